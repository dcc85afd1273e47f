"""Load-test the suite's gRPC APIs (`make loadtest`).

    python -m ops.loadtest fraud --target 127.0.0.1:50051 -c 32 -d 30          # closed loop
    python -m ops.loadtest fraud --target 127.0.0.1:50051 --rate 500 -d 30     # open loop, Poisson arrivals
    python -m ops.loadtest recommend -c 32 -d 30                                # the recommender on :50052
    python -m ops.loadtest quote --rate 200 -d 30                               # pricing on :50053
    python -m ops.loadtest v2 --target 127.0.0.1:18111 --model mlp -c 32 -d 10  # any KServe V2 endpoint

Scenarios are built from the real datasets: `fraud` scores transactions from the part of the
creditcard stream the bootstrap did not train on and reports each label through
ReportOutcome after --label-delay-s (a share --outcome-rate of them), as a checkout backend
would. `recommend` asks for k items for real Ta Feng customers and reports the clicks and
purchases their real later baskets imply (ops/scenario_recommend.py). `quote` prices real Ta
Feng products inside merchant guardrails and reports the sales a demand curve calibrated on
Ta Feng produces (ops/scenario_quote.py). `v2` sends ModelInfer with inputs shaped from the
model's ModelMetadata.

Closed loop (-c N): N workers, each sends, awaits the answer, sends again. Open loop
(--rate R): requests start at Poisson arrival times whatever the answers do (at most
--max-in-flight outstanding; arrivals beyond that are counted as `dropped_by_client`), so
queueing shows up in the latencies as it would for real users. A warm-up is not measured.
Prints progress every second, then req/s, p50/p90/p99/p99.9 and errors by gRPC status code;
writes the figures as JSON and a latency-over-time chart (PNG).

Why not Locust or ghz: Locust's gevent monkey-patching does not mix with grpcio's asyncio
client, and ghz is a Go binary outside the package registries this project may use. The
load loop here is a few dozen lines on grpc.aio, the same client stack the services' users run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable

import grpc
import numpy as np

Call = Callable[[int], Awaitable[object]]


class Recorder:
    def __init__(self, start: float) -> None:
        self.start = start
        self.samples: list[tuple[float, float]] = []  # (start offset s, latency s) of successes
        self.errors: dict[str, int] = {}
        self.dropped_by_client = 0

    def ok(self, t0: float, latency: float) -> None:
        self.samples.append((t0 - self.start, latency))

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


async def _timed(call: Call, i: int, rec: Recorder, measure: bool, scheduled: float | None = None) -> None:
    # Open loop: latency counts from the scheduled arrival, so a late start (client or server
    # falling behind) shows up in the figures instead of hiding (no coordinated omission).
    t0 = time.perf_counter() if scheduled is None else scheduled
    try:
        await call(i)
    except grpc.aio.AioRpcError as e:
        if measure:
            rec.error(e.code().name)
        return
    if measure:
        rec.ok(t0, time.perf_counter() - t0)


async def closed_loop(call: Call, concurrency: int, duration: float, warmup: float, rec: Recorder) -> None:
    t_meas = rec.start
    t_end = t_meas + duration

    async def worker(w: int) -> None:
        i = w
        while (now := time.perf_counter()) < t_end:
            await _timed(call, i, rec, now >= t_meas)
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))


async def open_loop(call: Call, rate: float, duration: float, warmup: float, rec: Recorder,
                    max_in_flight: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    t_begin = rec.start - warmup
    t_end = rec.start + duration
    in_flight: set[asyncio.Task] = set()
    next_t, i = t_begin, 0
    while next_t < t_end:
        delay = next_t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_in_flight:
            if next_t >= rec.start:
                rec.dropped_by_client += 1
        else:
            task = asyncio.ensure_future(_timed(call, i, rec, next_t >= rec.start, scheduled=next_t))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        i += 1
        next_t += rng.expovariate(rate)
    if in_flight:
        await asyncio.gather(*in_flight)


def summary(rec: Recorder, duration: float) -> dict:
    lat = np.array([s[1] for s in rec.samples]) * 1e3

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 3) if len(lat) else None

    return {"ok": len(lat), "rps": round(len(lat) / duration, 1), "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "p999_ms": pct(99.9), "max_ms": round(float(lat.max()), 3) if len(lat) else None,
            "errors": dict(rec.errors), "dropped_by_client": rec.dropped_by_client}


def per_second(rec: Recorder, duration: float) -> list[dict]:
    rows = []
    for sec in range(int(np.ceil(duration))):
        lat = np.array([s[1] for s in rec.samples if sec <= s[0] < sec + 1]) * 1e3
        rows.append({"second": sec, "ok": len(lat),
                     "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
                     "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None})
    return rows


def chart(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    xs = [r["second"] for r in rows if r["ok"]]
    ax.plot(xs, [r["p50_ms"] for r in rows if r["ok"]], label="p50")
    ax.plot(xs, [r["p99_ms"] for r in rows if r["ok"]], label="p99")
    ax.set_xlabel("second of the measured window")
    ax.set_ylabel("latency, ms")
    ax2 = ax.twinx()
    ax2.bar(xs, [r["ok"] for r in rows if r["ok"]], alpha=0.15, color="gray", label="req/s")
    ax2.set_ylabel("requests/s")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- scenarios ----
class Later:
    """Outcome reports a scenario schedules after a response (a label delay), awaited at the end."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def __call__(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks)


