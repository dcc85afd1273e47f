"""Clean shutdown of the real trainer process (issue 12, item 5).

SIGTERM while a learning round runs: the collector stops taking feedback (the fraud service
spools), the round is abandoned at its commit point without publishing or checkpointing (the
log says so), the log is closed and the process exits 0; no version appears after "trainer
stopped"; after a restart the abandoned round's labels (and the spooled feedback) are learned,
nothing lost. Everything waits on log lines and files, never on fixed sleeps.
"""
from __future__ import annotations

import json
import re
import time

import torch

from shared.registry import ModelRegistry
from tests.fraud_fixtures import bootstrap_small_fraud
from tests.loop_harness import Loop, Storefront, wait_serving, wait_until

# A slow round: it starts once 500 labels are in and trains 400 epochs over them (many seconds),
# so SIGTERM finds it training; a grace of 0 s abandons it at once.
SLOW = ["--min-events", "500", "--max-interval-s", "3600", "--epochs", "400", "--shutdown-round-grace-s", "0",
        "--retention-interval-s", "1"]
# after the restart: quick rounds, so the abandoned labels are learned soon
QUICK = ["--min-events", "100", "--max-interval-s", "1", "--epochs", "1"]


def labels_seen(lp) -> int:
    path = lp.workdir / "checkpoints" / "fraud.pt"
    return int(torch.load(path, weights_only=False).get("labels_seen", 0))


def versions(lp) -> list[str]:
    return sorted(ModelRegistry(lp.registry).versions("fraud"))


def published(lp) -> list[dict]:
    path = lp.workdir / "decisions" / "fraud.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in rows if r.get("decision") == "published"]


def test_sigterm_mid_round_abandons_it_unpublished_exits_0_and_nothing_is_lost(tmp_path):
    _, _, data = bootstrap_small_fraud(tmp_path)
    lp = Loop(tmp_path, SLOW)
    lp.trainer.start()
    lp.fraud.start()
    try:
        wait_serving(f"127.0.0.1:{lp.trainer_port}")
        wait_serving(f"127.0.0.1:{lp.fraud_port}")
        before = versions(lp)
        shop = Storefront(f"127.0.0.1:{lp.fraud_port}", data, range(50_000, 50_700))
        shop.run()
        assert shop.errors == []
        wait_until(lambda: "fraud: round started on" in lp.trainer.tail(200_000), 120, "a round to start")
        # the round is training (400 epochs): stop the trainer now
        t0 = time.monotonic()
        code = lp.trainer.stop(timeout=60)
        took = time.monotonic() - t0
        text = lp.trainer.tail(400_000)
        assert code == 0, text[-4000:]
        assert lp.trainer.proc.poll() == 0  # gone
        assert took < 30, took
        assert "round in progress was abandoned" in text, text[-4000:]
        assert "trainer stopped" in text and "event log closed" in text
        # nothing published after "trainer stopped" (nor during the shutdown): no new version, no
        # decision of that round, and no log line after "stopped" about a round
        assert versions(lp) == before
        assert published(lp) == []
        after_stop = text[text.index("trainer stopped"):]
        assert not re.search(r"published|round started", after_stop), after_stop
        assert labels_seen(lp) == 0  # the checkpoint did not move

        # more traffic while the trainer is down: its feedback is spooled by the service
        down = Storefront(f"127.0.0.1:{lp.fraud_port}", data, range(51_000, 51_100))
        down.run()
        assert down.errors == []

        # restart with quick rounds: the abandoned round's labels and the spooled ones are learned
        i = lp.trainer.args.index("--min-events")
        lp.trainer.args[i:i + len(SLOW)] = QUICK
        lp.trainer.start()
        wait_serving(f"127.0.0.1:{lp.trainer_port}")
        total = shop.outcomes + down.outcomes
        wait_until(lambda: labels_seen(lp) == total, 120, f"the learner to learn all {total} labels")
    finally:
        codes = (lp.fraud.stop(), lp.trainer.stop())
    assert codes == (0, 0), (lp.fraud.tail(), lp.trainer.tail())
