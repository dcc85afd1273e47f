"""One server interceptor for the cross-cutting concerns of every unary and client-streaming RPC.

- request id: the caller's `x-request-id` metadata, else a new one; set in the logging
  context, named in every error message, and echoed in trailing metadata when the caller
  sent one (a trailer on every response costs both sides CPU on the hot path);
- errors: a shared.errors.ServiceError becomes its status code and message; anything else
  is logged with its traceback and becomes INTERNAL naming the request id (no internals leak);
- metrics: count and latency by method and final status code.

One interceptor rather than four: each wrapping layer costs a coroutine per RPC on a hot
path that answers thousands of calls a second. Wrapped handlers are cached per method.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Any, Awaitable, Callable

import grpc

from shared import logs, metrics
from shared.errors import ServiceError

log = logging.getLogger(__name__)


class ServingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}
        self._prefix = f"{os.getpid():x}"
        self._counter = itertools.count(1)
        self._stats = metrics.REQUEST_STATS

    def _observe(self, method: str, code: str, seconds: float) -> None:
        stats = self._stats
        stats.observe(stats.series(method, code), seconds)

    def _request_id(self, context: grpc.aio.ServicerContext) -> tuple[str, bool]:
        """(request id, whether the caller sent it)."""
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id" and value:
                return str(value)[:128], True
        return f"{self._prefix}-{next(self._counter):x}", False

    def _wrap(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        short = method.rsplit("/", 1)[-1]

        async def handle(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            rid, echo = self._request_id(context)
            token = logs.request_id.set(rid)
            code = "OK"
            try:
                if echo:
                    context.set_trailing_metadata((("x-request-id", rid),))
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
            except Exception:
                code = "INTERNAL"
                log.exception("unhandled error in %s", short)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")
            finally:
                self._observe(short, code, time.perf_counter() - start)
                logs.request_id.reset(token)

        return handle

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._wrapped:
            cached = self._wrapped[method]
            return cached if cached is not None else await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        wrapped = None
        if handler is not None:
            if handler.unary_unary is not None:
                wrapped = grpc.unary_unary_rpc_method_handler(
                    self._wrap(method, handler.unary_unary),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
            elif handler.stream_unary is not None:
                wrapped = grpc.stream_unary_rpc_method_handler(
                    self._wrap(method, handler.stream_unary),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
        self._wrapped[method] = wrapped
        return wrapped if wrapped is not None else handler
