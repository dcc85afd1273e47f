"""A real pricing model for tests: the real learner's bootstrap on the first Ta Feng lines
(small and fast, made once per test session), copied into a registry under tmp; plus real
products to quote."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from protos.pricing.v1 import pricing_pb2
from shared.registry import ModelRegistry
from tests.first_versions import bootstrap_config, bootstrap_key, built_once, copy_first_version, require_version
from trainer.domains import pricing
from trainer.learner import Learner, LearnerConfig

LINES = 150_000  # the first ~3 weeks of Ta Feng


@dataclasses.dataclass
class PricingWorld:
    registry: ModelRegistry
    learner: Learner
    products: list[str]  # products with training rows (known to the model)
    references: dict[str, float]  # their reference (list) prices


def _train_pricing(root: Path, config: LearnerConfig | None) -> list[str]:
    """Bootstrap into root; returns the products with training rows."""
    model = pricing.PricingModel(bootstrap_iterations=25)
    vocab, (X, y), (hX, hy) = pricing.bootstrap_data(limit=LINES, min_lines=40)
    model.vocab = vocab
    registry = ModelRegistry(root / "registry")
    Learner(model, registry, root / "trainer", config).bootstrap(X, y, hX, hy, epochs=1)
    require_version(registry, "pricing")
    codes = np.unique(X[:, pricing.COL_PRODUCT]).astype(int)
    return [vocab.products[c - 1] for c in codes]


@functools.lru_cache(maxsize=None)
def _trained_once(key: tuple) -> tuple[Path, tuple[str, ...]]:
    root, products = built_once("pricing-first-version", key, lambda f: _train_pricing(f, bootstrap_config(key)))
    return root, tuple(products)


@functools.lru_cache(maxsize=1)
def _reference_prices() -> dict[str, float]:
    from trainer.domains import pricing_data
    from trainer.tafeng import load_tafeng

    refs = pricing_data.reference_prices(load_tafeng(LINES))
    refs.index = refs.index.astype(str)
    return {str(p): float(v) for p, v in refs.items()}


def quote(product: str, ref: float, pct: float | None = 20.0, **kw) -> pricing_pb2.QuoteRequest:
    g = pricing_pb2.Guardrails(min_price=ref * 0.5, max_price=ref * 2.0)
    if pct is not None:
        g.max_change_pct = pct
    req = pricing_pb2.QuoteRequest(product_id=product, reference_price=ref, guardrails=g,
                                   context=pricing_pb2.Context(segment="35-39", hour_of_day=18))
    for k, v in kw.items():
        if k == "guardrails":
            req.guardrails.CopyFrom(v)
        elif k == "context":
            req.context.CopyFrom(v)
        else:
            setattr(req, k, v)
    return req


def small_world(root: Path, config: LearnerConfig | None = None) -> PricingWorld:
    """Version 1 of pricing in root/registry and its checkpoint in root/trainer: a copy of the
    bootstrap made once per test session (per config of what the bootstrap reads;
    tests/first_versions.py), with a learner restored from it, so tests may publish and learn
    without rebuilding it. Products: those with training rows (known to the model)."""
    root = Path(root)
    built, products = _trained_once(bootstrap_key(config))
    copy_first_version(built, root)
    registry = ModelRegistry(root / "registry")
    learner = Learner(pricing.PricingModel(), registry, root / "trainer", config)
    assert learner.restore()
    references = _reference_prices()
    return PricingWorld(registry, learner, list(products), {p: references[p] for p in products})
