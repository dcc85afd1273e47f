"""No catalog input can brick the recommender or make one call unbounded (issue 11, items 3 and 6),
over real gRPC servers with the real sentence encoder:

- titles holding U+2028 / U+2029 / U+0085 survive a restart, and "x\\u2028 5 \\u2028y" (which split
  into a fragment that raised on load) does not stop the follower or a restart;
- an unreadable journal line is skipped, logged and counted, by the service and by the trainer;
- too long titles/categories and too many items are INVALID_ARGUMENT naming the item and field;
- an upsert past its deadline, or cut off by the server stopping, stops embedding and writes nothing;
- replacing the same ids with new titles does not grow the text table.
"""
from __future__ import annotations

import asyncio
import json
import random

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from protos.recommender.v1 import recommender_pb2 as pb
from protos.recommender.v1 import recommender_pb2_grpc as pb_grpc
from services.recommender.catalog import COMPACT_MIN_DEAD, ItemRecord
from services.recommender.main import RecommenderSettings, build
from shared.registry import ModelRegistry
from shared.text import MAX_CHARS_PER_TOKEN, MAX_TOKENS, TextEncoder, truncate_text
from tests.reco_onnx import publish_contract_version
from tests.server_harness import until
from tests.recommender_fixtures import exported_text_encoder, recommender_test_settings
from trainer.domains.recommender_catalog import CatalogJournal
from trainer.text_encoder import publish_text_encoder

TITLES = [("Organic whole milk 1 litre", "dairy"), ("Claw hammer with fibreglass handle", "tools"),
          ("Green tea bags, 80 pack", "drinks"), ("Cordless drill 18V", "tools")]
CATALOG = [{"item_id": f"sku-{i}", "title": t, "category": c, "price": 1.0 + i} for i, (t, c) in enumerate(TITLES)]
USERS = {"alice": ["sku-0", "sku-1"]}
SEPARATOR_TITLES = {"sep-2028": "Milk\u2028 2 litres", "sep-2029": "Tea\u2029bags", "sep-0085": "Drill\x85 18V",
                    "fragment": "x\u2028 5 \u2028y", "others": "a\x1cb\x1dc\x1ed\x0be\x0cf\rg\nh"}
WORDS = ("organic milk cordless drill green tea bags coffee beans hammer fibreglass handle pack litre "
         "stainless steel kettle cotton towel bamboo cutting board ceramic mug wireless mouse").split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalog-safety")
    registry = ModelRegistry(root / "registry")
    publish_text_encoder(registry, exported=exported_text_encoder())
    publish_contract_version(registry, root / "v1", CATALOG, USERS, dim=8, seed=1)
    return root, registry


settings = recommender_test_settings


class Running:
    """One recommender server on a free loopback port; .service is its domain core."""

    def __init__(self, s: RecommenderSettings) -> None:
        self.s = s
        self.stopped = False

    async def __aenter__(self) -> "Running":
        self.app, self.service = build(self.s)
        await self.app.start()
        self.channel = grpc.aio.insecure_channel(self.app.address)
        self.stub = pb_grpc.RecommenderStub(self.channel)
        return self

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.channel.close()
            await self.app.stop()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def serving(self) -> bool:
        resp = await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=""))
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def visible(self, item_id: str) -> bool:
        try:
            r = await self.stub.Recommend(pb.RecommendRequest(user_id="alice", k=1, candidate_item_ids=[item_id]))
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e  # unknown candidate: not there yet
            return False
        return [it.item_id for it in r.items] == [item_id]


def skipped(reader: str) -> float:
    return REGISTRY.get_sample_value("storefront_catalog_journal_skipped_lines_total", {"reader": reader}) or 0.0


def abandoned(reason: str) -> float:
    return REGISTRY.get_sample_value("storefront_recommender_upserts_abandoned_total", {"reason": reason}) or 0.0


