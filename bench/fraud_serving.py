"""ScoreTransaction vs V2 ModelInfer on the same fraud model, same process, same run.

    python -m bench.fraud_serving [--duration 8] [--concurrency 32]

Starts the real trainer (bootstraps fraud from the real data) and the fraud service, then
measures, alternating twice, closed-loop load at the given concurrency on the service's
domain API (ScoreTransaction: validation by feature name, thresholds, reason codes,
feedback recording) and on its KServe V2 ModelInfer of the same model with the same real
rows. Target (issue 4): ScoreTransaction p99 <= 1.2x ModelInfer p99. Writes
bench/results/fraud_serving.json.
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
from ops.procs import FraudLoop
from bench.storefront import score_request
from protos.fraud.v1 import fraud_pb2_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc

TARGET_RATIO = 1.2  # ScoreTransaction p99 / ModelInfer p99 (issue 4)


async def measure(address: str, rows: np.ndarray, requests, concurrency: int, duration: float, warmup: float):
    channel = grpc.aio.insecure_channel(address)
    fraud = fraud_pb2_grpc.FraudStub(channel)
    v2 = pb_grpc.GRPCInferenceServiceStub(channel)
    v2_requests = []
    for r in rows:
        req = pb.ModelInferRequest(model_name="fraud")
        req.inputs.add(name="features", datatype="FP32", shape=[1, rows.shape[1]])
        req.raw_input_contents.append(np.ascontiguousarray(r[None, :], np.float32).tobytes())
        v2_requests.append(req)
    n = len(rows)
    out = await alternate({V2: lambda i: v2.ModelInfer(v2_requests[i % n], timeout=10),
                           "ScoreTransaction": lambda i: fraud.ScoreTransaction(requests[i % n], timeout=10)},
                          concurrency, duration, warmup, label="fraud-serving")
    await channel.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", default="bench/results/fraud_serving.json")
    args = ap.parse_args(argv)
    from trainer.bootstrap import fraud_split
    from trainer.domains import fraud

    data = fraud.load_creditcard()
    _, _, rest = fraud_split(data)
    start = len(data) - len(rest)
    idx = np.arange(start, start + 2000)
    requests = [score_request(data, int(i)) for i in idx]
    with tempfile.TemporaryDirectory(prefix="fraud-serving-") as tmp:
        loop = FraudLoop(Path(tmp)).start()
        try:
            results = asyncio.run(measure(f"127.0.0.1:{loop.fraud_port}", data.X[idx], requests, args.concurrency,
                                          args.duration, args.warmup))
        finally:
            loop.stop()
    report = compare(results, "ScoreTransaction", args.concurrency, TARGET_RATIO)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
