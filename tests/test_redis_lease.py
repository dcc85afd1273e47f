"""trainer.lease against a real redis-server: one learner per domain, fencing tokens, takeover.

The holder that dies is a real process (`python -m trainer.lease hold`) killed with SIGKILL.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from shared.redis_conn import redis_client
from tests.redis_server import redis_server  # noqa: F401  (fixture)
from tests.server_harness import until
from trainer.lease import LeaseLost, LearnerLease, lease_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def client(redis_server):
    c = redis_client(redis_server.url)
    try:
        yield c
    finally:
        await c.aclose()


async def test_a_second_contender_cannot_acquire_while_the_holder_renews(client):
    holder = LearnerLease(client, "recommender", "trainer-a", ttl_s=0.6, renew_every_s=0.15)
    # the standby's own TTL is long: once it holds, nothing renews it before the checks below
    standby = LearnerLease(client, "recommender", "trainer-b", ttl_s=30, poll_s=0.05)
    token = await holder.try_acquire()
    assert token == 1 and holder.held
    holder.start_keeping()
    # ten renewals span 1.5 s, well past the 0.6 s TTL: only renewal keeps it held
    for renewed in range(1, 11):
        await until(lambda: holder.renewals >= renewed, f"renewal {renewed}")
        assert await standby.try_acquire() is None
        assert standby.observed.owner == "trainer-a" and standby.observed.token == token
        assert 0 < standby.observed.expires_in_s <= 0.6
    assert not holder.lost.is_set()
    assert await holder.release()
    # released on a clean shutdown: the standby gets it at once (no TTL to wait for), with a new token
    assert await standby.try_acquire() == token + 1
    await standby.check(token + 1)
    assert await standby.fence() == token + 1
    await standby.release()


async def test_a_retried_acquire_by_the_holder_keeps_its_token(client):
    lease = LearnerLease(client, "pricing", "trainer-a", ttl_s=5)
    token = await lease.try_acquire()
    # the same owner asking again (its first reply lost on the way back) gets the same lease
    assert await lease.try_acquire() == token
    assert await lease.fence() == token
    holder = await lease.holder()
    assert holder.owner == "trainer-a" and holder.token == token and 4 < holder.expires_in_s <= 5


async def test_domains_have_independent_leases(client):
    a = LearnerLease(client, "recommender", "trainer-a", ttl_s=30)
    b = LearnerLease(client, "fraud", "trainer-b", ttl_s=30)
    assert await a.try_acquire() == 1
    assert await b.try_acquire() == 1
    assert lease_key("fraud") != lease_key("recommender")
    with pytest.raises(ValueError):
        lease_key("a{b}")


async def test_a_stale_holder_cannot_renew_or_publish_after_takeover(client):
    stale = LearnerLease(client, "recommender", "trainer-a", ttl_s=0.4, drift=0.0)
    token = await stale.try_acquire()
    await stale.check(token)  # what a writer calls right before a publish
    # the holder stops renewing (a pause longer than the TTL); the standby takes over when it runs out
    standby = LearnerLease(client, "recommender", "trainer-b", ttl_s=5, poll_s=0.05)
    new_token = await asyncio.wait_for(standby.acquire(), 10)
    assert new_token > token
    assert not stale.held  # its own clock already says so
    with pytest.raises(LeaseLost):
        await stale.check(token)
    assert not await stale.renew()
    assert stale.lost.is_set()
    assert not await stale.release()  # it cannot delete its successor's lease
    await standby.check(new_token)
    assert (await standby.holder()).owner == "trainer-b"


async def test_the_redis_side_check_catches_a_takeover_the_local_clock_cannot_see(client):
    holder = LearnerLease(client, "recommender", "trainer-a", ttl_s=60)
    token = await holder.try_acquire()
    # the lease key vanishes (a failover to a replica that had not received it) and another
    # trainer takes the lease while this one's clock still gives it 60 s
    await client.delete(holder.key)
    other = LearnerLease(client, "recommender", "trainer-b", ttl_s=60)
    assert await other.try_acquire() == token + 1
    assert holder.held
    with pytest.raises(LeaseLost):
        await holder.check(token)
    assert holder.lost.is_set()
    assert not await holder.renew()
    await other.check(token + 1)


async def _start_holder(redis_url: str, domain: str, ttl_s: float) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trainer.lease", "hold", "--redis-url", redis_url, "--domain", domain,
        "--ttl-s", str(ttl_s), "--poll-s", "0.05", cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line, "the holder process exited before holding the lease"
        if " held by " in line:
            return proc, int(line.rsplit(" ", 1)[1])


async def test_a_standby_takes_over_within_ttl_plus_poll_after_the_holder_is_killed(redis_server, client):
    ttl_s, poll_s = 1.0, 0.05
    proc, token = await _start_holder(redis_server.url, "recommender", ttl_s)
    try:
        standby = LearnerLease(client, "recommender", "trainer-b", ttl_s=ttl_s, poll_s=poll_s)
        assert await standby.try_acquire() is None
        assert standby.observed.token == token
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert await proc.wait() == -signal.SIGKILL
        new_token = await asyncio.wait_for(standby.acquire(), 30)
        took = time.monotonic() - killed_at
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert new_token > token
    # bounded: the dead holder's last renewal plus the TTL, then at most one poll; slack for a busy machine
    assert took <= ttl_s + poll_s + 2.0, f"takeover took {took:.2f} s"
    await standby.check(new_token)


async def test_a_holder_stopped_cleanly_releases_at_once(redis_server, client):
    proc, token = await _start_holder(redis_server.url, "fraud", ttl_s=60)
    proc.send_signal(signal.SIGTERM)
    out = (await asyncio.wait_for(proc.stdout.read(), 60)).decode()
    assert await proc.wait() == 0
    assert f"released token {token}" in out
    # a 60 s TTL: only the release lets the standby in now
    standby = LearnerLease(client, "fraud", "trainer-b", ttl_s=60)
    assert await standby.try_acquire() == token + 1


async def test_the_holder_counts_itself_lost_when_redis_is_gone(redis_server, client):
    holder = LearnerLease(client, "recommender", "trainer-a", ttl_s=0.6, renew_every_s=0.1)
    await holder.try_acquire()
    holder.start_keeping()
    await until(lambda: holder.renewals >= 2, "renewals")
    redis_server.kill()
    # renewals fail (the client retries for seconds): the lease is counted lost when it runs out
    # by the holder's own clock, not when the client gives up
    await asyncio.wait_for(holder.lost.wait(), 5)
    assert not holder.held
    await holder.stop_keeping()


async def test_tokens_and_the_lease_survive_a_redis_kill(tmp_path, redis_server, client):
    assert redis_server.appendfsync == "always"
    holder = LearnerLease(client, "recommender", "trainer-a", ttl_s=60)
    for _ in range(3):  # tokens 1..3, each acquisition fsync'd before its reply
        token = await holder.try_acquire()
        await holder.release()
    token = await holder.try_acquire()
    assert token == 4
    redis_server.kill()
    redis_server.start()  # same folder and port: the AOF is replayed
    # the lease is still held (its expiry is absolute in the AOF) and the counter did not go back
    await holder.check(token)
    standby = LearnerLease(client, "recommender", "trainer-b", ttl_s=60)
    assert await standby.try_acquire() is None
    assert await standby.fence() == 4
    await holder.release()
    assert await standby.try_acquire() == 5


async def test_a_standby_waits_out_a_redis_restart_and_then_acquires(redis_server, client):
    holder = LearnerLease(client, "pricing", "trainer-a", ttl_s=60)
    token = await holder.try_acquire()
    redis_server.kill()
    standby = LearnerLease(client, "pricing", "trainer-b", ttl_s=60, poll_s=0.05)
    waiting = asyncio.ensure_future(standby.acquire())
    # the standby keeps trying while Redis is down instead of giving up
    await until(lambda: standby.acquire_errors >= 1, "the standby to find Redis down")
    assert not waiting.done()
    redis_server.start()
    await until(lambda: _observed_holder(standby) == "trainer-a", "the standby to see the holder again")
    await holder.release()  # the AOF kept the lease; a clean release lets the standby in
    assert await asyncio.wait_for(waiting, 30) == token + 1


def _observed_holder(lease: LearnerLease) -> str | None:
    return lease.observed.owner if lease.observed else None
