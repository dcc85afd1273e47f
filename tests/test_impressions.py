"""The recommender learns from what it showed (issue 16).

Joiner level, over a real SQLite event log: every item a served record lists and no outcome names
becomes an EVENT_IMPRESSION label once the label window has closed (not before), at its served
place; explicit impressions replace the derived ones for that response; a restored joiner asks no
served record twice; the log's size cap keeps the served records (and their outcomes) whose
impressions are not derived yet.

Learning: a real catalog of product titles (the real text encoder), a first version published by
the real learner, then rounds in which each customer is served the exported ONNX model's top 10
and clicks one of the ten (the first it really likes). The served records and clicks go through a
real event log and joiner into Learner.round. After a few rounds the mean served click probability
is within 0.05 of the observed click rate (0.1), where a learner fed the clicks alone stays far
above it; its HR@10 of the customers' liked items does not drop below that learner's.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.impressions import K, T0, USERS, WINDOW, Clock, append, impression_loop, outcome_record, served_record
from protos.feedback.v1 import feedback_pb2 as fb
from protos.recommender.v1 import recommender_pb2 as rec
from shared.text import TextEncoder
from tests.recommender_fixtures import exported_text_encoder
from trainer.domains.recommender import RecommenderModel
from trainer.domains.recommender_data import COL_POSITION, LEVEL_IMPRESSION, LEVEL_PURCHASE
from trainer.domains.recommender_plugin import served_impressions
from trainer.eventlog import OUTCOME, SERVED, RetentionPolicy, SqliteEventLog
from trainer.joiner import Joiner
from trainer.report import calibration_rows, calibration_table, render_html


@pytest.fixture
def log(tmp_path: Path):
    with SqliteEventLog(tmp_path / "events.db") as lg:
        yield lg


def test_shown_and_not_clicked_items_become_impressions_when_the_window_closes(log):
    shown = ["a", "b", "c", "d"]
    append(log, [served_record("p1", "u1", T0, shown, [0.4, 0.3, 0.2, 0.1]),
                 outcome_record("p1", "c", rec.EVENT_CLICK, T0 + 5),
                 outcome_record("p1", "c", rec.EVENT_PURCHASE, T0 + 50),
                 outcome_record("p1", "d", rec.EVENT_CLICK, T0 + WINDOW + 1)])  # late: not a click
    clock = Clock(T0 + 10)
    j = Joiner(log, {"recommender": WINDOW}, domain="recommender", grace_s=30.0, clock=clock)
    first = j.poll()
    assert [(x.label.item_id, x.label.event, x.derived) for x in first] == [
        ("c", rec.EVENT_CLICK, False), ("c", rec.EVENT_PURCHASE, False)]
    assert j.served_position == 0  # the window is open: nothing derived yet
    clock.now = T0 + WINDOW + 29  # closed, but an outcome may still be on its way to the log (grace)
    assert j.poll() == [] and j.derived == 0
    clock.now = T0 + WINDOW + 31
    derived = j.poll()
    assert [(x.label.item_id, x.label.event, x.derived, x.offset) for x in derived] == [
        ("a", rec.EVENT_IMPRESSION, True, 1), ("b", rec.EVENT_IMPRESSION, True, 1), ("d", rec.EVENT_IMPRESSION, True, 1)]
    assert all(x.label_delay_s == WINDOW and x.outcome.occurred_at == T0 for x in derived)
    assert j.late == 1 and j.derived == 3 and j.poll() == []
    # the model's rows (in log order: the impressions carry the served record's offset), each at
    # its served place, shown-only rows at the impression level
    model = RecommenderModel(encoder=lambda texts: np.zeros((len(texts), 384), np.float32))
    model.add_catalog([{"item_id": i, "title": f"item {i}", "category": "", "price": 1.0} for i in shown])
    ex = model.examples(first + derived)
    assert ex.X[:, COL_POSITION].tolist() == [1, 2, 4, 3]
    assert ex.y.tolist() == [LEVEL_IMPRESSION, LEVEL_IMPRESSION, LEVEL_IMPRESSION, LEVEL_PURCHASE]
    np.testing.assert_allclose(ex.served_p, [0.4, 0.3, 0.1, 0.2])


def test_explicit_impressions_replace_the_derived_ones_and_restores_ask_once(log):
    append(log, [served_record("p1", "u1", T0, ["a", "b", "c"], [0.3, 0.2, 0.1]),
                 served_record("p2", "u2", T0 + 1, ["a", "b", "c"], [0.3, 0.2, 0.1]),
                 outcome_record("p1", "a", rec.EVENT_IMPRESSION, T0 + 1),  # the client rendered only a
                 outcome_record("p2", "b", rec.EVENT_CLICK, T0 + 3)])
    clock = Clock(T0 + WINDOW + 100)
    j = Joiner(log, {"recommender": WINDOW}, domain="recommender", grace_s=0.0, clock=clock)
    out = j.poll()
    assert sorted((x.prediction_id, x.label.item_id, int(x.label.event), x.derived) for x in out) == [
        ("p1", "a", rec.EVENT_IMPRESSION, False), ("p2", "a", rec.EVENT_IMPRESSION, True),
        ("p2", "b", rec.EVENT_CLICK, False), ("p2", "c", rec.EVENT_IMPRESSION, True)]
    cp = j.checkpoint()
    assert cp["served_offset"] == log.end_offset()
    # a third response after the checkpoint: a restored joiner derives it alone
    append(log, [served_record("p3", "u3", T0 + 2, ["x", "y"], [0.5, 0.4])])
    again = Joiner(log, {"recommender": WINDOW}, domain="recommender", grace_s=0.0, clock=clock)
    again.restore(cp["offset"], cp["pending"], cp["served_offset"])
    assert [(x.prediction_id, x.label.item_id) for x in again.poll()] == [("p3", "x"), ("p3", "y")]
    # the plug-in alone: nothing to derive from a record that lists no items
    assert served_impressions(fb.ServedPrediction(prediction_id="p9", served_at=T0), []) == []


def test_the_size_cap_keeps_served_records_until_their_impressions_are_derived(log):
    """Retention's size cap deletes the oldest events a consumer has processed: the joiner has read
    every outcome, but the served records of an open window (and their clicks, which say which items
    were not impressions) are still to come; its commit's served_offset holds them."""
    responses = 200
    records = []
    for n in range(responses):
        shown = [f"item-{(n + k) % 50}" for k in range(K)]
        records += [served_record(f"p{n}", f"u{n}", T0 + n, shown, np.linspace(0.9, 0.1, K)),
                    outcome_record(f"p{n}", shown[n % K], rec.EVENT_CLICK, T0 + n + 2)]
    append(log, records)
    clock = Clock(T0 + responses + 10)  # every click is in; no window has closed
    j = Joiner(log, {"recommender": WINDOW}, domain="recommender", grace_s=0.0, clock=clock)
    assert len(j.poll(100_000)) == responses and j.position == log.end_offset() and j.served_position == 0
    j.commit()
    # fraud's joiner derives nothing: its served position is its read position, holding nothing back
    fraud = Joiner(log, {"recommender": WINDOW}, domain="fraud", grace_s=0.0, clock=clock)
    fraud.poll()
    assert fraud.checkpoint()["served_offset"] == fraud.position == log.end_offset()
    fraud.commit()
    policy = RetentionPolicy(windows={"recommender": WINDOW, "fraud": WINDOW}, slack_s=0.0, max_bytes=4096)
    report = log.retain(policy, now=clock.now)
    assert report.safe_offsets["recommender"] == (0, "joiner-recommender") and report.total_deleted == 0
    assert log.count("recommender", SERVED) == responses and log.count("recommender", OUTCOME) == responses
    # the windows close: each response's nine unclicked items are derived, none of the clicked ones
    clock.now = T0 + responses + WINDOW + 1
    derived = j.poll(100_000)
    assert len(derived) == responses * (K - 1) and all(x.derived for x in derived)
    assert not {(x.prediction_id, x.label.item_id) for x in derived} & {
        (f"p{n}", f"item-{(n + n % K) % 50}") for n in range(responses)}
    j.commit()
    report = log.retain(policy, now=clock.now)
    assert report.safe_offsets["recommender"][0] == log.end_offset() or log.count("recommender") == 0
    assert log.count("recommender", SERVED) < responses  # now the cap may take them


