"""The recommender's item index: one model version's item tower and the catalog's item vectors
it computed, kept in sync with the catalog (services.recommender.adapter serves with it).

Per version, at load time (ModelLoader.prepare, in the loader thread, before the version
serves), VersionItems computes the whole catalog's item vectors with that version's own
item tower: a hot swap never pairs one version's user tower with another's item vectors.
The catalog matrix is a shared (unbatched) input of the batcher: every request against the
same catalog snapshot and version shares one session run.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from typing import Mapping

import numpy as np

from services.recommender.catalog import CatalogSnapshot
from shared.runtime.model import LoadedModel, ModelRejected
from shared.runtime.session import RuntimeOptions, create_session

# the model contract: the scoring graph's and the item tower's inputs and outputs
INPUTS = {"user": "INT64", "history": "INT64", "context": "INT64", "k": "INT64", "restrict": "INT64",
          "exclude": "INT64", "item_vectors": "FP32"}
OUTPUTS = {"items": "INT64", "score": "FP32", "click": "FP32", "purchase": "FP32"}
ITEM_TOWER_INPUTS = {"item": "INT64", "text": "FP32", "category": "INT64", "price": "FP32"}
TOWER_CHUNK = 4096  # catalog rows per item tower run


def _check_graph(session, expected: Mapping[str, str], what: str) -> None:
    types = {"tensor(int64)": "INT64", "tensor(float)": "FP32"}
    got = {a.name: types.get(a.type, a.type) for a in session.get_inputs()}
    if got != dict(expected):
        raise ModelRejected(f"{what} inputs are {got}, the contract says {dict(expected)}")


def find_sorted(ascending: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position, found) of each of q in the ascending array: a binary search each; a position
    means something only where found."""
    if not len(ascending):
        return np.zeros(q.shape, np.int64), np.zeros(q.shape, bool)
    at = np.minimum(np.searchsorted(ascending, q), len(ascending) - 1)
    return at, ascending[at] == q


@dataclasses.dataclass(eq=False)
class ItemIndex:
    """One version's item vectors for one catalog snapshot (rows [0, size))."""

    generation: int
    size: int
    buffer: np.ndarray  # [capacity, Dv]; rows >= size are free for a later append
    vectors: np.ndarray  # buffer[:size]: the shared model input (one object per index)
    revisions: np.ndarray  # the catalog row revisions these vectors were computed from
    appended: bool = False  # a later index already appended into this buffer (the next one copies)
    # rows (ascending) of items this version has no id for, or an untrained one (vocab.json's
    # cold_items): brand-new items, served on their title/category/price alone (the candidates
    # of the exploration slot)
    unlearned: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    def is_unlearned(self, rows: list[int]) -> np.ndarray:
        """Which of these rows are unlearned (`unlearned` is ascending: find_sorted)."""
        return find_sorted(self.unlearned, np.asarray(rows, np.int64))[1]


