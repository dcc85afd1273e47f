"""Train the first version of each domain from its bundled real dataset and publish it.

    python -m trainer bootstrap [--domains fraud,recommender,pricing] [--force]

Fraud: the real creditcard transactions in time order; the first `train_share` trains
the model, the next `holdout_share` calibrates the decision thresholds and reports the
metrics; the rest of the stream is left for replay through the live loop. Recommender:
the Ta Feng purchases (trainer/domains/recommender_bootstrap.py). Pricing: Ta Feng sales
at their unit prices (trainer/domains/pricing.py bootstrap_pricing).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

from shared.registry import ModelRegistry

log = logging.getLogger(__name__)

FRAUD_TRAIN_SHARE = 0.5
FRAUD_HOLDOUT_SHARE = 0.1


def progress_bar(label: str):
    """A progress callback printing a bar on stderr (tqdm, which the stack already ships)."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, unit="epoch", file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


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
        log.info("fraud: registry already has version %s; bootstrap skipped", registry.current_version("fraud"))
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


def bootstrap_recommender(registry: ModelRegistry, workdir: Path, **kw) -> dict | None:
    """Ta Feng purchases in time order; the item titles through the frozen MiniLM encoder."""
    from trainer.domains.recommender_bootstrap import bootstrap_recommender as run

    return run(registry, workdir, **kw)


def bootstrap_pricing(registry: ModelRegistry, workdir: Path, **kw) -> dict | None:
    """Ta Feng sales at their unit prices (Nov-Dec 2000) as conversion data."""
    from trainer.domains.pricing import bootstrap_pricing as run

    return run(registry, workdir, **kw)


DOMAINS = {"fraud": bootstrap_fraud, "recommender": bootstrap_recommender, "pricing": bootstrap_pricing}


def bootstrap(registry: ModelRegistry, workdir: Path, domains: list[str], force: bool = False,
              models: dict | None = None, **kw) -> dict:
    """models: domain -> the DomainModel to train (default: the domain's defaults)."""
    return {d: DOMAINS[d](registry, workdir, force=force, model=(models or {}).get(d), **kw) for d in domains}


def fraud_stream_rows(limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The part of the creditcard stream the bootstrap did not see (for replay and tests)."""
    from trainer.domains import fraud

    data = fraud.load_creditcard(limit)
    _, _, rest = fraud_split(data)
    return rest.X, rest.y, rest.t


def main(argv: list[str] | None = None) -> int:
    import argparse

    from shared import logs

    ap = argparse.ArgumentParser(prog="python -m trainer bootstrap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default=",".join(DOMAINS), help=f"comma list of {list(DOMAINS)}")
    ap.add_argument("--registry-dir", default="var/registry")
    ap.add_argument("--workdir", default="var/trainer")
    ap.add_argument("--force", action="store_true", help="publish a new first version even if one exists")
    args = ap.parse_args(argv)
    logs.configure("INFO", "text")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        ap.error(f"unknown domain(s) {unknown}; known: {sorted(DOMAINS)}")
    bootstrap(ModelRegistry(args.registry_dir), Path(args.workdir), domains, force=args.force)
    return 0
