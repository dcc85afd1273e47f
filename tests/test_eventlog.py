"""The durable event log: append / read / idempotency / validation / offsets / crash safety.

The tests of the EventLog interface run against both implementations: the SQLite file
(`SqliteEventLog`) and Redis Streams (`RedisEventLog`, on a real redis-server with appendfsync
always, one per test module; each test its own log name). SQLite's file mechanics (WAL, vacuum,
a writer killed mid-transaction) are tested on SQLite alone; Redis's own (a server killed under
load, size limits in its units) in tests/test_redis_eventlog.py."""
from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from bench.ingest import fraud_outcome, fraud_served
from protos.feedback.v1 import feedback_pb2 as fb
from shared.feedback.records import feedback_outcome
from protos.fraud.v1 import fraud_pb2
from protos.pricing.v1 import pricing_pb2
from protos.recommender.v1 import recommender_pb2
from tests.redis_server import RedisServer
from trainer.eventlog import DUPLICATE, OUTCOME, REJECTED, SERVED, STORED, EventLog, SqliteEventLog
from trainer.eventlog_redis import RedisEventLog
from trainer.plugins import default_domains

REPO = Path(__file__).resolve().parents[1]
T = 1.7e9


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """One real redis-server (appendfsync always) for the module; each test uses its own log name."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendfsync="always").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def open_log(request, tmp_path: Path):
    """A factory: each call opens the same log again (a new object on the same file / keys)."""
    opened = []
    name = f"test-{os.urandom(6).hex()}"  # a fresh log on the shared server

    def open_() -> EventLog:
        if request.param == "sqlite":
            lg = SqliteEventLog(tmp_path / "events.db")
        else:
            lg = RedisEventLog(request.getfixturevalue("redis_url"), name=name)
        opened.append(lg)
        return lg

    yield open_
    for lg in opened:
        lg.close()


@pytest.fixture
def log(open_log):
    return open_log()


@pytest.fixture
def sqlite_log(tmp_path: Path):
    with SqliteEventLog(tmp_path / "events.db") as lg:
        yield lg


def rec_outcome(rid: str, pid: str, item: str = "i1", event=recommender_pb2.EVENT_CLICK, at: float = T + 5):
    o = feedback_outcome(recommender_pb2.RecommendationOutcome(prediction_id=pid, item_id=item, event=event,
                                                                        occurred_at=at), at, at)
    return fb.FeedbackRecord(record_id=rid, domain="recommender", outcome=o)


def outcome_key(domain: str, outcome: fb.Outcome) -> str:
    """The identity key the log stores for an outcome (its domain plug-in's)."""
    plugin = default_domains()[domain]
    return plugin.outcome_key(outcome.prediction_id, plugin.unpack_outcome(outcome))


def test_implements_the_interface(log):
    assert isinstance(log, EventLog)


def test_wal_and_full_sync(sqlite_log):
    log = sqlite_log
    assert log._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert log._reader().execute("PRAGMA synchronous").fetchone()[0] == 2


def test_append_and_read(log):
    records = [fraud_served(f"r{i}", f"p{i}", T + i) for i in range(5)]
    records += [fraud_outcome(f"o{i}", f"p{i}", T + 100 + i, is_fraud=i == 3) for i in range(3)]
    results = log.append_batch(records)
    assert [r.status for r in results] == [STORED] * 8
    assert [r.offset for r in results] == list(range(1, 9))
    assert [r.record_id for r in results] == [r.record_id for r in records]
    assert {(r.domain, r.kind) for r in results} == {("fraud", SERVED), ("fraud", OUTCOME)}
    assert log.end_offset() == 8
    assert log.count() == 8 and log.count(kind=SERVED) == 5 and log.count("fraud", OUTCOME) == 3
    assert log.count(domain="pricing") == 0

    entries = log.read(0, 100)
    assert [e.offset for e in entries] == list(range(1, 9))
    e = entries[0]
    assert (e.record_id, e.domain, e.kind, e.prediction_id, e.event_time) == ("r0", "fraud", SERVED, "p0", T)
    assert e.record == records[0]
    assert e.received_at > T
    assert entries[5].event_time == T + 100
    assert default_domains()["fraud"].unpack_outcome(entries[5].record.outcome).is_fraud is False

    assert [e.offset for e in log.read(2, 3)] == [3, 4, 5]
    assert [e.offset for e in log.read(0, 100, kind=OUTCOME)] == [6, 7, 8]
    assert [e.offset for e in log.read(0, 100, kind=OUTCOME, upto=7)] == [6, 7]
    assert log.read(8, 10) == [] and log.read(0, 0) == []
    assert [e.offset for e in log.get([7, 2, 99, 2])] == [2, 7]


def test_bytes_are_stored_as_received(log):
    raw = fraud_served("r1", "p1", T).SerializeToString() + b"\xa0\x06\x01"  # + unknown field 100 (newer sender)
    assert log.append_batch([raw])[0].status == STORED
    assert log.read(0, 1)[0].payload == raw


def test_offsets_continue_after_reopen(open_log):
    with open_log() as lg:
        lg.append_batch([fraud_served(f"r{i}", f"p{i}", T) for i in range(3)])
    with open_log() as lg:
        assert [r.offset for r in lg.append_batch([fraud_served("r9", "p9", T)])] == [4]
        assert lg.count() == 4


def test_idempotent_by_record_id(log):
    first = log.append_batch([fraud_served("a", "pa", T), fraud_served("b", "pb", T)])
    again = log.append_batch([fraud_served("b", "pb", T), fraud_served("c", "pc", T), fraud_served("a", "pa", T)])
    assert [(r.record_id, r.status) for r in again] == [("b", DUPLICATE), ("c", STORED), ("a", DUPLICATE)]
    assert again[0].offset == first[1].offset and again[2].offset == first[0].offset
    assert again[1].offset == 3
    # The same id twice in one batch: stored once.
    same = log.append_batch([fraud_served("d", "pd", T), fraud_served("d", "pd", T)])
    assert [r.status for r in same] == [STORED, DUPLICATE] and same[0].offset == same[1].offset == 4
    assert log.count() == 4


def _bad_records() -> list[tuple[object, str]]:
    good = fraud_served("x", "px", T)

    def served(**change):
        r = fb.FeedbackRecord()
        r.CopyFrom(good)
        for k, v in change.items():
            setattr(r.served, k, v) if k != "record_id" else setattr(r, k, v)
        return r

    no_version = fb.FeedbackRecord()
    no_version.CopyFrom(good)
    no_version.served.model.version = ""
    bad_tensor = fb.FeedbackRecord()
    bad_tensor.CopyFrom(good)
    bad_tensor.served.inputs[0].raw_data = b"\0" * 119
    bad_dtype = fb.FeedbackRecord()
    bad_dtype.CopyFrom(good)
    bad_dtype.served.outputs[0].datatype = "FLOAT"
    neg_shape = fb.FeedbackRecord()
    neg_shape.CopyFrom(good)
    neg_shape.served.inputs[0].shape[0] = -1
    wrong_request = fb.FeedbackRecord()
    wrong_request.CopyFrom(good)
    wrong_request.served.request.Pack(pricing_pb2.QuoteRequest())
    wrong_domain = fb.FeedbackRecord()
    wrong_domain.CopyFrom(good)
    wrong_domain.domain = "recommender"  # a fraud request in a recommender record

    pricing_in_fraud = fraud_outcome("o1", "px", T)
    pricing_in_fraud.outcome.domain_outcome.Pack(pricing_pb2.PricingOutcome(prediction_id="px", sold=False,
                                                                            occurred_at=T))
    pid_mismatch = fraud_outcome("o2", "px", T)
    pid_mismatch.outcome.domain_outcome.Pack(fraud_pb2.FraudOutcome(prediction_id="other", occurred_at=T))
    no_member = fraud_outcome("o3", "px", T)
    no_member.outcome.ClearField("domain_outcome")
    not_parsing = fraud_outcome("o4", "px", T)
    not_parsing.outcome.domain_outcome.value = b"\xff\xff"
    bytes_tensor = fb.FeedbackRecord()
    bytes_tensor.CopyFrom(good)
    bytes_tensor.served.inputs.add(name="title", datatype="BYTES", shape=[1, 2],
                                   raw_data=(3).to_bytes(4, "little") + b"abc")  # 1 element, shape says 2

    return [
        (fb.FeedbackRecord(domain="fraud", served=good.served), "record_id"),
        (served(record_id="r" * 257), "record_id"),
        (fb.FeedbackRecord(record_id="x", served=good.served), "domain"),
        (fb.FeedbackRecord(record_id="x", domain="toys", served=good.served), "domain"),
        (fb.FeedbackRecord(record_id="x", domain="Fraud!", served=good.served), "domain"),
        (fb.FeedbackRecord(record_id="x", domain="fraud"), "payload"),
        (served(prediction_id=""), "served.prediction_id"),
        (served(prediction_id="p" * 65), "served.prediction_id"),
        (no_version, "served.model"),
        (served(served_at=0.0), "served.served_at"),
        (served(served_at=math.nan), "served.served_at"),
        (served(served_at=math.inf), "served.served_at"),
        (bad_tensor, "served.inputs[0].raw_data"),
        (bad_dtype, "served.outputs[0].datatype"),
        (neg_shape, "served.inputs[0].shape"),
        (bytes_tensor, "served.inputs[1].raw_data"),
        (wrong_request, "served.request"),
        (wrong_domain, "served.request"),
        (fraud_outcome("o0", "", T), "outcome.prediction_id"),
        (fraud_outcome("o0", "px", 0.0), "outcome.occurred_at"),
        (fraud_outcome("o0", "px", T, received_at=-1.0), "outcome.received_at"),
        (pricing_in_fraud, "outcome.domain_outcome: packs 'storefront.pricing.v1.PricingOutcome'"),
        (pid_mismatch, "outcome.domain_outcome.prediction_id"),
        (no_member, "outcome.domain_outcome: required"),
        (not_parsing, "outcome.domain_outcome: the bytes"),
        (b"\xff\xff\xff", "FeedbackRecord"),
    ]


def test_rejects_malformed_records_without_raising(log):
    bad = _bad_records()
    batch = [fraud_served("ok-1", "p1", T)] + [b for b, _ in bad] + [fraud_outcome("ok-2", "p1", T + 1)]
    results = log.append_batch(batch)
    assert results[0].status == STORED and results[-1].status == STORED
    for (record, field), r in zip(bad, results[1:-1]):
        assert r.status == REJECTED, (field, r)
        assert field in r.message, (field, r.message)
        assert r.offset is None
    assert log.count() == 2
    assert [e.record_id for e in log.read(0, 10)] == ["ok-1", "ok-2"]


def test_only_rejected_records(log):
    assert [r.status for r in log.append_batch([b"\x00garbage"])] == [REJECTED]
    assert log.append_batch([]) == []
    assert log.end_offset() == 0


def test_served_for_and_outcome_identity(log):
    log.append_batch([fraud_served(f"s{i}", f"p{i}", T + i) for i in range(600)])  # > one SQL chunk
    log.append_batch([fraud_served("s-again", "p1", T + 1000),  # a second served record, same prediction
                      rec_outcome("o1", "p2"), rec_outcome("o2", "p2"), rec_outcome("o3", "p2", item="i2")])
    found = log.served_for([f"p{i}" for i in range(0, 600, 3)] + ["nope"])
    assert set(found) == {f"p{i}" for i in range(0, 600, 3)}
    assert found["p3"].record_id == "s3" and found["p3"].kind == SERVED
    assert log.served_for(["p1"])["p1"].record_id == "s1"  # the first stored
    assert log.served_for(["p1"], domain="recommender") == {}
    assert log.served_for([]) == {}

    o1 = log.read(601, 10, kind=OUTCOME)
    keys = [outcome_key(e.record.domain, e.record.outcome) for e in o1]
    assert keys[0] == keys[1] != keys[2]
    first = log.first_outcome_offsets(keys + ["fraud\x1fnope\x1f0"])
    assert first == {keys[0]: o1[0].offset, keys[2]: o1[2].offset}


def test_outcome_identity_follows_the_contracts():
    f1 = fraud_outcome("a", "p", T, is_fraud=True).outcome
    f2 = fraud_outcome("b", "p", T + 50, is_fraud=True, source="manual_review").outcome
    f3 = fraud_outcome("c", "p", T, is_fraud=False).outcome
    assert outcome_key("fraud", f1) == outcome_key("fraud", f2)  # (prediction_id, is_fraud)
    assert outcome_key("fraud", f1) != outcome_key("fraud", f3)
    r1, r2 = rec_outcome("a", "p", at=T).outcome, rec_outcome("b", "p", at=T + 9).outcome
    assert outcome_key("recommender", r1) == outcome_key("recommender", r2)
    r3 = rec_outcome("c", "p", event=recommender_pb2.EVENT_PURCHASE).outcome
    assert outcome_key("recommender", r1) != outcome_key("recommender", r3)

    def pricing(units, at):
        return feedback_outcome(pricing_pb2.PricingOutcome(prediction_id="p", sold=True, units=units, price=9.5,
                                                             occurred_at=at), at, at)
    assert outcome_key("pricing", pricing(1, T)) == outcome_key("pricing", pricing(1, T))
    assert outcome_key("pricing", pricing(1, T)) != outcome_key("pricing", pricing(2, T))
    assert outcome_key("pricing", pricing(1, T)) != outcome_key("pricing", pricing(1, T + 1))


def test_consumer_offsets_persist_across_reopen(open_log):
    with open_log() as lg:
        assert lg.committed("learner-fraud") == (0, None)
        lg.commit_offset("learner-fraud", 42, {"pending": [40, 41], "model": "v7"})
        lg.commit_offset("joiner", 7)
        lg.commit_offset("joiner", 9)
        with pytest.raises(ValueError):
            lg.commit_offset("joiner", -1)
    with open_log() as lg:
        assert lg.committed("learner-fraud") == (42, {"pending": [40, 41], "model": "v7"})
        assert lg.committed("joiner") == (9, None)
        assert lg.committed("other") == (0, None)


def test_readers_in_other_threads_never_miss_an_event(log):
    """A reader polling while the writer appends sees offsets 1..N exactly once, in order."""
    n_batches, per = 60, 25
    seen: list[int] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def reader():
        try:
            pos = 0
            while True:
                finished = done.is_set()
                for e in log.read(pos, 64):
                    seen.append(e.offset)
                    pos = e.offset
                if finished and pos == log.end_offset():
                    return
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(1)]
    for t in threads:
        t.start()
    for b in range(n_batches):
        log.append_batch([fraud_served(f"r{b}-{i}", f"p{b}-{i}", T) for i in range(per)])
    done.set()
    for t in threads:
        t.join(30)
    assert not errors
    assert seen == list(range(1, n_batches * per + 1))


