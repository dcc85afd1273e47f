"""The joiner over a real SQLite event log: matches, late, unmatched, duplicates, restarts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.ingest import fraud_outcome, fraud_served
from protos.common.v1 import common_pb2
from protos.feedback.v1 import feedback_pb2 as fb
from protos.fraud.v1 import fraud_pb2
from shared.feedback.records import feedback_outcome
from protos.pricing.v1 import pricing_pb2
from protos.recommender.v1 import recommender_pb2
from trainer.eventlog import REJECTED, STORED, SqliteEventLog
from trainer.joiner import Joiner, parse_windows
from trainer.plugins import default_domains

DEFAULT_WINDOWS = default_domains().windows()

T = 1.7e9
DAY = 86400.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log(tmp_path: Path):
    with SqliteEventLog(tmp_path / "events.db") as lg:
        yield lg


def append(log, *records) -> None:
    assert [r.status for r in log.append_batch(list(records))] == [STORED] * len(records)


def rec_served(rid: str, pid: str, at: float) -> fb.FeedbackRecord:
    s = fb.ServedPrediction(prediction_id=pid, model=common_pb2.ModelRef(name="recommender", version="v3"),
                            served_at=at)
    s.inputs.add(name="user", datatype="INT64", shape=[1, 1], raw_data=np.array([[7]], np.int64).tobytes())
    return fb.FeedbackRecord(record_id=rid, domain="recommender", served=s)


def rec_outcome(rid: str, pid: str, at: float, item: str = "i1", event=recommender_pb2.EVENT_CLICK):
    o = feedback_outcome(recommender_pb2.RecommendationOutcome(prediction_id=pid, item_id=item,
                                                                        event=event, occurred_at=at), at, at)
    return fb.FeedbackRecord(record_id=rid, domain="recommender", outcome=o)


def pricing_outcome(rid: str, pid: str, at: float, units: int = 1):
    o = feedback_outcome(pricing_pb2.PricingOutcome(prediction_id=pid, sold=True, units=units, price=4.2,
                                                      occurred_at=at), at, at)
    return fb.FeedbackRecord(record_id=rid, domain="pricing", outcome=o)


def test_matches_outcomes_to_what_was_served(log):
    served = [fraud_served(f"s{i}", f"p{i}", T + i) for i in range(5)]
    append(log, *served)
    append(log, fraud_outcome("o1", "p1", T + DAY, is_fraud=True), fraud_outcome("o3", "p3", T + 3 + 60))
    j = Joiner(log)
    out = j.poll()
    assert [(x.prediction_id, x.label.is_fraud) for x in out] == [("p1", True), ("p3", False)]
    x = out[0]
    assert x.domain == "fraud" and x.offset == 6 and x.served_offset == 2
    assert x.served == served[1].served  # exactly the features that were served
    assert x.served.inputs[0].shape == [1, 30]
    assert (x.model_name, x.model_version) == ("fraud", "20240101T000000Z-0001")
    assert x.label_delay_s == pytest.approx(DAY - 1)
    assert out[1].label_delay_s == pytest.approx(60)
    assert j.position == 7 and j.matched == 2
    assert j.poll() == []


def test_late_outcomes_are_dropped(log):
    append(log, fraud_served("s1", "p1", T), rec_served("s2", "q1", T), rec_served("s3", "q2", T))
    append(log, fraud_outcome("o1", "p1", T + 15 * DAY),   # fraud window: 14 days
           rec_outcome("o2", "q1", T + 2 * 3600),        # recommender window: 1 h
           rec_outcome("o3", "q2", T + 120))
    j = Joiner(log)
    assert [x.prediction_id for x in j.poll()] == ["q2"]
    assert (j.late, j.matched) == (2, 1)
    # Configurable windows.
    j2 = Joiner(log, {"fraud": 20 * DAY, "recommender": 3 * 3600}, consumer="other")
    assert [x.prediction_id for x in j2.poll()] == ["p1", "q1", "q2"]


def test_unmatched_outcomes_wait_then_give_up(log):
    clock = Clock(T + 1000)
    j = Joiner(log, grace_s=60, clock=clock)
    append(log, fraud_outcome("o1", "p1", T + 10, received_at=T + 10),
           fraud_outcome("o2", "p2", T + 10, received_at=T + 10))
    for r in log.read(0, 10):
        clock.now = r.received_at  # the log's clock
    assert j.poll() == [] and j.pending_offsets == [1, 2]
    # p1's prediction arrives late (another replica's stream was behind): joined on the next poll.
    append(log, fraud_served("s1", "p1", T))
    clock.now += 30
    out = j.poll()
    assert [x.prediction_id for x in out] == ["p1"] and out[0].offset == 1
    assert j.pending_offsets == [2] and j.unmatched == 0
    clock.now += 31  # past the grace period
    assert j.poll() == []
    assert j.pending_offsets == [] and j.unmatched == 1
    append(log, fraud_served("s2", "p2", T))
    assert j.poll() == []  # given up for good


def test_pending_is_bounded(log):
    clock = Clock(T)
    j = Joiner(log, grace_s=3600, max_pending=3, clock=clock)
    append(log, *[fraud_outcome(f"o{i}", f"p{i}", T, received_at=T) for i in range(5)])
    clock.now = log.read(0, 1)[0].received_at
    j.poll()
    assert j.pending_offsets == [3, 4, 5] and j.unmatched == 2  # the oldest gave way


def test_duplicates_are_emitted_once(log):
    append(log, fraud_served("s1", "p1", T), rec_served("s2", "q1", T))
    append(log, fraud_outcome("o1", "p1", T + 5, is_fraud=True),
           fraud_outcome("o1-resent", "p1", T + 5, is_fraud=True),          # same label, new record id
           fraud_outcome("o1-reversed", "p1", T + 9, is_fraud=False),       # the other label: the latest wins
           rec_outcome("c1", "q1", T + 1), rec_outcome("c2", "q1", T + 2),  # same (pid, item, event)
           rec_outcome("c3", "q1", T + 3, event=recommender_pb2.EVENT_PURCHASE))
    j = Joiner(log)
    out = j.poll()
    assert [log.get([x.offset])[0].record_id for x in out] == ["o1-reversed", "c1", "c3"]
    assert j.duplicates == 2 and j.superseded == 1
    # Resent again much later, after a restart from the committed checkpoint: still a duplicate.
    j.commit()
    append(log, fraud_outcome("o1-third", "p1", T + 5, is_fraud=True))
    j2 = Joiner(log)
    assert j2.position == j.position
    assert j2.poll() == [] and j2.duplicates == 1


def test_duplicate_inside_one_poll_when_the_first_is_pending(log):
    clock = Clock(T)
    j = Joiner(log, clock=clock)
    append(log, fraud_outcome("o1", "p1", T + 5), fraud_outcome("o2", "p1", T + 5))
    clock.now = log.read(0, 1)[0].received_at
    assert j.poll() == [] and j.pending_offsets == [1] and j.duplicates == 1
    append(log, fraud_served("s1", "p1", T))
    assert [x.offset for x in j.poll()] == [1]


def test_restore_continues_exactly_once(log):
    """Emit in small polls, checkpoint in the middle (with a pending outcome), restart: the union of
    what both joiners emit is every outcome exactly once, as a single uninterrupted joiner would."""
    clock = Clock(T)
    append(log, *[fraud_served(f"s{i}", f"p{i}", T + i) for i in range(30) if i != 4])
    append(log, *[fraud_outcome(f"o{i}", f"p{i}", T + 100 + i) for i in range(30)])
    clock.now = log.read(0, 1)[0].received_at
    reference = Joiner(log, consumer="reference", clock=clock)

    j = Joiner(log, clock=clock)
    first = j.poll(limit=10) + j.poll(limit=5)
    cp = j.checkpoint()
    assert cp["pending"] == [29 + 1 + 4]  # o4 (offset 34): its prediction is not in the log yet
    log.commit_offset("learner-fraud", cp["offset"], {"joiner": cp, "model": "v2"})

    append(log, fraud_served("s4", "p4", T + 4))  # p4 shows up while the trainer is down
    offset, meta = log.committed("learner-fraud")
    j2 = Joiner(log, consumer="learner-restarted", clock=clock)
    j2.restore(offset, meta["joiner"]["pending"])
    second = []
    while batch := j2.poll(limit=7):
        second += batch
    got = sorted(x.offset for x in first + second)
    assert got == sorted(set(got))  # nothing twice
    expected = sorted(x.offset for x in reference.poll(limit=1000) + reference.poll())
    assert got == expected and len(got) == 30
    assert j2.position == log.end_offset()


def test_replay_from_zero_emits_the_same(log):
    append(log, *[fraud_served(f"s{i}", f"p{i}", T + i) for i in range(10)])
    append(log, *[fraud_outcome(f"o{i}", f"p{i}", T + 50, is_fraud=i % 3 == 0) for i in range(10)])
    append(log, fraud_outcome("o0-again", "p0", T + 50, is_fraud=True))
    a = [(x.offset, x.prediction_id) for x in Joiner(log).poll()]
    j = Joiner(log)
    j.poll()
    j.restore(0)
    b = [(x.offset, x.prediction_id) for x in j.poll()]
    assert a == b and len(a) == 10


def test_position_moves_past_served_only_stretches(log):
    append(log, *[fraud_served(f"s{i}", f"p{i}", T) for i in range(50)])
    j = Joiner(log)
    assert j.poll(limit=5) == [] and j.position == 50
    append(log, fraud_outcome("o", "p3", T + 1))
    assert len(j.poll(limit=1)) == 1 and j.position == 51


def test_domain_filter_and_pricing(log):
    append(log, fraud_served("s1", "p1", T), rec_served("s2", "q1", T))
    s = fb.ServedPrediction(prediction_id="z1", model=common_pb2.ModelRef(name="pricing", version="v1"),
                            served_at=T)
    append(log, fb.FeedbackRecord(record_id="s3", domain="pricing", served=s))
    append(log, fraud_outcome("o1", "p1", T + 1), rec_outcome("o2", "q1", T + 1),
           pricing_outcome("o3", "z1", T + 3600), pricing_outcome("o4", "z1", T + 3600),
           pricing_outcome("o5", "z1", T + 3600, units=2))
    only = Joiner(log, domain="recommender")
    assert only.consumer == "joiner-recommender"
    assert [x.prediction_id for x in only.poll()] == ["q1"]
    pricing = Joiner(log, domain="pricing")
    out = pricing.poll()
    # pricing.proto: another outcome of the same quote is accepted and the latest wins (same
    # occurred_at: the one stored last)
    assert [log.get([x.offset])[0].record_id for x in out] == ["o5"]
    assert pricing.duplicates == 1 and pricing.superseded == 1


def test_prediction_ids_are_per_domain(log):
    """The same prediction id in two domains: an outcome joins its own domain's prediction only."""
    append(log, rec_served("s1", "same", T))
    append(log, fraud_outcome("o1", "same", T + 1))
    j = Joiner(log, grace_s=0)
    assert j.poll() == [] and j.unmatched == 1


