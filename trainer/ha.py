"""Trainer high availability on Redis: each domain is learned by the one replica holding its lease.

With `event_log_url` set (trainer/service.py, docs/REDIS.md), every trainer replica runs a
`DomainLeadership`: per domain, a task waits for the domain's LearnerLease (trainer/lease.py; a
standby waits there), and while this replica holds it, opens the domain (bootstraps it if nobody
has, restores its checkpoint from the shared workdir: the position it records is the offset
committed in the log) and runs its DomainLoop. A lost lease (renewals failed past the TTL) stops
the term at once: the loop stops, a round in progress is cancelled at its commit point, and the
next term (this replica's or another's) starts from the checkpoint. The learner's `fence`
(lease_fence) asks Redis before every checkpoint write and right before every publish whether
this replica still holds the lease with its token; its answer goes into the manifest.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from redis.exceptions import RedisError

log = logging.getLogger(__name__)


def lease_fence(lease, token: int, loop: asyncio.AbstractEventLoop, timeout_s: float) -> Callable[[], dict]:
    """Learner.fence for a round thread: asks Redis (on the event loop) whether this trainer still
    holds the domain's lease with `token`; raises LeaseLost (or the Redis error, or a timeout)
    when it cannot say yes, else returns what the manifest records."""
    from trainer.lease import LeaseLost

    def fence() -> dict:
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # cannot block the loop on itself: the lease's own view, kept by its renewals
            if lease.token != token or not lease.held:
                raise LeaseLost(f"{lease.domain}: token {token} is not held any more")
        else:
            asyncio.run_coroutine_threadsafe(lease.check(token), loop).result(timeout_s)
        return {"lease": {"token": token, "owner": lease.owner}}

    return fence


class DomainLeadership:
    """This replica's terms as the learner of each domain (Redis mode). `open_domain(domain)`
    (blocking, run in a thread) returns the domain's DomainLoop; `loops` is the trainer's
    domain -> DomainLoop map, holding the domains this replica learns now."""

    def __init__(self, settings, open_domain: Callable[[str], Any], loops: dict[str, Any],
                 after_round: Callable[[], Awaitable[None]] | None = None) -> None:
        from shared.redis_conn import redis_client
        from trainer.lease import LearnerLease

        self.settings = settings
        self.open_domain = open_domain
        self.loops = loops
        self.after_round = after_round
        self.stopping = asyncio.Event()
        self.client = redis_client(settings.event_log_url, settings.redis_password_file)
        self.leases = {d: LearnerLease(self.client, d, ttl_s=settings.lease_ttl_s, poll_s=settings.lease_poll_s)
                       for d in settings.domain_list}
        self.lost_rounds: dict[str, asyncio.Future] = {}  # domain -> a lost term's round still running

    def start(self) -> list[asyncio.Task]:
        loop = asyncio.get_running_loop()
        return [loop.create_task(self.learn_under_lease(d), name=f"lease-{d}") for d in self.leases]

    def holds(self, domain: str) -> bool:
        return domain in self.leases and self.leases[domain].held

    def stop(self) -> None:
        """No new term starts (standbys stop waiting); the running terms end when their tasks are cancelled."""
        self.stopping.set()

    async def close(self) -> None:
        await self.client.aclose()

    async def learn_under_lease(self, domain: str) -> None:
        """Wait for the domain's lease, learn while holding it, wait again when it is lost."""
        while not self.stopping.is_set():
            try:
                if not await self.hold_and_learn(domain):
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # keep the domain's failover alive; the next turn waits for the lease again
                log.exception("%s: learning under the lease failed; waiting for the lease again", domain)
                await asyncio.sleep(self.settings.lease_poll_s)

    async def hold_and_learn(self, domain: str) -> bool:
        """One term as the domain's learner: wait for the lease, learn until it is lost or the trainer
        stops. False when the domain cannot be learned here (or the trainer stops)."""
        lease = self.leases[domain]
        aio = asyncio.get_running_loop()
        token = await lease.acquire(self.stopping)
        if token is None:
            return False
        lease.start_keeping()
        lp = loop_task = lost = None
        try:
            earlier = self.lost_rounds.pop(domain, None)
            if earlier is not None and not earlier.done():
                # a round of this replica's lost term still runs (it cannot checkpoint or publish with
                # its old token): let it end before the checkpoint is read again
                log.info("%s: waiting for the round of the lost term to end", domain)
                await asyncio.wait([earlier])
            try:
                lp = await asyncio.to_thread(self.open_domain, domain)
            except FileNotFoundError as e:
                log.error("%s; run `python -m trainer bootstrap --domains %s`; not learning it", e, domain)
                return False
            lp.learner.fence = lease_fence(lease, token, aio, timeout_s=self.settings.lease_ttl_s)
            lp.after_round = self.after_round
            self.loops[domain] = lp
            log.info("%s: learning as the lease holder (token %d), from offset %d", domain, token,
                     lp.joiner.checkpoint()["offset"])
            loop_task = aio.create_task(lp.run(), name=f"learn-{domain}")
            lost = aio.create_task(lease.lost.wait())
            await asyncio.wait([loop_task, lost], return_when=asyncio.FIRST_COMPLETED)
            if lease.lost.is_set():
                log.warning("%s: learner lease lost; this trainer stops learning it and waits as a standby", domain)
        finally:
            if lp is not None:
                lp.stopping = True
                if lease.lost.is_set():
                    lp.cancel.cancel()  # a round in progress stops at its commit point (the fence holds too)
                if lp.round_future is not None and not lp.round_future.done():
                    # still running in its thread: the next term waits for it; its end (e.g. LeaseLost
                    # at the fence, RoundCancelled at the commit point) is logged
                    self.lost_rounds[domain] = lp.round_future
                    lp.round_future.add_done_callback(
                        lambda f, d=domain: f.cancelled() or log.info("%s: round of the lost term ended: %r", d,
                                                                      f.exception() or f.result()))
                self.loops.pop(domain, None)
            for t in (loop_task, lost):
                if t is not None:
                    t.cancel()
            await asyncio.gather(*(t for t in (loop_task, lost) if t is not None), return_exceptions=True)
            try:
                await lease.release()
            except (RedisError, OSError) as e:  # Redis down: the lease runs out by its TTL instead
                log.warning("%s: could not release the learner lease (%s: %s); it expires by itself", domain,
                            type(e).__name__, e)
        return True
