"""Serving benchmark: our V2 server against in-process ONNX Runtime, batched and not, and under hot swaps.

    python -m bench.serving                      # mlp and twotower, 8 s per measurement (~3 min)
    python -m bench.serving --quick              # 3 s each: a smoke run
    python -m bench.serving --models mlp --duration 5 --warmup 1

For each model, in ONE run on one machine (the load generator, the server and the baseline
share its cores, so read the figures as ratios):
- onnxruntime-inprocess: one session (intra_op_num_threads=1), batch-1 run() calls in a loop;
- server-batched / server-unbatched: `python -m shared.serve_onnx --onnx FILE` with default
  settings and --max-batch-size 64, then 1; at each concurrency (default 1 and 32);
- server-steady / server-hot-swap: the server following a registry (v1 published first) at the
  highest concurrency, first without swaps, then while a new version (alternating two weight
  sets) is published about every second.
Server CPU is read from /proc/<pid>/stat (utime + stime, every thread) at the edges of the
measured window. Prints a markdown table on stdout, progress on stderr, and writes
bench/results/serving.json (keys: bench/README.md). Exit status 1 when a measurement failed
or a hot swap lost requests.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc
import numpy as np
import onnxruntime as ort

from bench import models
from bench.machine import machine_busy_s, machine_info as _machine_info, process_cpu_s, process_rss_mb, progress_printer
from ops.loadgen import latency_summary, self_cpu_s
from ops.procs import free_port
from ops.scenario_v2 import infer_once, make_inputs, run_load
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pbg

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "serving.json"
progress = progress_printer("bench")


@dataclasses.dataclass
class Options:
    models: list[str]
    duration: float
    warmup: float
    concurrency: list[int]
    swap_interval: float
    max_batch_size: int
    cache_dir: Path
    out: Path
    server_args: list[str]
    quick: bool
    retries: int = 1
    max_other_pct: float = 25.0
    quiet_timeout: float = 10.0
    noise_budget: float = 60.0  # seconds of waiting and re-measuring the whole run may spend on noise
    timeout: float = 10.0

    @property
    def swap_every(self) -> float:
        """Publish interval: ~swap_interval, short enough for >= 5 publishes in one window."""
        return min(self.swap_interval, self.duration / 6)


# ---------------------------------------------------------------- /proc helpers
def listens_on(pid: int, port: int) -> bool:
    """Whether process pid holds a listening TCP socket on port (so a ready answer is its own)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                return True
    return False


# ---------------------------------------------------------------- server subprocess
METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+([^\s]+)")
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Server:
    """`python -m shared.serve_onnx ...` as a child process on free loopback ports."""

    def __init__(self, label: str, name: str, source_args: list[str], workdir: Path, extra: list[str]) -> None:
        self.label = label
        self.name = name
        self.args = [*source_args, *extra]
        self.port = 0
        self.metrics_port = 0
        self.log_path = workdir / f"server-{label}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self._log_file = None

    @property
    def cmd(self) -> list[str]:
        return [sys.executable, "-m", "shared.serve_onnx", "--name", self.name, "--host", "127.0.0.1",
                "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--log-format", "text",
                *self.args]

    def describe(self) -> str:
        return "python -m shared.serve_onnx --name " + self.name + " " + " ".join(self.args)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, ready_timeout: float = 120.0, attempts: int = 3) -> None:
        """Start on free ports and wait until the model is ready. A port taken between choosing
        and binding it (other processes share the machine) means new ports and another try."""
        for attempt in range(1, attempts + 1):
            self.port, self.metrics_port = free_port(), free_port()
            try:
                await self._start_once(ready_timeout)
                return
            except RuntimeError as e:
                busy = "Address already in use" in str(e) or "cannot bind" in str(e)
                if not busy or attempt == attempts:
                    raise
                progress(f"{self.label}: port {self.port} or {self.metrics_port} was taken meanwhile; new ports")
                await self.stop()

    async def _start_once(self, ready_timeout: float) -> None:
        # Settings come from the flags only: STOREFRONT_* in this environment would skew the figures.
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOREFRONT_")}
        self._log_file = open(self.log_path, "wb")
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd, cwd=REPO, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=self._log_file,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        await self.wait_ready(ready_timeout)

    async def wait_ready(self, timeout: float) -> None:
        """Poll V2 ModelReady until the model is loaded; fail if the process dies first."""
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"{self.label}: server exited with {self.proc.returncode} before it was "
                                       f"ready; log tail:\n{self.log_tail()}")
                try:
                    r = await stub.ModelReady(pb.ModelReadyRequest(name=self.name), timeout=1.0)
                    if r.ready and self.proc.returncode is None and listens_on(self.pid, self.port):
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.label}: model {self.name!r} not ready after {timeout:.0f} s; "
                                       f"log tail:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid)

    def rss_mb(self) -> float | None:
        return process_rss_mb(self.pid)

    def _scrape_sync(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = METRIC_RE.match(line)
            if m and m.group(1).startswith("storefront_"):
                labels = tuple(sorted(LABEL_RE.findall(m.group(2) or "")))
                try:
                    out[(m.group(1), labels)] = float(m.group(3))
                except ValueError:
                    pass
        return out

    async def scrape(self) -> dict:
        """The server's storefront_* Prometheus series ({} if the endpoint does not answer)."""
        try:
            return await asyncio.to_thread(self._scrape_sync)
        except Exception as e:  # the figures do not depend on it; say so and go on
            progress(f"{self.label}: metrics endpoint did not answer ({e!r})")
            return {}

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self) -> None:
        """SIGTERM, wait for the graceful drain, then SIGKILL."""
        try:
            if self.proc is not None and self.proc.returncode is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.proc.wait(), 15)
                except asyncio.TimeoutError:
                    progress(f"{self.label}: server did not stop within 15 s of SIGTERM; killing it")
                    self.proc.kill()
                    await self.proc.wait()
        finally:
            if self.proc is not None and self.proc.returncode is None:  # cancelled while waiting
                self.proc.kill()
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None


