"""Bounded storage while the loop runs (issue 12, item 4): many rounds of the real fraud learner on
real creditcard rows, through the trainer's own domain loop (joiner -> learner round -> the
learner's progress committed as log consumer -> registry gc), with the event log's retention
passes at the trainer's settings (small label window): the log's size on disk (database + WAL)
stays under a bound while events keep flowing, nothing a consumer has not processed is deleted,
and every label reaches the learner exactly once.

Time is the records' own (served_at / occurred_at advance 0.1 s per transaction; retention is
given that clock), so the test waits on offsets only, never on the wall clock."""
from __future__ import annotations

import numpy as np

from protos.common.v1 import common_pb2
from protos.feedback.v1 import feedback_pb2 as fb
from shared.feedback.records import feedback_outcome
from protos.fraud.v1 import fraud_pb2
from shared.feedback import fill_tensor
from tests.fraud_fixtures import bootstrap_small_fraud
from trainer.domains.fraud import FEATURES
from trainer.eventlog import OUTCOME, SERVED, STORED, RetentionPolicy, SqliteEventLog
from trainer.service import DomainLoop, TrainerSettings

T0 = 1.7e9
DT = 0.1              # seconds of record time per transaction (10 transactions/s)
TRANSACTIONS = 24_000  # rows 40,000..59,999 of the creditcard slice, then again from 40,000 with new ids
TICK = 200            # transactions served between two joiner polls
LAG = 300             # a label arrives 300 transactions (30 s) after its prediction was served
UNLABELED_EVERY = 10  # every 10th prediction never gets a label: it may go only past the label window
RETAIN_EVERY = 5      # ticks between retention passes (the trainer's retention_interval_s, in record time)
ROUND_LABELS = 2500   # min_events: 8 rounds
WINDOW_S = 120.0      # fraud's label window here (production: 14 days; the rule is the same)
# kept beyond the window: more than the learner's commit lag (a round of ROUND_LABELS labels is ~280 s
# of record time here), as in production (660 s of slack, a round at least every 30 s); see
# test_a_label_not_yet_processed_keeps_its_prediction_past_the_window for why it must be
SLACK_S = 400.0
BOUND = 12 * 2**20    # the log may never be larger than this on disk (~24 MB of records are appended)


def served_record(i: int, pid: str, x: np.ndarray, p: float, version: str, at: float) -> fb.FeedbackRecord:
    """A served prediction as the fraud service records it (shared.feedback.FeedbackClient.record_served):
    the model's input row and outputs as tensors, the packed request and response."""
    request = fraud_pb2.ScoreTransactionRequest(transaction_id=f"tx-{i}", amount=float(x[-1]), timestamp=at,
                                                card_ref=f"card-{i % 5000}",
                                                features={n: float(v) for n, v in zip(FEATURES, x[:-1])})
    response = fraud_pb2.ScoreTransactionResponse(
        prediction_id=pid, fraud_probability=p, decision=fraud_pb2.DECISION_ALLOW,
        model=common_pb2.ModelRef(name="fraud", version=version), review_threshold=0.5, block_threshold=0.9)
    rec = fb.FeedbackRecord(record_id=f"fraud-1-s{i:09d}", domain="fraud")
    s = rec.served
    s.prediction_id, s.served_at = pid, at
    s.model.name, s.model.version = "fraud", version
    fill_tensor(s.inputs.add(), "features", x.reshape(1, -1).astype(np.float32))
    fill_tensor(s.outputs.add(), "probability", np.array([[p]], np.float32))
    s.request.Pack(request)
    s.response.Pack(response)
    return rec


def outcome_record(i: int, pid: str, is_fraud: bool, at: float) -> fb.FeedbackRecord:
    o = feedback_outcome(fraud_pb2.FraudOutcome(prediction_id=pid, is_fraud=is_fraud, occurred_at=at,
                                                source="chargeback"), at, at)
    return fb.FeedbackRecord(record_id=f"fraud-1-o{i:09d}", domain="fraud", outcome=o)


