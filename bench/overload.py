"""Overload benchmark: what admission control does at 2.5x capacity.

    python -m bench.overload                     # twotower, 2 rounds of 6 s per phase (~1.5 min)
    python -m bench.overload --rounds 3 --duration 8 --factor 2.5
    python -m bench.overload --model mlp --server-arg=--max-batch-size --server-arg=64

One server (`python -m shared.serve_onnx --onnx FILE --max-batch-size 1`, the twotower
benchmark model) per configuration, on free loopback ports, on this machine. Why that model
unbatched: the Python load generator costs ~200 us of CPU per call; to offer 2.5x the
capacity of a server that costs ~400 us per call (the mlp) it would need more cores than a
2-core machine has, and the overload would be in the client. The twotower model costs the
server ~2.4 ms per call unbatched, so the queue forms in the server, where admission control
acts (as it did in the issue: requests piling up in the server until clients gave up).
Configurations:
- protected: the default settings (max_concurrent_rpcs, and the adaptive per-method limit
  driven by queue_delay_target_ms);
- unprotected: admission control off (--max-concurrent-rpcs 0 --queue-delay-target-ms 0), as before.
Per configuration and round:
- steady: closed loop at c=32 (ops/loadgen.py, as every load here), which saturates the server: its req/s is
  "capacity" and its p99 the steady-state reference;
- overload: open loop at factor x that capacity (arrivals on a fixed schedule, whatever the
  answers), every call with a 2 s deadline, as a crowd of independent clients would. A
  latency is measured from the call's scheduled send time, so a client that falls behind
  does not hide the wait (no coordinated omission).
Reported per phase: requests/s answered OK, p50/p99 of OK (admitted) calls, calls by status
code, the sending rate achieved; medians over the rounds, and ratios of the overload to the
steady run of the same server in the same round. The server's own counts
(storefront_requests_total, storefront_requests_shed_total) are read from its metrics.
Prints a markdown table on stdout and writes bench/results/overload.json.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc

from bench import models
from ops.loadgen import CHANNEL_OPTIONS, generate, summary
from ops.scenario_v2 import requests_for, run_load
from bench.machine import machine_info
from bench.serving import Server, metric_value, progress, write_json
from protos.inference import grpc_service_pb2_grpc as pbg

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "overload.json"
CONFIGS = {
    "protected": [],
    "unprotected": ["--max-concurrent-rpcs", "0", "--queue-delay-target-ms", "0"],
}


async def open_loop(target: str, model: str, rate: float, duration: float, warmup: float,
                    timeout: float) -> dict[str, Any]:
    """Calls sent at `rate` per second on a fixed schedule for warmup + duration seconds."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        (req,) = await requests_for(stub, model)
        # no cap on calls in flight: a crowd of independent clients does not wait for each other
        rec = await generate(lambda i: stub.ModelInfer(req, timeout=timeout), duration=duration, warmup=warmup,
                             rate=rate, poisson=False, max_in_flight=1 << 30)
    s = summary(rec)
    by_code = {"OK": s["ok"], **s["errors"]} if s["ok"] else dict(s["errors"])
    return {"offered_rps": round(rate, 1), "sent_rps": round(rec.sent / duration, 1),
            "send_lag_ms": round(rec.send_lag_max_s * 1e3, 1),
            "rps": s["rps"], "calls": sum(by_code.values()), "by_code": by_code,
            **{k: s[k] for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms", "max_ms")}}


async def one_round(server: Server, opts: argparse.Namespace) -> dict[str, Any]:
    before = await server.scrape()
    steady = await run_load(server.target, opts.model, concurrency=opts.concurrency, duration=opts.duration,
                            warmup=opts.warmup, timeout=opts.timeout)
    rate = steady["rps"] * opts.factor
    progress(f"{server.label}: steady {steady['rps']} req/s p99 {steady['p99_ms']} ms; overload at {rate:.0f}/s")
    over = await open_loop(server.target, opts.model, rate, opts.duration, opts.warmup, opts.timeout)
    after = await server.scrape()

    def delta(name: str, **labels: str) -> int:
        return int(metric_value(after, name, **labels) - metric_value(before, name, **labels))

    server_codes = {c: delta("storefront_requests_total", method="ModelInfer", code=c)
                    for c in ("OK", "RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE",
                              "INTERNAL")}
    progress(f"{server.label}: overload {over['rps']} OK/s p99 {over['p99_ms']} ms, codes {over['by_code']}")
    return {
        "steady": {"rps": steady["rps"], "p50_ms": steady["p50_ms"], "p99_ms": steady["p99_ms"],
                   "by_code": {"OK": steady["ok"], **steady["errors_by_code"]}},
        "overload": over,
        "server_counts": {k: v for k, v in server_codes.items() if v},
        "shed": {r: delta("storefront_requests_shed_total", method="ModelInfer", reason=r)
                 for r in ("concurrency", "adaptive_limit")},
        # where the adaptive limit settled (absent when off): the admitted concurrency under overload
        "admission_limit_after": metric_value(after, "storefront_admission_limit", method="ModelInfer") or None,
        "ratios": {"goodput_vs_steady": _ratio(over["rps"], steady["rps"]),
                   "p50_vs_steady": _ratio(over["p50_ms"], steady["p50_ms"]),
                   "p99_vs_steady": _ratio(over["p99_ms"], steady["p99_ms"]),
                   "ok_share": _ratio(over["by_code"].get("OK", 0), over["calls"])},
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _median(rows: list[dict], *path: str) -> float | None:
    vals = []
    for r in rows:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    return round(statistics.median(vals), 3) if vals else None


def summarize(rounds: list[dict]) -> dict[str, Any]:
    codes: collections.Counter[str] = collections.Counter()
    for r in rounds:
        codes.update(r["overload"]["by_code"])
    return {
        "steady_rps": _median(rounds, "steady", "rps"), "steady_p50_ms": _median(rounds, "steady", "p50_ms"),
        "steady_p99_ms": _median(rounds, "steady", "p99_ms"),
        "overload_offered_rps": _median(rounds, "overload", "offered_rps"),
        "overload_sent_rps": _median(rounds, "overload", "sent_rps"),
        "overload_ok_rps": _median(rounds, "overload", "rps"),
        "overload_p50_ms": _median(rounds, "overload", "p50_ms"), "overload_p99_ms": _median(rounds, "overload", "p99_ms"),
        "overload_by_code_total": dict(codes),
        "goodput_vs_steady": _median(rounds, "ratios", "goodput_vs_steady"),
        "p99_vs_steady": _median(rounds, "ratios", "p99_vs_steady"),
        "ok_share": _median(rounds, "ratios", "ok_share"),
    }


def render(report: dict[str, Any]) -> str:
    o = report["options"]
    lines = [f"Overload, {report['date']}: {o['model']} ({' '.join(o['server_arg'])}), steady = closed loop c={o['concurrency']}; overload = open loop at "
             f"{o['factor']}x the steady req/s with a {o['timeout']} s deadline; {o['duration']} s per phase, "
             f"medians of {o['rounds']} rounds; client and server share {report['machine'].get('cpus_usable')} cores.",
             "",
             "| server | steady req/s | steady p50 / p99 ms | offered / sent req/s | overload OK req/s | "
             "admitted p50 / p99 ms | p99 vs steady | OK share | calls by code (all rounds) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, s in report["summary"].items():
        codes = ", ".join(f"{k} {v:,}" for k, v in sorted(s["overload_by_code_total"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {name} | {s['steady_rps']:,} | {s['steady_p50_ms']} / {s['steady_p99_ms']} | "
                     f"{s['overload_offered_rps']:,} / {s['overload_sent_rps']:,} | {s['overload_ok_rps']:,} | "
                     f"{s['overload_p50_ms']} / {s['overload_p99_ms']} | {s['p99_vs_steady']}x | {s['ok_share']} | "
                     f"{codes} |")
    return "\n".join(lines)


async def amain(opts: argparse.Namespace) -> dict[str, Any]:
    path = models.ensure_model(opts.model)
    report: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine_info(), "options": {k: v for k, v in vars(opts).items() if k != "out"},
                              "configs": {}, "summary": {}}
    with tempfile.TemporaryDirectory(prefix="overload-", dir=REPO / "var") as tmp:
        for name in opts.configs.split(","):
            server = Server(name, opts.model, ["--onnx", str(path), *opts.server_arg, *CONFIGS[name]], Path(tmp), [])
            try:
                progress(f"{name}: starting {server.describe()}")
                await server.start()
                rounds = []
                for i in range(opts.rounds):
                    rounds.append(await one_round(server, opts))
                report["configs"][name] = {"server": server.describe(), "rounds": rounds}
                report["summary"][name] = summarize(rounds)
            finally:
                await server.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="twotower", help="benchmark model kind (bench/models.py)")
    ap.add_argument("--server-arg", action="append", default=None,
                    help="flag for every server (repeat); default --max-batch-size 1 (see the module doc)")
    ap.add_argument("--configs", default="protected,unprotected", help=f"comma list of {sorted(CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=6.0, help="measured seconds per phase")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=32, help="closed-loop clients of the steady phase")
    ap.add_argument("--factor", type=float, default=2.5, help="overload rate / steady req/s")
    ap.add_argument("--timeout", type=float, default=2.0, help="deadline of every call, seconds")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    opts = ap.parse_args(argv)
    if opts.server_arg is None:
        opts.server_arg = ["--max-batch-size", "1"]
    unknown = set(opts.configs.split(",")) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown config(s) {sorted(unknown)}")
    (REPO / "var").mkdir(exist_ok=True)
    report = asyncio.run(amain(opts))
    write_json(report, opts.out)
    print(render(report), flush=True)
    print(f"wrote {opts.out}", file=sys.stderr)
    prot = report["summary"].get("protected")
    return 0 if prot is None or prot["overload_by_code_total"].get("RESOURCE_EXHAUSTED") else 1


if __name__ == "__main__":
    sys.exit(main())