def test_parse_windows():
    w = parse_windows("fraud=100, recommender=1800", DEFAULT_WINDOWS)
    assert w == {"fraud": 100.0, "recommender": 1800.0, "pricing": 86400.0}
    assert parse_windows("", DEFAULT_WINDOWS) == DEFAULT_WINDOWS
    for bad in ("fraud", "shoes=1", "fraud=0", "fraud=x"):
        with pytest.raises(ValueError):
            parse_windows(bad, DEFAULT_WINDOWS)


def test_fraud_two_labels_of_one_prediction_only_the_latest_is_joined(log):
    """fraud.proto: a chargeback later reversed; the trainer uses the label with the latest occurred_at,
    whatever order the two arrive in."""
    append(log, fraud_served("s1", "p1", T), fraud_served("s2", "p2", T))
    append(log, fraud_outcome("p1-fraud", "p1", T + 5, is_fraud=True),
           fraud_outcome("p1-reversed", "p1", T + 9, is_fraud=False),
           fraud_outcome("p2-legit-late", "p2", T + 9, is_fraud=False),   # stored first, happened last
           fraud_outcome("p2-fraud-early", "p2", T + 5, is_fraud=True))
    j = Joiner(log)
    out = j.poll()
    assert [(x.prediction_id, x.label.is_fraud) for x in out] == [("p1", False), ("p2", False)]
    assert j.superseded == 2 and j.matched == 2


