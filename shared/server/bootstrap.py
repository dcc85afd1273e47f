"""Build, run and stop a service's grpc.aio server.

A ServerApp is what a service's `main` wires: its settings, its ServedModels, and a
function that adds its domain servicers. Every app gets, without asking:
- the KServe V2 servicer over its models, next to its domain API;
- the standard health service (with List): NOT_SERVING until every model is loaded (and
  until `ready` says so), SERVING after, NOT_SERVING again while draining on shutdown;
- server reflection, grpc.reflection.v1 and v1alpha; Prometheus metrics over HTTP;
- the ServingInterceptor, with admission control (max_concurrent_rpcs, queue_delay_target_ms)
  and grpc's own maximum_concurrent_rpcs as a hard backstop above it;
- optional TLS / mTLS; keepalive; graceful shutdown on SIGTERM/SIGINT (see ServerApp.stop);
- `--workers N`: N processes sharing the port through SO_REUSEPORT.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Awaitable, Callable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from shared import logs
from shared.serving import ServedModel
from shared.server.health import HealthServicer
from shared.server.interceptors import ServingInterceptor
from shared.server.reflection_v1 import SERVICE_NAME as REFLECTION_V1, add_reflection_v1
from shared.settings import ServerSettings
from shared.v2 import V2Servicer, add_to_server as add_v2

log = logging.getLogger(__name__)

# Adds a service's own servicers to the server; returns their full service names.
Register = Callable[[grpc.aio.Server], list[str]]


def server_options(s: ServerSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", s.max_message_mb << 20),
        ("grpc.max_send_message_length", s.max_message_mb << 20),
        ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 2),
        # Only share the port on purpose: a single process should fail loudly on a busy port.
        ("grpc.so_reuseport", 1 if s.workers > 1 or os.environ.get("STOREFRONT_WORKER_INDEX") else 0),
    ]


def hard_rpc_limit(s: ServerSettings) -> int | None:
    """grpc's own bound on RPCs in flight, a backstop well above the interceptor's limit.

    grpc counts what the interceptor does not: health checks and Watch streams, reflection,
    feedback streams, and the calls being answered RESOURCE_EXHAUSTED by the interceptor
    itself. It answers RESOURCE_EXHAUSTED too, but uncounted in our metrics, so it must only
    act when shedding in the interceptor cannot keep up.
    """
    return 4 * s.max_concurrent_rpcs if s.max_concurrent_rpcs > 0 else None


def server_credentials(s: ServerSettings) -> grpc.ServerCredentials | None:
    if not s.tls_cert:
        return None
    key = Path(s.tls_key).read_bytes()
    cert = Path(s.tls_cert).read_bytes()
    ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


@dataclasses.dataclass
class ServerApp:
    name: str
    settings: ServerSettings
    models: Mapping[str, ServedModel]
    register: Register | None = None
    v2: bool = True  # serve the models over KServe V2 too (the trainer serves none)
    # Beyond the models being loaded, what health SERVING also needs (the trainer: a model
    # version for every domain it learns); re-checked by refresh_health().
    ready: Callable[[], bool] | None = None
    # Called after the models started / before they stop (e.g. the feedback client).
    on_start: list[Callable[[], Awaitable[None]]] = dataclasses.field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = dataclasses.field(default_factory=list)
    # The longest one shutdown step (grpc's stop after its grace, an on_stop hook, a model's
    # stop) may take before it is abandoned, logged by name: a step stuck on a dead dependency
    # must not keep a SIGTERM'd process alive until the orchestrator's SIGKILL, which loses
    # what the later steps would have flushed.
    stop_step_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        self.server: grpc.aio.Server | None = None
        self.health = HealthServicer()
        self.interceptor = ServingInterceptor(self.settings.max_concurrent_rpcs, self.settings.queue_delay_target_ms)
        self.port: int = 0
        self.metrics_port: int = 0
        self.service_names: list[str] = []
        self._metrics_httpd = None
        self._stopping = False

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def _set_health(self) -> None:
        if self._stopping:
            return
        ready = all(m.ready for m in self.models.values()) and (self.ready is None or self.ready())
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def refresh_health(self) -> None:
        """Re-read readiness (models and `ready`) into the health service."""
        await self._set_health()

    async def start(self) -> int:
        """Bind, start serving (health NOT_SERVING), load the models, flip health. Returns the port."""
        s = self.settings
        self.server = grpc.aio.server(interceptors=[self.interceptor], options=server_options(s),
                                      maximum_concurrent_rpcs=hard_rpc_limit(s))
        names = []
        if self.v2:
            add_v2(V2Servicer(self.models), self.server)
            names.append("inference.GRPCInferenceService")
        if self.register is not None:
            names += self.register(self.server)
        self.service_names = names
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflected = [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME,
                     REFLECTION_V1]
        reflection.enable_server_reflection(reflected, self.server)
        add_reflection_v1(reflected, self.server)
        address = f"{s.host}:{s.port}"
        creds = server_credentials(s)
        self.port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {address}")
        await self._set_health()
        await self.server.start()
        mport = s.resolved_metrics_port
        if mport > 0:
            self._metrics_httpd, _ = start_http_server(mport, addr=s.host)
            self.metrics_port = mport
        loop = asyncio.get_running_loop()
        for served in self.models.values():
            served.handle.on_swap(lambda _m: loop.create_task(self._set_health()))
        await asyncio.gather(*(m.start() for m in self.models.values()))
        for hook in self.on_start:
            await hook()
        await self._set_health()
        log.info("%s serving gRPC on %s%s (metrics %s)", self.name, address if s.port else self.address,
                 " with TLS" if creds else "", f"http://{s.host}:{mport}/metrics" if mport > 0 else "off")
        return self.port

    async def stop(self) -> None:
        """Drain, then stop: in this order, so that no admitted call is lost.

        1. health NOT_SERVING (Watch streams are told at once);
        2. keep serving for drain_s, so load balancers that poll Check see it and move away
           before we refuse anything (skipped when nothing ever health-checked us);
        3. end the Watch streams: an open one would otherwise hold server.stop() for its
           whole grace and then be cancelled;
        4. server.stop(grace_s): new RPCs are refused, in-flight ones get grace_s to finish;
        5. only then the on_stop hooks and the models, which in-flight calls still use.
        Each step is bounded (stop_step_timeout_s; grpc's stop gets grace_s more): one that
        hangs is abandoned and named in the log, and the steps after it still run.
        """
        if self._stopping:
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        try:
            if self.server is not None:
                if self.settings.drain_s > 0 and self.health.polled:
                    log.info("%s: NOT_SERVING; draining for %.1f s before refusing new calls", self.name,
                             self.settings.drain_s)
                    await asyncio.sleep(self.settings.drain_s)
                await self._stop_step("closing the health Watch streams", self.health.close_watches())
                await self._stop_step("stopping the gRPC server", self.server.stop(self.settings.grace_s),
                                      self.settings.grace_s + self.stop_step_timeout_s)
        finally:
            for hook in self.on_stop:
                await self._stop_step(f"the shutdown hook {getattr(hook, '__qualname__', hook)!r}", hook())
            await asyncio.gather(*(self._stop_step(f"stopping model {name!r}", m.stop())
                                   for name, m in self.models.items()))
            if self._metrics_httpd is not None:
                self._metrics_httpd.shutdown()
                self._metrics_httpd.server_close()
            log.info("%s stopped", self.name)

    async def _stop_step(self, what: str, step: Awaitable[None], timeout_s: float | None = None) -> None:
        """Await one shutdown step in a task of its own, for at most timeout_s (default
        stop_step_timeout_s). Past it the task is cancelled and left behind, not awaited: a step
        that swallows its cancellation would otherwise hold the shutdown as surely as the hang.
        A step that fails is logged; the shutdown goes on either way."""
        timeout_s = self.stop_step_timeout_s if timeout_s is None else timeout_s
        task = asyncio.ensure_future(step)
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            task.cancel()
            log.error("%s: %s did not finish within %.1f s; abandoned so that the shutdown ends", self.name,
                      what, timeout_s)
        elif not task.cancelled() and task.exception() is not None:
            log.error("%s: %s failed", self.name, what, exc_info=task.exception())


async def _serve_until_signal(app: ServerApp) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
        print(f"{app.name} listening on {app.address}", flush=True)
        await stop.wait()
        log.info("%s: shutdown signal received, draining", app.name)
    finally:
        await app.stop()


def run_app(make_app: Callable[[ServerSettings], ServerApp], settings: ServerSettings) -> int:
    """Entry point of a service's main: one process, or a supervisor of `workers` processes."""
    logs.configure(settings.log_level, settings.log_format)
    if settings.workers > 1:
        return _supervise(settings)
    asyncio.run(_serve_until_signal(make_app(settings)))
    _exit_past_abandoned_threads()
    return 0


# A daemon thread whose name starts with this may be abandoned at shutdown (it commits nothing
# after the stop); run_app exits past it instead of waiting.
ABANDONABLE_THREAD = "abandonable:"


def _exit_past_abandoned_threads() -> None:
    """Everything durable is closed by now. A daemon thread still running (the trainer's round
    abandoned at shutdown, deep in torch) can abort the interpreter's finalization with a C++
    `terminate` (exit -6, seen in CI), so when one is left, flush and leave without finalizing."""
    left = [t.name for t in threading.enumerate() if t.daemon and t.is_alive() and t.name.startswith(ABANDONABLE_THREAD)]
    if not left:
        return
    log.info("exiting past abandoned thread(s) %s", ", ".join(left))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _supervise(settings: ServerSettings) -> int:
    """Start N copies of this very command with --workers 1 on the same port; relay signals."""
    base = list(sys.orig_argv)
    children = []
    for i in range(settings.workers):
        mport = settings.resolved_metrics_port
        extra = ["--workers", "1", "--metrics-port", str(mport + i if mport > 0 else 0)]
        env = dict(os.environ, STOREFRONT_WORKER_INDEX=str(i))
        children.append(subprocess.Popen(base + extra, env=env))
    log.info("started %d workers on port %d: pids %s", len(children), settings.port, [c.pid for c in children])

    relayed: set[int] = set()

    def relay(signum, _frame):
        relayed.add(signum)
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    codes = [c.wait() for c in children]
    # A worker killed by a signal has a negative code, which max() would hide behind a clean 0.
    # One killed by the very signal we relayed (it came while the worker was still importing,
    # before its handler existed) did stop as asked.
    failed = [128 - c if c < 0 else c for c in codes if c != 0 and -c not in relayed]
    return max(failed, default=0)
