"""Per-caller token buckets for the outcome RPCs (ReportOutcome / StreamOutcomes of every domain).

Outcomes become training labels, so one caller must not be able to flood a model with them.
Each caller has a bucket of `burst` tokens refilled at `rate` tokens per second; one outcome
costs one token; an outcome that finds the bucket empty is refused (RESOURCE_EXHAUSTED, which
clients retry with backoff). The buckets live in the event loop's thread (no lock) and are
bounded: the least recently used caller is forgotten beyond `max_callers` (a forgotten caller
starts again with a full bucket, which is no worse than a new caller).

Who is a caller (`caller_of`): the client certificate's common name under mTLS (stable across
connections and addresses), else the peer's IP address without its port: a client opening new
connections gets new ports, and keying by port would hand it a fresh bucket per connection.
"""
from __future__ import annotations

import collections
import ipaddress
import time
from typing import Callable


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.7:53412' -> '10.0.0.7'; 'ipv6:[::1]:53412' -> '::1'; other forms as they are."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0] if rest.startswith("[") else rest
        host = host.strip("[]")
        return host.split("%", 1)[0]
    return peer


def is_loopback_peer(peer: str) -> bool:
    """True for a loopback TCP peer (127.0.0.0/8, ::1, ::ffff:127.x) or a Unix socket."""
    if peer.startswith("unix:") or peer.startswith("unix-abstract:"):
        return True
    try:
        ip = ipaddress.ip_address(peer_host(peer))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def caller_of(context) -> str:
    """The identity a rate limit is keyed by (see the module docstring)."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # not every context type offers it (e.g. in-process fakes)
        auth = {}
    names = auth.get("x509_common_name")
    if names:
        return "cn:" + names[0].decode(errors="replace")
    return "ip:" + peer_host(context.peer() or "")


class RateLimiter:
    """Token buckets keyed by caller. rate <= 0 turns limiting off."""

    def __init__(self, rate: float, burst: int, max_callers: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 and rate > 0:
            raise ValueError("burst must be >= 1 when a rate is set")
        self.rate = float(rate)
        self.burst = float(max(1, burst))
        self.max_callers = max_callers
        self.clock = clock
        self._buckets: collections.OrderedDict[str, list[float]] = collections.OrderedDict()  # caller -> [tokens, t]

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, caller: str, cost: float = 1.0) -> bool:
        """Take `cost` tokens from the caller's bucket; False (taking nothing) when it has fewer."""
        if self.rate <= 0:
            return True
        now = self.clock()
        b = self._buckets.get(caller)
        if b is None:
            b = self._buckets[caller] = [self.burst, now]
            if len(self._buckets) > self.max_callers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(caller)
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        if b[0] < cost:
            return False
        b[0] -= cost
        return True