async def fraud_scenario(channel: grpc.aio.Channel, args) -> tuple[Call, Callable[[], Awaitable[None]]]:
    from ops.storefront_data import fraud_requests
    from protos.fraud.v1 import fraud_pb2, fraud_pb2_grpc

    requests, labels = fraud_requests(args.rows)
    stub = fraud_pb2_grpc.FraudStub(channel)
    rng = random.Random(args.seed)
    later = Later()

    async def report_later(pid: str, is_fraud: bool) -> None:
        await asyncio.sleep(args.label_delay_s)
        try:
            await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=pid, is_fraud=is_fraud, source="chargeback"),
                                     timeout=args.timeout)
        except grpc.aio.AioRpcError as e:
            print(f"[loadtest] ReportOutcome failed: {e.code().name}: {e.details()}", file=sys.stderr)

    async def call(i: int):
        k = i % len(requests)
        resp = await stub.ScoreTransaction(requests[k], timeout=args.timeout)
        if rng.random() < args.outcome_rate:
            later(report_later(resp.prediction_id, labels[k]))
        return resp

    return call, later.drain


async def v2_scenario(channel: grpc.aio.Channel, args) -> tuple[Call, Callable[[], Awaitable[None]]]:
    from protos.inference import grpc_service_pb2 as pb
    from protos.inference import grpc_service_pb2_grpc as pb_grpc
    from shared.runtime.dtypes import NUMPY_OF_V2

    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=args.model), timeout=args.timeout)
    rng = np.random.default_rng(args.seed)
    reqs = []
    for _ in range(64):
        req = pb.ModelInferRequest(model_name=args.model)
        for t in meta.inputs:
            shape = [1 if d < 0 else d for d in t.shape]
            dtype = NUMPY_OF_V2[t.datatype]
            x = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
            req.inputs.add(name=t.name, datatype=t.datatype, shape=shape)
            req.raw_input_contents.append(x.tobytes())
        reqs.append(req)

    async def call(i: int):
        return await stub.ModelInfer(reqs[i % len(reqs)], timeout=args.timeout)

    async def drain() -> None:
        return None

    return call, drain


async def recommend_scenario(channel: grpc.aio.Channel, args):
    from ops.scenario_recommend import scenario

    return await scenario(channel, args)


async def quote_scenario(channel: grpc.aio.Channel, args):
    from ops.scenario_quote import scenario

    return await scenario(channel, args)


DEFAULT_TARGETS = {"fraud": "127.0.0.1:50051", "recommend": "127.0.0.1:50052", "quote": "127.0.0.1:50053"}
SCENARIOS = {"fraud": fraud_scenario, "recommend": recommend_scenario, "quote": quote_scenario, "v2": v2_scenario}