class VersionItems:
    """What one model version needs beyond its scoring graph: its item tower, vocabularies,
    manifest parameters, and the catalog's item vectors computed by it (kept in sync)."""

    def __init__(self, model: LoadedModel, options: RuntimeOptions) -> None:
        folder = model.path.parent
        self.version = model.version
        extra = model.manifest.extra if model.manifest is not None else json.loads(
            (folder / "manifest.json").read_text())["extra"]
        self.history_len = int(extra["history_len"])
        self.dim = int(extra["item_vector_dim"])
        self.pages = {p.lower(): i + 1 for i, p in enumerate(extra["pages"])}
        self.devices = {d.lower(): i + 1 for i, d in enumerate(extra["devices"])}
        for name in ("item_tower.onnx", "vocab.json"):
            if not (folder / name).is_file():
                raise ModelRejected(f"version {model.version} has no {name}")
        vocab = json.loads((folder / "vocab.json").read_text())
        self.user_code = {u: i + 1 for i, u in enumerate(vocab["users"])}
        self.item_code = {it: i + 1 for i, it in enumerate(vocab["items"])}
        self.category_code = {c: i + 1 for i, c in enumerate(vocab["categories"])}
        # items with a code but no interaction yet (untrained id rows): explored like unknown ones
        self.cold_items = frozenset(vocab.get("cold_items", ()))
        _check_graph(model.created.session, INPUTS, "model.onnx")
        outs = {o.name for o in model.created.session.get_outputs()}
        if outs != set(OUTPUTS):
            raise ModelRejected(f"model.onnx outputs are {sorted(outs)}, the contract says {sorted(OUTPUTS)}")
        self.tower = create_session(folder / "item_tower.onnx", options).session
        _check_graph(self.tower, ITEM_TOWER_INPUTS, "item_tower.onnx")
        self._lock = threading.Lock()
        self.index: ItemIndex | None = None

    # ---- item vectors ----
    def tower_vectors(self, snap: CatalogSnapshot, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), np.float32)
        ids, cats = snap.ids, snap.categories
        for s in range(0, len(rows), TOWER_CHUNK):
            r = rows[s:s + TOWER_CHUNK]
            feeds = {
                "item": np.array([self.item_code.get(ids[i], 0) for i in r], np.int64).reshape(-1, 1),
                "text": snap.text_vectors(r),
                "category": np.array([self.category_code.get(cats[c], 0) for c in snap.category[r]],
                                     np.int64).reshape(-1, 1),
                "price": snap.price[r].astype(np.float32).reshape(-1, 1),
            }
            y = self.tower.run(["item_vector"], feeds)[0]
            if y.shape != (len(r), self.dim):
                raise ModelRejected(f"item tower returned {y.shape}, expected {(len(r), self.dim)}")
            out[s:s + len(r)] = y
        if not np.isfinite(out).all():
            raise ModelRejected("item tower returned non-finite vectors")
        return out

    def build(self, snap: CatalogSnapshot) -> ItemIndex:
        """Item vectors for `snap`, computing only rows added or rewritten since the newest
        index this version has (the whole catalog the first time). Thread-safe; does not
        publish the result (see publish)."""
        with self._lock:
            base = self.index
            if base is not None and base.generation == snap.generation:
                return base
            if base is None or base.generation > snap.generation or base.size > snap.size:
                rows = np.arange(snap.size)
                buffer = np.zeros((max(snap.size, 1), self.dim), np.float32)
                first_new, known = 0, np.zeros(0, np.int64)
            else:
                first_new, known = base.size, base.unlearned
                changed = np.flatnonzero(snap.revision[: base.size] != base.revisions)
                rows = np.concatenate([changed, np.arange(base.size, snap.size)])
                buffer = base.buffer
                if len(changed) or base.appended or snap.size > len(buffer):
                    # copy-on-write: runs in flight read the old buffer
                    fresh = np.zeros((max(snap.size, 2 * base.size, 1024), self.dim), np.float32)
                    fresh[: base.size] = base.vectors
                    buffer = fresh
                else:
                    base.appended = True  # rows beyond base.size are invisible to base's view
            if len(rows):
                buffer[rows] = self.tower_vectors(snap, rows)
            # a row's item id never changes: only rows added since the base can be new unlearned ones
            code, cold = self.item_code, self.cold_items
            added = [r for r in range(first_new, snap.size) if snap.ids[r] not in code or snap.ids[r] in cold]
            unlearned = np.concatenate([known, np.asarray(added, np.int64)])
            return ItemIndex(snap.generation, snap.size, buffer, buffer[: snap.size], snap.revision.copy(),
                             unlearned=unlearned)

    def publish(self, index: ItemIndex) -> None:
        with self._lock:
            if self.index is None or index.generation > self.index.generation:
                self.index = index

    def index_for(self, snap: CatalogSnapshot) -> ItemIndex:
        idx = self.index
        if idx is not None and idx.generation == snap.generation:
            return idx
        # this version was loaded while the catalog moved on: catch up (a few rows, usually)
        idx = self.build(snap)
        self.publish(idx)
        return idx
