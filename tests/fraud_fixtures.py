"""A real fraud model for tests: trained by the real learner on the first rows of the real
creditcard data (small and fast), published to a registry under tmp.

Trained once per test session (once per config of what the bootstrap reads): bootstrap_small_fraud
copies that first version (registry and trainer workdir) into each test's folder and restores a
learner from the copy, so every test gets its own registry, checkpoint and data arrays (no test
sees another's changes) without training again."""
from __future__ import annotations

import functools
from pathlib import Path

from shared.registry import ModelRegistry
from tests.first_versions import bootstrap_config, bootstrap_key, built_once, copy_first_version, require_version
from trainer.domains import fraud
from trainer.learner import Learner, LearnerConfig

TRAIN_ROWS = 30_000
DATA_ROWS = 60_000


@functools.lru_cache(maxsize=1)
def _creditcard() -> fraud.FraudData:
    return fraud.load_creditcard(limit=DATA_ROWS)


def _data() -> fraud.FraudData:
    """A private copy of the test rows: a test may write into its arrays."""
    d = _creditcard()
    return fraud.FraudData(d.X.copy(), d.y.copy(), d.t.copy())


def _train(root: Path, config: LearnerConfig) -> None:
    data = _creditcard()
    learner = Learner(fraud.FraudModel(), ModelRegistry(root / "registry"), root / "trainer", config)
    train, holdout = data.slice(0, TRAIN_ROWS), data.slice(TRAIN_ROWS, TRAIN_ROWS + 10_000)
    learner.bootstrap(train.X, train.y, holdout.X, holdout.y, epochs=2)
    require_version(learner.registry, "fraud")


@functools.lru_cache(maxsize=None)
def _trained_once(key: tuple) -> Path:
    return built_once("fraud-first-version", key, lambda root: _train(root, bootstrap_config(key)))[0]


def bootstrap_small_fraud(root: Path, config: LearnerConfig | None = None) -> tuple[ModelRegistry, Learner, fraud.FraudData]:
    """Version 1 of fraud in root/registry and its checkpoint in root/trainer, as the trainer's
    first start leaves them; returns (registry, learner restored with config, the data)."""
    root = Path(root)
    copy_first_version(_trained_once(bootstrap_key(config)), root)
    registry = ModelRegistry(root / "registry")
    learner = Learner(fraud.FraudModel(), registry, root / "trainer", config)
    assert learner.restore()
    return registry, learner, _data()