def test_closed_log_refuses(tmp_path: Path):
    lg = SqliteEventLog(tmp_path / "events.db")
    lg.close()
    with pytest.raises(sqlite3.ProgrammingError):
        lg.append_batch([fraud_served("a", "p", T)])
    lg.close()  # twice is fine


CHILD = r"""
import sys
from bench.ingest import fraud_outcome, fraud_served
from trainer.eventlog import DUPLICATE, STORED, SqliteEventLog
log = SqliteEventLog(sys.argv[1])
prefix, start = sys.argv[2], int(sys.argv[3])
i = start
while True:
    batch = [fraud_served(f"{prefix}-{k}", f"p-{k}", 1.7e9 + k) for k in range(i, i + 7)]
    batch.append(fraud_outcome(f"{prefix}-o{i}", f"p-{i}", 1.7e9 + i + 5))
    if i > start:
        batch.append(fraud_served(f"{prefix}-{i - 1}", f"p-{i - 1}", 1.7e9 + i - 1))  # a resend
    results = log.append_batch(batch)
    assert all(r.status in (STORED, DUPLICATE) for r in results), results
    print(" ".join(r.record_id for r in results), flush=True)
    i += 7
"""


def test_every_acknowledged_record_survives_sigkill(tmp_path: Path):
    """A writer is killed with SIGKILL at arbitrary moments, three times over the same file; every
    record it reported stored is there exactly once and the database is intact."""
    path = tmp_path / "events.db"
    acked: list[str] = []
    start = 0
    for round_, lines_before_kill in enumerate((5, 40, 17)):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), f"w{round_}", str(start)],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            for _ in range(lines_before_kill):
                line = child.stdout.readline()
                assert line, child.stderr.read()
                acked += line.split()
        finally:
            child.send_signal(signal.SIGKILL)
            rest, _ = child.communicate(timeout=30)
        acked += rest.split()  # printed after their commit returned, before the kill
        assert child.returncode == -signal.SIGKILL
        start += 7 * (lines_before_kill + 50)

    with SqliteEventLog(path) as lg:
        assert lg._writer.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = [row[0] for row in lg._writer.execute("SELECT record_id FROM events ORDER BY offset")]
        offsets = [row[0] for row in lg._writer.execute("SELECT offset FROM events ORDER BY offset")]
    assert len(stored) == len(set(stored))
    assert set(acked) <= set(stored), sorted(set(acked) - set(stored))[:10]
    assert offsets == list(range(1, len(offsets) + 1))  # no holes: a killed transaction left nothing
    assert len(set(acked)) > 3 * 40