def test_a_late_correction_is_emitted_and_names_what_it_supersedes(log):
    append(log, fraud_served("s1", "p1", T), fraud_outcome("o1", "p1", T + 5, is_fraud=True))
    j = Joiner(log)
    first = j.poll()
    assert [x.label.is_fraud for x in first] == [True] and first[0].supersedes == ()
    append(log, fraud_outcome("o2", "p1", T + 9, is_fraud=False))
    second = j.poll()
    assert [x.label.is_fraud for x in second] == [False]
    assert second[0].supersedes == (first[0].offset,)
    # An older label that arrives after a newer one was handled is dropped.
    append(log, fraud_outcome("o0", "p1", T + 1, is_fraud=True))  # same identity as o1: a duplicate anyway
    assert j.poll() == []


def test_a_pending_label_superseded_before_its_prediction_arrives_is_dropped(log):
    clock = Clock(T)
    j = Joiner(log, clock=clock)
    append(log, fraud_outcome("o1", "p1", T + 5, is_fraud=True))
    clock.now = log.read(0, 1)[0].received_at
    assert j.poll() == [] and j.pending_offsets == [1]
    append(log, fraud_outcome("o2", "p1", T + 9, is_fraud=False))
    assert j.poll() == [] and j.pending_offsets == [2] and j.superseded == 1
    append(log, fraud_served("s1", "p1", T))
    assert [x.label.is_fraud for x in j.poll()] == [False]


