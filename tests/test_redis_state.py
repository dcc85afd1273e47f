"""The recommender's shared online state (services.recommender.redis_state) on a real redis-server:
two replicas (two clients, two objects) see each other's writes on their next call, and the
Redis classes answer exactly as the in-process ones do."""
from __future__ import annotations

import random

import numpy as np
import pytest

from services.recommender.history import UserHistory
from services.recommender.redis_state import RedisPredictionMemory, RedisUserHistory, user_keys
from shared.redis_conn import redis_client
from tests.redis_server import redis_server  # noqa: F401  (fixture)
from tests.server_harness import until


@pytest.fixture
async def clients(redis_server):
    """Two clients with their own connection pools: replica A's and replica B's."""
    a, b = redis_client(redis_server.url), redis_client(redis_server.url)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def test_an_outcome_reported_to_replica_b_shows_in_replica_a_at_once(clients):
    a_client, b_client = clients
    a_history, b_history = RedisUserHistory(a_client), RedisUserHistory(b_client)
    a_predictions, b_predictions = RedisPredictionMemory(a_client), RedisPredictionMemory(b_client)
    # replica A serves a prediction for user u1; the click comes back to replica B
    await a_predictions.add("pred-1", "u1")
    user = await b_predictions.get("pred-1")
    assert user == "u1"
    await b_history.record(user, "item-7", purchase=False)
    # A's very next read has it: no cache, no propagation delay to wait for
    assert await a_history.recent("u1") == ["item-7"]
    await b_history.record("u1", "item-9", purchase=True)
    assert await a_history.user_state("u1", 8) == (["item-9", "item-7"], ["item-9"])
    assert await a_history.contains("u1") and not await a_history.contains("u2")
    assert await a_predictions.get("pred-unknown") is None


async def test_answers_match_the_in_process_history(clients):
    """The same random interactions through both classes: identical recent and purchased lists."""
    client = clients[0]
    rng = random.Random(7)
    local = UserHistory(max_users=1000, max_recent=8, max_purchased=5)
    shared = RedisUserHistory(client, max_recent=8, max_purchased=5)
    users = [f"u{i}" for i in range(6)]
    items = [f"i{i}" for i in range(15)]  # few items: repeats and repeat purchases happen often
    for _ in range(400):
        user, item, purchase = rng.choice(users), rng.choice(items), rng.random() < 0.3
        local.record(user, item, purchase)
        await shared.record(user, item, purchase)
    for user in users + ["nobody"]:
        assert await shared.recent(user) == local.recent(user), user
        for n in (0, 1, 3, 20):
            assert await shared.recent(user, n) == local.recent(user, n), (user, n)
        assert await shared.purchased(user) == local.purchased(user), user
        assert await shared.user_state(user, 3) == (local.recent(user, 3), local.purchased(user))
    assert len(await shared.recent("u0")) == 8 and len(await shared.purchased("u0")) == 5


async def test_keys_expire_after_the_last_interaction(clients):
    client = clients[0]
    # 3 s: long enough that a loaded machine cannot expire the keys before they are read below
    history = RedisUserHistory(client, ttl_s=3.0)
    predictions = RedisPredictionMemory(client, ttl_s=3.0)
    await history.record("u1", "i1", purchase=True)
    await predictions.add_many([("p1", "u1"), ("p2", "u2")])
    assert await predictions.get("p2") == "u2"
    for key in user_keys("u1"):
        assert 0 < await client.pttl(key) <= 3000
    # expiry is the server's: wait until it has removed the keys
    await until(lambda: _gone(history, predictions), "the state to expire", timeout_s=10)
    assert await history.recent("u1") == [] and await history.purchased("u1") == []


async def _gone(history: RedisUserHistory, predictions: RedisPredictionMemory) -> bool:
    return not await history.contains("u1") and await predictions.get("p1") is None


def _users_npz(path, users: dict[str, list[str]]):
    user_ids = np.array(list(users), dtype=str)
    indptr = np.cumsum([0] + [len(v) for v in users.values()]).astype(np.int64)
    item_ids = np.array([it for v in users.values() for it in v], dtype=str)
    np.savez(path, user_ids=user_ids, indptr=indptr, item_ids=item_ids)
    return path


async def test_seeding_matches_the_in_process_history_and_runs_once(tmp_path, clients):
    a_client, b_client = clients
    rng = random.Random(3)
    users = {f"u{i}": [f"i{rng.randrange(30)}" for _ in range(rng.randrange(1, 25))] for i in range(40)}
    npz = _users_npz(tmp_path / "users.npz", users)
    local = UserHistory(max_users=1000, max_recent=10, max_purchased=6)
    a = RedisUserHistory(a_client, max_recent=10, max_purchased=6, seed_batch=7)
    b = RedisUserHistory(b_client, max_recent=10, max_purchased=6)
    # a user the service already saw keeps what it saw (newer than the training file)
    local.record("u0", "live-item", purchase=True)
    await a.record("u0", "live-item", purchase=True)
    assert local.seed_npz(npz) == 39
    assert await a.seed_npz(npz) == 39
    for user in users:
        assert await b.recent(user) == local.recent(user), user
        assert await b.purchased(user) == local.purchased(user), user
    assert await b.recent("u0") == ["live-item"]
    # another replica loading the same version seeds nothing again
    assert await b.seed_npz(npz) == 0
    # a live purchase ranks newer than every seeded one
    await b.record("u1", users["u1"][0], purchase=True)
    local.record("u1", users["u1"][0], purchase=True)
    assert await a.purchased("u1") == local.purchased("u1")


async def test_seeding_a_long_history_stays_within_luas_limits(tmp_path, clients):
    client = clients[0]
    long = [f"i{k}" for k in range(6000)]  # more values than one Lua unpack() can take
    npz = _users_npz(tmp_path / "users.npz", {"heavy": long})
    local = UserHistory(max_users=10, max_recent=5000, max_purchased=5000)
    local.seed_npz(npz)
    shared = RedisUserHistory(client, max_recent=5000, max_purchased=5000)
    assert await shared.seed_npz(npz) == 1
    assert await shared.recent("heavy") == local.recent("heavy")
    assert await shared.purchased("heavy") == local.purchased("heavy")


async def test_state_survives_a_redis_kill(redis_server, clients):
    assert redis_server.appendfsync == "always"
    client = clients[0]
    history, predictions = RedisUserHistory(client), RedisPredictionMemory(client)
    await predictions.add("p1", "u1")
    await history.record("u1", "i1", purchase=False)
    await history.record("u1", "i2", purchase=True)
    redis_server.kill()
    redis_server.start()
    # the client reconnects on its own; the scripts are loaded again on first use
    assert await history.user_state("u1") == (["i2", "i1"], ["i2"])
    assert await predictions.get("p1") == "u1"
    await history.record("u1", "i3", purchase=True)
    assert await history.purchased("u1") == ["i2", "i3"]