def test_an_any_with_the_right_type_is_accepted(log):
    r = fraud_served("x", "p", T)
    assert r.served.request.type_url.endswith("storefront.fraud.v1.ScoreTransactionRequest")
    r.served.ClearField("request")  # optional: absent is fine
    r.served.response.CopyFrom(any_pb2.Any())
    res = log.append_batch([r])[0]
    assert res.status == REJECTED and "served.response" in res.message
    r.served.ClearField("response")
    assert log.append_batch([r])[0].status == STORED


# ---------------------------------------------------------------- retention

from trainer.eventlog import RetentionPolicy  # noqa: E402

WINDOWS = {"fraud": 14 * 86400.0, "recommender": 3600.0, "pricing": 86400.0}
LEARNED = frozenset({"fraud", "pricing"})  # one label per prediction (their plug-ins say so)


def test_the_built_in_plug_ins_declare_the_windows_and_learned_domains_retention_uses():
    assert default_domains().windows() == WINDOWS
    assert default_domains().one_label_per_prediction() == LEARNED


def rec_served(rid: str, pid: str, at: float) -> fb.FeedbackRecord:
    r = fb.FeedbackRecord(record_id=rid, domain="recommender")
    r.served.prediction_id, r.served.served_at = pid, at
    r.served.model.name, r.served.model.version = "recommender", "v1"
    return r


