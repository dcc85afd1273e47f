"""Composition root of the pricing service: settings -> registry, model, feedback, server.

    python -m services.pricing.main [--port 50053] [--exploration-share 0.2] [--max-step-pct 10] ...
"""
from __future__ import annotations

import dataclasses
import sys

from services.pricing.adapter import (EXPLORATION_FLOOR, EXPLORATION_GAIN_SCALE, SIGNATURE, UNIFORM_STEP_SHARE,
                                     PricingService, check_manifest, check_outputs)
from services.pricing.servicer import PricingServicer, register
from shared.domain import domain_app, served_model
from shared.server import ServerApp, run_app
from shared.settings import DomainSettings, setting


@dataclasses.dataclass
class PricingSettings(DomainSettings):
    """Pricing service: quotes inside the caller's guardrails, with Thompson-sampling exploration."""

    port: int = setting(50053, "gRPC port")
    model_name: str = setting("pricing", "model name in the registry")
    exploration_share: float = setting(0.2, "share of quotes priced off the greedy price (exploration) while the "
                                            "posterior is unsure (less as it narrows: exploration_gain_scale), chosen "
                                            "by a Thompson sample within the step limit or by a wide step")
    max_step_pct: float = setting(10.0, "step limit of a local exploratory step: at most this % away from the greedy price")
    wide_step_share: float = setting(1.0, "share of exploratory quotes priced anywhere in the guardrails (a wide step: "
                                          "a Thompson sample's best price other than the greedy one) instead of "
                                          "within the step limit")
    uniform_step_share: float = setting(UNIFORM_STEP_SHARE, "share of wide steps priced uniformly at random over the "
                                                            "guardrails instead of by a Thompson sample (reaches price "
                                                            "regions the posterior is wrongly sure about)")
    exploration_gain_scale: float = setting(EXPLORATION_GAIN_SCALE, "exploration decays as the posterior narrows: a "
                                            "quote explores with the full exploration_share while its Thompson samples' "
                                            "expected gain over the greedy price is at least this share of its expected "
                                            "value, in proportion below; 0 = always exploration_share")
    exploration_floor: float = setting(EXPLORATION_FLOOR, "least share of exploration_share a quote explores with, "
                                                          "however narrow the posterior (tests beliefs that may be "
                                                          "wrongly sure)")
    grid_size: int = setting(21, "candidate prices per quote (evenly spaced over the guardrails, plus the reference)")
    exploration_seed: int = setting(-1, "seed of the exploration draws; -1 = from the OS")

    def validate(self) -> list[str]:
        p = super().validate()
        if not 0.0 <= self.exploration_share <= 1.0:
            p.append("exploration_share must be in [0, 1]")
        if self.max_step_pct < 0:
            p.append("max_step_pct must be >= 0")
        if not 0.0 <= self.wide_step_share <= 1.0:
            p.append("wide_step_share must be in [0, 1]")
        if not 0.0 <= self.uniform_step_share <= 1.0:
            p.append("uniform_step_share must be in [0, 1]")
        if self.exploration_gain_scale < 0:
            p.append("exploration_gain_scale must be >= 0")
        if not 0.0 <= self.exploration_floor <= 1.0:
            p.append("exploration_floor must be in [0, 1]")
        if not 2 <= self.grid_size <= 1024:
            p.append("grid_size must be in 2..1024")
        return p


def make_app(s: PricingSettings) -> ServerApp:
    served, _ = served_model(s, expected=SIGNATURE, output_check=check_outputs, manifest_check=check_manifest)
    service = PricingService(served, exploration_share=s.exploration_share, max_step_pct=s.max_step_pct,
                             wide_step_share=s.wide_step_share, uniform_step_share=s.uniform_step_share,
                             exploration_gain_scale=s.exploration_gain_scale, exploration_floor=s.exploration_floor,
                             grid_size=s.grid_size, seed=s.exploration_seed)
    return domain_app(service, s, register(PricingServicer(service)))


def main(argv: list[str] | None = None) -> int:
    return run_app(make_app, PricingSettings.load(argv))


if __name__ == "__main__":
    sys.exit(main())
