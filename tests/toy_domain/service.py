"""The toy domain's service, on the shared domain template (shared/domain.py): adapter, servicer, settings.

    python -m tests.toy_domain.service [--port 50099] [--registry-dir var/registry] [--trainer-target ...]
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Hashable, Mapping

import numpy as np

from protos.feedback.v1 import feedback_pb2
from shared.domain import DomainService, Prepared, attach_domain, check_id, event_time, feedback_outcome
from shared.errors import InvalidArgument
from shared.ratelimit import caller_of
from shared.registry import Signature, TensorSpec
from shared.runtime.model import LoadedModel, ModelLoader
from shared.server import ServerApp, run_app
from shared.serving import ServedModel
from shared.settings import DomainSettings, setting
from tests.toy_domain import toy_pb2, toy_pb2_grpc

DOMAIN = "toy"  # the name its trainer plug-in registers (trainer_plugin.TRAINER_DOMAIN)
WIDTH = 4
SIGNATURE = Signature(inputs=(TensorSpec("x", "FP32", (-1, WIDTH)),),
                      outputs=(TensorSpec("probability", "FP32", (-1, 1)),))


def check_outputs(outputs: Mapping[str, np.ndarray]) -> str | None:
    p = outputs["probability"]
    return "probability outside [0, 1]" if (p < 0).any() or (p > 1).any() else None


class ToyService(DomainService[toy_pb2.ScoreRequest, toy_pb2.ScoreResponse]):
    domain = DOMAIN

    def preprocess(self, request: toy_pb2.ScoreRequest, model: LoadedModel) -> Prepared:
        if len(request.x) != WIDTH:
            raise InvalidArgument(f"x must hold {WIDTH} numbers, got {len(request.x)}")
        if not all(math.isfinite(v) for v in request.x):
            raise InvalidArgument("x must be finite")
        return Prepared({"x": np.asarray(request.x, np.float32).reshape(1, WIDTH)}, 1)

    def postprocess(self, request, prepared: Prepared, outputs, model: LoadedModel,
                    prediction_id: str) -> toy_pb2.ScoreResponse:
        resp = toy_pb2.ScoreResponse(prediction_id=prediction_id, probability=float(outputs["probability"][0, 0]))
        resp.model.name, resp.model.version = model.name, model.version
        return resp

    def outcome_to_feedback(self, outcome: toy_pb2.ToyOutcome, now: float) -> tuple[Hashable, feedback_pb2.Outcome]:
        check_id(outcome.prediction_id, "prediction_id", 64)
        occurred = event_time(outcome.occurred_at, "occurred_at", now)
        message = toy_pb2.ToyOutcome()
        message.CopyFrom(outcome)
        message.occurred_at = occurred
        return (outcome.prediction_id, outcome.positive), feedback_outcome(message, occurred)


class ToyServicer(toy_pb2_grpc.ToyServicer):
    def __init__(self, service: ToyService) -> None:
        self.service = service

    async def Score(self, request, context):
        return await self.service.predict(request, ServedModel.deadline_of(context))

    async def ReportOutcome(self, request, context):
        return await self.service.report_outcomes([request], caller_of(context))


@dataclasses.dataclass
class ToySettings(DomainSettings):
    """Toy scoring service (tests)."""

    port: int = setting(50099, "gRPC port")
    model_name: str = setting(DOMAIN, "model name in the registry")


def make_app(s: ToySettings) -> ServerApp:
    loader = ModelLoader(options=s.runtime_options(), expected=SIGNATURE, output_check=check_outputs)
    served = ServedModel.from_settings(s.model_name, s, loader)
    service = ToyService(served)

    def register(server) -> list[str]:
        toy_pb2_grpc.add_ToyServicer_to_server(ToyServicer(service), server)
        return [toy_pb2.DESCRIPTOR.services_by_name["Toy"].full_name]

    app = ServerApp(DOMAIN, s, {s.model_name: served}, register)
    attach_domain(app, service, s)  # prediction id keys, outcome limits, the feedback stream to the trainer
    return app


def main(argv: list[str] | None = None) -> int:
    return run_app(make_app, ToySettings.load(argv))


if __name__ == "__main__":
    sys.exit(main())
