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

import asyncio
import json
import sys
import tempfile
from pathlib import Path


from bench.api_vs_v2 import arguments, compare, measure
from bench.machine import machine_info
from ops.scenario_v2 import build_request
from shared.runtime.dtypes import V2_OF_NUMPY

TARGET_RATIO = 1.5


def v2_requests(quotes, registry_dir: Path, grid_size: int):
    """ModelInfer requests with the very tensors the service builds for each quote."""
    from services.pricing.adapter import PricingService, Vocab
    from shared.registry import ModelRegistry

    registry = ModelRegistry(registry_dir)
    vocab = Vocab(registry.manifest("pricing", registry.current_version("pricing")).extra)
    service = PricingService(None, grid_size=grid_size)
    out = []
    for q in quotes:
        feeds = service.prepare(q, vocab).feeds
        out.append(build_request("pricing", feeds, {name: V2_OF_NUMPY[value.dtype] for name, value in feeds.items()}))
    return out


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__, "bench/results/pricing_serving.json").parse_args(argv)
    from bench.eval_pricing import PricingLoop
    from protos.pricing.v1 import pricing_pb2_grpc
    from ops.scenario_quote import quotes as make_quotes

    _, _, quotes = make_quotes(200, 2000)
    with tempfile.TemporaryDirectory(prefix="pricing-serving-") as tmp:
        # the trainer learns nothing here (no outcomes): it bootstraps the model the service serves
        loop = PricingLoop(Path(tmp), [], ["--exploration-seed", "0"]).start()
        try:
            v2_reqs = v2_requests(quotes, loop.registry, 21)
            results = asyncio.run(measure(f"127.0.0.1:{loop.port}", "Quote",
                                          lambda ch: pricing_pb2_grpc.PricingStub(ch).Quote, quotes, v2_reqs,
                                          args.concurrency, args.duration, args.warmup, args.rounds,
                                          label="pricing-serving"))
        finally:
            loop.stop()
    report = compare(results, "Quote", args.concurrency, TARGET_RATIO)
    report["machine"] = machine_info()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
