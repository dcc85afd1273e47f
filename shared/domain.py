"""The template every domain service follows: preprocess -> inference -> postprocess.

A domain (fraud, recommender, pricing) subclasses DomainService and writes only what is
particular to it: `preprocess` (validate the request, build model inputs), `postprocess`
(turn outputs into its response, apply its rules) and `outcome_key` (what makes two
outcomes the same). The template does the rest the same way everywhere: the deadline,
the batcher, a prediction id unique across replicas and restarts, recording what was
served and what happened for the trainer, and de-duplicating repeated outcomes.

Two optional hooks for domains whose model inputs are not what the trainer should see:
`served_record` picks what is recorded for the trainer (default: every model input and
output; the recommender records ids instead of its catalog matrix), and
`outcome_accepted` sees each new (non-duplicate) outcome (the recommender updates the
user's recent history with it).
"""
from __future__ import annotations

import abc
import collections
import dataclasses
import itertools
import math
import time
import uuid
from typing import Any, AsyncIterator, Generic, Hashable, Iterable, Mapping, TypeVar

import numpy as np
from google.protobuf.message import Message

from protos.common.v1 import common_pb2
from protos.feedback.v1 import feedback_pb2
from shared import logs
from shared.errors import InvalidArgument, ResourceExhausted, Unavailable
from shared.runtime.model import LoadedModel
from shared.serving import ServedModel

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

MAX_FUTURE_SKEW_S = 300.0  # outcome times further in the future than this are refused


@dataclasses.dataclass
class Prepared:
    """Model inputs built from one request, plus whatever postprocess needs from preprocess."""

    feeds: dict[str, np.ndarray]
    rows: int
    extra: Any = None
    # Inputs without a batch axis, fed once per run (e.g. a catalog matrix). A request that has
    # them runs on the model version preprocess saw (they are usually made for that version).
    shared: dict[str, np.ndarray] | None = None


class PredictionIds:
    """Opaque ids unique across replicas and restarts: a random instance id plus a counter."""

    def __init__(self) -> None:
        self.instance = uuid.uuid4().hex[:16]
        self._seq = itertools.count(1)

    def next(self) -> str:
        return f"{self.instance}-{next(self._seq):x}"


class SeenOutcomes:
    """Bounded memory of outcome identities this replica already accepted (best effort:
    the trainer de-duplicates for real)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._seen: collections.OrderedDict[Hashable, None] = collections.OrderedDict()

    def add(self, key: Hashable) -> bool:
        """True if new."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True


def finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{field} must be a finite number, got {value}")
    return value


def check_id(value: str, field: str, max_len: int, required: bool = True) -> str:
    if required and not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) > max_len:
        raise InvalidArgument(f"{field} is longer than {max_len} characters")
    return value


def event_time(value: float, field: str, now: float, allow_future: bool = False) -> float:
    """A client-sent Unix time: 0 means now; negative, non-finite or far future is refused."""
    finite(value, field)
    if value == 0:
        return now
    if value < 0:
        raise InvalidArgument(f"{field} must be >= 0 (Unix seconds), got {value}")
    if not allow_future and value > now + MAX_FUTURE_SKEW_S:
        raise InvalidArgument(f"{field} is {value - now:.0f} s in the future")
    return value


