"""End to end with real processes: trainer + fraud service, real transactions and labels.

- a new version is published from the outcomes and then served;
- the event log holds exactly what was sent (served predictions and outcomes);
- kill -9 of the trainer mid-stream: nothing lost, nothing learned twice;
- the trainer down for 30 s under traffic: every request answered, feedback spooled and
  replayed, nothing lost.
"""
import time

import pytest
import torch

from tests.fraud_fixtures import bootstrap_small_fraud
from tests.loop_harness import Loop, Storefront, wait_serving, wait_until
from trainer.eventlog import SqliteEventLog

# retention off: these tests compare the log with everything that was sent (retention deletes
# learned events; tests/test_eventlog.py covers it). Direct delivery: they are about the loop
# learning and a new version serving every request; canary delivery (a share of requests, then
# promotion on live labels) is tests/test_canary.py's subject
FAST = ["--min-events", "150", "--max-interval-s", "2", "--epochs", "1", "--retention-interval-s", "0",
        "--delivery", "direct"]


@pytest.fixture
def loop(tmp_path):
    _, _, data = bootstrap_small_fraud(tmp_path)
    lp = Loop(tmp_path, FAST)
    lp.data = data
    lp.trainer.start()
    lp.fraud.start()
    try:
        wait_serving(f"127.0.0.1:{lp.trainer_port}")
        wait_serving(f"127.0.0.1:{lp.fraud_port}")
        yield lp
    finally:
        codes = (lp.fraud.stop(), lp.trainer.stop())
        assert codes == (0, 0), (lp.fraud.tail(), lp.trainer.tail())


def log_counts(lp) -> tuple[int, int]:
    with SqliteEventLog(lp.event_log) as log:
        return log.count("fraud", "served"), log.count("fraud", "outcome")


def labels_seen(lp) -> int:
    return int(torch.load(lp.workdir / "checkpoints" / "fraud.pt", weights_only=False).get("labels_seen", 0))


def test_outcomes_become_a_new_served_version_and_the_log_holds_everything(loop):
    shop = Storefront(f"127.0.0.1:{loop.fraud_port}", loop.data, range(40_000, 40_400))
    shop.run()
    assert shop.errors == []
    # the trainer learns from the joined outcomes and publishes; the service hot-reloads it
    wait_until(lambda: shop.one(40_400 + len(shop.versions)) != "1", 90, "a response from a new version")
    assert max(shop.versions, key=int) != "1"
    wait_until(lambda: log_counts(loop) == (shop.scored, shop.outcomes), 30, "the log to hold every record")
    assert log_counts(loop) == (shop.scored, shop.outcomes)


def test_trainer_killed_mid_stream_loses_nothing_and_learns_nothing_twice(loop):
    shop = Storefront(f"127.0.0.1:{loop.fraud_port}", loop.data, range(41_000, 41_900)).start(pause_s=0.002)
    wait_until(lambda: shop.outcomes >= 300, 60, "traffic")
    loop.trainer.kill9()
    time.sleep(1.0)
    loop.trainer.start()
    wait_serving(f"127.0.0.1:{loop.trainer_port}")
    shop.join(120)
    shop.stop()
    assert shop.errors == []
    wait_until(lambda: log_counts(loop) == (shop.scored, shop.outcomes), 60, "spooled feedback to be replayed")
    # every label is consumed by exactly one learning round, across the crash
    wait_until(lambda: labels_seen(loop) == shop.outcomes, 60, "the learner to consume every label")
    time.sleep(3)  # no later round may count any label again
    assert labels_seen(loop) == shop.outcomes


def test_trainer_down_for_30_seconds_under_traffic(loop):
    shop = Storefront(f"127.0.0.1:{loop.fraud_port}", loop.data, range(42_000, 47_000)).start(pause_s=0.01)
    wait_until(lambda: shop.outcomes >= 100, 60, "traffic")
    assert loop.trainer.stop() == 0
    down_at = shop.outcomes
    time.sleep(30)
    assert shop.outcomes > down_at + 200  # the service kept answering while the trainer was down
    loop.trainer.start()
    wait_serving(f"127.0.0.1:{loop.trainer_port}")
    time.sleep(2)
    shop.stop()
    assert shop.errors == []
    wait_until(lambda: log_counts(loop) == (shop.scored, shop.outcomes), 90, "spooled feedback to be replayed")


def test_replay_feeds_history_through_the_live_loop(loop, tmp_path, capsys):
    from trainer.replay import export_fraud, read_events, run_fraud

    events = tmp_path / "events.jsonl"
    assert export_fraud(events, start_row=1000, rows=500, label_delay_s=120.0, t0=None) == 500
    first = next(read_events(events))
    assert first["domain"] == "fraud" and set(first["outcome"]["label"]) == {"is_fraud", "source"}
    stats = run_fraud(events, f"127.0.0.1:{loop.fraud_port}", speed=0, report_every=200, timeout_s=10)
    assert len(stats.y) == 500 and sum(stats.versions.values()) == 500
    out = capsys.readouterr().out
    assert "[replay] labels=200" in out and "[replay] done: labels=500" in out
    wait_until(lambda: log_counts(loop) == (500, 500), 30, "the log to hold the replay")
