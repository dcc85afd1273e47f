"""Requests a storefront would send, built from the real datasets (for load tests and benches)."""
from __future__ import annotations

import numpy as np

from protos.fraud.v1 import fraud_pb2


def fraud_request(row: np.ndarray, transaction_id: str) -> fraud_pb2.ScoreTransactionRequest:
    """A ScoreTransaction request from one creditcard row (V1..V28, Amount)."""
    from trainer.domains.fraud import FEATURES

    return fraud_pb2.ScoreTransactionRequest(transaction_id=transaction_id, amount=float(row[-1]),
                                             features={n: float(v) for n, v in zip(FEATURES, row[:-1])})


def fraud_requests(rows: int) -> tuple[list[fraud_pb2.ScoreTransactionRequest], list[bool]]:
    """Requests and labels from the part of the stream the bootstrap did not train on."""
    from trainer.domains.fraud_bootstrap import fraud_stream_rows

    X, y, _ = fraud_stream_rows()
    n = min(rows, len(y))
    return [fraud_request(X[i], f"lt-{i}") for i in range(n)], [bool(v) for v in y[:n]]
