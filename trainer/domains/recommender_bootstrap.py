"""Bootstrap the recommender from the real Ta Feng transactions.

    python -m trainer bootstrap --domains recommender

1. the sentence encoder is exported and published as `text-encoder` (only if absent);
2. the catalog is Ta Feng's products (title = "product subclass <code>": Ta Feng has no
   titles; category = the subclass; price = the median unit price), embedded by the encoder;
3. every purchase line is a training row (click + purchase) with the customer's purchases of
   earlier days as history; all days but the last `holdout_days` train the first version,
   the last days are its holdout (HR@10 / NDCG@10 of each line's item over the whole catalog,
   in the manifest's metrics). Users' interactions of every day go into users.npz, so the
   service starts with each customer's real history.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from shared.registry import ModelRegistry

log = logging.getLogger(__name__)

HOLDOUT_DAYS = 7
HOLDOUT_ROWS = 20_000  # holdout lines scored for the metrics (a fixed random sample)
EPOCHS = 2


def _bar(total: int, desc: str, unit: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True, disable=not show)


def bootstrap_recommender(registry: ModelRegistry, workdir: Path, *, epochs: int = EPOCHS, limit: int | None = None,
                          force: bool = False, show_progress: bool = True, model=None,
                          holdout_days: int = HOLDOUT_DAYS, holdout_rows: int = HOLDOUT_ROWS,
                          text_encoder: tuple[Path, float] | None = None, config=None) -> dict | None:
    """model: the RecommenderModel to train (the trainer passes one built from its settings).
    limit: only the first `limit` purchase lines (tests). text_encoder: an exported encoder
    (path, parity) to publish instead of exporting one (tests)."""
    from trainer.domains.recommender import MODEL_NAME, RecommenderModel
    from trainer.domains.recommender_data import TafengRows, tafeng_catalog
    from trainer.learner import Learner
    from trainer.tafeng import load_tafeng
    from trainer.text_encoder import publish_text_encoder

    if registry.current_version(MODEL_NAME) is not None and not force:
        log.info("recommender: registry already has version %s; bootstrap skipped", registry.current_version(MODEL_NAME))
        return None
    t0 = time.time()
    encoder_version = publish_text_encoder(registry, exported=text_encoder)
    model = model or RecommenderModel()
    if model.registry_dir is None:
        model.registry_dir = registry.root
    df = load_tafeng(limit)
    catalog = tafeng_catalog(df)
    model.add_catalog(catalog)
    rows = TafengRows(df, model.state)
    n_days = len(rows.days)
    split = max(1, n_days - holdout_days) if n_days > 1 else n_days
    with _bar(n_days, "recommender rows", "day", show_progress) as bar:
        X, y = rows.rows(0, split, progress=lambda d: bar.update(1))
        Xh, yh = rows.rows(split, n_days, progress=lambda d: bar.update(1))
    if len(Xh) > holdout_rows:
        keep = np.sort(np.random.default_rng(0).choice(len(Xh), holdout_rows, replace=False))
        Xh, yh = Xh[keep], yh[keep]
    learner = Learner(model, registry, workdir, config)
    with _bar(epochs * math.ceil(len(X) / model.batch_size), "recommender bootstrap", "batch", show_progress) as bar:
        model.on_batch = bar.update
        try:
            entry = learner.bootstrap(X, y, Xh, yh, epochs)
        finally:
            model.on_batch = None
    log.info("recommender: bootstrapped version %s from %d real purchase lines (%d customers, %d products; "
             "text-encoder %s) in %.1f s: %s", entry.get("version"), len(X), model.state.n_users,
             model.state.n_items, encoder_version, time.time() - t0,
             {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.get("metrics", {}).items()})
    return entry