def test_the_event_log_stays_bounded_while_the_loop_learns_for_many_rounds(tmp_path):
    registry, _, data = bootstrap_small_fraud(tmp_path)
    s = TrainerSettings(workdir=str(tmp_path / "trainer"), registry_dir=str(registry.root), domains="fraud",
                        windows=f"fraud={WINDOW_S:g}", join_grace_s=5.0, retention_slack_s=SLACK_S,
                        min_events=ROUND_LABELS, max_interval_s=1e9, delivery="direct", adv_epsilon=0.0,
                        gate_min_positives="fraud=5", gate_min_rows="fraud=1000", gate_resamples=200,
                        gc_keep_last=3, gc_min_age_s=0.0, report_interval_s=0.0)
    policy = s.retention_policy()
    log = SqliteEventLog(s.event_log_path)
    loop = DomainLoop("fraud", log, registry, s)
    learner = loop.learner
    rows = np.arange(TRANSACTIONS) % 20_000 + 40_000
    pid = [f"p{i:09d}" for i in range(TRANSACTIONS)]
    expected_labels = 0
    appended_payload = 0
    sizes: list[int] = []
    decisions: list[str] = []
    versions_on_disk: list[int] = []
    try:
        for tick, start in enumerate(range(0, TRANSACTIONS, TICK)):
            now = T0 + (start + TICK) * DT
            batch = range(start, start + TICK)
            X = data.X[rows[batch]]
            version = registry.current_version("fraud")
            p = learner.model.predict(learner.net if learner.champion is None else learner.champion, X)
            records = [served_record(i, pid[i], X[k], float(p[k]), version, T0 + i * DT) for k, i in enumerate(batch)]
            for j in range(start - LAG, start + TICK - LAG):  # labels of predictions served LAG earlier
                if j >= 0 and j % UNLABELED_EVERY:
                    records.append(outcome_record(j, pid[j], bool(data.y[rows[j]]), T0 + (j + LAG) * DT))
                    expected_labels += 1
            results = log.append_batch(records)
            assert all(r.status == STORED for r in results)
            appended_payload += sum(r.ByteSize() for r in records)
            # the trainer's domain loop, step by step: poll the joiner, learn, a round when due
            # (it commits the learner's checkpointed progress as consumer learner-fraud), gc
            joined = loop.joiner.poll(4096)
            assert loop.joiner.position == log.end_offset()  # caught up: one poll reads a tick
            learner.add(learner.model.examples(joined))
            if learner.due():
                entry = loop._round(loop.joiner.checkpoint())
                decisions.append(entry["decision"])
                loop.collect_garbage()
                versions_on_disk.append(len(registry.versions("fraud")))
            if tick % RETAIN_EVERY == RETAIN_EVERY - 1:
                committed, meta = log.committed("learner-fraud")
                above = [e.offset for e in log.read(committed, 10**6)]
                pending_labels = log.read(committed, 10**6, kind=OUTCOME)
                report = log.retain(policy, now=now)
                # nothing a consumer has not processed went: every event after the committed offset is
                # still there, and so is the prediction of every label not yet processed
                assert report.dropped_unprocessed == 0
                assert report.safe_offsets["fraud"] == (committed, "learner-fraud")
                assert [e.offset for e in log.read(committed, 10**6)] == above
                wanted = {e.prediction_id for e in pending_labels}
                assert set(log.served_for(wanted, domain="fraud")) == wanted
                sizes.append(report.bytes_before)  # the peak: what accumulated since the last pass
        # the whole stream was learned, each label once (none late, duplicate or unmatched)
        assert loop.joiner.stats()["matched"] == expected_labels
        assert learner.labels_seen + len(learner.pending) == expected_labels
        assert len(decisions) >= 8 and "published" in decisions, decisions
        # what stays: predictions waiting for their label, unlabeled ones inside the window, and
        # what the learner has not checkpointed yet; everything older went
        committed, _ = log.committed("learner-fraud")
        assert log.count(kind=SERVED) < LAG + (WINDOW_S + policy.slack_s) / DT / UNLABELED_EVERY + \
            (log.end_offset() - committed) + RETAIN_EVERY * TICK
    finally:
        log.close()
    # bounded: under the bound at every pass (the largest is before the first round: nothing is
    # processed yet), no higher in the second half than in the first, while the records appended
    # were about twice the bound and 4x the log's size once retention runs
    assert appended_payload > 1.8 * BOUND, appended_payload
    assert sizes[-1] < appended_payload / 4, (sizes[-1], appended_payload)
    assert max(sizes) < BOUND, sizes
    half = len(sizes) // 2
    assert max(sizes[half:]) <= 1.25 * max(sizes[1:half]), sizes
    # and the registry: gc after each round keeps the champion, its rollback target and the last 3
    assert max(versions_on_disk) <= 6, versions_on_disk


def test_a_label_not_yet_processed_keeps_its_prediction_past_the_window(tmp_path):
    with SqliteEventLog(tmp_path / "events.db") as log:
        log.append_batch([served_record(0, "p0", np.zeros(29, np.float32), 0.01, "1", T0)])  # offset 1
        log.commit_offset("learner-fraud", 1, {"domain": "fraud", "offset": 1, "pending": []})
        log.append_batch([outcome_record(0, "p0", True, T0 + 100)])  # offset 2: inside the 120 s window
        log.retain(RetentionPolicy(windows={"fraud": 120.0}, slack_s=10.0, learned_domains=frozenset({"fraud"})),
                   now=T0 + 200)
        # the learner has not processed offset 2: after a restart its joiner needs p0 to learn that label
        assert set(log.served_for(["p0"], domain="fraud")) == {"p0"}
