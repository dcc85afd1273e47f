"""The pricing domain's trainer plug-in (trainer/plugins.py): its feedback contract, model, first model."""
from __future__ import annotations

from protos.pricing.v1 import pricing_pb2
from trainer.plugins import TrainerDomain


def pricing_model(settings=None):
    from trainer.domains.pricing import PricingModel

    return PricingModel()


def bootstrap(registry, workdir, **kw):
    """Ta Feng sales at their unit prices (Nov-Dec 2000) as conversion data."""
    from trainer.domains.pricing import bootstrap_pricing

    return bootstrap_pricing(registry, workdir, **kw)


TRAINER_DOMAIN = TrainerDomain(
    name="pricing",
    outcome_type=pricing_pb2.PricingOutcome,
    request_type=pricing_pb2.QuoteRequest,
    response_type=pricing_pb2.QuoteResponse,
    # pricing.proto: every field is the identity; a sale later corrected (refund) wins by occurred_at
    outcome_identity=lambda o: (o.sold, o.units, o.price, o.occurred_at),
    latest_outcome_wins=True,
    window_s=86400.0,  # a quote is honoured for at most a day
    model=pricing_model,
    bootstrap=bootstrap,
)