def offsets_of(log, **kw) -> list[int]:
    return [e.offset for e in log.read(0, 10**6, **kw)]


def test_new_logs_use_incremental_vacuum(sqlite_log):
    assert sqlite_log._writer.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL


def test_retention_keeps_whatever_a_consumer_or_a_label_window_still_needs(log):
    now = T + 1000
    # fraud: served p0..p5 (offsets 1..6), labels of p0..p2 (7..9), a label whose prediction has not
    # arrived (10: the joiner holds it pending), then a label of p3 nobody processed yet (11)
    log.append_batch([fraud_served(f"s{i}", f"p{i}", T + i) for i in range(6)])
    log.append_batch([fraud_outcome(f"o{i}", f"p{i}", T + 50) for i in range(3)])
    log.append_batch([fraud_outcome("o9", "p9", T + 50), fraud_outcome("o3", "p3", T + 50)])
    # recommender: a prediction clicked inside its window, and one of another consumer-less domain
    log.append_batch([rec_served("rs1", "rp1", now - 10), rec_outcome("ro1", "rp1", at=now - 5)])
    log.commit_offset("learner-fraud", 10, {"domain": "fraud", "offset": 10, "pending": [10]})
    policy = RetentionPolicy(windows=WINDOWS, slack_s=60, learned_domains=LEARNED)
    report = log.retain(policy, now=now)
    # learned predictions and their processed labels went; the pending label, the unprocessed one,
    # their predictions, unlabeled predictions inside the window and every recommender event stayed
    assert report.deleted == {("fraud", "learned"): 3, ("fraud", "processed"): 3}
    assert report.safe_offsets["fraud"] == (9, "learner-fraud")
    assert report.safe_offsets["recommender"] == (0, "")
    assert offsets_of(log, domain="fraud") == [4, 5, 6, 10, 11]
    assert log.count(domain="recommender") == 2
    assert report.dropped_unprocessed == 0 and report.rows_after == 7

    # past fraud's label window (plus slack): the unlabeled predictions go too, but only those at or
    # below the committed offset, and never p3 (at 4 <= 9): its label at 11 arrived inside the window
    # and is not processed yet; after a restart the joiner needs p3 to learn it
    later = T + WINDOWS["fraud"] + 61 + 5
    report = log.retain(policy, now=later)
    assert report.deleted == {("fraud", "window"): 2}
    assert offsets_of(log, domain="fraud") == [4, 10, 11]
    # a consumer reading every domain (no "domain" in its meta) lets the recommender's events go once
    # they are past its window; a second fraud consumer further behind holds fraud back
    log.commit_offset("joiner", log.end_offset())
    log.commit_offset("audit-fraud", 3, {"domain": "fraud"})
    report = log.retain(policy, now=now + 3600 + 61)
    assert report.deleted == {("recommender", "window"): 1, ("recommender", "processed"): 1}
    assert report.safe_offsets["fraud"] == (3, "audit-fraud")
    assert offsets_of(log, domain="fraud") == [4, 10, 11]


