"""One active learner per domain across trainer replicas: a Redis lease with a fencing token.

Several trainers may run (any of them collects feedback); for each domain only the holder of
that domain's lease runs learner rounds and publishes to the registry. The others are standbys:
they poll, and take the lease over once the holder stops renewing it (a crash, a kill -9, a
partition, a pause longer than the lease).

Redis keys (the domain is the hash tag, so both keys of a domain sit in one Cluster slot and one
script can touch both):

    storefront:lease:{<domain>}          "<token> <owner>", with a TTL (PX): who holds it now
    storefront:lease:{<domain>}:fence    INCR counter, never expires: the last token handed out

Acquiring is one Lua script: when nobody holds the lease, INCR the fence counter and SET the
lease to "<new token> <owner>" with the TTL; when this owner already holds it (a retried call
whose first reply was lost), extend it and hand back the same token. Renewal and release are
compare-and-set scripts on the whole value: only the holder with that token extends or deletes
the lease, so a holder that lost it can never extend or delete its successor's.

The fencing token: every acquisition gets a larger token than any before it (the counter lives
in Redis, persisted with the AOF, and never expires). The learner writes its token into each
manifest it publishes and calls `check(token)` just before a registry publish: a holder that was
paused past its TTL and replaced finds that it no longer holds token T and does not publish. A
writer that sees manifests can also refuse any publish whose token is below the largest it has
seen (`fence()` reads the counter), which covers the remaining window between the check and the
rename.

Timing: the holder renews every ttl/3 and considers itself the holder only until
`renewed_at + ttl * (1 - drift)` by its own monotonic clock, so it stops before Redis lets the
key expire even with some clock drift; a standby polls every `poll_s` (or sooner, when the
remaining TTL it read is shorter), so takeover after a crash takes at most ttl + poll_s.

Also a small command line, for operators and the failover tests (a real process to kill -9):

    python -m trainer.lease show --redis-url redis://127.0.0.1:6379/0 --domain recommender
    python -m trainer.lease hold --redis-url ... --domain recommender --ttl-s 5
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import time
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

PREFIX = "storefront:lease"

_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, ' ', 1, true)
  local token = tonumber(string.sub(current, 1, sep - 1))
  local owner = string.sub(current, sep + 1)
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, token, owner, tonumber(ARGV[2])}
  end
  return {0, token, owner, redis.call('PTTL', KEYS[1])}
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ' ' .. ARGV[1], 'PX', ARGV[2])
return {1, token, ARGV[1], tonumber(ARGV[2])}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseLost(RuntimeError):
    """This process no longer holds the lease (or never did) with the token it asked about."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a domain's lease, as last read: their token, and how long the lease has left."""
    owner: str
    token: int
    expires_in_s: float


