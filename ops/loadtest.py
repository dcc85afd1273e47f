"""Load-test the suite's gRPC APIs (`make loadtest`).

    python -m ops.loadtest fraud --target 127.0.0.1:50051 -c 32 -d 30          # closed loop
    python -m ops.loadtest fraud --target 127.0.0.1:50051 --rate 500 -d 30     # open loop, Poisson arrivals
    python -m ops.loadtest recommend -c 32 -d 30                                # the recommender on :50052
    python -m ops.loadtest quote --rate 200 -d 30                               # pricing on :50053
    python -m ops.loadtest v2 --target 127.0.0.1:18111 --model mlp -c 32 -d 10  # any KServe V2 endpoint
    python -m ops.loadtest fraud --target ipv4:127.0.0.1:50051,127.0.0.1:50061  # replicas, round_robin

Scenarios are built from the real datasets: `fraud` scores transactions from the part of the
creditcard stream the bootstrap did not train on and reports each label through
ReportOutcome after --label-delay-s (a share --outcome-rate of them), as a checkout backend
would. `recommend` asks for k items for real Ta Feng customers and reports the clicks and
purchases their real later baskets imply (ops/scenario_recommend.py). `quote` prices real Ta
Feng products inside merchant guardrails and reports the sales a demand curve calibrated on
Ta Feng produces (ops/scenario_quote.py). `v2` sends ModelInfer with inputs shaped from the
model's ModelMetadata (ops/scenario_v2.py). `fraud` is ops/scenario_fraud.py.

Closed loop (-c N): N workers, each sends, awaits the answer, sends again. Open loop
(--rate R): requests start at Poisson arrival times whatever the answers do (at most
--max-in-flight outstanding; arrivals beyond that are counted as `dropped_by_client`), so
queueing shows up in the latencies as it would for real users. A warm-up is not measured.
The loop is ops/loadgen.py, the one the benchmarks run too. Prints progress every second,
then req/s, p50/p90/p99/p99.9 and errors by gRPC status code; writes the figures as JSON and
a latency-over-time chart (PNG). After `recommend` it prints the learning report's click
calibration per version (mean served click probability against the observed click rate, and
ECE) from the trainer's decision log under --workdir (trainer/report.py).

Why not Locust or ghz: Locust's gevent monkey-patching does not mix with grpcio's asyncio
client, and ghz is a Go binary outside the package registries this project may use. The
load loop here is a few dozen lines on grpc.aio, the same client stack the services' users run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from ops import scenario_fraud, scenario_quote, scenario_recommend, scenario_v2
from ops.loadgen import CHANNEL_OPTIONS, Call, Recorder, closed_loop, generate, per_second, summary
from shared.channels import aio_channel, normalize_target

__all__ = ["Call", "Recorder", "closed_loop", "summary", "run", "main"]  # the loop's parts, for tests that drive it


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


DEFAULT_TARGETS = {"fraud": "127.0.0.1:50051", "recommend": "127.0.0.1:50052", "quote": "127.0.0.1:50053"}
SCENARIOS = {"fraud": scenario_fraud.scenario, "recommend": scenario_recommend.scenario,
             "quote": scenario_quote.scenario, "v2": scenario_v2.scenario}


async def run(args) -> dict:
    channel = aio_channel(args.target, options=CHANNEL_OPTIONS)
    call, drain = await SCENARIOS[args.scenario](channel, args)
    await call(0)  # connectivity and correctness outside the window
    rec = await generate(call, duration=args.duration, warmup=args.warmup, concurrency=args.concurrency,
                         rate=args.rate, max_in_flight=args.max_in_flight, seed=args.seed, progress_label="loadtest")
    await drain()
    await channel.close()
    out = {"scenario": args.scenario, "target": args.target, "mode": "open" if args.rate else "closed",
           "concurrency": None if args.rate else args.concurrency, "rate": args.rate or None,
           "duration_s": args.duration, "warmup_s": args.warmup, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.update(summary(rec))
    out["per_second"] = per_second(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ops.loadtest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--target", default="", help="HOST:PORT (loopback or your own test hosts), or several "
                    "replicas (ipv4:IP:PORT,IP:PORT or dns:///NAME:PORT: round_robin, UNAVAILABLE retried on "
                    "another; shared/channels.py); default: the scenario's service on 127.0.0.1 (fraud :50051, "
                    "recommend :50052, quote :50053)")
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
    ap.add_argument("--bought-click-rate", type=float, default=0.3,
                    help="recommend: chance that a shown item the customer really bought is clicked (then bought)")
    ap.add_argument("--click-delay-s", type=float, default=1.0, help="recommend: seconds before a click is reported")
    ap.add_argument("--workdir", type=Path, default=Path("var/trainer"),
                    help="recommend: the suite's trainer workdir, whose click calibration per version is printed at "
                         "the end (as python -m trainer report prints it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("var/loadtest"), help="folder for the JSON and the PNG")
    args = ap.parse_args(argv)
    if not args.target:
        if args.scenario not in DEFAULT_TARGETS:
            ap.error(f"{args.scenario} needs --target")
        args.target = DEFAULT_TARGETS[args.scenario]
    try:
        normalize_target(args.target)
    except ValueError as e:
        ap.error(f"--target: {e}")
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
    if args.scenario == "recommend":
        learning_report(args.workdir)
    return 1 if result["errors"] else 0


def learning_report(workdir: Path) -> None:
    """The recommender's click calibration per version from the trainer's decision log, when this
    machine can read it; else where to look. Labels of the last answers count once their label
    window (an hour by default; 10 s in `make demo`) has passed and a round learned them."""
    from trainer.report import print_calibration

    print(f"learning report of the trainer in {workdir} (shown items become negatives once the recommender's "
          "label window has passed; later rounds move these figures):")
    if not print_calibration(workdir):
        print(f"no click calibration in {workdir}/decisions: run python -m trainer report --workdir <the suite's "
              "trainer workdir> where the trainer runs")


if __name__ == "__main__":
    sys.exit(main())
