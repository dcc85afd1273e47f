"""The recommender's catalog: stable rows, immutable snapshots, a durable JSONL journal.

Every item gets a row the first time it is seen and keeps it for the life of the process
(items are added or replaced, never removed), so catalog row indices fed to the model
(history, candidates, exclusions) and returned by it stay meaningful across updates.

Readers (Recommend) take `Catalog.current`, an immutable CatalogSnapshot, once per request:
a concurrent UpsertItems builds a *new* snapshot and publishes it with one assignment.
Per-row arrays live in buffers with spare capacity: appending rows writes beyond the size
older snapshots can see (their views end before it), so an append costs O(new rows); a
replaced item copies the arrays first (copy-on-write), so nothing a reader holds changes
under it. The id list and the id -> row dict are shared and append-only for the same
reason (a row is valid in a snapshot when it is < its size).

Titles are embedded once per distinct title (the frozen sentence encoder does not depend
on the model version) into a text table; rows point into it. A replaced title leaves its
embedding behind (older snapshots may still read it), so the table (and the category list)
is compacted once dead entries outnumber live ones: new arrays, rows remapped, memory bounded
by the live items however often the same ids are replaced. The per-version item vectors
(item tower output) are not here: see services.recommender.item_index.ItemIndex.

Departments: every item is in one department (a namespace such as "grocery" or "films");
the default one is "" (items upserted without one, every item of a model version's
catalog.jsonl, every journal line written before departments existed). A snapshot gives the
rows of a set of departments (cached per snapshot), which a Recommend scoped to departments
restricts the ranking to. Department names are few and never compacted.

Durability: every upsert is appended to the journal (one JSON object per line: item_id,
title, category, price, and department when not the default) and fsync'd before it is applied, so an answered UpsertItems
survives a crash. Lines are written and read line-safe (shared.jsonl: ASCII-escaped,
split on b"\n" only), and an unreadable line is skipped, logged and counted, never fatal:
one bad append (ours or a feed's) must not stop the follower or a restart. At start the
journal is replayed (the last line of an item wins; a line torn by a crash mid-append is
cut off first); when there is none, it is seeded from the model version's catalog.jsonl;
when replaced items make up most of it, it is compacted (atomic rename). The trainer reads
the same file (with the same shared.jsonl reader) to learn items it has not seen.

The Redis mode (the service's redis_url) keeps no file: the shared catalog on Redis
(services.recommender.redis_state.RedisCatalogJournal) is the journal; this class is loaded
from its snapshot (`load_records`) and applies upserts with journal=False, its own and those it
follows (services.recommender.catalog_updates).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from services.recommender.catalog_records import ItemRecord, _fsync_dir, read_jsonl, write_jsonl
from shared.jsonl import read_records

__all__ = ["COMPACT_MIN_DEAD", "Catalog", "CatalogSnapshot", "ItemRecord", "read_jsonl", "write_jsonl"]

log = logging.getLogger(__name__)

TEXT_DIM = 384
# Compact the text table / category list when dead entries exceed both the live ones and
# this (so a small catalog is not rebuilt on every replacement). Compaction copies the live
# entries: amortised O(1) per replaced title.
COMPACT_MIN_DEAD = 256
Embed = Callable[[Sequence[str]], np.ndarray]  # titles -> float32 [n, TEXT_DIM]


@dataclasses.dataclass(frozen=True, eq=False)
class CatalogSnapshot:
    """The catalog as one request sees it. Rows [0, size) are valid; nothing here changes."""

    generation: int  # bumped by every applied upsert
    size: int
    ids: list[str]  # shared, append-only: read only [:size]
    row_of: dict[str, int]  # shared, append-only: a row >= size is not in this snapshot
    categories: list[str]  # shared, append-only category names
    category: np.ndarray  # int32 [size]: index into categories
    price: np.ndarray  # float32 [size]
    text_row: np.ndarray  # int32 [size]: row of the title's embedding in `texts`
    texts: np.ndarray  # float32 [T, TEXT_DIM]
    revision: np.ndarray  # int64 [size]: generation that last wrote each row
    departments: list[str]  # shared, append-only department names
    department: np.ndarray  # int32 [size]: index into departments
    _scopes: dict = dataclasses.field(default_factory=dict, repr=False)  # departments -> rows (cache)

    def scope(self, names: Iterable[str]) -> tuple[np.ndarray, frozenset[int]]:
        """Rows (ascending, and as a set) of the items in any of these departments; names not in
        the catalog add none. Cached per snapshot: requests scoped to a department cost one scan
        of the department column per catalog change, not one per request."""
        key = frozenset(names)
        got = self._scopes.get(key)
        if got is None:
            codes = [i for i, name in enumerate(self.departments) if name in key]
            rows = np.flatnonzero(np.isin(self.department, codes)) if codes else np.zeros(0, np.int64)
            got = (rows, frozenset(rows.tolist()))
            if len(self._scopes) >= 64:  # bounded: scopes are few (pages); a flood of new ones must not grow it
                self._scopes.clear()
            self._scopes[key] = got
        return got

    def row(self, item_id: str) -> int | None:
        r = self.row_of.get(item_id)
        return r if r is not None and r < self.size else None

    def item_id(self, row: int) -> str:
        return self.ids[row]

    def category_of(self, row: int) -> str:
        return self.categories[self.category[row]]

    def text_vectors(self, rows: np.ndarray) -> np.ndarray:
        return self.texts[self.text_row[rows]]


def _grow(buf: np.ndarray, needed: int) -> np.ndarray:
    if needed <= len(buf):
        return buf
    cap = max(needed, 2 * len(buf), 1024)
    out = np.zeros((cap, *buf.shape[1:]), buf.dtype)
    out[: len(buf)] = buf
    return out


class Catalog:
    """Writer side of the catalog; `current` is the published snapshot readers use."""

    def __init__(self, journal_path: str | os.PathLike[str], embed: Embed | None = None) -> None:
        self.path = Path(journal_path)
        self.embed = embed  # set before load/upsert (the text encoder comes from the registry)
        self._lock = threading.Lock()  # one writer at a time (upserts, the loader thread's seeding)
        self.loaded = False
        self._ids: list[str] = []
        self._row_of: dict[str, int] = {}
        self._titles: list[str] = []  # per row; writer-side only (detects changed titles)
        self._categories: list[str] = []
        self._category_index: dict[str, int] = {}
        self._text_row_of: dict[str, int] = {}  # title -> row in the text table
        self._text_refs: list[int] = []  # per text-table row: catalog rows using it (0 = dead)
        self._live_texts = 0
        self._category_refs: list[int] = []  # per category: catalog rows in it
        self._departments: list[str] = [""]  # append-only; "" (code 0) is the default department
        self._department_index: dict[str, int] = {"": 0}
        self._department = np.zeros(0, np.int32)
        self._live_categories = 0
        self.compactions = 0  # text-table/category compactions (tests, logs)
        self._category = np.zeros(0, np.int32)
        self._price = np.zeros(0, np.float32)
        self._text_row = np.zeros(0, np.int32)
        self._revision = np.zeros(0, np.int64)
        self._texts = np.zeros((0, TEXT_DIM), np.float32)
        self._n_texts = 0
        self._pos = 0  # journal bytes read so far (see read_appended)
        self._inode: int | None = None
        self.latest = self._snapshot(0, 0)
        self.current = self.latest

    # ---- reading ----
    def _snapshot(self, generation: int, size: int) -> CatalogSnapshot:
        return CatalogSnapshot(generation, size, self._ids, self._row_of, self._categories,
                               self._category[:size], self._price[:size], self._text_row[:size],
                               self._texts[: self._n_texts], self._revision[:size], self._departments,
                               self._department[:size])

    def __len__(self) -> int:
        return self.current.size

    def title(self, item_id: str) -> str | None:
        r = self._row_of.get(item_id)
        return None if r is None else self._titles[r]

    # ---- loading ----
    def ensure_loaded(self, seed: str | os.PathLike[str] | None = None) -> CatalogSnapshot:
        """Replay the journal (seeding it first from `seed`, a catalog.jsonl, when there is no
        journal yet) and publish the result. Idempotent; thread-safe."""
        with self._lock:
            if self.loaded:
                return self.current
            if not self.path.exists():
                if seed is None or not Path(seed).is_file():
                    raise FileNotFoundError(f"no catalog journal at {self.path} and no catalog.jsonl to seed it from")
                self._seed_journal(Path(seed))
            self._repair_tail()
            items = self._read_from(0)
            if len(items) > 10_000 and len(items) > 2 * len({it.item_id for it in items}):
                self._compact(items)
            if items:
                self._apply(items, generation=1)
            self.current = self.latest
            self.loaded = True
            log.info("catalog: %d items from %s (%d distinct titles)", self.latest.size, self.path, self._n_texts)
            return self.current

    def load_records(self, items: Sequence[ItemRecord], source: str) -> CatalogSnapshot:
        """Load the catalog from items read elsewhere (the Redis mode: the shared catalog's
        snapshot) instead of the journal file, and publish it. Idempotent; thread-safe."""
        with self._lock:
            if self.loaded:
                return self.current
            if items:
                self._apply(items, generation=1)
            self.current = self.latest
            self.loaded = True
            log.info("catalog: %d items from %s (%d distinct titles)", self.latest.size, source, self._n_texts)
            return self.current

    def _repair_tail(self) -> None:
        """Cut a torn last line (a crash mid-append) off the journal, so the next append starts
        on a line of its own instead of gluing onto the fragment."""
        size = self.path.stat().st_size
        if size == 0:
            return
        with open(self.path, "rb+") as f:
            keep = size
            while keep > 0:  # find the last newline, reading backwards in blocks
                start = max(0, keep - 65536)
                f.seek(start)
                block = f.read(keep - start)
                nl = block.rfind(b"\n")
                if nl >= 0:
                    keep = start + nl + 1
                    break
                keep = start
            if keep < size:
                log.warning("catalog %s: cutting a torn last line (%d bytes)", self.path, size - keep)
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def _compact(self, items: list[ItemRecord]) -> None:
        """Rewrite the journal with one line per item (the last one) when replaced items make up
        most of it. Atomic (write beside, fsync, rename): readers see the old or the new file;
        the trainer's reader re-reads a replaced file from the start."""
        last = list({it.item_id: it for it in items}.values())
        tmp = self.path.with_name(self.path.name + ".compact")
        write_jsonl(tmp, last, fsync=True)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        st = self.path.stat()
        self._inode, self._pos = st.st_ino, st.st_size
        log.info("catalog %s: compacted %d lines to %d items", self.path, len(items), len(last))

    def _seed_journal(self, seed: Path) -> None:
        items = read_jsonl(seed)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.seed-{os.getpid()}")  # workers may seed at once
        with open(tmp, "w", encoding="ascii") as f:
            for item in items:
                f.write(item.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:  # create-if-absent: a worker that seeded first (and may have appended since) wins
            os.link(tmp, self.path)
        except FileExistsError:
            log.info("catalog: %s was seeded by another process", self.path)
            return
        finally:
            os.unlink(tmp)
        _fsync_dir(self.path.parent)
        log.info("catalog: seeded %s with %d items from %s", self.path, len(items), seed)

    # ---- following the journal (other writers: service workers, a catalog feed) ----
    def _read_from(self, pos: int) -> list[ItemRecord]:
        """Whole lines from byte `pos` on; advances the position past them (a line still being
        written is left for the next read; an unreadable line is skipped, logged and counted:
        the position moves past it, so it is never retried and never blocks what follows)."""
        with open(self.path, "rb") as f:
            self._inode = os.fstat(f.fileno()).st_ino
            f.seek(pos)
            data = f.read()
        out, end = read_records(data, f"catalog {self.path} (from byte {pos})", "recommender", ItemRecord.from_json)
        self._pos = pos + end
        return out

    def read_appended(self) -> list[ItemRecord]:
        """Items appended to the journal since it was last read, that differ from what this
        catalog holds (its own appends read back equal and are dropped). A replaced file
        (compacted by another process) is read again from the start."""
        with self._lock:
            if not self.loaded:
                return []
            try:
                st = self.path.stat()
            except FileNotFoundError:
                return []
            pos = 0 if st.st_ino != self._inode or st.st_size < self._pos else self._pos
            if st.st_size == pos and pos:
                return []
            items = list({it.item_id: it for it in self._read_from(pos)}.values())
            return [it for it in items if self._differs(it)]

    def changed(self, items: Sequence[ItemRecord]) -> list[ItemRecord]:
        """The items (the last line of each) that differ from what this catalog holds: what a
        follower still has to apply (its own upserts, read back, are dropped)."""
        with self._lock:
            return [it for it in {it.item_id: it for it in items}.values() if self._differs(it)]

    def _differs(self, it: ItemRecord) -> bool:
        row = self._row_of.get(it.item_id)
        if row is None:
            return True
        return (self._titles[row] != it.title or self._categories[self._category[row]] != it.category
                or float(self._price[row]) != np.float32(it.price)
                or self._departments[self._department[row]] != it.department)

    # ---- writing ----
    def plan(self, items: Sequence[ItemRecord]) -> tuple[int, int, list[str]]:
        """(new items, replaced items, titles that need an embedding) for an upsert."""
        new = sum(1 for it in items if it.item_id not in self._row_of)
        titles = sorted({it.title for it in items if it.title not in self._text_row_of})
        return new, len(items) - new, titles

    def upsert(self, items: Sequence[ItemRecord], title_vectors: dict[str, np.ndarray] | None = None,
               journal: bool = True) -> CatalogSnapshot:
        """Journal (fsync) then apply; returns the new snapshot WITHOUT publishing it (the
        caller publishes it together with the item vectors made for it). title_vectors:
        embeddings of titles not yet in the text table (else self.embed computes them).
        journal=False: items read from the journal (another writer's), applied only."""
        with self._lock:
            if not self.loaded:
                raise RuntimeError("catalog not loaded yet")
            if journal:
                # one write() on an O_APPEND descriptor: lines of concurrent writers (other
                # service workers) never interleave (a buffered file would split large writes)
                data = "".join(it.to_json() + "\n" for it in items).encode("ascii")
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            return self._apply(items, self.latest.generation + 1, title_vectors)

    def publish(self, snapshot: CatalogSnapshot) -> None:
        if snapshot.generation > self.current.generation:
            self.current = snapshot

    def _apply(self, items: Sequence[ItemRecord], generation: int,
               title_vectors: dict[str, np.ndarray] | None = None) -> CatalogSnapshot:
        last: dict[str, ItemRecord] = {}
        for it in items:  # a later line of the same item wins
            last[it.item_id] = it
        items = list(last.values())
        missing = sorted({it.title for it in items if it.title not in self._text_row_of
                          and not (title_vectors and it.title in title_vectors)})
        vectors = dict(title_vectors or {})
        if missing:
            if self.embed is None:
                raise RuntimeError("catalog has no text encoder")
            for t, v in zip(missing, self.embed(missing)):
                vectors[t] = v
        old_size = self.latest.size
        replaced = [it for it in items if it.item_id in self._row_of]
        if replaced:  # copy-on-write: snapshots already handed out keep their arrays
            self._category = self._category.copy()
            self._price = self._price.copy()
            self._text_row = self._text_row.copy()
            self._revision = self._revision.copy()
            self._department = self._department.copy()
        size = old_size + sum(1 for it in items if it.item_id not in self._row_of)
        self._category = _grow(self._category, size)
        self._price = _grow(self._price, size)
        self._text_row = _grow(self._text_row, size)
        self._revision = _grow(self._revision, size)
        self._department = _grow(self._department, size)
        new_titles = [t for t in dict.fromkeys(it.title for it in items) if t not in self._text_row_of]
        if new_titles:
            self._texts = _grow(self._texts, self._n_texts + len(new_titles))
            for t in new_titles:
                self._texts[self._n_texts] = vectors[t]
                self._text_row_of[t] = self._n_texts
                self._text_refs.append(0)
                self._n_texts += 1
        for it in items:
            row = self._row_of.get(it.item_id)
            if row is None:
                row = len(self._ids)
                self._ids.append(it.item_id)
                self._titles.append(it.title)
                self._row_of[it.item_id] = row
            else:
                self._titles[row] = it.title
                self._unref(int(self._text_row[row]), int(self._category[row]))
            c = self._category_index.get(it.category)
            if c is None:
                c = self._category_index[it.category] = len(self._categories)
                self._categories.append(it.category)
                self._category_refs.append(0)
            t = self._text_row_of[it.title]
            self._ref(t, c)
            self._category[row] = c
            self._price[row] = it.price
            self._text_row[row] = t
            self._revision[row] = generation
            dept = self._department_index.get(it.department)
            if dept is None:
                dept = self._department_index[it.department] = len(self._departments)
                self._departments.append(it.department)
            self._department[row] = dept
        self._compact_tables(size)
        self.latest = self._snapshot(generation, size)
        return self.latest

    # ---- reclaiming replaced titles and categories ----
    def _ref(self, text: int, category: int) -> None:
        self._live_texts += self._text_refs[text] == 0
        self._text_refs[text] += 1
        self._live_categories += self._category_refs[category] == 0
        self._category_refs[category] += 1

    def _unref(self, text: int, category: int) -> None:
        self._text_refs[text] -= 1
        self._live_texts -= self._text_refs[text] == 0
        self._category_refs[category] -= 1
        self._live_categories -= self._category_refs[category] == 0

    def _compact_tables(self, size: int) -> None:
        """Drop text-table rows and categories no item uses any more, once they outnumber the
        live ones. Without this, replacing the same ids with new titles grew the table (and
        memory) by one embedding per new title, forever. Everything is rebuilt into NEW
        arrays and lists: snapshots already handed out keep reading the old ones."""
        dead_texts = self._n_texts - self._live_texts
        if dead_texts > max(self._live_texts, COMPACT_MIN_DEAD):
            keep = [t for t in range(self._n_texts) if self._text_refs[t] > 0]
            remap = np.full(max(self._n_texts, 1), -1, np.int32)
            remap[keep] = np.arange(len(keep), dtype=np.int32)
            texts = np.zeros((max(1024, 2 * len(keep)), TEXT_DIM), np.float32)
            texts[: len(keep)] = self._texts[keep]
            self._text_row_of = {title: int(remap[t]) for title, t in self._text_row_of.items() if remap[t] >= 0}
            self._text_refs = [self._text_refs[t] for t in keep]
            text_row = self._text_row.copy()
            text_row[:size] = remap[self._text_row[:size]]
            self._texts, self._n_texts, self._text_row = texts, len(keep), text_row
            self.compactions += 1
            log.info("catalog: compacted the text table: %d live titles, %d replaced ones dropped", len(keep),
                     dead_texts)
        dead_categories = len(self._categories) - self._live_categories
        if dead_categories > max(self._live_categories, COMPACT_MIN_DEAD):
            keep = [c for c in range(len(self._categories)) if self._category_refs[c] > 0]
            remap = np.full(len(self._categories), -1, np.int32)
            remap[keep] = np.arange(len(keep), dtype=np.int32)
            self._categories = [self._categories[c] for c in keep]
            self._category_index = {name: i for i, name in enumerate(self._categories)}
            self._category_refs = [self._category_refs[c] for c in keep]
            category = self._category.copy()
            category[:size] = remap[self._category[:size]]
            self._category = category
            self.compactions += 1
            log.info("catalog: compacted the category list: %d live, %d unused dropped", len(keep), dead_categories)