def default_owner() -> str:
    """host:pid:random: unique per process start, readable in `show`."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease_key(domain: str) -> str:
    if not domain or any(c in domain for c in "{} \n"):
        raise ValueError(f"domain must be a non-empty name without braces or spaces, got {domain!r}")
    return f"{PREFIX}:{{{domain}}}"


class LearnerLease:
    """One process's claim on one domain's learner. Not shared between processes; one object
    per domain per trainer."""

    def __init__(self, client: Redis, domain: str, owner: str | None = None, *, ttl_s: float = 10.0,
                 renew_every_s: float | None = None, poll_s: float = 1.0, drift: float = 0.05) -> None:
        if ttl_s <= 0 or poll_s <= 0 or not 0 <= drift < 0.5:
            raise ValueError("ttl_s and poll_s must be > 0, drift in [0, 0.5)")
        self.client = client
        self.domain = domain
        self.key = lease_key(domain)
        self.fence_key = self.key + ":fence"
        self.owner = owner or default_owner()
        if " " in self.owner:
            raise ValueError("owner must not contain spaces")
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.renew_every_s = renew_every_s if renew_every_s is not None else ttl_s / 3
        if not 0 < self.renew_every_s < ttl_s:
            raise ValueError("renew_every_s must be in (0, ttl_s)")
        self.poll_s = poll_s
        self.drift = drift
        self.token: int | None = None  # the fencing token while held; None otherwise
        self.valid_until = 0.0  # monotonic: past this, this process does not count on holding it
        self.observed: Holder | None = None  # the other holder, as the last failed acquire saw it
        self.renewals = 0
        self.acquire_errors = 0  # attempts that could not reach Redis (acquire() waits them out)
        self._last_error_log = -math.inf
        self.lost = asyncio.Event()  # set when a held lease is lost (not on release)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._keeper: asyncio.Task | None = None

    @property
    def value(self) -> str:
        if self.token is None:
            raise LeaseLost(f"{self.domain}: not held")
        return f"{self.token} {self.owner}"

    @property
    def held(self) -> bool:
        """Held as far as this process can tell without asking Redis (its own clock)."""
        return self.token is not None and not self.lost.is_set() and time.monotonic() < self.valid_until

    def _validity(self, started: float) -> float:
        return started + self.ttl_ms / 1000 * (1 - self.drift)

    async def try_acquire(self) -> int | None:
        """The fencing token when this process holds the lease now (newly or still), else None
        (then `observed` says who holds it)."""
        started = time.monotonic()
        ok, token, owner, pttl = await self._acquire(keys=[self.key, self.fence_key], args=[self.owner, self.ttl_ms])
        if ok:
            if self.token != int(token) or self.lost.is_set():
                self.lost = asyncio.Event()
                self.renewals = 0
                log.info("%s: learner lease acquired by %s with token %d", self.domain, self.owner, token)
            self.token, self.valid_until, self.observed = int(token), self._validity(started), None
            return self.token
        self.observed = Holder(owner, int(token), max(0, int(pttl)) / 1000)
        return None

    async def acquire(self, stop: asyncio.Event | None = None) -> int | None:
        """Wait until this process holds the lease (a standby's loop); None when stop was set first.
        Redis being unreachable (a restart, a failover) is waited out, not raised: a standby that
        gave up would leave the domain with no learner once the holder dies."""
        while stop is None or not stop.is_set():
            try:
                token = await self.try_acquire()
            except (RedisError, OSError) as e:
                self.acquire_errors += 1
                if time.monotonic() - self._last_error_log >= 60.0:  # one line a minute at most
                    self._last_error_log = time.monotonic()
                    log.warning("%s: cannot reach Redis for the learner lease (%s: %s); retrying every %.1f s "
                                "(%d failures)", self.domain, type(e).__name__, e, self.poll_s, self.acquire_errors)
                wait = self.poll_s
            else:
                if token is not None:
                    return token
                # poll again after poll_s, or as soon as the holder's lease would run out
                wait = min(self.poll_s, max(0.005, self.observed.expires_in_s))
            if stop is None:
                await asyncio.sleep(wait)
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        return None

    async def renew(self) -> bool:
        """Extend the lease if this process still holds it with its token; False (and `lost`
        set) when it does not."""
        if self.token is None or self.lost.is_set():
            return False
        started = time.monotonic()
        if await self._renew(keys=[self.key], args=[self.value, self.ttl_ms]):
            self.valid_until = self._validity(started)
            self.renewals += 1
            return True
        self._mark_lost("another owner holds it or it expired")
        return False

    async def check(self, token: int) -> None:
        """Raise LeaseLost unless this process holds the lease with `token` now, by Redis and by
        its own clock: what a writer calls right before a registry publish. A RedisError (Redis
        unreachable) propagates: either way, do not publish."""
        if token != self.token or not self.held:
            raise LeaseLost(f"{self.domain}: token {token} is not held by {self.owner} (held: {self.token}, "
                            f"{'lost' if self.lost.is_set() else 'expired by the local clock'})")
        current = await self.client.get(self.key)
        if current != f"{token} {self.owner}":
            if token == self.token:  # a check that began before a re-acquire says nothing about the new token
                self._mark_lost(f"Redis holds {current!r}")
            raise LeaseLost(f"{self.domain}: token {token} was taken over (Redis holds {current!r})")

    async def fence(self) -> int:
        """The largest token ever handed out for this domain (0: none yet)."""
        return int(await self.client.get(self.fence_key) or 0)

    async def holder(self) -> Holder | None:
        """Who holds the lease now, read from Redis (None: nobody)."""
        async with self.client.pipeline(transaction=True) as pipe:
            value, pttl = await pipe.get(self.key).pttl(self.key).execute()
        if value is None:
            return None
        token, _, owner = value.partition(" ")
        return Holder(owner, int(token), max(0, pttl) / 1000)

    async def release(self) -> bool:
        """Give the lease up (a clean shutdown): a standby takes over at its next poll instead of
        after the TTL. True when this process still held it."""
        await self.stop_keeping()
        if self.token is None:
            return False
        try:
            released = bool(await self._release(keys=[self.key], args=[self.value]))
        finally:
            if self.token is not None:
                log.info("%s: learner lease token %d released by %s", self.domain, self.token, self.owner)
            self.token, self.valid_until = None, 0.0
        return released

    def _mark_lost(self, why: str) -> None:
        if not self.lost.is_set():
            log.warning("%s: learner lease token %s lost by %s: %s", self.domain, self.token, self.owner, why)
            self.lost.set()

    # ---- renewal in the background ----
    def start_keeping(self) -> None:
        """Renew every renew_every_s until released or lost (then `lost` is set)."""
        if self.token is None:
            raise LeaseLost(f"{self.domain}: acquire before keeping")
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._keep(), name=f"lease-{self.domain}")

    async def stop_keeping(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None

    async def _keep(self) -> None:
        while not self.lost.is_set():
            await asyncio.sleep(self.renew_every_s)
            try:
                # a renewal still pending when the lease runs out by the local clock is too late
                # whatever Redis answers (the client retries a dead server for seconds)
                remaining = self.valid_until - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError("no time left on the lease")
                await asyncio.wait_for(self.renew(), remaining)
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                # Redis unreachable: keep trying while the lease may still be ours; past the
                # local validity a standby may hold it, so stop counting on it
                if time.monotonic() >= self.valid_until:
                    self._mark_lost(f"could not renew before it ran out ({type(e).__name__}: {e})")
                else:
                    log.warning("%s: lease renewal failed (%s: %s); retrying", self.domain, type(e).__name__, e)
        # the lease is gone: nothing left to renew

    @contextlib.asynccontextmanager
    async def holding(self, stop: asyncio.Event | None = None):
        """Wait for the lease, keep it renewed inside the block, release it on the way out.
        Yields the token (None when stop was set before it was acquired)."""
        token = await self.acquire(stop)
        if token is None:
            yield None
            return
        self.start_keeping()
        try:
            yield token
        finally:
            await self.release()


# ---- command line ----
async def _show(client: Redis, domain: str) -> int:
    lease = LearnerLease(client, domain, owner="show")
    holder, fence = await lease.holder(), await lease.fence()
    if holder is None:
        print(f"{domain}: free (last token {fence})")
    else:
        print(f"{domain}: held by {holder.owner} with token {holder.token}, {holder.expires_in_s:.1f} s left "
              f"(last token {fence})")
    return 0


async def _hold(client: Redis, domain: str, ttl_s: float, poll_s: float) -> int:
    """Hold the lease until SIGTERM/SIGINT (then release it) or until it is lost (exit 1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lease = LearnerLease(client, domain, ttl_s=ttl_s, poll_s=poll_s)
    print(f"{domain}: waiting for the lease as {lease.owner}", flush=True)
    async with lease.holding(stop) as token:
        if token is None:
            return 0
        print(f"{domain}: held by {lease.owner} with token {token}", flush=True)
        lost = asyncio.ensure_future(lease.lost.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([lost, stopped], return_when=asyncio.FIRST_COMPLETED)
        for f in (lost, stopped):
            f.cancel()
        if lease.lost.is_set():
            print(f"{domain}: lost token {token}", flush=True)
            return 1
    print(f"{domain}: released token {token}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from shared.redis_conn import redis_client

    ap = argparse.ArgumentParser(prog="python -m trainer.lease", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("show", "hold"))
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--redis-password-file", default="")
    ap.add_argument("--domain", required=True)
    ap.add_argument("--ttl-s", type=float, default=10.0)
    ap.add_argument("--poll-s", type=float, default=1.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def run() -> int:
        client = redis_client(args.redis_url, args.redis_password_file)
        try:
            if args.command == "show":
                return await _show(client, args.domain)
            return await _hold(client, args.domain, args.ttl_s, args.poll_s)
        finally:
            await client.aclose()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
