"""One server interceptor for the cross-cutting concerns of every unary and client-streaming RPC.

- request id: the caller's `x-request-id` metadata, else a new one; set in the logging
  context, named in every error message, and echoed in trailing metadata when the caller
  sent one (a trailer on every response costs both sides CPU on the hot path);
- admission control: over `max_concurrent_rpcs` RPCs in flight in this server, or while the
  oldest admitted call of the same unary method has been in flight longer than
  `max_queue_wait_ms`, a call is answered RESOURCE_EXHAUSTED at once, before it costs any
  model time (see _refusal);
- errors: a shared.errors.ServiceError becomes its status code and message; a
  NotImplementedError becomes UNIMPLEMENTED; anything else is logged with its traceback
  and becomes INTERNAL naming the request id (no internals leak);
- metrics: count and latency by method and final status code, shed calls included.

One interceptor rather than four: each wrapping layer costs a coroutine per RPC on a hot
path that answers thousands of calls a second. Wrapped handlers are cached per method that
exists (unknown names are not cached: a caller could otherwise grow the cache without bound).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
from typing import Any, Awaitable, Callable

import grpc

from shared import logs, metrics
from shared.errors import ResourceExhausted, ServiceError

log = logging.getLogger(__name__)

# Never shed: a load balancer must be able to ask an overloaded process whether it is
# healthy (and get SERVING: overload is not ill health), and an operator to look inside it.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ServingInterceptor(grpc.aio.ServerInterceptor):
    """One per server: the in-flight count it bounds is that server's.

    max_concurrent_rpcs: admitted non-exempt calls in flight at once; 0 = no limit.
    max_queue_wait_ms: refuse a unary call while the oldest admitted call of its method has
    been in flight longer than this; 0 = off.
    """

    def __init__(self, max_concurrent_rpcs: int = 0, max_queue_wait_ms: float = 0.0) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._prefix = f"{os.getpid():x}"
        self._counter = itertools.count(1)
        self._stats = metrics.REQUEST_STATS
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.max_queue_wait_s = max_queue_wait_ms / 1000.0
        self.in_flight = 0  # admitted, not finished; only ever touched from the event loop

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

    def _refusal(self, admitted: collections.deque | None, now: float) -> str | None:
        """Why a new call must be shed now, or None to admit it.

        The in-flight bound caps the queue a call can join (so its wait) whatever the cause;
        the age of the method's oldest admitted call catches a queue that is short in calls
        but slow to drain. The oldest call is the head of the queue because this server's
        queues (event loop, micro-batcher) are first in, first out. It is tracked per method
        so one slow method (a large upsert) cannot shed the others; only unary methods, as a
        client stream's age measures its client's pace, not our queue.
        """
        if self.max_concurrent_rpcs and self.in_flight >= self.max_concurrent_rpcs:
            return "concurrency"
        if admitted is not None and self.max_queue_wait_s:
            while admitted and not admitted[0][1]:  # finished calls leave lazily, O(1) amortized
                admitted.popleft()
            if admitted and now - admitted[0][0] > self.max_queue_wait_s:
                return "queue_wait"
        return None

    def _wrap(self, method: str, behavior: Callable[..., Awaitable[Any]], unary: bool) -> Callable[..., Awaitable[Any]]:
        short = method.rsplit("/", 1)[-1]
        exempt = method.startswith(EXEMPT_PREFIXES)
        admitted: collections.deque | None = collections.deque() if unary and not exempt else None
        shed_counters = {reason: metrics.SHED.labels(short, reason) for reason in ("concurrency", "queue_wait")}

        async def handle(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            rid, echo = self._request_id(context)
            token = logs.request_id.set(rid)
            code = "OK"
            entry = None
            try:
                if echo:
                    context.set_trailing_metadata((("x-request-id", rid),))
                if not exempt:
                    reason = self._refusal(admitted, start)
                    if reason is not None:
                        shed_counters[reason].inc()
                        raise ResourceExhausted(f"server overloaded ({reason}); retry later with backoff")
                    self.in_flight += 1
                    entry = [start, True]
                    if admitted is not None:
                        admitted.append(entry)
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
                if entry is not None:
                    self.in_flight -= 1
                    entry[1] = False
                self._observe(short, code, time.perf_counter() - start)
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
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._wrap(method, handler.unary_unary, unary=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        elif handler.stream_unary is not None:
            wrapped = grpc.stream_unary_rpc_method_handler(
                self._wrap(method, handler.stream_unary, unary=False),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        self._wrapped[method] = wrapped
        return wrapped
