"""Fraud domain rules: request -> model inputs, outputs -> probability, decision, reasons.

The model's manifest declares the feature names in input column order (the bundled model:
V1..V28, then "amount"). Requests carry every declared feature by name except the ones
derived from request fields ("amount" comes from ScoreTransactionRequest.amount).
Decision thresholds come from the manifest (calibrated by the trainer on a holdout to
target false-positive rates) unless configuration overrides them.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Hashable, Mapping

import numpy as np

from protos.common.v1 import common_pb2
from protos.feedback.v1 import feedback_pb2
from protos.fraud.v1 import fraud_pb2
from shared.domain import DomainService, Prepared, check_id, event_time, feedback_outcome, finite
from shared.errors import InvalidArgument, echo_names
from shared.registry import Manifest, Signature, TensorSpec
from shared.runtime.model import LoadedModel

DERIVED = {"amount"}  # features filled from request fields, not from request.features
N_INPUTS = 29
FLOAT32_MAX = float(np.finfo(np.float32).max)
SIGNATURE = Signature(
    inputs=(TensorSpec("features", "FP32", (-1, N_INPUTS)),),
    outputs=(TensorSpec("probability", "FP32", (-1, 1)), TensorSpec("contributions", "FP32", (-1, N_INPUTS))),
)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    review: float
    block: float


def check_manifest(manifest: Manifest) -> str | None:
    names = manifest.extra.get("feature_names")
    if not isinstance(names, list) or len(names) != N_INPUTS or len(set(names)) != N_INPUTS:
        return f"extra.feature_names must list {N_INPUTS} distinct input names"
    if "amount" not in names:
        return "extra.feature_names must include 'amount'"
    t = manifest.extra.get("thresholds") or {}
    try:
        review, block = float(t["review"]), float(t["block"])
    except (KeyError, TypeError, ValueError):
        return "extra.thresholds must hold numeric 'review' and 'block'"
    if not 0.0 <= review <= block <= 1.0:
        return f"thresholds must satisfy 0 <= review <= block <= 1, got review={review} block={block}"
    return None


def check_outputs(outputs: Mapping[str, np.ndarray]) -> str | None:
    p = outputs["probability"]
    if (p < 0).any() or (p > 1).any():
        return "probability outside [0, 1]"
    return None


class FraudService(DomainService[fraud_pb2.ScoreTransactionRequest, fraud_pb2.ScoreTransactionResponse]):
    domain = "fraud"
    prediction_id_legacy_domain = 1  # ids issued before domains were named still verify

    def __init__(self, served, feedback=None, *, review_threshold: float = -1.0, block_threshold: float = -1.0,
                 max_reasons: int = 3) -> None:
        super().__init__(served, feedback)
        self.override = (review_threshold, block_threshold)
        self.max_reasons = max_reasons
        self._columns: dict[str, tuple[list[str], dict[str, int]]] = {}  # per model version

    def thresholds(self, model: LoadedModel) -> Thresholds:
        t = (model.manifest.extra.get("thresholds") if model.manifest else None) or {"review": 0.5, "block": 0.9}
        review = self.override[0] if self.override[0] >= 0 else float(t["review"])
        block = self.override[1] if self.override[1] >= 0 else float(t["block"])
        return Thresholds(review, max(block, review))

    def feature_names(self, model: LoadedModel) -> list[str]:
        if model.manifest is not None and "feature_names" in model.manifest.extra:
            return list(model.manifest.extra["feature_names"])
        return [f"V{i}" for i in range(1, N_INPUTS)] + ["amount"]

    def routing_key(self, request: fraud_pb2.ScoreTransactionRequest) -> str | None:
        """Canary routing by card (else customer): every transaction of one card is scored by one
        version while a canary runs, so a card's decisions stay consistent (a fraud burst on a
        card is not judged half by each model). Neither given: a random draw."""
        if request.card_ref:
            return "card:" + request.card_ref
        return "customer:" + request.customer_ref if request.customer_ref else None

    def preprocess(self, request: fraud_pb2.ScoreTransactionRequest, model: LoadedModel) -> Prepared:
        check_id(request.transaction_id, "transaction_id", 128)
        check_id(request.customer_ref, "customer_ref", 128, required=False)
        check_id(request.card_ref, "card_ref", 128, required=False)
        amount = finite(request.amount, "amount")
        if amount < 0:
            raise InvalidArgument(f"amount must be >= 0, got {amount}")
        event_time(request.timestamp, "timestamp", time.time())
        names = self.feature_names(model)
        given = request.features
        if len(given) > len(names) - len(DERIVED):
            # before reading any value: the message names a few of them, never all (a status
            # message rides in trailing metadata, which gRPC bounds)
            unknown = sorted(k for k in given if k not in names or k in DERIVED)
            raise InvalidArgument(f"unknown feature(s) {echo_names(unknown)}; the model takes "
                                  f"{[n for n in names if n not in DERIVED]}")
        row = np.empty((1, len(names)), np.float32)
        # The model computes in float32: a double beyond float32's range (|x| > 3.4e38, e.g.
        # 1e39) is finite here but becomes inf in the row, and the model would answer NaN.
        # The cast's overflow is expected (not a warning); the row the model will see is
        # checked once below, naming the first such feature.
        with np.errstate(over="ignore"):
            for i, name in enumerate(names):
                if name == "amount":
                    row[0, i] = amount
                    continue
                if name not in given:
                    raise InvalidArgument(f'features["{name}"] is required')
                value = given[name]
                if not math.isfinite(value):
                    raise InvalidArgument(f'features["{name}"] must be finite, got {value}')
                row[0, i] = value
        if not np.isfinite(row).all():
            name = names[int(np.flatnonzero(~np.isfinite(row[0]))[0])]
            field, value = ("amount", amount) if name == "amount" else (f'features["{name}"]', given[name])
            raise InvalidArgument(f"{field} is outside the float32 range the model computes in "
                                  f"(|x| <= {FLOAT32_MAX:.4g}), got {value}")
        return Prepared({"features": row}, 1, names)

    def postprocess(self, request, prepared: Prepared, outputs, model: LoadedModel, prediction_id: str):
        p = float(outputs["probability"][0, 0])
        contributions = outputs["contributions"][0]
        t = self.thresholds(model)
        decision = (fraud_pb2.DECISION_BLOCK if p >= t.block else
                    fraud_pb2.DECISION_REVIEW if p >= t.review else fraud_pb2.DECISION_ALLOW)
        resp = fraud_pb2.ScoreTransactionResponse(
            prediction_id=prediction_id, fraud_probability=p, decision=decision,
            model=common_pb2.ModelRef(name=model.name, version=model.version),
            review_threshold=t.review, block_threshold=t.block)
        names = prepared.extra
        row = prepared.feeds["features"][0]
        for i in np.argsort(-contributions)[: self.max_reasons]:
            if contributions[i] <= 0:
                break
            resp.reasons.add(feature=names[i], contribution=float(contributions[i]), value=float(row[i]))
        return resp

    def outcome_to_feedback(self, outcome: fraud_pb2.FraudOutcome, now: float) -> tuple[Hashable, feedback_pb2.Outcome]:
        check_id(outcome.prediction_id, "prediction_id", 64)
        check_id(outcome.source, "source", 64, required=False)
        occurred = event_time(outcome.occurred_at, "occurred_at", now)
        message = fraud_pb2.FraudOutcome()
        message.CopyFrom(outcome)
        message.occurred_at = occurred
        return (outcome.prediction_id, outcome.is_fraud), feedback_outcome(message, occurred)
