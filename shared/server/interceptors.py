"""One server interceptor for the cross-cutting concerns of every unary and client-streaming RPC.

- request id: the caller's `x-request-id` metadata, else a new one; set in the logging
  context, named in every error message, and echoed in trailing metadata when the caller
  sent one (a trailer on every response costs both sides CPU on the hot path);
- request decoding: bytes that are not a valid message of the method's request type are
  answered INVALID_ARGUMENT "request could not be decoded as <type>" (grpc's own answer is
  UNKNOWN naming a Python exception class: it leaks internals and reads as our fault);
- admission control (see AdaptiveLimit): a call is answered RESOURCE_EXHAUSTED at once,
  before it costs any model time, when `max_concurrent_rpcs` calls are in flight in this
  server ("concurrency"), or when its unary method is at its adaptive concurrency limit
  ("adaptive_limit"), a limit that shrinks while the method shows a standing queue;
- errors: a shared.errors.ServiceError becomes its status code and message; a
  NotImplementedError becomes UNIMPLEMENTED; anything else is logged with its traceback
  and becomes INTERNAL naming the request id (no internals leak);
- metrics: count and latency by method and final status code, shed and undecodable calls
  included.

One interceptor rather than four: each wrapping layer costs a coroutine per RPC on a hot
path that answers thousands of calls a second. Wrapped handlers are cached per method that
exists (unknown names are not cached: a caller could otherwise grow the cache without bound).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from shared import logs, metrics
from shared.errors import InvalidArgument, ResourceExhausted, ServiceError

log = logging.getLogger(__name__)

# Never shed: a load balancer must be able to ask an overloaded process whether it is
# healthy (and get SERVING: overload is not ill health), and an operator to look inside it.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# The adaptive limit's ceiling when max_concurrent_rpcs is 0 (no server-wide cap): a limit
# must start somewhere, and it starts permissive (see AdaptiveLimit).
UNCAPPED_CEILING = 1024


class AdaptiveLimit:
    """The concurrency limit of one unary method, adapted to the queue its calls see.

    The signal is CoDel's: the MINIMUM latency of the calls that completed OK in each short
    interval. A standing queue delays every call, so even the fastest one is slow; a single
    slow call (100k candidates, a 5,000-row batch) does not move the minimum while other calls
    keep completing, so it cannot make the method refuse everyone else. The minimum is
    compared with `baseline`, the method's no-load latency (the lowest interval minimum
    seen). The control is AIMD (TCP's, and Netflix concurrency-limits'): an interval whose
    minimum exceeds max(baseline * tolerance, baseline + target) multiplies the limit by
    `decrease`; any other interval adds 1. The limit stays within [floor, ceiling]: at the
    floor a slow method still serves `floor` calls at once, and the ceiling is the server's
    own cap.

    The baseline falls at once to any lower interval minimum, and rises (1/32 of the way to the
    interval minimum per interval, ~3 s) only while the limit is at the floor: the queue has then been cut as short as it will be, so the
    latency still seen is the method's own (a slower model version, a busier machine), and
    the limit must be allowed to recover. Letting it rise at any other time would let a
    long overload teach the limiter that a queued latency is normal, a target higher each time.

    Only OK completions are samples: a call refused early by validation is fast whatever the
    queue, and a stream of them must not hide one. The interval closes lazily, on the first
    completion after its end, so the hot path is a few comparisons and no allocation; the
    gauge (a lock inside prometheus_client) is set only when an interval closes.
    Touched only from the event loop: no locks.
    """

    __slots__ = ("ceiling", "floor", "target_s", "tolerance", "interval_s", "decrease", "drift", "clock",
                 "limit", "in_flight", "baseline", "_min", "_interval_end", "_gauge")

    def __init__(self, ceiling: int, target_s: float, *, floor: int = 4, tolerance: float = 2.0,
                 interval_s: float = 0.1, decrease: float = 0.9, drift: float = 1 / 32,
                 clock: Callable[[], float] = time.perf_counter, gauge: Any = None) -> None:
        if ceiling < 1 or floor < 1 or target_s < 0 or tolerance < 1 or interval_s <= 0 or not 0 < decrease < 1:
            raise ValueError("AdaptiveLimit: ceiling, floor >= 1; target_s >= 0; tolerance >= 1; "
                             "interval_s > 0; 0 < decrease < 1")
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.target_s = target_s
        self.tolerance = tolerance
        self.interval_s = interval_s
        self.decrease = decrease
        self.drift = drift
        self.clock = clock
        # Start permissive: until the method has shown a queue, only the server-wide cap applies.
        self.limit = float(ceiling)
        self.in_flight = 0
        self.baseline = math.inf
        self._min = math.inf  # fastest OK completion of the current interval
        self._interval_end = clock() + interval_s
        self._gauge = gauge
        if gauge is not None:
            gauge.set(self.limit)

    def try_acquire(self) -> bool:
        """Admit one call (True) unless the method is at its limit."""
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self, started: float, ok: bool) -> float:
        """One admitted call finished (ok: it answered OK); returns the clock's now."""
        now = self.clock()
        self.in_flight -= 1
        if ok:
            latency = now - started
            if now >= self._interval_end:
                self._close_interval()
                self._interval_end = now + self.interval_s
                self._min = latency
            elif latency < self._min:
                self._min = latency
        return now

    @property
    def threshold(self) -> float:
        """The interval minimum above which the method is taken to have a standing queue."""
        b = self.baseline
        return max(b * self.tolerance, b + self.target_s)

    def _close_interval(self) -> None:
        m = self._min
        if m == math.inf:  # no OK completion since the limiter was made
            return
        b = self.baseline
        old = self.limit
        if m > self.threshold:
            self.limit = max(float(self.floor), old * self.decrease)
            if self.limit <= self.floor:
                self.baseline = b + (m - b) * self.drift
        else:
            self.limit = min(float(self.ceiling), old + 1.0)
        if m < b:
            self.baseline = m
        if self._gauge is not None and self.limit != old:
            self._gauge.set(self.limit)


