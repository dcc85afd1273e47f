"""A domain API against KServe V2 ModelInfer of the same model, same process, same run.

The measurement both serving benchmarks share (bench.fraud_serving, bench.pricing_serving):
closed-loop load at a fixed concurrency (ops.loadtest's loop), alternating the APIs round
after round so that drift in the machine's load hits both alike, then the median over the
rounds of each API's p99 and req/s, and the ratio of the domain API's p99 to ModelInfer's.
"""
from __future__ import annotations

import sys
import time
from typing import Awaitable, Callable, Mapping

import numpy as np

from ops.loadtest import Recorder, closed_loop, summary

V2 = "ModelInfer"


async def measure_one(call: Callable[[int], Awaitable[object]], concurrency: int, duration: float,
                      warmup: float) -> dict:
    rec = Recorder(time.perf_counter() + warmup)
    await closed_loop(call, concurrency, duration, warmup, rec)
    return summary(rec, duration)


async def alternate(calls: Mapping[str, Callable[[int], Awaitable[object]]], concurrency: int, duration: float,
                    warmup: float, rounds: int = 2, label: str = "serving") -> list[dict]:
    """Each API in turn, `rounds` times; one summary per (round, API)."""
    out = []
    for round_ in range(rounds):
        for api, call in calls.items():
            r = await measure_one(call, concurrency, duration, warmup)
            r.update(api=api, round=round_ + 1, concurrency=concurrency)
            print(f"[{label}] {api} round {round_ + 1}: {r}", file=sys.stderr)
            out.append(r)
    return out


def compare(results: list[dict], api: str, concurrency: int, target: float) -> dict:
    """Median p99 and req/s per API over the rounds, the p99 ratio; prints the table."""
    apis = [V2, api]
    p99 = {a: float(np.median([r["p99_ms"] for r in results if r["api"] == a])) for a in apis}
    rps = {a: float(np.median([r["rps"] for r in results if r["api"] == a])) for a in apis}
    rounds = len([r for r in results if r["api"] == api])
    ratio = round(p99[api] / p99[V2], 3)
    print(f"| API (c={concurrency}) | req/s (median of {rounds}) | p99 ms (median of {rounds}) |")
    print("|---|---|---|")
    for a in apis:
        print(f"| {a} | {rps[a]:,.0f} | {p99[a]:.2f} |")
    print(f"\n{api} p99 / {V2} p99 = {ratio} (target <= {target})")
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results, "p99_ratio": ratio,
            "target_ratio": target, "median_p99_ms": p99, "median_rps": rps}
