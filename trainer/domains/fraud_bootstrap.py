"""Fraud's first model: the real creditcard transactions in time order.

The first `train_share` trains the model, the next `holdout_share` calibrates the decision
thresholds and reports the metrics; the rest of the stream is left for replay through the
live loop (`fraud_stream_rows`: `python -m trainer replay`, benchmarks, tests).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from shared.registry import ModelRegistry
from trainer.progress import progress_bar

log = logging.getLogger(__name__)

FRAUD_TRAIN_SHARE = 0.5
FRAUD_HOLDOUT_SHARE = 0.1


def fraud_split(data, train_share: float = FRAUD_TRAIN_SHARE, holdout_share: float = FRAUD_HOLDOUT_SHARE):
    n = len(data)
    a, b = int(n * train_share), int(n * (train_share + holdout_share))
    return data.slice(0, a), data.slice(a, b), data.slice(b, n)


def bootstrap_fraud(registry: ModelRegistry, workdir: Path, *, epochs: int = 4, limit: int | None = None,
                    force: bool = False, show_progress: bool = True, model=None) -> dict | None:
    """model: the FraudModel to train (the trainer passes one built from its settings)."""
    from trainer.domains import fraud
    from trainer.learner import Learner

    if registry.current_version(fraud.MODEL_NAME) is not None and not force:
        log.info("fraud: registry already has version %s; bootstrap skipped", registry.current_version(fraud.MODEL_NAME))
        return None
    t0 = time.time()
    data = fraud.load_creditcard(limit)
    train, holdout, _ = fraud_split(data)
    learner = Learner(model or fraud.FraudModel(), registry, workdir)
    entry = learner.bootstrap(train.X, train.y, holdout.X, holdout.y, epochs,
                              progress=progress_bar("fraud bootstrap") if show_progress else None)
    log.info("fraud: bootstrapped version %s from %d real transactions in %.1f s: %s", entry.get("version"),
             len(train), time.time() - t0, {k: round(v, 4) if isinstance(v, float) else v
                                             for k, v in entry.get("metrics", {}).items()})
    return entry


def fraud_stream_rows(limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The part of the creditcard stream the bootstrap did not see (for replay and tests)."""
    from trainer.domains import fraud

    data = fraud.load_creditcard(limit)
    _, _, rest = fraud_split(data)
    return rest.X, rest.y, rest.t