def test_max_age_removes_old_processed_events_even_inside_their_window(log):
    import time
    log.append_batch([fraud_served(f"s{i}", f"p{i}", time.time()) for i in range(4)])  # inside the 14-day window
    log.commit_offset("learner-fraud", 2, {"domain": "fraud"})
    report = log.retain(RetentionPolicy(windows=WINDOWS, max_age_s=1.0), now=time_after_received(log) + 2)
    assert report.deleted == {("fraud", "age"): 2}
    assert offsets_of(log) == [3, 4]


def time_after_received(log) -> float:
    return max(e.received_at for e in log.read(0, 10**6))


def _fill(log, n: int, start: int = 0, pad: int = 3000) -> None:
    big = fb.Tensor(name="pad", datatype="UINT8", shape=[pad], raw_data=b"\x07" * pad)
    for b in range(start, start + n, 500):
        recs = []
        for i in range(b, min(b + 500, start + n)):
            r = fraud_served(f"s{i}", f"p{i}", T + i)
            r.served.inputs.append(big)
            recs.append(r)
        log.append_batch(recs)


def test_size_limits_delete_oldest_processed_first_and_the_hard_cap_counts_what_it_drops(sqlite_log):
    log = sqlite_log
    _fill(log, 4000)
    full = log.disk_bytes()
    assert log.live_bytes() > 12_000_000
    log.commit_offset("learner-fraud", 1000, {"domain": "fraud"})
    # soft limit far below what is stored: only the 1000 processed events may go
    report = log.retain(RetentionPolicy(windows=WINDOWS, max_bytes=2_000_000), now=T + 10)
    assert report.deleted == {("fraud", "size"): 1000} and report.dropped_unprocessed == 0
    assert offsets_of(log)[0] == 1001
    # the freed pages were given back: the file shrank
    assert log.disk_bytes() < full * 0.85, (full, log.disk_bytes())
    # the hard cap goes further, oldest first, and says how much unprocessed it dropped
    report = log.retain(RetentionPolicy(windows=WINDOWS, max_bytes=2_000_000, hard_max_bytes=5_000_000),
                        now=T + 10)
    assert report.dropped_unprocessed > 0 and report.deleted[("fraud", "hard_cap")] == report.dropped_unprocessed
    assert log.live_bytes() <= 5_000_000
    kept = offsets_of(log)
    assert kept == list(range(kept[0], 4001))  # the newest stayed, in one piece
    assert log.disk_bytes() < 6_500_000


