"""End to end with real processes: trainer + fraud service, real transactions and labels.

- a new version is published from the outcomes and then served;
- the event log holds exactly what was sent (served predictions and outcomes);
- kill -9 of the trainer mid-stream: nothing lost, nothing learned twice;
- the trainer down under traffic (200 answered transactions, several failed reconnects):
  every request answered, feedback spooled and replayed, nothing lost.
"""
import re

import pytest
import torch

from tests.fraud_fixtures import bootstrap_small_fraud
from tests.loop_harness import Loop, Storefront, wait_serving, wait_until
from trainer.eventlog import SqliteEventLog

# retention off: these tests compare the log with everything that was sent (retention deletes
# learned events; tests/test_eventlog.py covers it). Direct delivery: they are about the loop
# learning and a new version serving every request; canary delivery (a share of requests, then
# promotion on live labels) is tests/test_canary.py's subject. No must-beat bar (--gate-min-gain -1):
# a few hundred labels do not make a challenger measurably better than the bootstrap version, and
# the gate's rule is tests/test_gate.py's subject (refusals still apply here)
FAST = ["--min-events", "150", "--max-interval-s", "2", "--epochs", "1", "--retention-interval-s", "0",
        "--delivery", "direct", "--gate-min-gain", "-1"]


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
    killed_at = shop.outcomes
    wait_until(lambda: shop.outcomes >= killed_at + 50, 60, "answers while the trainer is dead")
    loop.trainer.start()
    wait_serving(f"127.0.0.1:{loop.trainer_port}")
    shop.join(120)
    shop.stop()
    assert shop.errors == []
    wait_until(lambda: log_counts(loop) == (shop.scored, shop.outcomes), 60, "spooled feedback to be replayed")
    # every label is consumed by exactly one learning round, across the crash
    wait_until(lambda: labels_seen(loop) == shop.outcomes, 60, "the learner to consume every label")
    # no later round counts any of them again: the rounds that learn the next labels (more than
    # min-events) end with the count at exactly every label sent, the old ones once
    more = Storefront(f"127.0.0.1:{loop.fraud_port}", loop.data, range(41_900, 42_100))
    more.run()
    more.stop()
    assert more.errors == []
    total = shop.outcomes + more.outcomes
    wait_until(lambda: labels_seen(loop) >= total, 60, "the learner to consume the next labels")
    assert labels_seen(loop) == total


def reconnects_after_failures(lp) -> list[int]:
    """Failed attempts before each reconnect the fraud service's feedback client logged."""
    return [int(n) for n in re.findall(r"feedback: connected to trainer \S+ after (\d+) failed attempts",
                                       lp.fraud.log_path.read_text(errors="replace"))]


def test_trainer_down_under_traffic_every_request_answered_and_the_feedback_replayed(loop):
    shop = Storefront(f"127.0.0.1:{loop.fraud_port}", loop.data, range(42_000, 47_000)).start(pause_s=0.01)
    wait_until(lambda: shop.outcomes >= 100, 60, "traffic")
    assert loop.trainer.stop() == 0
    down_at = shop.outcomes
    # the service keeps answering while the trainer is down: the outage lasts 200 answered
    # transactions and outcomes, all of whose feedback the service has to spool
    wait_until(lambda: shop.outcomes > down_at + 200, 120, "answers while the trainer is down")
    loop.trainer.start()
    wait_serving(f"127.0.0.1:{loop.trainer_port}")
    # the feedback client's backoff brings it back after its failed attempts, replaying the spool first.
    # How many attempts fail depends on how long 200 answers take against the backoff schedule (one on
    # a quiet machine, several on a loaded one); what the event proves is that it reconnected after failing
    wait_until(lambda: reconnects_after_failures(loop), 60, "the service to reconnect to the trainer")
    assert reconnects_after_failures(loop)[-1] >= 1
    back_at = shop.outcomes
    wait_until(lambda: shop.outcomes >= back_at + 100, 60, "traffic with the trainer back")
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
