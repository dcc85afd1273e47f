"""Copying a first version trained once per test process (registry plus trainer workdir) into
one test's folder: each test owns its copy, so none sees another's changes, and none trains."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


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

    return LearnerConfig(**dict(zip(BOOTSTRAP_FIELDS, key)))


def build_folder(prefix: str) -> Path:
    """A folder for what is built once per process, removed when the process ends."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, root, True)
    return root


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