class _Undecodable:
    """What a wrapped request deserializer returns for bytes that are not a valid message, so
    that the wrapped behaviour can answer INVALID_ARGUMENT (a deserializer can only raise, and
    grpc turns that into UNKNOWN with the exception's class and text)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDECODABLE"


UNDECODABLE = _Undecodable()


def tolerant_deserializer(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, and whatever else the bytes can provoke: the caller's bytes
            return UNDECODABLE
    return decode


def request_type_name(deserializer: Callable[[bytes], Any] | None) -> str:
    """The request's full proto name from a generated `Message.FromString` (a bound classmethod)."""
    desc = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = getattr(desc, "full_name", None)
    return name if isinstance(name, str) and name else "the method's request type"


async def _decoded(requests: AsyncIterator[Any], message: str) -> AsyncIterator[Any]:
    """A client stream that raises InvalidArgument at the first undecodable message. (A servicer
    reading with context.read() instead of iterating would get UNDECODABLE itself; ours iterate.)"""
    async for request in requests:
        if request is UNDECODABLE:
            raise InvalidArgument(message)
        yield request


class ServingInterceptor(grpc.aio.ServerInterceptor):
    """One per server: the in-flight count it bounds is that server's.

    max_concurrent_rpcs: admitted non-exempt calls in flight at once (unary and client
    streams); 0 = no limit.
    queue_delay_target_ms: the standing-queue delay a unary method may show before its
    adaptive limit shrinks (AdaptiveLimit's target); 0 = no adaptive limits.
    clock: seconds, monotonic; read when a method's handler is first wrapped, so a test can
    set it before the server starts and drive the limits deterministically.
    min_limit, tolerance, interval_s: AdaptiveLimit's floor, tolerance and interval.
    """

    def __init__(self, max_concurrent_rpcs: int = 0, queue_delay_target_ms: float = 0.0, *,
                 clock: Callable[[], float] = time.perf_counter, min_limit: int = 4, tolerance: float = 2.0,
                 interval_s: float = 0.1) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._prefix = f"{os.getpid():x}"
        self._counter = itertools.count(1)
        self._stats = metrics.REQUEST_STATS
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.queue_delay_target_s = queue_delay_target_ms / 1000.0
        self.clock = clock
        self.min_limit = min_limit
        self.tolerance = tolerance
        self.interval_s = interval_s
        self.in_flight = 0  # admitted, not finished; only ever touched from the event loop
        self.limits: dict[str, AdaptiveLimit] = {}  # full method name -> its limit (unary, not exempt)

    @property
    def cache_size(self) -> int:
        return len(self._wrapped)

    def _observe(self, method: str, code: str, seconds: float) -> None:
        stats = self._stats
        stats.observe(stats.series(method, code), seconds)

    def _request_id(self, context: grpc.aio.ServicerContext) -> tuple[str, bool]:
        """(request id, whether the caller sent it)."""
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id" and value:
                return str(value)[:128], True
        return f"{self._prefix}-{next(self._counter):x}", False

    def _limit_for(self, method: str, short: str) -> AdaptiveLimit:
        found = self.limits.get(method)
        if found is None:  # two first calls may wrap one method concurrently: they share one limit
            found = self.limits[method] = AdaptiveLimit(
                self.max_concurrent_rpcs or UNCAPPED_CEILING, self.queue_delay_target_s, floor=self.min_limit,
                tolerance=self.tolerance, interval_s=self.interval_s, clock=self.clock,
                gauge=metrics.ADMISSION_LIMIT.labels(short))
        return found

    def _wrap(self, method: str, behavior: Callable[..., Awaitable[Any]], unary: bool,
              request_type: str | None) -> Callable[..., Awaitable[Any]]:
        short = method.rsplit("/", 1)[-1]
        exempt = method.startswith(EXEMPT_PREFIXES)
        # A client stream's duration is its client's pace, not our queue: it counts toward
        # max_concurrent_rpcs only, never as a latency sample.
        limit = self._limit_for(method, short) if unary and not exempt and self.queue_delay_target_s > 0 else None
        shed_concurrency = metrics.SHED.labels(short, "concurrency")
        shed_adaptive = metrics.SHED.labels(short, "adaptive_limit")
        undecodable = f"request could not be decoded as {request_type}"
        check_stream = not unary and request_type is not None
        clock = self.clock

        async def handle(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            start = clock()
            rid, echo = self._request_id(context)
            token = logs.request_id.set(rid)
            code = "OK"
            admitted = False
            try:
                if echo:
                    context.set_trailing_metadata((("x-request-id", rid),))
                if request_or_iterator is UNDECODABLE:  # refused before admission: it costs nothing
                    raise InvalidArgument(undecodable)
                if not exempt:
                    cap = self.max_concurrent_rpcs
                    if cap and self.in_flight >= cap:
                        shed_concurrency.inc()
                        raise ResourceExhausted("server overloaded (concurrency); retry later with backoff")
                    if limit is not None and not limit.try_acquire():
                        shed_adaptive.inc()
                        raise ResourceExhausted("server overloaded (adaptive_limit); retry later with backoff")
                    self.in_flight += 1
                    admitted = True
                if check_stream:
                    request_or_iterator = _decoded(request_or_iterator, undecodable)
                return await behavior(request_or_iterator, context)
            except ServiceError as e:
                code = e.code.name
                await context.abort(e.code, f"{e.message} (request id {rid})")
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                c = context.code()
                code = c.name if isinstance(c, grpc.StatusCode) else "UNKNOWN"
                raise
            except NotImplementedError:
                # A generated servicer base's unimplemented method: the caller's mistake or our
                # gap, never an internal fault.
                code = "UNIMPLEMENTED"
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"method not implemented (request id {rid})")
            except Exception:
                code = "INTERNAL"
                log.exception("unhandled error in %s", short)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")
            finally:
                if admitted:
                    self.in_flight -= 1
                    end = limit.release(start, code == "OK") if limit is not None else clock()
                else:
                    end = clock()
                self._observe(short, code, end - start)
                logs.request_id.reset(token)

        return handle

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            # Unknown method: grpc answers UNIMPLEMENTED. Not cached, so distinct made-up names
            # cannot grow memory; the set of real methods is fixed when the server starts.
            return None
        wrapped = handler  # server-streaming methods (health Watch, reflection) pass through
        deserializer = handler.request_deserializer
        request_type = None  # no deserializer: the behaviour takes the raw bytes, nothing to check
        if deserializer is not None and (handler.unary_unary is not None or handler.stream_unary is not None):
            request_type = request_type_name(deserializer)
            deserializer = tolerant_deserializer(deserializer)
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._wrap(method, handler.unary_unary, True, request_type),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
        elif handler.stream_unary is not None:
            wrapped = grpc.stream_unary_rpc_method_handler(
                self._wrap(method, handler.stream_unary, False, request_type),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
        self._wrapped[method] = wrapped
        return wrapped
