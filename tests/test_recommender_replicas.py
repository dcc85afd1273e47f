"""Two recommender replicas in the Redis mode (redis_url; issue 14): each a real gRPC server on
its own loopback port with its own adapter, catalog and clients, sharing nothing but one real
redis-server (and the registry and prediction id key, as replicas of one deployment do).

- a click reported to replica B changes what replica A recommends, within 1 s;
- an item upserted on A is recommendable on B within 1 s (B follows the shared catalog's stream);
- an outcome for a prediction A served, reported to B, is joined in the trainer's event log with
  A's served record (a real collector on a real RedisEventLog, the real joiner), and B finds the
  prediction's user through the shared prediction memory.

The version is a small real ONNX graph that follows the model contract (tests/reco_onnx.py: the
user vector is the user embedding plus the mean of the history's item vectors, so a click moves
the ranking), with the real sentence encoder.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from protos.recommender.v1 import recommender_pb2 as pb
from services.recommender.redis_state import RedisCatalogJournal, RedisUserHistory
from shared.redis_conn import redis_client
from shared.registry import ModelRegistry
from tests.reco_onnx import publish_contract_version
from tests.recommender_fixtures import RunningRecommender, exported_text_encoder, recommender_test_settings
from tests.redis_server import redis_server  # noqa: F401  (fixture)
from tests.server_harness import until, within
from tests.test_recommender_service import CATALOG, USERS, ids
from trainer.collector import FeedbackCollector, add_collector
from trainer.domains.recommender import model_from_settings
from trainer.eventlog_redis import RedisEventLog
from trainer.joiner import Joiner
from trainer.settings import TrainerSettings
from trainer.text_encoder import publish_text_encoder

WITHIN_S = 1.0  # the bound for a change on one replica to show on the other


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("reco-replicas")
    registry = ModelRegistry(root / "registry")
    publish_text_encoder(registry, exported=exported_text_encoder())
    publish_contract_version(registry, root / "v1", CATALOG, USERS, dim=16, seed=1)
    return registry


CALL_S = 60.0  # far above a Redis client's retries (about 5 s): a hang fails at its own line
STEP_S = 60.0  # a bound for starting or stopping both replicas (about 1 s on an idle machine)


@contextlib.asynccontextmanager
async def replicas(tmp_path, registry, redis_url: str, trainer_target: str = ""):
    """Replicas A and B (stubs, services) on one Redis; separate state folders. Starting and
    stopping them are bounded steps (tests.server_harness.within): a hang names itself."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        async with within(STEP_S, "starting replicas A and B"):
            for name in ("a", "b"):
                s = recommender_test_settings(tmp_path, registry, name, redis_url=redis_url,
                                              trainer_target=trainer_target)
                running = RunningRecommender(s)
                stub = await stack.enter_async_context(running)
                out.append((stub, running.service))
        try:
            yield out
        finally:
            async with within(STEP_S, "stopping replicas A and B"):
                await stack.aclose()


async def test_a_click_reported_to_replica_b_changes_what_replica_a_recommends(tmp_path, registry, redis_server):
    async with replicas(tmp_path, registry, redis_server.url) as ((a, a_service), (b, b_service)):
        assert a_service.shared is not None and a_service.history is not b_service.history  # two adapters, one Redis
        request = pb.RecommendRequest(user_id="dave", k=5)  # a user neither the model nor the store knows
        first = await a.Recommend(request)
        assert first.fallback and len(first.items) == 5
        clicked = ids(first)[-1]
        ack = await b.ReportOutcome(pb.RecommendationOutcome(prediction_id=first.prediction_id, item_id=clicked,
                                                             event=pb.EVENT_CLICK))
        assert ack.accepted == 1
        reported = time.monotonic()
        after = {}

        async def a_ranks_with_the_click() -> bool:
            after["resp"] = await a.Recommend(request)
            return not after["resp"].fallback

        await until(a_ranks_with_the_click, "replica A to rank with the click reported to B", timeout_s=WITHIN_S)
        seen_after = time.monotonic() - reported
        resp = after["resp"]
        # the history now holds the clicked item: scores (and the ranking) are the ones it implies
        assert [round(it.score, 4) for it in resp.items] != [round(it.score, 4) for it in first.items]
        assert seen_after <= WITHIN_S
        # a purchase reported to A is left out by B (exclude_purchased reads the shared purchased set)
        bought = ids(resp)[0]
        await a.ReportOutcome(pb.RecommendationOutcome(prediction_id=resp.prediction_id, item_id=bought,
                                                       event=pb.EVENT_PURCHASE))
        excluded = await b.Recommend(pb.RecommendRequest(user_id="dave", k=10, exclude_purchased=True))
        assert bought not in ids(excluded) and len(excluded.items) == len(CATALOG) - 1


