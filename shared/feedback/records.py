"""Building the FeedbackRecords a service sends: a served prediction (with what a shadow
version computed for it) and an outcome, serialized once."""
from __future__ import annotations

import time
from typing import Mapping

import numpy as np
from google.protobuf.message import Message

from protos.feedback.v1 import feedback_pb2
from shared.feedback.tensors import fill_tensor


class ShadowRecord:
    """What a shadow version computed for a served request (see ServedPrediction.shadow)."""

    __slots__ = ("version", "inputs", "outputs", "score", "latency_ms")

    def __init__(self, version: str, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                 score: float, latency_ms: float) -> None:
        self.version = version
        self.inputs = inputs
        self.outputs = outputs
        self.score = score
        self.latency_ms = latency_ms


def served_record(record_id: str, domain: str, prediction_id: str, model_name: str, model_version: str,
                  inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                  request: Message | None = None, response: Message | None = None,
                  served_at: float | None = None, shadow: ShadowRecord | None = None) -> bytes:
    """One serialized FeedbackRecord for a served prediction; raises on what cannot be encoded."""
    rec = feedback_pb2.FeedbackRecord(record_id=record_id, domain=domain)
    s = rec.served
    s.prediction_id = prediction_id
    s.model.name = model_name
    s.model.version = model_version
    s.served_at = served_at or time.time()
    for name, value in inputs.items():
        fill_tensor(s.inputs.add(), name, value)
    for name, value in outputs.items():
        fill_tensor(s.outputs.add(), name, value)
    if request is not None:
        s.request.Pack(request)
    if response is not None:
        s.response.Pack(response)
    if shadow is not None:
        sh = s.shadow
        sh.model.name = model_name
        sh.model.version = shadow.version
        for name, value in shadow.inputs.items():
            fill_tensor(sh.inputs.add(), name, value)
        for name, value in shadow.outputs.items():
            fill_tensor(sh.outputs.add(), name, value)
        sh.score = shadow.score
        sh.latency_ms = shadow.latency_ms
    return rec.SerializeToString()


def outcome_record(record_id: str, domain: str, outcome: feedback_pb2.Outcome) -> bytes:
    """One serialized FeedbackRecord for an outcome."""
    return feedback_pb2.FeedbackRecord(record_id=record_id, domain=domain, outcome=outcome).SerializeToString()


def feedback_outcome(message: Message, occurred_at: float, received_at: float = 0.0) -> feedback_pb2.Outcome:
    """The feedback Outcome of a domain outcome message: its prediction_id and occurred_at copied
    out (so the trainer's joiner needs not unpack it) and the message packed as domain_outcome
    (whose own occurred_at the caller has set to occurred_at). received_at: when the service
    received it (0: the service template sets it on admission)."""
    record = feedback_pb2.Outcome(prediction_id=message.prediction_id, occurred_at=occurred_at,
                                  received_at=received_at)
    record.domain_outcome.Pack(message)
    return record