def metric_value(series: dict, name: str, **labels: str) -> float:
    """Sum of the series called name whose labels include the given ones."""
    want = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and want <= set(ls))


# ---------------------------------------------------------------- measurements
def inprocess_baseline(kind: str, path: Path, duration: float, warmup: float) -> dict[str, Any]:
    """One ORT session (one thread), batch-1 run() calls in a closed loop: the physical limit."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    specs = [(i.name, "FP32", [d if isinstance(d, int) else -1 for d in i.shape]) for i in sess.get_inputs()]
    feeds = make_inputs(specs, batch=1, seed=0)  # the very input the load generator sends
    names = [o.name for o in sess.get_outputs()]
    run, pc = sess.run, time.perf_counter
    lat: list[float] = []
    t_start = pc() + warmup
    t_end = t_start + duration
    while pc() < t_start:
        run(names, feeds)
    cpu_a, mach_a = self_cpu_s(), machine_busy_s()
    while True:
        s = pc()
        if s >= t_end:
            break
        run(names, feeds)
        e = pc()
        if e <= t_end:
            lat.append(e - s)
    cpu = self_cpu_s() - cpu_a
    mach = machine_busy_s() - mach_a
    n = len(lat)
    return {
        "model": kind,
        "target": "onnxruntime-inprocess",
        "concurrency": 1,
        "ok": n,
        "errors": 0,
        "errors_by_code": {},
        "rps": round(n / duration, 1),
        **latency_summary(lat),
        "server_cpu_us_per_req": None,
        "cpu_us_per_call": round(cpu / n * 1e6, 2) if n else None,
        "cpu_pct": round(100 * cpu / duration, 1),
        "other_cpu_pct": round(100 * (mach - cpu) / duration, 1),
        "duration_s": duration,
    }


async def wait_quiet(opts: Options) -> float:
    """Wait until the machine is nearly idle, within what is left of the noise budget.

    Returns the last busy reading (% of one core)."""
    started = time.monotonic()
    give_up = started + min(opts.quiet_timeout, max(0.0, opts.noise_budget))
    said = False
    try:
        while True:
            a = machine_busy_s()
            await asyncio.sleep(0.5)
            pct = 100 * (machine_busy_s() - a) / 0.5
            if pct <= opts.max_other_pct:
                return pct
            if time.monotonic() >= give_up:
                progress(f"machine still busy ({pct:.0f}% of a core); measuring anyway")
                return pct
            if not said:
                progress(f"waiting for a quiet machine ({pct:.0f}% of a core busy before the measurement)")
                said = True
    finally:
        if said:
            opts.noise_budget -= time.monotonic() - started


MAX_CLIENT_LAG_MS = 250.0  # a load generator stalled longer than this was starved of CPU


def noise_of(row: dict[str, Any], opts: Options) -> float:
    """How far past the noise limits a measurement went (<= 0: clean)."""
    return max(row["other_cpu_pct"] - opts.max_other_pct,
               (row.get("client_loop_lag_max_ms") or 0.0) - MAX_CLIENT_LAG_MS)


async def quietly(label: str, opts: Options, fn: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """fn() on a quiet machine; again (up to `retries` times, within the noise budget) when other
    processes took more than max_other_pct of a core during its window, or the load generator
    was stalled. Keeps the quietest attempt."""
    best = None
    for attempt in range(1, opts.retries + 2):
        await wait_quiet(opts)
        started = time.monotonic()
        row = await fn()
        if attempt > 1:
            opts.noise_budget -= time.monotonic() - started
        row["attempts"] = attempt
        if best is None or noise_of(row, opts) < noise_of(best, opts):
            best = row
        if noise_of(row, opts) <= 0:
            break
        if attempt > opts.retries or opts.noise_budget < opts.warmup + opts.duration:
            break
        progress(f"{label}: other processes used {row['other_cpu_pct']:.0f}% of a core during the window "
                 f"(load generator stalled up to {row.get('client_loop_lag_max_ms') or 0:.0f} ms); measuring again")
    best["noisy"] = noise_of(best, opts) > 0
    return best


def compare_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> str:
    """'ok', or what differs between the server's outputs and in-process ORT's."""
    problems = []
    for name, w in want.items():
        g = got.get(name)
        if g is None:
            problems.append(f"{name} missing")
        elif g.shape != w.shape or g.dtype != w.dtype:
            problems.append(f"{name}: {g.dtype}{list(g.shape)} != {w.dtype}{list(w.shape)}")
        elif w.dtype.kind == "f":
            if not np.allclose(g, w, rtol=1e-4, atol=1e-5):
                problems.append(f"{name}: max abs diff {float(np.abs(g - w).max()):.3g}")
        elif (g != w).mean() > 0.01:  # integer outputs (top-k indices): ties may reorder a few
            problems.append(f"{name}: {100 * float((g != w).mean()):.1f}% of values differ")
    return "ok" if not problems else "; ".join(problems)


async def check_server(server: Server, kind: str, path_of: Path | Callable[[str], Path]) -> str:
    """One 4-row request through the server compared with in-process ORT on the file of the
    version that answered (path_of: a file, or version -> file)."""
    x = models.sample_input(kind, batch=4, seed=7)
    got, version = await infer_once(server.target, kind, {"input": x})
    path = path_of(version) if callable(path_of) else path_of
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    verdict = compare_outputs(got, want)
    if verdict != "ok":
        verdict = f"version {version}: {verdict}"
        progress(f"WARNING {server.label}: the server's answer differs from in-process onnxruntime: {verdict}")
    return verdict


async def measure(server: Server, kind: str, target: str, concurrency: int, opts: Options,
                  during: Callable[[float, float], Awaitable[Any]] | None = None) -> dict[str, Any]:
    """Load the server at `concurrency`, reading its CPU and metrics at the window's edges."""

    async def window(t_start: float, t_end: float) -> dict[str, Any]:
        cpu_a, mach_a = server.cpu_s(), machine_busy_s()
        task = asyncio.ensure_future(during(t_start, t_end)) if during is not None else None
        met_a = await server.scrape()
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        cpu_b, mach_b = server.cpu_s(), machine_busy_s()
        met_b = await server.scrape()
        extra = await task if task is not None else None
        return {"server_cpu_s": cpu_b - cpu_a, "machine_busy_s": mach_b - mach_a,
                "metrics_a": met_a, "metrics_b": met_b, "during": extra}

    res = await run_load(server.target, kind, concurrency=concurrency, duration=opts.duration,
                         warmup=opts.warmup, timeout=opts.timeout, window=window)
    w = res.pop("window")
    n, d = res["ok"], opts.duration
    met_a, met_b = w["metrics_a"], w["metrics_b"]
    runs = metric_value(met_b, "storefront_batch_size_count", model=kind) - \
        metric_value(met_a, "storefront_batch_size_count", model=kind)
    rows = metric_value(met_b, "storefront_batch_size_sum", model=kind) - \
        metric_value(met_a, "storefront_batch_size_sum", model=kind)
    client_cpu_s = (res["client_cpu_pct"] / 100) * d
    row = {
        "model": kind,
        "target": target,
        "concurrency": concurrency,
        **{k: res[k] for k in ("ok", "errors", "errors_by_code", "rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms",
                               "mean_ms", "max_ms")},
        "server_cpu_us_per_req": round(w["server_cpu_s"] / n * 1e6, 1) if n else None,
        "server_cpu_pct": round(100 * w["server_cpu_s"] / d, 1),
        "client_cpu_us_per_req": res["client_cpu_us_per_req"],
        "client_cpu_pct": res["client_cpu_pct"],
        "client_loop_lag_max_ms": res["client_loop_lag_max_ms"],
        "other_cpu_pct": round(100 * (w["machine_busy_s"] - w["server_cpu_s"] - client_cpu_s) / d, 1),
        "mean_batch_rows": round(rows / runs, 2) if runs else None,
        "versions": res["versions"],
        "server_rss_mb": server.rss_mb(),
        "duration_s": d,
        "warmup_errors": res["warmup_errors"],
    }
    row["_raw"] = {"version_first_seen_s": res["version_first_seen_s"], "during": w["during"],
                   "metrics_a": met_a, "metrics_b": met_b}
    progress(f"{kind} {target} c={concurrency}: {row['rps']:,.0f} req/s, p50 {row['p50_ms']} ms, "
             f"p99 {row['p99_ms']} ms, errors {row['errors_by_code'] or 0}, "
             f"server {row['server_cpu_us_per_req']} us/req, batch {row['mean_batch_rows']}")
    return row