def test_a_log_made_without_auto_vacuum_is_converted_once_and_shrinks(tmp_path: Path):
    path = tmp_path / "events.db"
    with sqlite3.connect(path) as conn:  # a log from before auto_vacuum: a table already exists
        conn.execute("CREATE TABLE legacy (x)")
    with SqliteEventLog(path) as lg:
        assert lg._writer.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
        _fill(lg, 2000)
        full = lg.disk_bytes()
        lg.commit_offset("learner-fraud", 1800, {"domain": "fraud"})
        report = lg.retain(RetentionPolicy(windows=WINDOWS, max_bytes=500_000), now=T + 10)  # below what 200 take
        assert report.total_deleted == 1800
        assert lg._writer.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert lg.disk_bytes() < full * 0.3, (full, lg.disk_bytes())
        assert offsets_of(lg) == list(range(1801, 2001))
        assert [e.record_id for e in lg.read(1800, 1)] == ["s1800"]


def test_retention_policy_validation():
    with pytest.raises(ValueError):
        RetentionPolicy(windows=WINDOWS, max_bytes=10, hard_max_bytes=5).validate()
    with pytest.raises(ValueError):
        RetentionPolicy(windows=WINDOWS, learned_domains=frozenset({"ads"})).validate(default_domains())
    RetentionPolicy(windows=WINDOWS).validate()