async def run(args) -> dict:
    channel = grpc.aio.insecure_channel(args.target, options=[("grpc.max_receive_message_length", 64 << 20)])
    call, drain = await SCENARIOS[args.scenario](channel, args)
    await call(0)  # connectivity and correctness outside the window
    rec = Recorder(time.perf_counter() + args.warmup)

    async def progress() -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter() - rec.start
            if now < 0:
                print(f"[loadtest] warming up ({-now:.0f} s left)", file=sys.stderr)
                continue
            recent = [s[1] for s in rec.samples if s[0] >= now - 1]
            p99 = f"{np.percentile(recent, 99) * 1e3:.1f} ms" if recent else "-"
            print(f"[loadtest] {now:5.0f}/{args.duration:.0f} s  {len(recent)} req/s  p99 {p99}  "
                  f"errors {sum(rec.errors.values())}", file=sys.stderr)

    ticker = asyncio.ensure_future(progress())
    try:
        if args.rate:
            await open_loop(call, args.rate, args.duration, args.warmup, rec, args.max_in_flight, args.seed)
        else:
            await closed_loop(call, args.concurrency, args.duration, args.warmup, rec)
    finally:
        ticker.cancel()
    await drain()
    await channel.close()
    out = {"scenario": args.scenario, "target": args.target, "mode": "open" if args.rate else "closed",
           "concurrency": None if args.rate else args.concurrency, "rate": args.rate or None,
           "duration_s": args.duration, "warmup_s": args.warmup, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.update(summary(rec, args.duration))
    out["per_second"] = per_second(rec, args.duration)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ops.loadtest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--target", default="", help="HOST:PORT (loopback or your own test hosts); default: the "
                    "scenario's service on 127.0.0.1 (fraud :50051, recommend :50052, quote :50053)")
    ap.add_argument("-c", "--concurrency", type=int, default=32, help="closed loop: workers")
    ap.add_argument("--rate", type=float, default=0.0, help="open loop: mean arrivals per second (Poisson)")
    ap.add_argument("--max-in-flight", type=int, default=10_000, help="open loop: outstanding requests at most")
    ap.add_argument("-d", "--duration", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=10.0, help="gRPC deadline per call, seconds")
    ap.add_argument("--model", default="fraud", help="v2: the model name")
    ap.add_argument("--rows", type=int, default=5000,
                    help="distinct real transactions / customers / products to cycle through")
    ap.add_argument("--outcome-rate", type=float, default=1.0, help="share of predictions whose outcome is reported")
    ap.add_argument("--label-delay-s", type=float, default=2.0,
                    help="seconds before the outcome is reported (fraud label, recommend purchase after the click, "
                         "quote sale)")
    ap.add_argument("-k", type=int, default=10, help="recommend: items per Recommend")
    ap.add_argument("--click-rate", type=float, default=0.03,
                    help="recommend: chance a shown item the customer did not buy is clicked")
    ap.add_argument("--click-delay-s", type=float, default=1.0, help="recommend: seconds before a click is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("var/loadtest"), help="folder for the JSON and the PNG")
    args = ap.parse_args(argv)
    if not args.target:
        if args.scenario not in DEFAULT_TARGETS:
            ap.error(f"{args.scenario} needs --target")
        args.target = DEFAULT_TARGETS[args.scenario]
    if args.duration <= 0 or args.warmup < 0 or args.concurrency < 1 or args.rate < 0 or not 0 <= args.outcome_rate <= 1:
        ap.error("need duration > 0, warmup >= 0, concurrency >= 1, rate >= 0, 0 <= outcome-rate <= 1")
    result = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.scenario}-{result['mode']}-{time.strftime('%Y%m%dT%H%M%S')}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    chart(result["per_second"], f"{args.scenario} {result['mode']} loop on {args.target}", args.out / f"{stem}.png")
    print("| scenario | mode | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | dropped by client |")
    print("|---|---|---|---|---|---|---|---|---|")
    mode = f"closed c={args.concurrency}" if not args.rate else f"open {args.rate:g}/s"
    print(f"| {args.scenario} | {mode} | {result['rps']:,} | {result['p50_ms']} | {result['p90_ms']} | "
          f"{result['p99_ms']} | {result['p999_ms']} | {result['errors'] or 0} | {result['dropped_by_client']} |")
    print(f"wrote {args.out / stem}.json and .png")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
