"""Small real first versions of every domain in one folder laid out like `var/` after the
trainer's first start (registry/ and trainer/ checkpoints), for tests that run the whole
suite: each domain trained by its real learner on a slice of its real dataset, once per test
session, and copied into root (tests/first_versions.py)."""
from __future__ import annotations

from pathlib import Path

from tests.fraud_fixtures import bootstrap_small_fraud
from tests.pricing_fixtures import small_world
from tests.recommender_fixtures import bootstrap_small_recommender


def bootstrap_small_suite(root: Path) -> dict:
    """Returns what each domain's fixture returns, by domain."""
    return {"fraud": bootstrap_small_fraud(root), "recommender": bootstrap_small_recommender(root),
            "pricing": small_world(root)}
