"""services.recommender.redis_state.RedisCatalogJournal on a real redis-server: an upsert written
through one replica reaches another replica's blocking read, a starting replica loads the whole
catalog, a follower that fell behind the capped stream reloads, and an unreadable line is skipped."""
from __future__ import annotations

import asyncio

import pytest

from services.recommender.catalog_records import ItemRecord
from services.recommender.redis_state import CatalogPosition, RedisCatalogJournal
from shared.redis_conn import redis_client
from tests.redis_server import redis_server  # noqa: F401  (fixture)


@pytest.fixture
async def clients(redis_server):
    a, b = redis_client(redis_server.url), redis_client(redis_server.url)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


def item(n: int, title: str | None = None, department: str = "") -> ItemRecord:
    return ItemRecord(f"sku-{n}", title or f"item {n} \u00e9t\u00e9", f"cat-{n % 3}", 1.5 * n, department)


class Follower:
    """What a replica does with the journal: load the snapshot, then apply changes, reloading
    when told to (the wiring in the recommender does the same with its Catalog)."""

    def __init__(self, journal: RedisCatalogJournal) -> None:
        self.journal = journal
        self.items: dict[str, ItemRecord] = {}
        self.position = CatalogPosition()
        self.reloads = 0

    async def load(self) -> None:
        items, self.position = await self.journal.snapshot()
        self.items = {it.item_id: it for it in items}
        self.reloads += 1

    async def step(self, block_s: float = 5.0) -> list[ItemRecord]:
        changes = await self.journal.changes(self.position, block_s)
        if changes.reload:
            await self.load()
            return []
        for it in changes.items:
            self.items[it.item_id] = it
        self.position = changes.position
        return changes.items


async def test_an_upsert_on_replica_a_reaches_replica_b_blocking_read(clients):
    a = RedisCatalogJournal(clients[0])
    b = Follower(RedisCatalogJournal(clients[1]))
    assert await a.seed([item(1), item(2)])
    await b.load()
    assert sorted(b.items) == ["sku-1", "sku-2"]
    # B is already waiting when A writes: the read returns with A's upsert
    waiting = asyncio.ensure_future(b.step(block_s=30))
    seq = await a.append([item(3, department="films"), item(1, "renamed")])
    assert await asyncio.wait_for(waiting, 30) == [item(3, department="films"), item(1, "renamed")]
    assert b.position.seq == seq
    assert b.items["sku-1"].title == "renamed" and b.items["sku-3"].department == "films"
    # nothing new: an empty answer at the same position
    assert await b.step(block_s=0.05) == [] and b.position.seq == seq
    # a replica starting now loads the same catalog without replaying anything
    c = Follower(RedisCatalogJournal(clients[0]))
    await c.load()
    assert c.items == b.items and c.position == b.position


async def test_seeding_fills_an_empty_catalog_once_and_followers_reload(clients):
    a, b = RedisCatalogJournal(clients[0]), RedisCatalogJournal(clients[1])
    follower = Follower(b)
    await follower.load()
    assert follower.items == {} and follower.position == CatalogPosition()
    assert await a.seed([item(n) for n in range(1200)])  # more lines than one Lua unpack() slice
    assert not await b.seed([item(9999)])  # the catalog has items: the second version's seed is ignored
    await follower.step()  # the seed entry: reload
    assert follower.reloads == 2 and len(follower.items) == 1200 and "sku-9999" not in follower.items


async def test_a_follower_behind_the_capped_stream_reloads(clients):
    writer = RedisCatalogJournal(clients[0], maxlen=10)
    follower = Follower(RedisCatalogJournal(clients[1], maxlen=10))
    await writer.append([item(0)])
    await follower.load()
    for n in range(1, 400):  # the stream keeps about the last 10 (trimmed by whole nodes of 100)
        await writer.append([item(n)])
    assert await clients[0].xlen(writer.log_key) < 399
    await follower.step()
    assert follower.reloads == 2 and len(follower.items) == 400
    assert await follower.step(block_s=0.05) == []


async def test_an_unreadable_line_is_skipped_not_fatal(clients):
    journal = RedisCatalogJournal(clients[0])
    await journal.append([item(1)])
    await clients[0].hset(journal.items_key, "broken", '{"item_id": "broken", "title": 5}')
    items, _ = await journal.snapshot()
    assert [it.item_id for it in items] == ["sku-1"]
    with pytest.raises(ValueError):
        await journal.append([])


async def test_an_answered_upsert_survives_a_redis_kill(redis_server, clients):
    assert redis_server.appendfsync == "always"
    journal = RedisCatalogJournal(clients[0])
    seq = await journal.append([item(1), item(2)])
    redis_server.kill()
    redis_server.start()
    items, position = await journal.snapshot()
    assert items == [item(1), item(2)] and position.seq == seq
    assert await journal.append([item(3)]) == seq + 1


async def test_the_trainer_reads_what_the_services_upsert(redis_server, clients):
    """The trainer's reader (trainer/domains/recommender_catalog.RedisCatalogReader, chosen by the
    trainer's event_log_url) on what the service's journal writes: the whole catalog first, then
    each upsert once, the whole catalog again after a gap in the capped stream."""
    from trainer.domains.recommender import model_from_settings
    from trainer.settings import TrainerSettings

    journal = RedisCatalogJournal(clients[0])
    settings = TrainerSettings(event_log_url=redis_server.url)
    reader = model_from_settings(settings).journal
    assert reader.read_new() == []  # nothing there yet
    await journal.seed([item(1), item(2)])
    await journal.append([item(3)])

    def ids(records) -> list[str]:
        return sorted(r["item_id"] for r in records)

    assert ids(reader.read_new()) == ["sku-1", "sku-2", "sku-3"]
    assert reader.read_new() == []
    await journal.append([item(4, "a new title")])
    [new] = reader.read_new()
    assert new == {"item_id": "sku-4", "title": "a new title", "category": "cat-1", "price": 6.0}
    # upserts while the trainer is not reading, the capped stream trimmed past them: a gap in the
    # sequence numbers, so the whole catalog again
    for n in (5, 6, 7):
        await journal.append([item(n)])
    await clients[0].xtrim(journal.log_key, maxlen=1, approximate=False)  # what MAXLEN ~ does to a busy stream
    assert ids(reader.read_new()) == [f"sku-{n}" for n in range(1, 8)]
    assert reader.read_new() == []
    await journal.append([item(8)])
    assert ids(reader.read_new()) == ["sku-8"]  # and then on from there, one upsert at a time
    # the file journal is the default (no event_log_url); catalog_redis_url names another server than the log's
    assert type(model_from_settings(TrainerSettings()).journal).__name__ == "CatalogJournal"
    other = model_from_settings(TrainerSettings(catalog_redis_url=redis_server.url)).journal
    assert ids(other.read_new()) == [f"sku-{n}" for n in range(1, 9)]
    assert any("catalog_redis_url" in p for p in TrainerSettings(catalog_redis_url="http://x:1").validate())