def distinct_titles(n: int, chars: int, seed: int) -> list[str]:
    """n different realistic titles of about `chars` characters (never seen by the encoder's cache)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [f"#{seed}-{i}"]
        while sum(len(w) + 1 for w in words) < chars:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words)[:chars])
    return out


async def test_titles_with_unicode_line_separators_survive_a_restart(world):
    root, registry = world
    s = settings(root, registry, "separators")
    items = [pb.Item(item_id=k, title=t, category="misc\u2028cat", price=2.0) for k, t in SEPARATOR_TITLES.items()]
    async with Running(s) as r:
        await r.stub.UpsertItems(pb.UpsertItemsRequest(items=items))
        raw = (root / "separators" / "items.jsonl").read_bytes()
        for sep in ("\u2028", "\u2029", "\x85"):  # written escaped: no reader can take them for a line break
            assert sep.encode("utf-8") not in raw
        # the follower re-reads the journal it wrote: a fragment would make it raise every round
        assert r.service.catalog.read_appended() == []
    async with Running(s) as r:  # a restart replays the journal
        assert await r.serving()
        catalog = r.service.catalog
        assert {k: catalog.title(k) for k in SEPARATOR_TITLES} == SEPARATOR_TITLES
        assert catalog.current.category_of(catalog.current.row("fragment")) == "misc\u2028cat"
        for k in SEPARATOR_TITLES:
            assert await r.visible(k)


async def test_a_journal_written_raw_by_the_old_writer_loads_whole(world):
    """A journal from before the fix (ensure_ascii=False: raw U+2028 in a line) is read whole:
    a deployment bricked by it starts again without editing the file."""
    root, registry = world
    s = settings(root, registry, "old-writer")
    path = root / "old-writer" / "items.jsonl"
    path.parent.mkdir(parents=True)
    lines = [json.dumps(c, ensure_ascii=False) for c in CATALOG]
    lines.append(json.dumps({"item_id": "fragment", "title": "x\u2028 5 \u2028y", "category": "", "price": 1.0},
                            ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    async with Running(s) as r:
        assert await r.serving()
        assert r.service.catalog.title("fragment") == "x\u2028 5 \u2028y"
        assert await r.visible("fragment")


BAD_LINES = [
    b"{not json",
    b" 5 ",  # the fragment the old reader made of "x\u2028 5 \u2028y": it raised (5 has no .get)
    b'"a string"',
    b"[1, 2]",
    b"\xff\xfe not utf-8",
    b'{"item_id": "t", "title": 3}',
    b'{"item_id": "p", "title": "Price too big", "price": 1e999}',
    b'{"item_id": "q", "title": "Price huge int", "price": 1' + b"0" * 400 + b"}",
    b'{"item_id": "r", "title": "Negative", "price": -1}',
    b'{"title": "No id"}',
]


async def test_corrupt_journal_lines_are_skipped_counted_and_the_service_still_serves(world):
    root, registry = world
    s = settings(root, registry, "corrupt", catalog_poll_s=0.05)
    path = root / "corrupt" / "items.jsonl"
    path.parent.mkdir(parents=True)
    good = [ItemRecord(c["item_id"], c["title"], c["category"], c["price"]).to_json().encode() for c in CATALOG]
    after = ItemRecord("after-bad", "Whole bean espresso 1 kg", "drinks", 14.0).to_json().encode()
    path.write_bytes(b"\n".join([*good[:2], *BAD_LINES, *good[2:], after]) + b"\n")
    before = skipped("recommender")
    async with Running(s) as r:
        assert await r.serving()  # never refuses the model over a line
        assert skipped("recommender") - before == len(BAD_LINES)
        assert r.service.catalog.current.size == len(CATALOG) + 1
        assert await r.visible("after-bad")
        # a feed appends a bad line, then a good one, while the service runs: the follower
        # skips the bad one (counted once) and keeps applying what follows
        with open(path, "ab") as f:
            f.write(b" 5 \n")
            f.write(ItemRecord("feed-later", "Oat milk 1 litre", "dairy", 2.2).to_json().encode() + b"\n")
        await until(lambda: r.visible("feed-later"), "the line after a bad one to be applied")
        assert skipped("recommender") - before == len(BAD_LINES) + 1
    # the trainer reads the same file with the same reader: the same items, bad lines counted
    before_trainer = skipped("trainer")
    records = CatalogJournal(path).read_new()
    assert [x["item_id"] for x in records] == [c["item_id"] for c in CATALOG[:2]] + \
        [c["item_id"] for c in CATALOG[2:]] + ["after-bad", "feed-later"]
    assert skipped("trainer") - before_trainer == len(BAD_LINES) + 1


async def test_the_trainer_reads_titles_with_line_separators_exactly(world, tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text("".join(ItemRecord(k, t, "c\x85", 1.0).to_json() + "\n" for k, t in SEPARATOR_TITLES.items()))
    journal = CatalogJournal(path)
    assert {x["item_id"]: x["title"] for x in journal.read_new()} == SEPARATOR_TITLES
    with open(path, "ab") as f:  # a torn append is left for the next read, not skipped
        f.write(b'{"item_id": "late", "title": "La')
    assert journal.read_new() == []
    with open(path, "ab") as f:
        f.write(b'te\\u2028r", "category": "", "price": 1}\n')
    assert [(x["item_id"], x["title"]) for x in journal.read_new()] == [("late", "Late\u2028r")]


async def test_upsert_bounds_are_settings_and_name_the_item_and_field(world):
    root, registry = world
    s = settings(root, registry, "bounds", upsert_max_items=3, title_max_chars=40, category_max_chars=10)
    cases = [
        ([pb.Item(item_id=f"i{n}", title="t", price=1) for n in range(4)], "items must hold 1..3 items, got 4"),
        ([pb.Item(item_id="a", title="t", price=1), pb.Item(item_id="b", title="t" * 41, price=1)],
         "items[1].title is longer than 40 characters"),
        ([pb.Item(item_id="a", title="t", category="c" * 11, price=1)], "items[0].category is longer than 10"),
        ([pb.Item(item_id="i" * 129, title="t", price=1)], "items[0].item_id is longer than 128"),
    ]
    async with Running(s) as r:
        for items, words in cases:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await r.stub.UpsertItems(pb.UpsertItemsRequest(items=items))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details(), words
        ok = await r.stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="a", title="t" * 40, price=1)]))
        assert ok.inserted == 1
    assert RecommenderSettings().upsert_max_items == 1000 and RecommenderSettings().title_max_chars == 300
    assert "title_max_chars must be >= 1" in settings(root, registry, "x", title_max_chars=0).validate()


async def test_an_upsert_past_its_deadline_stops_embedding_and_writes_nothing(world):
    root, registry = world
    async with Running(settings(root, registry, "deadline")) as r:
        catalog = r.service.catalog
        journal = catalog.path.read_bytes()
        generation, size = catalog.current.generation, catalog.current.size
        titles = distinct_titles(300, 300, seed=1)  # ~6 s of encoder CPU: far past the deadline
        items = [pb.Item(item_id=f"slow-{i}", title=t, price=1.0) for i, t in enumerate(titles)]
        before = abandoned("deadline") + abandoned("cancelled")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await r.stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=0.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        async with r.service._upsert_lock:  # held until the upsert has stopped (old code: until it applied all)
            pass
        assert abandoned("deadline") + abandoned("cancelled") == before + 1
        assert r.service.titles_embedded < len(titles)  # it stopped embedding, it did not run to the end
        # nothing half-applied: journal, snapshot and ids untouched
        assert catalog.path.read_bytes() == journal
        assert (catalog.current.generation, catalog.current.size) == (generation, size)
        assert catalog.current.row("slow-0") is None and catalog.title("slow-0") is None
        # and the service takes the next upsert
        ok = await r.stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="fast", title="Tea", price=1)]))
        assert ok.catalog_size == size + 1


async def test_stopping_the_server_stops_an_upsert_in_flight(world):
    root, registry = world
    r = Running(settings(root, registry, "stop", grace_s=0.2))
    async with r:
        catalog = r.service.catalog
        journal = catalog.path.read_bytes()
        titles = distinct_titles(300, 300, seed=2)
        items = [pb.Item(item_id=f"stop-{i}", title=t, price=1.0) for i, t in enumerate(titles)]
        before = abandoned("cancelled")
        call = asyncio.ensure_future(r.stub.UpsertItems(pb.UpsertItemsRequest(items=items)))
        await until(lambda: r.service.titles_embedded > 0, "the upsert to start embedding")
        await r.app.stop()  # grace 0.2 s: the call is cancelled, and so is its embedding
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        async with r.service._upsert_lock:
            pass
        assert abandoned("cancelled") == before + 1
        assert r.service.titles_embedded < len(titles)
        assert catalog.path.read_bytes() == journal and catalog.current.row("stop-0") is None
        await r.stop()


async def test_replacing_the_same_ids_with_new_titles_does_not_grow_the_text_table(world):
    root, registry = world
    async with Running(settings(root, registry, "replace")) as r:
        catalog = r.service.catalog
        n, rounds = 16, 30
        for k in range(rounds):
            titles = distinct_titles(n, 30, seed=100 + k)
            await r.stub.UpsertItems(pb.UpsertItemsRequest(items=[
                pb.Item(item_id=f"rep-{i}", title=t, category=f"cat-{k}-{i}", price=1.0 + k) for i, t in enumerate(titles)]))
        snap = catalog.current
        live = len(CATALOG) + n
        assert snap.size == live
        # old code: one embedding row per title ever seen (4 + 16 x 30 = 484 rows, growing per call)
        assert len(snap.texts) <= live + COMPACT_MIN_DEAD + n, len(snap.texts)
        assert len(catalog._texts) <= 1024 and len(snap.categories) <= live + COMPACT_MIN_DEAD + n
        assert catalog.compactions >= 1
        # rows still point at the right embeddings and categories after compaction
        encoder: TextEncoder = r.service.encoder
        rows = [snap.row(f"rep-{i}") for i in range(n)]
        import numpy as np

        np.testing.assert_allclose(snap.text_vectors(np.array(rows)), encoder.encode(titles), atol=1e-6)
        assert [snap.category_of(row) for row in rows] == [f"cat-{rounds - 1}-{i}" for i in range(n)]
        assert await r.visible("rep-3")


def test_long_texts_are_cut_before_tokenizing_without_changing_the_embedding():
    encoder = TextEncoder(exported_text_encoder()[0])
    long = " ".join(distinct_titles(1, 20_000, seed=7))
    assert len(truncate_text(long)) == MAX_TOKENS * MAX_CHARS_PER_TOKEN
    import numpy as np

    np.testing.assert_allclose(encoder.encode_uncached([long]), encoder.encode_uncached([long[:1024]]), atol=1e-6)
