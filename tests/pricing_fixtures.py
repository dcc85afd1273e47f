"""A real pricing model for tests: the real learner's bootstrap on the first Ta Feng lines
(small and fast), published to a registry under tmp; plus real products to quote."""
from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from protos.pricing.v1 import pricing_pb2
from shared.registry import ModelRegistry
from trainer.domains import pricing
from trainer.learner import Learner, LearnerConfig

LINES = 150_000  # the first ~3 weeks of Ta Feng


@dataclasses.dataclass
class PricingWorld:
    registry: ModelRegistry
    learner: Learner
    products: list[str]  # products with training rows (known to the model)
    references: dict[str, float]  # their reference (list) prices


def bootstrap_small_pricing(root: Path, config: LearnerConfig | None = None) -> PricingWorld:
    from trainer.domains import pricing_data
    from trainer.tafeng import load_tafeng

    model = pricing.PricingModel(bootstrap_iterations=25)
    vocab, (X, y), (hX, hy) = pricing.bootstrap_data(limit=LINES, min_lines=40)
    model.vocab = vocab
    registry = ModelRegistry(root / "registry")
    learner = Learner(model, registry, root / "trainer", config)
    learner.bootstrap(X, y, hX, hy, epochs=1)
    codes = np.unique(X[:, pricing.COL_PRODUCT]).astype(int)
    products = [vocab.products[c - 1] for c in codes]
    refs = pricing_data.reference_prices(load_tafeng(LINES))
    refs.index = refs.index.astype(str)
    return PricingWorld(registry, learner, products, {p: float(refs[p]) for p in products})


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


@functools.lru_cache(maxsize=1)
def _built_once() -> tuple[Path, list[str], dict[str, float]]:
    root = Path(tempfile.mkdtemp(prefix="pricing-fixture-"))
    world = bootstrap_small_pricing(root)
    return root, world.products, world.references


def small_world(root: Path, config: LearnerConfig | None = None) -> PricingWorld:
    """A copy under root of one bootstrap made once per test process (registry and trainer
    workdir), with a restored learner: tests may publish and learn without rebuilding it."""
    built, products, references = _built_once()
    for name in ("registry", "trainer"):
        shutil.copytree(built / name, root / name)
    registry = ModelRegistry(root / "registry")
    learner = Learner(pricing.PricingModel(), registry, root / "trainer", config)
    assert learner.restore()
    return PricingWorld(registry, learner, products, references)
