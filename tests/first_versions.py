"""Copying a first version trained once per test session (registry plus trainer workdir) into
one test's folder: each test owns its copy, so none sees another's changes, and none trains.

Once per session, not per process: `make test` runs pytest-xdist workers, and each would
otherwise train every first version again. What is built once lives in one folder for the
session (tests/conftest.py creates it before the workers start and removes it at the end); the
first worker to need a build makes it under a file lock, the others wait for it and reuse it."""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

# the session's build folder, set by tests/conftest.py in the controlling process (inherited by
# the xdist workers it starts)
BUILDS_ENV = "STOREFRONT_TEST_BUILDS"


# the LearnerConfig fields Learner.bootstrap reads (the replay sample, the gate's window, the
# export checks): configs equal on these bootstrap the very same first version
BOOTSTRAP_FIELDS = ("replay_size", "gate_min_positives", "gate_min_rows", "parity_tol", "latency_budget_ms")


def bootstrap_key(config) -> tuple:
    """What of config the bootstrap depends on: one first version is trained per key."""
    from trainer.learner import LearnerConfig

    config = config or LearnerConfig()
    return tuple(getattr(config, f) for f in BOOTSTRAP_FIELDS)


def bootstrap_config(key: tuple):
    """A config with the bootstrap fields of key (the rest default: the bootstrap reads none of it)."""
    from trainer.learner import LearnerConfig

    config = LearnerConfig(**dict(zip(BOOTSTRAP_FIELDS, key)))
    # A first version shared by many tests is no latency measurement: with xdist workers and their
    # servers busy, the recommender's batch-1 median read 8.5 ms against the 5 ms budget, its
    # bootstrap was refused and every test copying it failed. The budget check has its own test
    # (tests/test_learner.py); a test's own rounds keep its config's budget.
    config.latency_budget_ms = max(config.latency_budget_ms, FIRST_VERSION_LATENCY_BUDGET_MS)
    return config


FIRST_VERSION_LATENCY_BUDGET_MS = 50.0


def require_version(registry, name: str) -> None:
    """A first-version build that published nothing fails here (and is built again by the next
    test that needs it) instead of leaving every test an empty registry."""
    if registry.current_version(name) is None:
        raise RuntimeError(f"the {name} first version was not published; its decision log says why")


@functools.lru_cache(maxsize=1)
def _builds_root() -> Path:
    if os.environ.get(BUILDS_ENV):
        return Path(os.environ[BUILDS_ENV])
    # imported outside a pytest session (a script): this process's own folder
    root = Path(tempfile.mkdtemp(prefix="storefront-test-builds-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def built_once(prefix: str, key: Any, build: Callable[[Path], Any]) -> tuple[Path, Any]:
    """(folder, result) of build(folder), run once per session for each (prefix, key): result
    must be JSON. A build that died half-way (no BUILT.json) is removed and made again."""
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    folder = _builds_root() / f"{prefix}-{digest}"
    done = folder / "BUILT.json"
    with FileLock(f"{folder}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            result = build(folder)
            staged = folder / "BUILT.json.tmp"
            staged.write_text(json.dumps({"key": repr(key), "result": result}))
            os.replace(staged, done)
    return folder, json.loads(done.read_text())["result"]


def copy_registry(src: Path, dst: Path) -> None:
    """Copy a registry into dst (which may exist, even be watched by a running service): version
    folders first, then each model's CURRENT pointer by an atomic rename, as a publish does."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("CURRENT"), dirs_exist_ok=True)
    for pointer in src.glob("models/*/CURRENT"):
        target = dst / pointer.relative_to(src)
        staged = target.with_name("CURRENT.copying")
        shutil.copyfile(pointer, staged)
        os.replace(staged, target)


def copy_first_version(built: Path, root: Path) -> None:
    """built/registry and built/trainer (checkpoints, decisions) into root, beside what is there."""
    shutil.copytree(built / "trainer", root / "trainer", dirs_exist_ok=True)
    copy_registry(built / "registry", root / "registry")
