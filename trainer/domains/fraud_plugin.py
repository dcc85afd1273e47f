"""The fraud domain's trainer plug-in (trainer/plugins.py): its feedback contract, model, first model, settings."""
from __future__ import annotations

import dataclasses

from protos.fraud.v1 import fraud_pb2
from shared.settings import setting
from trainer.domains.fraud import ADV_EPSILON, ADV_METHOD, ADV_SHARE, ADV_STEPS
from trainer.plugins import TrainerDomain


@dataclasses.dataclass
class FraudTrainerSettings:
    """Fraud's trainer settings (flags and environment under these names: --adv-epsilon, STOREFRONT_ADV_EPSILON)."""

    adv_epsilon: float = setting(ADV_EPSILON, "fraud adversarial training: L-inf radius in standardized units (0 = off)")
    adv_share: float = setting(ADV_SHARE, "fraud adversarial training: share of each mini-batch given an adversarial copy")
    adv_method: str = setting(ADV_METHOD, "fraud adversarial training: attack, 'pgd' or 'fgsm'")
    adv_steps: int = setting(ADV_STEPS, "fraud adversarial training: PGD steps")

    def validate(self) -> list[str]:
        p = []
        if self.adv_epsilon < 0 or not 0.0 <= self.adv_share <= 1.0 or self.adv_steps < 1:
            p.append("adv_epsilon must be >= 0, adv_share in [0, 1], adv_steps >= 1")
        if self.adv_method not in ("pgd", "fgsm"):
            p.append(f"adv_method must be 'pgd' or 'fgsm', not {self.adv_method!r}")
        return p


def fraud_model(settings=None):
    """The FraudModel, with the adversarial-training options of the trainer settings (defaults without)."""
    from trainer.domains.fraud import FraudModel

    if settings is None:
        return FraudModel()
    return FraudModel(adv_epsilon=settings.adv_epsilon, adv_share=settings.adv_share,
                      adv_method=settings.adv_method, adv_steps=settings.adv_steps)


def bootstrap(registry, workdir, **kw):
    from trainer.domains.fraud_bootstrap import bootstrap_fraud

    return bootstrap_fraud(registry, workdir, **kw)


TRAINER_DOMAIN = TrainerDomain(
    name="fraud",
    outcome_type=fraud_pb2.FraudOutcome,
    request_type=fraud_pb2.ScoreTransactionRequest,
    response_type=fraud_pb2.ScoreTransactionResponse,
    # fraud.proto: one label per transaction; a chargeback later reversed is a correction
    # (the latest occurred_at wins), the same label sent twice a duplicate
    outcome_identity=lambda o: (o.is_fraud,),
    latest_outcome_wins=True,
    window_s=14 * 86400.0,  # chargebacks take weeks
    model=fraud_model,
    bootstrap=bootstrap,
    settings=FraudTrainerSettings,
    canary_mode="shadow",  # a canary would let a bad candidate decide real transactions
)