class DomainService(abc.ABC, Generic[Req, Resp]):
    """What a domain servicer delegates to; the gRPC servicer stays a thin adapter."""

    domain: int  # feedback_pb2.Domain value

    def __init__(self, served: ServedModel, feedback=None) -> None:
        self.served = served
        self.feedback = feedback  # shared.feedback.FeedbackClient, or None when not learning
        self.ids = PredictionIds()
        self.seen_outcomes = SeenOutcomes()

    # ---- what a domain writes ----
    @abc.abstractmethod
    def preprocess(self, request: Req, model: LoadedModel) -> Prepared:
        """Validate the request (InvalidArgument naming the field) and build model inputs."""

    @abc.abstractmethod
    def postprocess(self, request: Req, prepared: Prepared, outputs: Mapping[str, np.ndarray],
                    model: LoadedModel, prediction_id: str) -> Resp:
        """Build the response from the model outputs and the domain's rules."""

    @abc.abstractmethod
    def outcome_to_feedback(self, outcome: Message, now: float) -> tuple[Hashable, feedback_pb2.Outcome]:
        """Validate one outcome; return its identity (for duplicates) and the feedback record."""

    def served_record(self, request: Req, prepared: Prepared, outputs: Mapping[str, np.ndarray],
                      response: Resp) -> tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]:
        """(inputs, outputs) recorded for the trainer with the request and response; what the
        trainer learns from must be exactly what was served. Default: the batched model
        inputs and every output (never the shared inputs)."""
        return prepared.feeds, outputs

    def outcome_accepted(self, outcome: Message, record: feedback_pb2.Outcome) -> None:
        """Called once per new (non-duplicate) valid outcome, before it is queued for the trainer."""

    # ---- the template ----
    async def predict(self, request: Req, deadline: float | None) -> Resp:
        model = self.served.current
        if model is None:
            raise Unavailable(f"model {self.served.name!r} is not loaded yet")
        prepared = self.preprocess(request, model)
        outputs, used = await self.served.infer(prepared.feeds, prepared.rows, deadline, shared=prepared.shared,
                                                model=model if prepared.shared else None)
        named = dict(zip(used.output_names, outputs))
        prediction_id = self.ids.next()
        logs.model_version.set(used.version)
        response = self.postprocess(request, prepared, named, used, prediction_id)
        if self.feedback is not None:
            inputs, recorded = self.served_record(request, prepared, named, response)
            self.feedback.record_served(prediction_id, used.name, used.version, inputs, recorded,
                                        request=request, response=response, served_at=time.time())
        return response

    def accept_outcomes(self, outcomes: Iterable[Message]) -> common_pb2.ReportOutcomeResponse:
        """Queue outcomes for the trainer; the first invalid one stops the call (earlier ones stay)."""
        accepted = duplicates = 0
        now = time.time()
        for outcome in outcomes:
            key, record = self.outcome_to_feedback(outcome, now)
            if not self.seen_outcomes.add(key):
                duplicates += 1
                continue
            record.received_at = now
            self.outcome_accepted(outcome, record)
            if self.feedback is not None and not self.feedback.record_outcome(record):
                raise ResourceExhausted("outcome queue and disk spool are full; retry later")
            accepted += 1
        return common_pb2.ReportOutcomeResponse(accepted=accepted, duplicates=duplicates)

    async def accept_outcome_stream(self, outcomes: AsyncIterator[Message]) -> common_pb2.ReportOutcomeResponse:
        total = common_pb2.ReportOutcomeResponse()
        i = 0
        async for outcome in outcomes:
            try:
                one = self.accept_outcomes([outcome])
            except InvalidArgument as e:
                raise InvalidArgument(f"outcome {i}: {e.message}") from None
            total.accepted += one.accepted
            total.duplicates += one.duplicates
            i += 1
        return total


def attach_feedback(app, settings, domain: str):
    """The feedback client of a domain service, started and stopped with its server; None
    when settings.trainer_target is empty (serving without learning)."""
    if not settings.trainer_target:
        return None
    import os

    from shared.feedback import FeedbackClient

    spool = settings.spool_dir or f"var/spool/{domain}"
    worker = os.environ.get("STOREFRONT_WORKER_INDEX")
    if worker is not None:  # a spool folder is locked by one process: one per worker
        spool = os.path.join(spool, f"worker-{worker}")
    client = FeedbackClient(settings.trainer_target, domain=domain, spool_dir=spool,
                            max_spool_bytes=settings.spool_max_mb << 20)

    async def start() -> None:
        client.start()

    app.on_start.append(start)
    app.on_stop.append(client.stop)
    return client