def _legacy_outcome_payload(rid: str, pid: str, at: float, field: int, message) -> bytes:
    """A FeedbackRecord outcome as the enum version of feedback.proto wrote it: `Domain domain = 2`
    (a varint) and the domain message in Outcome field 4, 5 or 6 (the retired oneof)."""
    body = message.SerializeToString()
    outcome = fb.Outcome(prediction_id=pid, occurred_at=at, received_at=at).SerializeToString()
    outcome += bytes([field << 3 | 2, len(body)]) + body
    record = fb.FeedbackRecord(record_id=rid).SerializeToString()
    record += bytes([2 << 3 | 0, 1])  # the retired enum field; its value no longer matters
    return record + bytes([4 << 3 | 2, len(outcome)]) + outcome  # FeedbackRecord.outcome is still field 4


def test_outcomes_stored_before_domain_plug_ins_still_join(log):
    """An event log written by the enum version: its rows name the domain, so the outcome in a
    retired field is read as that domain's message (feedback.proto, "Upgrade")."""
    append(log, fraud_served("s1", "p1", T), fraud_served("s2", "p2", T))
    legacy = [(_legacy_outcome_payload("o1", "p1", T + 60, 4, fraud_pb2.FraudOutcome(
                   prediction_id="p1", is_fraud=True, occurred_at=T + 60)), "p1"),
              (_legacy_outcome_payload("o2", "p2", T + 70, 4, fraud_pb2.FraudOutcome(
                   prediction_id="p2", is_fraud=False, occurred_at=T + 70)), "p2")]
    plugin = default_domains()["fraud"]
    with log._write_lock:  # the rows as the old trainer stored them (append_batch now rejects them)
        for i, (payload, pid) in enumerate(legacy):
            label = plugin.unpack_outcome(fb.FeedbackRecord.FromString(payload).outcome)
            log._writer.execute(
                "INSERT INTO events (record_id, domain, kind, prediction_id, event_time, received_at, outcome_key, "
                "payload) VALUES (?, 'fraud', 'outcome', ?, ?, ?, ?, ?)",
                (f"o{i + 1}", pid, T + 60, T + 60, plugin.outcome_key(pid, label), payload))
    assert log.append_batch([legacy[0][0]])[0].status == REJECTED  # on the wire: drain spools first
    out = Joiner(log).poll()
    assert [(x.prediction_id, x.label.is_fraud) for x in out] == [("p1", True), ("p2", False)]
    # and a resent copy of a legacy outcome, in the new form, is recognised as its duplicate
    append(log, fraud_outcome("o1-again", "p1", T + 60, is_fraud=True))
    j = Joiner(log)
    assert [x.prediction_id for x in j.poll()] == ["p1", "p2"] and j.duplicates == 1


def test_served_labels_are_asked_once_across_committed_restarts(log):
    """The served position travels in the committed checkpoint: a joiner restored from it asks
    the plug-in about no served prediction twice; a checkpoint from before served positions
    resumes them at its read position."""
    def listing(rid: str, pid: str, at: float) -> fb.FeedbackRecord:
        r = rec_served(rid, pid, at)
        out = r.served.outputs.add(name="item_ids", datatype="BYTES", shape=[1, 2])
        out.raw_data = b"".join(len(i).to_bytes(4, "little") + i for i in (b"x", b"y"))
        return r

    window = DEFAULT_WINDOWS["recommender"]
    append(log, listing("s1", "p1", T), rec_outcome("o1", "p1", T + 5, item="x"))
    clock = Clock(T + 10)
    j = Joiner(log, consumer="c", clock=clock, grace_s=0.0)
    assert [x.label.item_id for x in j.poll()] == ["x"] and j.served_position == 0  # window open
    clock.now = T + window + 1
    assert [(x.label.item_id, x.derived) for x in j.poll()] == [("y", True)]
    j.commit()
    append(log, listing("s2", "p2", T + 1))
    again = Joiner(log, consumer="c", clock=clock, grace_s=0.0)
    assert again.served_position == 2
    assert [(x.prediction_id, x.label.item_id) for x in again.poll()] == [("p2", "x"), ("p2", "y")]
    old = Joiner(log, consumer="old", clock=clock, grace_s=0.0)
    old.restore(2, ())  # served_offset unknown: from the read position
    assert old.served_position == 2 and [x.prediction_id for x in old.poll()] == ["p2", "p2"]
