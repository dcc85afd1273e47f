"""A storefront-like client of the fraud service for benchmarks and end-to-end tests: scores
real transactions and reports each label right after, counting every call and its result."""
from __future__ import annotations

import threading
import time

import grpc

from shared.channels import sync_channel
from protos.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from ops.storefront_data import fraud_request


def score_request(data, i: int) -> fraud_pb2.ScoreTransactionRequest:
    return fraud_request(data.X[i], f"tx-{i}")


class Storefront:
    """Scores transactions and reports each label right after (label delay is the trainer's
    business: the joiner is what handles a delay). Counts every call and its result."""

    def __init__(self, address: str, data, rows: range) -> None:
        self.channel = sync_channel(address)  # one service, or its replicas (round_robin)
        self.stub = fraud_pb2_grpc.FraudStub(self.channel)
        self.data, self.rows = data, rows
        self.scored = 0
        self.outcomes = 0
        self.errors: list[str] = []
        self.versions: set[str] = set()
        self.first_seen: dict[str, float] = {}  # model version -> when a response first came from it
        self.reported: dict[str, float] = {}  # prediction_id -> when its outcome was reported
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def one(self, i: int) -> str:
        resp = self.stub.ScoreTransaction(score_request(self.data, i), timeout=10)
        now = time.time()
        self.scored += 1
        self.versions.add(resp.model.version)
        self.first_seen.setdefault(resp.model.version, now)
        self.stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=resp.prediction_id,
                                                       is_fraud=bool(self.data.y[i]), source="chargeback"), timeout=10)
        self.reported[resp.prediction_id] = time.time()
        self.outcomes += 1
        return resp.model.version

    def run(self, pause_s: float = 0.0) -> None:
        for i in self.rows:
            if self._stop.is_set():
                return
            try:
                self.one(i)
            except grpc.RpcError as e:
                self.errors.append(f"{e.code().name}: {e.details()}")
            if pause_s:
                time.sleep(pause_s)

    def start(self, pause_s: float = 0.0) -> "Storefront":
        self._thread = threading.Thread(target=self.run, args=(pause_s,), daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.channel.close()
