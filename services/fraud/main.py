"""Composition root of the fraud service: settings -> registry, model, feedback, server.

    python -m services.fraud.main [--port 50051] [--registry-dir var/registry] ...
"""
from __future__ import annotations

import dataclasses
import sys

from services.fraud.adapter import SIGNATURE, FraudService, check_manifest, check_outputs
from services.fraud.servicer import FraudServicer, register
from shared.domain import domain_app, served_model
from shared.server import ServerApp, run_app
from shared.settings import DomainSettings, setting


@dataclasses.dataclass
class FraudSettings(DomainSettings):
    """Fraud scoring service."""

    port: int = setting(50051, "gRPC port")
    model_name: str = setting("fraud", "model name in the registry")
    review_threshold: float = setting(-1.0, "REVIEW at or above this probability; -1 = the model's calibrated one")
    block_threshold: float = setting(-1.0, "BLOCK at or above this probability; -1 = the model's calibrated one")
    max_reasons: int = setting(3, "reason codes per response")

    def validate(self) -> list[str]:
        p = super().validate()
        for name in ("review_threshold", "block_threshold"):
            v = getattr(self, name)
            if v != -1.0 and not 0.0 <= v <= 1.0:
                p.append(f"{name} must be in [0, 1] or -1")
        if self.max_reasons < 0:
            p.append("max_reasons must be >= 0")
        return p


def make_app(s: FraudSettings) -> ServerApp:
    served, _ = served_model(s, expected=SIGNATURE, output_check=check_outputs, manifest_check=check_manifest)
    service = FraudService(served, review_threshold=s.review_threshold, block_threshold=s.block_threshold,
                           max_reasons=s.max_reasons)
    return domain_app(service, s, register(FraudServicer(service)))


def main(argv: list[str] | None = None) -> int:
    return run_app(make_app, FraudSettings.load(argv))


if __name__ == "__main__":
    sys.exit(main())
