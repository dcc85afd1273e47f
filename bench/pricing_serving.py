"""Quote vs V2 ModelInfer on the same pricing model, same process, same run.

    python -m bench.pricing_serving [--duration 8] [--concurrency 32] [--rounds 2]

Starts the real trainer (bootstraps pricing from Ta Feng) and the pricing service, then
measures, alternating (bench.api_vs_v2), closed-loop load at the given concurrency on the
service's domain API (Quote: validation, guardrails, the candidate grid, one model run over it,
greedy and Thompson choice, feedback recording) and on its KServe V2 ModelInfer of the same
model, fed exactly the tensors Quote feeds it (product code, segment, hour, the 21-point grid
of log price ratios) for the same real Ta Feng quotes (ops.scenario_quote). Target (issue 6):
Quote p99 <= 1.5x ModelInfer p99. Writes bench/results/pricing_serving.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np

from bench.api_vs_v2 import V2, alternate, compare
from bench.machine import machine_info

TARGET_RATIO = 1.5


def v2_requests(quotes, registry_dir: Path, grid_size: int):
    """ModelInfer requests with the very tensors the service builds for each quote."""
    from protos.inference import grpc_service_pb2 as pb
    from services.pricing.adapter import PricingService, Vocab
    from shared.registry import ModelRegistry

    registry = ModelRegistry(registry_dir)
    vocab = Vocab(registry.manifest("pricing", registry.current_version("pricing")).extra)
    service = PricingService(None, grid_size=grid_size)
    out = []
    for q in quotes:
        feeds = service.prepare(q, vocab).feeds
        req = pb.ModelInferRequest(model_name="pricing")
        for name, value in feeds.items():
            req.inputs.add(name=name, datatype="INT64" if value.dtype == np.int64 else "FP32", shape=list(value.shape))
            req.raw_input_contents.append(np.ascontiguousarray(value).tobytes())
        out.append(req)
    return out


async def measure(address: str, quotes, v2_reqs, concurrency: int, duration: float, warmup: float, rounds: int):
    from protos.inference import grpc_service_pb2_grpc as pb_grpc
    from protos.pricing.v1 import pricing_pb2_grpc

    channel = grpc.aio.insecure_channel(address)
    pricing = pricing_pb2_grpc.PricingStub(channel)
    v2 = pb_grpc.GRPCInferenceServiceStub(channel)
    n = len(quotes)
    out = await alternate({V2: lambda i: v2.ModelInfer(v2_reqs[i % n], timeout=10),
                           "Quote": lambda i: pricing.Quote(quotes[i % n], timeout=10)},
                          concurrency, duration, warmup, rounds, label="pricing-serving")
    await channel.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench/results/pricing_serving.json")
    args = ap.parse_args(argv)
    from bench.eval_pricing import PricingLoop
    from ops.scenario_quote import quotes as make_quotes

    _, _, quotes = make_quotes(200, 2000)
    with tempfile.TemporaryDirectory(prefix="pricing-serving-") as tmp:
        # the trainer learns nothing here (no outcomes): it bootstraps the model the service serves
        loop = PricingLoop(Path(tmp), [], ["--exploration-seed", "0"]).start()
        try:
            v2_reqs = v2_requests(quotes, loop.registry, 21)
            results = asyncio.run(measure(f"127.0.0.1:{loop.port}", quotes, v2_reqs, args.concurrency, args.duration,
                                          args.warmup, args.rounds))
        finally:
            loop.stop()
    report = compare(results, "Quote", args.concurrency, TARGET_RATIO)
    report["machine"] = machine_info()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