async def bench_file_server(kind: str, path: Path, target: str, max_batch_size: int, opts: Options,
                            workdir: Path, results: list[dict]) -> None:
    server = Server(target, kind, ["--onnx", str(path), "--max-batch-size", str(max_batch_size)], workdir,
                    opts.server_args)
    try:
        progress(f"{kind} {target}: starting {server.describe()}")
        await server.start()
        verdict = await check_server(server, kind, path)
        for c in opts.concurrency:
            row = await quietly(f"{kind} {target} c={c}", opts, lambda: measure(server, kind, target, c, opts))
            row.update(max_batch_size=max_batch_size, output_check=verdict)
            results.append(row)
    finally:
        await server.stop()


async def bench_hot_swap(kind: str, opts: Options, workdir: Path, results: list[dict]) -> None:
    from shared.registry import ModelRegistry
    from shared.runtime.signature import signature_of_onnx

    files = [models.ensure_model(kind, models.FIRST_SEED, opts.cache_dir),
             models.second_version(kind, opts.cache_dir)]
    signature = signature_of_onnx(files[0])
    registry = ModelRegistry(workdir / f"registry-{kind}")
    first = registry.publish(kind, files[0], signature, metrics={"bench": "hot-swap", "seed": models.FIRST_SEED})
    c = max(opts.concurrency)
    server = Server(f"hot-swap-{kind}", kind, ["--registry-dir", str(registry.root),
                                                "--max-batch-size", str(opts.max_batch_size)], workdir,
                    opts.server_args)
    every = opts.swap_every

    async def publisher(t_start: float, t_end: float) -> list[dict[str, Any]]:
        # Every ~`every` s, jittered so that publishes do not lock to the server's poll phase.
        jitter = np.random.default_rng(0)
        events = []
        k = 0
        while True:
            when = t_start + every * (k + 0.5)
            if when >= t_end - every * 0.5:  # leave the last version time to arrive
                return events
            when += every * jitter.uniform(-0.25, 0.25)
            await asyncio.sleep(max(0.0, when - time.perf_counter()))
            seed_index = (k + 1) % 2  # v1 has the first weight set: alternate starting with the second
            t_pub = time.perf_counter()
            m = await asyncio.to_thread(registry.publish, kind, files[seed_index], signature,
                                        metrics={"bench": "hot-swap", "seed": seed_index})
            events.append({"version": m.version, "weights": seed_index,
                           "publish_started_s": round(t_pub - t_start, 4),
                           "published_s": round(time.perf_counter() - t_start, 4)})
            k += 1

    try:
        progress(f"{kind} hot swap: starting {server.describe()} (v{first.version} published)")
        await server.start()
        verdict = await check_server(server, kind, files[0])
        steady = await quietly(f"{kind} server-steady", opts, lambda: measure(server, kind, "server-steady", c, opts))
        steady.update(max_batch_size=opts.max_batch_size, output_check=verdict)
        results.append(steady)
        progress(f"{kind} hot swap: publishing a new version every {every:.2f} s under load")
        swap = await quietly(f"{kind} server-hot-swap", opts,
                             lambda: measure(server, kind, "server-hot-swap", c, opts, during=publisher))
        swap.update(max_batch_size=opts.max_batch_size, output_check=verdict)
        raw = swap["_raw"]
        events = raw["during"] or []
        seen = raw["version_first_seen_s"]
        delays = []
        for ev in events:
            t = seen.get(ev["version"])
            ev["first_served_s"] = t
            ev["publish_to_served_ms"] = round((t - ev["published_s"]) * 1e3, 1) if t is not None else None
            if ev["publish_to_served_ms"] is not None:
                delays.append(ev["publish_to_served_ms"])

        def reloads(series: dict, result: str) -> float:
            return metric_value(series, "storefront_model_reloads_total", model=kind, result=result)

        met_a, met_b = raw["metrics_a"], raw["metrics_b"]
        loaded = sum(reloads(met_b, r) - reloads(met_a, r) for r in ("loaded", "rollback"))
        refused = reloads(met_b, "refused") - reloads(met_a, "refused")
        swap.update(
            p99_steady_ms=steady["p99_ms"],
            p99_vs_steady=_ratio(swap["p99_ms"], steady["p99_ms"]),
            swaps_published=len(events),
            swaps_loaded=int(loaded) if met_b else None,
            swaps_refused=int(refused) if met_b else None,
            versions_seen=sorted(swap["versions"], key=lambda v: int(v) if v.isdigit() else math.inf),
            versions_never_served=[ev["version"] for ev in events if ev["first_served_s"] is None],
            publish_to_served_ms={"p50": round(float(np.median(delays)), 1) if delays else None,
                                  "max": max(delays) if delays else None},
            publish_interval_s=round(every, 3),
            publishes=events,
        )
        swap["versions_seen_count"] = len(swap["versions_seen"])
        # The version answering now must compute what its own weights compute.
        weights_of = {first.version: 0, **{ev["version"]: ev["weights"] for ev in events}}
        swap["output_check"] = await check_server(server, kind, lambda v: files[weights_of.get(v, 0)])
        results.append(swap)
        progress(f"{kind} hot swap: {len(events)} published, {swap['swaps_loaded']} loaded, "
                 f"{swap['swaps_refused']} refused, {swap['errors']} failed requests, versions seen "
                 f"{swap['versions_seen']}, p99 {swap['p99_ms']} ms (steady {steady['p99_ms']} ms)")
    finally:
        await server.stop()


