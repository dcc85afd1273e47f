"""End-to-end test helpers: the real trainer and fraud service as processes (ops.procs),
and a storefront-like client that scores real transactions and reports their labels."""
from __future__ import annotations

import time
from pathlib import Path

from ops.procs import FraudLoop, wait_serving  # noqa: F401  (re-exported for the tests)
from bench.storefront import Storefront, score_request  # noqa: F401


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


class Loop(FraudLoop):
    """The trainer (not bootstrapping: tests bootstrap a small model first) and the fraud
    service, polling fast."""

    def __init__(self, root: Path, trainer_args: list[str] = ()) -> None:
        super().__init__(root, ["--bootstrap", "0", "--poll-interval-s", "0.2", *trainer_args],
                         ["--poll-interval-s", "0.2"])


