"""A real fraud model for tests: trained by the real learner on the first rows of the real
creditcard data (small and fast), published to a registry under tmp."""
from __future__ import annotations

from pathlib import Path

from shared.registry import ModelRegistry
from trainer.domains import fraud
from trainer.learner import Learner, LearnerConfig

TRAIN_ROWS = 30_000


def bootstrap_small_fraud(root: Path, config: LearnerConfig | None = None) -> tuple[ModelRegistry, Learner, fraud.FraudData]:
    data = fraud.load_creditcard(limit=60_000)
    registry = ModelRegistry(root / "registry")
    learner = Learner(fraud.FraudModel(), registry, root / "trainer", config)
    train, holdout = data.slice(0, TRAIN_ROWS), data.slice(TRAIN_ROWS, TRAIN_ROWS + 10_000)
    learner.bootstrap(train.X, train.y, holdout.X, holdout.y, epochs=2)
    return registry, learner, data