async def guarded(what: str, results: list[dict], kind: str, target: str, coro: Awaitable[None]) -> bool:
    """Run one section; a failure is reported and recorded, and the next section still runs."""
    try:
        await coro
        return True
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as e:
        progress(f"FAILED {what}: {type(e).__name__}: {e}")
        results.append({"model": kind, "target": target, "error": f"{type(e).__name__}: {e}"})
        return False


async def run_all(opts: Options) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    (REPO / "var").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-", dir=REPO / "var"))
    try:
        for kind in opts.models:
            progress(f"{kind}: building / reading the model files in {opts.cache_dir}")
            path = models.ensure_model(kind, models.FIRST_SEED, opts.cache_dir)
            models.second_version(kind, opts.cache_dir)
            progress(f"{kind} onnxruntime-inprocess: {opts.warmup:g} s warm-up + {opts.duration:g} s")
            try:
                base = await quietly(f"{kind} onnxruntime-inprocess", opts, lambda: asyncio.to_thread(
                    inprocess_baseline, kind, path, opts.duration, opts.warmup))
                results.append(base)
                progress(f"{kind} onnxruntime-inprocess: {base['rps']:,.0f} calls/s, p50 {base['p50_ms']} ms, "
                         f"p99 {base['p99_ms']} ms")
            except Exception as e:
                progress(f"FAILED {kind} onnxruntime-inprocess: {type(e).__name__}: {e}")
                results.append({"model": kind, "target": "onnxruntime-inprocess", "error": repr(e)})
            for target, mbs in (("server-batched", opts.max_batch_size), ("server-unbatched", 1)):
                await guarded(f"{kind} {target}", results, kind, target,
                              bench_file_server(kind, path, target, mbs, opts, workdir, results))
            await guarded(f"{kind} hot swap", results, kind, "server-hot-swap",
                          bench_hot_swap(kind, opts, workdir, results))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    add_ratios(results)
    for r in results:
        r.pop("_raw", None)
    return {
        "date": started,
        "machine": machine_info(),
        "settings": {
            "models": opts.models,
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "quick": opts.quick,
            "concurrency": opts.concurrency,
            "hot_swap_concurrency": max(opts.concurrency),
            "publish_interval_s": round(opts.swap_every, 3),
            "batched_max_batch_size": opts.max_batch_size,
            "request_batch": 1,
            "channels": 1,
            "request_timeout_s": opts.timeout,
            "ort_threads": {"intra_op": 1, "inter_op": 1},
            "server": "python -m shared.serve_onnx (defaults otherwise; STOREFRONT_* env cleared)",
            "server_args": opts.server_args,
            "retries": opts.retries,
            "max_other_pct": opts.max_other_pct,
        },
        "results": results,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    r = a / b
    return round(r, 4 if r < 0.1 else 2)


def add_ratios(results: list[dict]) -> None:
    base = {r["model"]: r for r in results if r.get("target") == "onnxruntime-inprocess" and "error" not in r}
    for r in results:
        b = base.get(r["model"])
        if b is None or "error" in r:
            continue
        r["rps_vs_inprocess"] = _ratio(r["rps"], b["rps"])
        r["p50_vs_inprocess"] = _ratio(r["p50_ms"], b["p50_ms"])
        r["p99_vs_inprocess"] = _ratio(r["p99_ms"], b["p99_ms"])


def machine_info() -> dict[str, Any]:
    return _machine_info(onnxruntime=ort.__version__, grpcio=grpc.__version__, numpy=np.__version__)


# ---------------------------------------------------------------- report
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v >= 1000:
            return f"{v:,.0f}"
        if v >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{_fmt(v)}x"


def render_table(report: dict[str, Any]) -> str:
    rs = report["results"]
    s = report["settings"]
    m = report["machine"]
    out = [f"Serving benchmark, {report['date']}: {m['cpu_count']} CPUs ({m['cpu_model']}), "
           f"{s['duration_s']:g} s per measurement after {s['warmup_s']:g} s warm-up, batch-1 requests, "
           "one channel, closed loop; client, server and baseline share the machine.", "",
           "| model | target | c | req/s | vs in-proc rate | p50 ms | p99 ms | p50 vs in-proc | errors "
           "| server CPU us/req | rows/run |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rs:
        if "error" in r:
            out.append(f"| {r['model']} | {r['target']} | | FAILED: {r['error'][:120]} | | | | | | | |")
            continue
        cpu = _fmt(r.get("server_cpu_us_per_req"))
        if r["target"] == "onnxruntime-inprocess":
            cpu = f"({_fmt(r.get('cpu_us_per_call'))} in-proc)"
        errs = r["errors"]
        if r.get("errors_by_code"):
            errs = ", ".join(f"{k} {v}" for k, v in r["errors_by_code"].items())
        mark = " (noisy)" if r.get("noisy") else ""
        out.append(f"| {r['model']} | {r['target']}{mark} | {r['concurrency']} | {_fmt(r['rps'])} "
                   f"| {_x(r.get('rps_vs_inprocess'))} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} "
                   f"| {_x(r.get('p50_vs_inprocess'))} | {errs} | {cpu} | {_fmt(r.get('mean_batch_rows'))} |")
    if any(r.get("noisy") for r in rs):
        out += ["", f"(noisy): other processes used more than {s['max_other_pct']:g}% of a core during that window, "
                f"or the load generator stalled for more than {MAX_CLIENT_LAG_MS:g} ms, even after the retries the "
                "noise budget allowed (other_cpu_pct, client_loop_lag_max_ms in the JSON). Read those rows with care."]
    swaps = [r for r in rs if r.get("target") == "server-hot-swap" and "error" not in r]
    if swaps:
        out += ["", "Hot swap (same server, same concurrency: steady window first, then a new version "
                f"published every {s['publish_interval_s']:g} s):", "",
                "| model | c | published | loaded | refused | failed requests | p99 steady ms | p99 swaps ms "
                "| p99 ratio | versions answering | publish -> served ms p50 / max |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in swaps:
            pts = r["publish_to_served_ms"]
            out.append(f"| {r['model']} | {r['concurrency']} | {r['swaps_published']} | {_fmt(r['swaps_loaded'])} "
                       f"| {_fmt(r['swaps_refused'])} | {r['errors']} | {_fmt(r['p99_steady_ms'])} "
                       f"| {_fmt(r['p99_ms'])} | {_x(r['p99_vs_steady'])} "
                       f"| {len(r['versions_seen'])}: {', '.join(r['versions_seen'])} "
                       f"| {_fmt(pts['p50'])} / {_fmt(pts['max'])} |")
    return "\n".join(out)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> Options:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,twotower", help="comma list of: " + ", ".join(models.KINDS))
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per measurement (default 8)")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds before each (default 2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 s per measurement, 1 s warm-up")
    ap.add_argument("--concurrency", default="1,32", help="comma list of concurrencies (hot swap uses the highest)")
    ap.add_argument("--swap-interval", type=float, default=1.0,
                    help="seconds between publishes during the hot-swap window (shortened so >= 5 fit)")
    ap.add_argument("--max-batch-size", type=int, default=64, help="--max-batch-size of the batched server")
    ap.add_argument("--retries", type=int, default=1,
                    help="measure again (at most this many times) when other processes were busy in the window")
    ap.add_argument("--max-other-pct", type=float, default=25.0,
                    help="CPU (%% of one core) other processes may use in a window before it counts as noisy")
    ap.add_argument("--quiet-timeout", type=float, default=10.0,
                    help="seconds to wait for a quiet machine before each measurement")
    ap.add_argument("--cache-dir", default=str(models.DEFAULT_CACHE_DIR), help="where the model files are cached")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra flag for every server (repeat: --server-arg=--batch-workers --server-arg=2)")
    a = ap.parse_args(argv)
    kinds = [k.strip() for k in a.models.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in models.KINDS]
    if unknown or not kinds:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(models.KINDS)}")
    duration = a.duration if a.duration is not None else (3.0 if a.quick else 8.0)
    warmup = a.warmup if a.warmup is not None else (1.0 if a.quick else 2.0)
    try:
        conc = sorted({int(c) for c in a.concurrency.split(",") if c.strip()})
    except ValueError:
        ap.error("--concurrency takes a comma list of integers")
    if duration <= 0 or warmup < 0 or not conc or min(conc) < 1 or a.max_batch_size < 1 or a.swap_interval <= 0 \
            or a.retries < 0 or a.quiet_timeout < 0:
        ap.error("need duration > 0, warmup >= 0, concurrencies >= 1, max batch size >= 1, swap interval > 0, "
                 "retries >= 0, quiet timeout >= 0")
    cache = Path(a.cache_dir)
    return Options(models=kinds, duration=duration, warmup=warmup, concurrency=conc,
                   swap_interval=a.swap_interval, max_batch_size=a.max_batch_size,
                   cache_dir=cache if cache.is_absolute() else REPO / cache,
                   out=Path(a.out), server_args=a.server_arg, quick=a.quick, retries=a.retries,
                   max_other_pct=a.max_other_pct, quiet_timeout=a.quiet_timeout)


async def amain(opts: Options) -> dict[str, Any]:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # finally blocks stop the servers
    return await run_all(opts)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    progress(f"models {opts.models}, {opts.duration:g} s per measurement after {opts.warmup:g} s warm-up, "
             f"concurrency {opts.concurrency}, {os.cpu_count()} CPUs")
    try:
        report = asyncio.run(amain(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        progress("interrupted; servers stopped, no results written")
        return 130
    write_json(report, opts.out)
    print(render_table(report), flush=True)
    progress(f"wrote {opts.out}")
    failed = [r for r in report["results"] if "error" in r]
    lost = [r for r in report["results"] if r.get("target") == "server-hot-swap" and r.get("errors")]
    return 1 if failed or lost else 0


if __name__ == "__main__":
    sys.exit(main())
