"""Load-test scenario for fraud: a checkout backend scoring real transactions, labels reported later.

    python -m ops.loadtest fraud --target 127.0.0.1:50051 -c 32 -d 30

Each call scores one transaction from the part of the creditcard stream the bootstrap did not
train on (cycling through --rows of them); for a share --outcome-rate of the answers the real
label is reported through ReportOutcome after --label-delay-s, as a chargeback would be.
"""
from __future__ import annotations

import asyncio
import random

import grpc

from ops.loadgen import Later, report_outcome
from ops.storefront_data import fraud_requests
from protos.fraud.v1 import fraud_pb2, fraud_pb2_grpc


async def scenario(channel: grpc.aio.Channel, args):
    requests, labels = await asyncio.to_thread(fraud_requests, args.rows)
    stub = fraud_pb2_grpc.FraudStub(channel)
    rng = random.Random(args.seed)
    later = Later()

    async def report_later(pid: str, is_fraud: bool) -> None:
        await asyncio.sleep(args.label_delay_s)
        outcome = fraud_pb2.FraudOutcome(prediction_id=pid, is_fraud=is_fraud, source="chargeback")
        await report_outcome(lambda: stub.ReportOutcome(outcome, timeout=args.timeout))

    async def call(i: int):
        k = i % len(requests)
        resp = await stub.ScoreTransaction(requests[k], timeout=args.timeout)
        if rng.random() < args.outcome_rate:
            later(report_later(resp.prediction_id, labels[k]))
        return resp

    return call, later.drain
