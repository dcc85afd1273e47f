"""Small real first versions of every domain in one folder laid out like `var/` after the
trainer's first start (registry/ and trainer/ checkpoints), for tests that run the whole
suite: each domain trained by its real learner on a slice of its real dataset, once per test
session, and copied into root (tests/first_versions.py)."""
from __future__ import annotations

import os
from pathlib import Path

from tests.fraud_fixtures import bootstrap_small_fraud
from tests.pricing_fixtures import small_world
from tests.recommender_fixtures import bootstrap_small_recommender


BUILDERS = {"fraud": bootstrap_small_fraud, "recommender": bootstrap_small_recommender, "pricing": small_world}


def bootstrap_small_suite(root: Path) -> dict:
    """Returns what each domain's fixture returns, by domain.

    Each xdist worker starts with another domain: the first tests of every worker need the
    whole suite, and each domain's first version is built once under a file lock, so in one
    order the three workers queued behind one build at a time (one core busy, ~40 s); rotated,
    the three builds run at once."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    first = int(worker[2:]) if worker[2:].isdigit() else 0
    names = list(BUILDERS)
    order = names[first % len(names):] + names[:first % len(names)]
    built = {name: BUILDERS[name](root) for name in order}
    return {name: built[name] for name in names}
