"""Demo traffic for a running suite (`make demo` = `python -m ops.up --demo 60`).

Sends realistic requests built from the real datasets to every domain service at once
(transactions to score, customers to recommend for, products to quote) and reports their
outcomes at realistic rates and short delays through the services, the same scenarios
`ops.loadtest` runs. Every few seconds it prints, per domain, the requests and errors so
far, the model versions the service answered with, and the newest version the trainer
published in the registry, so one sees new versions being learned from the traffic,
published, and picked up by the services without a failed request.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path

import grpc

from shared.channels import aio_channel
from shared.registry import ModelRegistry


@dataclasses.dataclass
class DomainTraffic:
    domain: str  # the trainer domain / registry model name
    scenario: str  # ops.loadtest scenario name
    target: str
    rate: float  # requests per second (Poisson arrivals)
    requests: int = 0
    errors: int = 0
    versions: dict[str, int] = dataclasses.field(default_factory=dict)  # version -> responses

    def versions_text(self) -> str:
        return ",".join(f"v{v}" for v in sorted(self.versions, key=lambda v: int(v) if v.isdigit() else 0)) or "-"


def scenario_args(**overrides) -> argparse.Namespace:
    """The load-test options the scenarios read, with demo defaults (short label delays)."""
    base = dict(timeout=10.0, rows=5000, outcome_rate=1.0, label_delay_s=1.0, seed=0, model="")
    base.update(overrides)
    return argparse.Namespace(**base)


async def _prepare(t: DomainTraffic):
    """The domain's load-test scenario (built from its real dataset: seconds for some)."""
    from ops.loadtest import SCENARIOS

    channel = aio_channel(t.target)  # one service, or its replicas (round_robin)
    call, drain = await SCENARIOS[t.scenario](channel, scenario_args())
    return channel, call, drain


async def _drive(t: DomainTraffic, prepared, duration_s: float, stop: asyncio.Event) -> None:
    import random

    channel, call, drain = prepared
    rng = random.Random(hash(t.domain) & 0xFFFF)
    in_flight: set[asyncio.Task] = set()

    async def one(i: int) -> None:
        try:
            resp = await call(i)
        except grpc.aio.AioRpcError as e:
            t.errors += 1
            print(f"[demo] {t.domain}: {e.code().name}: {e.details()}", file=sys.stderr)
            return
        t.requests += 1
        version = resp.model.version
        t.versions[version] = t.versions.get(version, 0) + 1

    end = time.monotonic() + duration_s
    i = 0
    try:
        while time.monotonic() < end and not stop.is_set():
            await asyncio.sleep(rng.expovariate(t.rate))
            task = asyncio.ensure_future(one(i))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            i += 1
        if in_flight:
            await asyncio.gather(*in_flight)
        await drain()  # outcomes still waiting for their delay are sent
    finally:
        await channel.close()


def _published(registry: ModelRegistry, name: str) -> str:
    try:
        versions = registry.versions(name)
    except Exception:  # a model the trainer has not bootstrapped yet
        versions = []
    current = registry.current_version(name)
    return f"current v{current} ({len(versions)} published)" if current else "none yet"


async def run_demo(traffic: list[DomainTraffic], registry_dir: Path, duration_s: float = 60.0,
                   every_s: float = 5.0, stop: asyncio.Event | None = None) -> list[DomainTraffic]:
    stop = stop or asyncio.Event()
    registry = ModelRegistry(registry_dir)
    start_versions = {t.domain: registry.current_version(t.domain) for t in traffic}
    print(f"demo: building request streams from the real datasets for {', '.join(t.domain for t in traffic)}",
          flush=True)
    prepared = await asyncio.gather(*(_prepare(t) for t in traffic))
    print(f"demo: {duration_s:.0f} s of traffic and outcomes", flush=True)
    drivers = asyncio.gather(*(_drive(t, p, duration_s, stop) for t, p in zip(traffic, prepared)))
    t0 = time.monotonic()
    while not drivers.done():
        await asyncio.wait([drivers], timeout=every_s)
        lines = [f"  {t.domain:<12} {t.requests:>6} requests {t.errors:>3} errors   served {t.versions_text():<24} "
                 f"registry {_published(registry, t.domain)}" for t in traffic]
        print(f"[demo {time.monotonic() - t0:5.0f} s]\n" + "\n".join(lines), flush=True)
    await drivers
    for t in traffic:
        now = registry.current_version(t.domain)
        picked = [v for v in t.versions if v != start_versions.get(t.domain)]
        print(f"demo: {t.domain}: registry v{start_versions.get(t.domain)} -> v{now}; the service answered with "
              f"{t.versions_text()} ({len(picked)} new version(s) picked up), {t.errors} errors", flush=True)
    return traffic