async def test_an_item_upserted_on_replica_a_is_recommendable_on_replica_b_within_a_second(
        tmp_path, registry, redis_server):
    async with replicas(tmp_path, registry, redis_server.url) as ((a, a_service), (b, b_service)):
        item = pb.Item(item_id="sku-new", title="Stainless steel garden trowel", category="garden", price=9.5)
        answer = await a.UpsertItems(pb.UpsertItemsRequest(items=[item]))
        assert (answer.inserted, answer.catalog_size) == (1, len(CATALOG) + 1)
        upserted = time.monotonic()

        async def b_recommends_it() -> bool:
            try:
                resp = await b.Recommend(pb.RecommendRequest(user_id="alice", k=1, candidate_item_ids=["sku-new"]))
            except grpc.aio.AioRpcError as e:  # not in B's catalog yet: the candidate is unknown there
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
                return False
            return ids(resp) == ["sku-new"]

        await until(b_recommends_it, "the item upserted on A to be recommendable on B", timeout_s=WITHIN_S)
        assert time.monotonic() - upserted <= WITHIN_S
        assert b_service.catalog.title("sku-new") == item.title and len(b_service.catalog) == len(CATALOG) + 1
        # A applied its own upsert once: reading it back from the stream changed nothing there
        await until(lambda: b_service.catalog.current.generation >= 2, "B's catalog generation")
        assert a_service.catalog.current.generation == 2
        # the shared catalog is what a third replica (or a restart) loads
        client = redis_client(redis_server.url)
        try:
            items, _ = await RedisCatalogJournal(client).snapshot()
        finally:
            await client.aclose()
        assert {it.item_id for it in items} == {c["item_id"] for c in CATALOG} | {"sku-new"}
        # and what the trainer reads to learn new items (its event_log_url names the same Redis)
        reader = model_from_settings(TrainerSettings(event_log_url=redis_server.url)).journal
        assert "sku-new" in {r["item_id"] for r in reader.read_new()}


async def test_an_outcome_for_a_prediction_served_by_a_and_reported_to_b_is_joined(tmp_path, registry, redis_server):
    log = RedisEventLog(redis_server.url)
    collector = FeedbackCollector(log)
    server = grpc.aio.server()
    add_collector(server, collector)
    trainer = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        async with replicas(tmp_path, registry, redis_server.url, trainer_target=trainer) as ((a, _), (b, _b)):
            served = await a.Recommend(pb.RecommendRequest(user_id="erin", k=4))
            clicked = ids(served)[1]
            ack = await b.ReportOutcome(pb.RecommendationOutcome(prediction_id=served.prediction_id,
                                                                 item_id=clicked, event=pb.EVENT_CLICK))
            assert ack.accepted == 1
            joiner = Joiner(log, domain="recommender")
            joined = []

            async def joined_in_the_log() -> bool:
                joined.extend(e for e in joiner.poll() if not e.derived)
                return bool(joined)

            await until(joined_in_the_log, "the outcome reported to B to join A's served record", timeout_s=10.0)
            [example] = joined
            assert example.prediction_id == served.prediction_id
            assert (example.label.item_id, example.label.event) == (clicked, pb.EVENT_CLICK)
            assert example.model_version == served.model.version
            response = pb.RecommendResponse()
            assert example.served.response.Unpack(response) and ids(response) == ids(served)
            # B found the prediction's user (served by A) through the shared prediction memory
            client = redis_client(redis_server.url)
            try:
                assert await RedisUserHistory(client).recent("erin") == [clicked]
            finally:
                await client.aclose()
    finally:
        await server.stop(1.0)
        await collector.close()
        log.close()


async def test_redis_unreachable_refuses_ranking_without_history_but_keeps_every_label(tmp_path, registry,
                                                                                      redis_server):
    """Redis down: a Recommend for a user is UNAVAILABLE (never ranked without their history
    silently), an anonymous one is answered, an outcome is still accepted (the label goes to the
    trainer; only its history update is skipped); Redis back: a retry, not an error. Every call
    has a deadline and every step a bound that names it (a hang ended this test twice at pytest's
    timeout on the event loop's idle frame, with no word of where)."""
    async with replicas(tmp_path, registry, redis_server.url) as ((a, _a), (b, _b)):
        request = pb.RecommendRequest(user_id="fay", k=3)
        served = await a.Recommend(request, timeout=CALL_S)
        redis_server.kill()
        async with within(CALL_S + 10, "three calls with Redis down"):
            recommend, report, anonymous = await asyncio.gather(
                a.Recommend(request, timeout=CALL_S),
                b.ReportOutcome(pb.RecommendationOutcome(prediction_id=served.prediction_id, item_id=ids(served)[0],
                                                         event=pb.EVENT_CLICK), timeout=CALL_S),
                a.Recommend(pb.RecommendRequest(k=3), timeout=CALL_S), return_exceptions=True)
        assert isinstance(recommend, grpc.aio.AioRpcError) and recommend.code() == grpc.StatusCode.UNAVAILABLE
        assert "history" in recommend.details()
        assert report.accepted == 1 and len(anonymous.items) == 3
        redis_server.start()  # same port and folder: the AOF replayed
        async with within(CALL_S + 10, "a Recommend after Redis came back"):
            again = await a.Recommend(request, timeout=CALL_S)
        assert len(again.items) == 3 and again.prediction_id != served.prediction_id