# ---------------------------------------------------------------- learning from impressions


@pytest.mark.long
def test_impressions_calibrate_the_click_probability_without_hurting_the_ranking(tmp_path):
    """The loop of bench/impressions.py (its module doc), three rounds."""
    out = impression_loop(tmp_path, TextEncoder(exported_text_encoder()[0]), rounds=3)
    f, learner, entry = out["figures"], out["learner"], out["last_entry"]
    print(json.dumps(f))
    observed, served_p = f["observed_click_rate"], f["mean_served_click_p_by_round"]
    assert observed == pytest.approx(1 / K)
    assert f["derived_impressions_by_round"] == [USERS * (K - 1)] * 3
    assert "refused" not in f["decisions"], f["decisions"]
    assert served_p[0] > 0.5  # the first version, purchases only: far from the click rate
    assert abs(served_p[-1] - observed) <= 0.05, (served_p, observed)
    assert f["clicks_only_mean_click_p"] > observed + 0.2, f
    # the learning report's per-version calibration table, from the learner's decision log
    rows = calibration_rows(learner.decisions.read())
    assert rows[0]["version"] == "1" and rows[-1]["version"] == out["final"].version
    served = [r for r in rows if "served_click_rate" in r]  # versions that served a round (not the last one)
    assert rows[-1]["gate_click_ece"] is not None and served[-1]["served_click_rate"] == pytest.approx(observed, abs=0.01)
    assert rows[0]["served_mean_served_click_p"] == pytest.approx(served_p[0], abs=1e-4)  # the first round: v1's
    assert "Click calibration per version" in render_html("recommender", learner.decisions.read(), b"")
    # ... and as the demo, the recommend load test and `python -m trainer report` print it
    table = calibration_table(learner.decisions.read())
    assert len(table) == 2 + len(rows) and table[-1].startswith(f"| {out['final'].version} | ")
    assert f"| {served[-1]['served_mean_served_click_p']:.4f} | {served[-1]['served_click_rate']:.4f} |" in "\n".join(table)
    # the learning report's figures: the prequential window of the last round holds shown items too
    preq = entry["prequential"]
    assert preq["click_rate"] == pytest.approx(observed, abs=0.01) and 0 <= preq["click_ece"] <= 1
    # HR@10 does not drop: the paired difference over the same targets is not below zero beyond
    # two of its standard errors (240 targets: one target is 0.4 points)
    assert f["hr@10_liked_not_bought"] >= f["clicks_only_hr@10_liked_not_bought"] - 2 * f["hr@10_paired_se"], f
