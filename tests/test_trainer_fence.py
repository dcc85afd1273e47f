"""The fence a trainer's learner calls before each checkpoint write and publish in Redis mode
(trainer.ha.lease_fence, Learner.fence): a real redis-server, two trainers' leases.

A holder paused past its lease (a GC pause, a stopped VM: here, a holder that stops renewing) and
replaced by another trainer is refused by its fence, from its round thread, even though its own
process still has its token: it never checkpoints or publishes after the takeover. The fence's
answer while held is what the manifest records."""
from __future__ import annotations

import asyncio
import threading

import pytest

from shared.redis_conn import redis_client
from tests.redis_server import redis_server  # noqa: F401 (a fixture)
from trainer.lease import LearnerLease, LeaseLost
from trainer.ha import lease_fence


def test_a_replaced_holder_is_refused_by_its_fence_and_the_new_holder_passes(redis_server):  # noqa: F811
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client_a, client_b = redis_client(redis_server.url), redis_client(redis_server.url)
        try:
            a = LearnerLease(client_a, "fraud", owner="trainer-a", ttl_s=0.6, poll_s=0.05)
            # B's own TTL is long: it holds for the rest of the test, which renews nothing (with
            # 0.6 s, a loaded CI machine once let B's lease run out before its fence was asked)
            b = LearnerLease(client_b, "fraud", owner="trainer-b", ttl_s=30, poll_s=0.05)
            token_a = await a.acquire()
            fence_a = lease_fence(a, token_a, loop, timeout_s=5)
            # from a round thread, as the learner calls it: while held, it says what the manifest records
            assert await asyncio.to_thread(fence_a) == {"lease": {"token": token_a, "owner": "trainer-a"}}
            # A stops renewing (paused); B takes the lease over once it runs out
            token_b = await b.acquire()
            assert token_b > token_a
            with pytest.raises(LeaseLost):
                await asyncio.to_thread(fence_a)
            # ... even while A's own process would still count on the token (its view restored)
            a.valid_until = float("inf")
            a.lost.clear()
            with pytest.raises(LeaseLost):
                await asyncio.to_thread(fence_a)
            fence_b = lease_fence(b, token_b, loop, timeout_s=5)
            assert (await asyncio.to_thread(fence_b))["lease"]["token"] == token_b
            # on the event loop itself the fence cannot block: it answers from the lease's own view
            with pytest.raises(LeaseLost):
                fence_a()
            assert threading.current_thread() is threading.main_thread()
        finally:
            await client_a.aclose()
            await client_b.aclose()

    asyncio.run(scenario())
