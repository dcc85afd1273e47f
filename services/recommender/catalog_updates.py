"""Catalog updates while the recommender serves: UpsertItems (validate, embed the new titles in
chunks that honour the deadline, journal, item vectors of every loaded version, publish) and
following the journal other writers append to (the file, or in the Redis mode the shared
catalog's stream every replica writes). A mixin of
services.recommender.adapter.RecommenderService, which holds the catalog, the served model and
the text encoder it uses."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Sequence

import numpy as np
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from protos.recommender.v1 import recommender_pb2 as pb
from services.recommender.catalog import CatalogSnapshot, ItemRecord
from services.recommender.catalog_records import items_of_request
from services.recommender.item_index import VersionItems
from services.recommender.redis_state import CatalogPosition
from shared.errors import DeadlineExceeded, Unavailable

log = logging.getLogger(__name__)

EMBED_CHUNK_CHARS = 4096  # title characters per encoder call: deadline/cancellation is checked between calls
EMBED_CHUNK_TITLES = 64

CATALOG_ITEMS = Gauge("storefront_recommender_catalog_items", "Items in the recommender's catalog")
UPSERTED = Counter("storefront_recommender_upserted_items_total", "Items upserted, by kind (inserted, updated)",
                   ["kind"])
UPSERTS_ABANDONED = Counter("storefront_recommender_upserts_abandoned_total",
                            "UpsertItems (or journal catch-ups) stopped before anything was written, by reason "
                            "(deadline, cancelled)", ["reason"])


def embed_chunks(titles: Sequence[str], max_chars: int = EMBED_CHUNK_CHARS,
                 max_titles: int = EMBED_CHUNK_TITLES) -> list[list[str]]:
    """Titles in groups of about max_chars characters (at least one title each): each group
    is one encoder call, short enough (~0.5 s of CPU at most) that a deadline or a
    cancellation is noticed soon after it passes."""
    out: list[list[str]] = []
    chunk: list[str] = []
    chars = 0
    for t in titles:
        if chunk and (chars + len(t) > max_chars or len(chunk) >= max_titles):
            out.append(chunk)
            chunk, chars = [], 0
        chunk.append(t)
        chars += len(t)
    if chunk:
        out.append(chunk)
    return out


class CatalogUpdates:
    """UpsertItems and the journal follower (see the module doc)."""

    def validate_items(self, request: pb.UpsertItemsRequest) -> list[ItemRecord]:
        return items_of_request(request, self.upsert_max_items, self.title_max_chars, self.category_max_chars)

    async def upsert(self, request: pb.UpsertItemsRequest, deadline: float | None = None) -> pb.UpsertItemsResponse:
        """Embed the new titles, then journal (fsync), compute the item vectors of every loaded
        version, and publish catalog and vectors together: a Recommend that starts after the
        answer sees them. deadline: time.monotonic() by which the caller stops waiting."""
        items = self.validate_items(request)
        if self.served.current is None or not self.catalog.loaded:
            raise Unavailable(f"model {self.served.name!r} is not loaded yet")
        inserted, updated, size = await self._apply_items(items, journal=True, deadline=deadline)
        return pb.UpsertItemsResponse(inserted=inserted, updated=updated, catalog_size=size)

    async def _apply_items(self, items: list[ItemRecord], journal: bool,
                           deadline: float | None = None, only_changed: bool = False) -> tuple[int, int, int]:
        """Two phases. Embedding (the expensive part: the sentence encoder) runs in chunks and
        stops at the deadline (DEADLINE_EXCEEDED) or when the call is cancelled (the client
        went away, or the server is stopping past its grace), having written nothing: the
        encoder's cache is all it leaves. The commit (journal, apply, item vectors, publish)
        is cheap by comparison and runs to its end even if cancelled meanwhile: once a line is
        in the journal it will be applied at the next start anyway, so memory must match it."""
        async with self._upsert_lock:
            if only_changed:  # a follower: what differs now, under the lock (an upsert may just have applied it)
                items = await asyncio.to_thread(self.catalog.changed, items)
                if not items:
                    return 0, 0, self.catalog.latest.size
            inserted, updated, titles = self.catalog.plan(items)
            try:
                vectors = await self._embed(titles, deadline)
            except asyncio.CancelledError:
                UPSERTS_ABANDONED.labels("cancelled").inc()
                log.info("catalog: upsert of %d items cancelled while embedding; nothing written", len(items))
                raise
            commit = asyncio.ensure_future(self._commit(items, vectors, journal))
            try:
                snap = await asyncio.shield(commit)
            except asyncio.CancelledError:
                while not commit.done():  # keep the lock until the commit is published
                    try:
                        await asyncio.wait({commit})
                    except asyncio.CancelledError:
                        continue
                raise
        CATALOG_ITEMS.set(snap.size)
        UPSERTED.labels("inserted").inc(inserted)
        UPSERTED.labels("updated").inc(updated)
        return inserted, updated, snap.size

    async def _embed(self, titles: list[str], deadline: float | None) -> dict[str, np.ndarray]:
        vectors: dict[str, np.ndarray] = {}
        if not titles:
            return vectors
        encoder = self.text_encoder()
        for chunk in embed_chunks(titles):
            if deadline is not None and time.monotonic() >= deadline:
                UPSERTS_ABANDONED.labels("deadline").inc()
                log.info("catalog: upsert deadline passed after %d of %d titles embedded; nothing written",
                         len(vectors), len(titles))
                raise DeadlineExceeded(f"deadline exceeded after embedding {len(vectors)} of {len(titles)} "
                                       "new titles; nothing was written")
            self.titles_embedded += len(chunk)
            vectors.update(zip(chunk, await asyncio.to_thread(encoder.encode, chunk)))
        if deadline is not None and time.monotonic() >= deadline:
            UPSERTS_ABANDONED.labels("deadline").inc()
            raise DeadlineExceeded("deadline exceeded before the items were written; nothing was written")
        return vectors

    async def _commit(self, items: list[ItemRecord], vectors: dict[str, np.ndarray],
                      journal: bool) -> CatalogSnapshot:
        if journal and self.shared is not None:
            # the Redis mode: the shared catalog is the journal (every replica follows it); written
            # before it is applied here, as the file journal is
            try:
                await self.shared.journal.append(items)
            except RedisError as e:
                raise Unavailable(f"the shared catalog (Redis) could not be written: {e}") from e
            journal = False
        snap = await asyncio.to_thread(self.catalog.upsert, items, vectors, journal)
        states = []
        for m in self.served.loaded_models():  # the canary's vectors too: it answers requests
            if isinstance(m.prepared, VersionItems) and m.prepared not in states:
                states.append(m.prepared)
        built = [(st, await asyncio.to_thread(st.build, snap)) for st in states]
        for st, idx in built:  # no await from here: readers see catalog and vectors change together
            st.publish(idx)
        self.catalog.publish(snap)
        return snap

    async def follow_journal(self, interval_s: float) -> None:
        """Apply what other writers append to the catalog journal (the other workers of a
        `--workers N` service, a catalog feed writing JSONL lines), every interval_s. This
        process's own appends read back unchanged and cost nothing."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self.served.current is None:
                    continue
                items = await asyncio.to_thread(self.catalog.read_appended)
                if items:
                    await self._apply_items(items, journal=False)
                    log.info("catalog: applied %d items written to %s by another writer", len(items),
                             self.catalog.path)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad feed must not stop serving; the next round retries
                log.exception("catalog: following %s failed", self.catalog.path)

    async def follow_shared_catalog(self, retry_s: float = 1.0) -> None:
        """The Redis mode's follower: apply the upserts every replica writes to the shared
        catalog's stream (a blocking read: an upsert on another replica is applied here within
        milliseconds), from the position of the snapshot the catalog was loaded from. A gap
        (this replica fell behind the capped stream) or a seed entry: the whole snapshot again,
        its changed items applied. Redis unreachable: logged, retried every retry_s."""
        journal = self.shared.journal
        position: CatalogPosition | None = None
        while True:
            try:
                if position is None:
                    position = self.catalog_position  # set with the catalog's first load (prepare)
                    if position is None:
                        await asyncio.sleep(retry_s)  # no version loaded yet: nothing to apply to
                        continue
                changes = await journal.changes(position, block_s=1.0)
                items, after = changes.items, changes.position
                if changes.reload:
                    items, after = await journal.snapshot()
                if items:
                    inserted, updated, _ = await self._apply_items(items, journal=False, only_changed=True)
                    if inserted or updated:
                        log.info("catalog: applied %d new and %d updated items from the shared catalog", inserted,
                                 updated)
                position = after  # only once applied: a failure reads the same changes again
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis unreachable, a bad item: serving goes on; the next round retries
                log.exception("catalog: following the shared catalog failed; retrying in %.1f s", retry_s)
                await asyncio.sleep(retry_s)
