"""Build, run and stop a service's grpc.aio server.

A ServerApp is what a service's `main` wires: its settings, its ServedModels, and a
function that adds its domain servicers. Every app gets, without asking:
- the KServe V2 servicer over its models, next to its domain API;
- the standard health service: NOT_SERVING until every model is loaded, SERVING after,
  NOT_SERVING again while draining on shutdown;
- server reflection; Prometheus metrics over HTTP; the ServingInterceptor;
- optional TLS / mTLS; keepalive; graceful shutdown on SIGTERM/SIGINT;
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
from pathlib import Path
from typing import Awaitable, Callable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from shared import logs
from shared.serving import ServedModel
from shared.server.interceptors import ServingInterceptor
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
    # Called after the models started / before they stop (e.g. the feedback client).
    on_start: list[Callable[[], Awaitable[None]]] = dataclasses.field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.server: grpc.aio.Server | None = None
        self.health = HealthServicer()
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
        ready = all(m.ready for m in self.models.values())
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def start(self) -> int:
        """Bind, start serving (health NOT_SERVING), load the models, flip health. Returns the port."""
        s = self.settings
        self.server = grpc.aio.server(interceptors=[ServingInterceptor()], options=server_options(s))
        names = []
        if self.v2:
            add_v2(V2Servicer(self.models), self.server)
            names.append("inference.GRPCInferenceService")
        if self.register is not None:
            names += self.register(self.server)
        self.service_names = names
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server)
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
        """Drain: health NOT_SERVING, refuse new RPCs, give in-flight ones grace_s, stop models."""
        if self._stopping:
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        try:
            if self.server is not None:
                await self.server.stop(self.settings.grace_s)
        finally:
            for hook in self.on_stop:
                try:
                    await hook()
                except Exception:
                    log.exception("%s: shutdown hook failed", self.name)
            await asyncio.gather(*(m.stop() for m in self.models.values()), return_exceptions=True)
            if self._metrics_httpd is not None:
                self._metrics_httpd.shutdown()
                self._metrics_httpd.server_close()
            log.info("%s stopped", self.name)


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
    return 0


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

    def relay(signum, _frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    codes = [c.wait() for c in children]
    return max(codes, default=0)
