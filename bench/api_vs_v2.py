"""A domain API against KServe V2 ModelInfer of the same model, same process, same run.

The measurement both serving benchmarks share (bench.fraud_serving, bench.pricing_serving):
closed-loop load at a fixed concurrency (ops/loadgen.py), alternating the APIs round
after round so that drift in the machine's load hits both alike, then the median over the
rounds of each API's p99 and req/s, and the ratio of the domain API's p99 to ModelInfer's.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Mapping, Sequence

import grpc
import numpy as np

from ops.loadgen import Call, generate, summary
from protos.inference import grpc_service_pb2_grpc as pb_grpc

V2 = "ModelInfer"


async def alternate(calls: Mapping[str, Call], concurrency: int, duration: float,
                    warmup: float, rounds: int = 2, label: str = "serving") -> list[dict]:
    """Each API in turn, `rounds` times; one summary per (round, API)."""
    out = []
    for round_ in range(rounds):
        for api, call in calls.items():
            r = summary(await generate(call, duration=duration, warmup=warmup, concurrency=concurrency))
            r.update(api=api, round=round_ + 1, concurrency=concurrency)
            print(f"[{label}] {api} round {round_ + 1}: {r}", file=sys.stderr)
            out.append(r)
    return out


async def measure(address: str, api: str, method_of: Callable[[grpc.aio.Channel], Callable], requests: Sequence,
                  v2_requests: Sequence, concurrency: int, duration: float, warmup: float, rounds: int = 2,
                  label: str = "serving") -> list[dict]:
    """`alternate` on one channel to `address`: `api` is method_of(channel) called with requests[i],
    ModelInfer with v2_requests[i] (the same inputs, as the model sees them)."""
    channel = grpc.aio.insecure_channel(address)
    try:
        method, infer = method_of(channel), pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        n = len(requests)
        return await alternate({V2: lambda i: infer(v2_requests[i % n], timeout=10),
                                api: lambda i: method(requests[i % n], timeout=10)},
                               concurrency, duration, warmup, rounds, label)
    finally:
        await channel.close()


def arguments(doc: str, out: str) -> argparse.ArgumentParser:
    """The options both serving benchmarks take."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=out)
    return ap


def compare(results: list[dict], api: str, concurrency: int, target: float | None) -> dict:
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
    print(f"\n{api} p99 / {V2} p99 = {ratio}" + (f" (target <= {target})" if target is not None else ""))
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results, "p99_ratio": ratio,
            "target_ratio": target, "median_p99_ms": p99, "median_rps": rps}
