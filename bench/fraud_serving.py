"""ScoreTransaction vs V2 ModelInfer on the same fraud model, same process, same run.

    python -m bench.fraud_serving [--duration 8] [--concurrency 32] [--rounds 2]

Starts the real trainer (bootstraps fraud from the real data) and the fraud service, then
measures, alternating (--rounds, 2), closed-loop load at the given concurrency on the service's
domain API (ScoreTransaction: validation by feature name, thresholds, reason codes,
feedback recording) and on its KServe V2 ModelInfer of the same model with the same real
rows. Target (issue 4): ScoreTransaction p99 <= 1.2x ModelInfer p99. Writes
bench/results/fraud_serving.json.
"""
from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.api_vs_v2 import arguments, compare, measure
from ops.scenario_v2 import build_request
from ops.procs import FraudLoop
from bench.storefront import score_request
from protos.fraud.v1 import fraud_pb2_grpc

TARGET_RATIO = 1.2  # ScoreTransaction p99 / ModelInfer p99 (issue 4)


def v2_requests(rows: np.ndarray) -> list:
    """ModelInfer requests with each row's features, as ScoreTransaction hands them to the model."""
    return [build_request("fraud", {"features": r[None, :].astype(np.float32)}, {"features": "FP32"}) for r in rows]


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__, "bench/results/fraud_serving.json").parse_args(argv)
    from trainer.domains.fraud_bootstrap import fraud_split
    from trainer.domains import fraud

    data = fraud.load_creditcard()
    _, _, rest = fraud_split(data)
    start = len(data) - len(rest)
    idx = np.arange(start, start + 2000)
    requests = [score_request(data, int(i)) for i in idx]
    with tempfile.TemporaryDirectory(prefix="fraud-serving-") as tmp:
        loop = FraudLoop(Path(tmp)).start()
        try:
            results = asyncio.run(measure(f"127.0.0.1:{loop.fraud_port}", "ScoreTransaction",
                                          lambda ch: fraud_pb2_grpc.FraudStub(ch).ScoreTransaction, requests,
                                          v2_requests(data.X[idx]), args.concurrency, args.duration, args.warmup,
                                          args.rounds, label="fraud-serving"))
        finally:
            loop.stop()
    report = compare(results, "ScoreTransaction", args.concurrency, TARGET_RATIO)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
