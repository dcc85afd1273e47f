"""Drift that acts and is visible: the loss-window detector against its frozen pre-drift level
(alarms on a rise, holds until recovery, never re-baselines on a blind model, quiet on a
stationary heavy-tailed stream), its counter and log lines, the learner's action while in
drift (real learner, real creditcard rows), and the learning report's drift span."""
import logging

import numpy as np
import pytest
from prometheus_client import REGISTRY

from tests.fraud_fixtures import TRAIN_ROWS, bootstrap_small_fraud
from trainer import report
from trainer.drift import LossDrift
from trainer.learner import Examples, LearnerConfig


def fraud_like_losses(rng, n, fraud_rate=0.0017, legit=0.0015, missed=1.7):
    """Per-label log loss shaped like the served fraud model's on the creditcard stream (mean
    ~0.004, sd ~0.1): small on legitimate rows, a heavy tail on the rare frauds."""
    loss = rng.exponential(legit, n)
    frauds = rng.random(n) < fraud_rate
    loss[frauds] = rng.exponential(missed, int(frauds.sum()))
    return loss


def feed(det, losses, step=100):
    for i in range(0, len(losses), step):
        det.update_many(losses[i:i + step])


def alarms_of(model):
    return REGISTRY.get_sample_value("storefront_trainer_drift_alarms_total", {"model": model}) or 0.0


def test_alarms_on_an_abrupt_rise_and_holds_until_the_loss_is_back(caplog):
    rng = np.random.default_rng(1)
    det = LossDrift("test-rise")
    before = alarms_of("test-rise")
    feed(det, fraud_like_losses(rng, 30_000))
    assert not det.in_drift and det.alarms == 0
    with caplog.at_level(logging.INFO, logger="trainer.drift"):
        # the served model got much worse: 5x the loss on legitimate rows, twice the frauds missed harder
        feed(det, fraud_like_losses(rng, 5000, legit=0.02, missed=6.0, fraud_rate=0.004))
        assert det.in_drift and det.alarms == 1
        alarm_at = det.drift_since
        assert alarm_at - 30_000 <= det.window  # caught within one window
        ref = det.ref_mean
        feed(det, fraud_like_losses(rng, 20_000, legit=0.02, missed=6.0, fraud_rate=0.004))
        # still high: still in drift, against the same pre-drift reference
        assert det.in_drift and det.alarms == 1 and det.ref_mean == ref and det.labels_in_drift == det.labels - alarm_at
        feed(det, fraud_like_losses(rng, 10_000))  # recovered
        assert not det.in_drift and det.cleared_at is not None
    assert alarms_of("test-rise") - before == 1
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    info = [r for r in caplog.records if r.levelno == logging.INFO and "drift over" in r.getMessage()]
    assert len(warn) == 1 and len(info) == 1
    msg = warn[0].getMessage()
    assert f"{ref:.5f}" in msg and "pre-drift reference" in msg and "labels since" in msg and "test-rise" in msg
    assert "after" in info[0].getMessage() and "labels in drift" in info[0].getMessage()


def test_quiet_on_a_stationary_heavy_tailed_stream():
    rng = np.random.default_rng(0)
    det = LossDrift("test-stationary")  # the learner's defaults
    feed(det, fraud_like_losses(rng, 300_000), step=4096)  # batches as the trainer's poll delivers them
    assert det.alarms == 0 and not det.in_drift
    assert det.ref_mean == pytest.approx(0.0017 * 1.7 + 0.9983 * 0.0015, rel=0.3)


def test_a_blind_frozen_model_stays_in_drift_against_the_pre_drift_level():
    rng = np.random.default_rng(2)
    det = LossDrift("test-frozen")
    calm, blind = fraud_like_losses(rng, 25_000), fraud_like_losses(rng, 150_000, legit=0.03, missed=8.0, fraud_rate=0.004)
    feed(det, calm)
    in_drift = []
    for i in range(0, len(blind), 500):
        det.update_many(blind[i:i + 500])
        in_drift.append(det.in_drift)
    # from the alarm on, in drift at every check to the end, one alarm, reference never moved
    first = in_drift.index(True)
    assert first <= 10 and all(in_drift[first:]) and det.alarms == 1
    assert det.ref_mean < 0.02 < det.recent_mean


def test_update_one_by_one_equals_batches():
    rng = np.random.default_rng(3)
    losses = np.concatenate([fraud_like_losses(rng, 8000), fraud_like_losses(rng, 3000, legit=0.05)])
    a, b = LossDrift("test-a", window=1000, min_reference=3000), LossDrift("test-b", window=1000, min_reference=3000)
    for v in losses:
        a.update(float(v))
    b.update_many(losses)
    assert a.figures() == b.figures() and a.alarms == b.alarms == 1


@pytest.mark.parametrize("bad", [dict(window=5), dict(min_reference=0), dict(z=-1), dict(check_every=0)])
def test_rejects_nonsense_settings(bad):
    with pytest.raises(ValueError):
        LossDrift("test-bad", **bad)


def broken(learner, X):
    """What a broken serving version answers: the fixture model's scores inverted. Its loss is
    many times the calm level on every row (the fixture's briefly trained model is too poorly
    calibrated for a feature change to move its loss reliably)."""
    return 1.0 - learner.model.predict(learner.net, X)


@pytest.fixture
def drifting_learner(tmp_path):
    """A real fraud learner whose detector has seen a calm stretch, then a drift (served by the
    broken serving version), so it is in drift now."""
    config = LearnerConfig(min_events=100, epochs=1, drift_window=500, drift_lr_factor=3.0, drift_epochs=2)
    registry, learner, data = bootstrap_small_fraud(tmp_path, config)
    learner.drift.min_reference = 3000  # the fixture's stream is short
    start, offset = TRAIN_ROWS + 10_000, 1
    X, y = data.X[start:start + 6000], data.y[start:start + 6000]
    learner.add(Examples(X, y, learner.model.predict(learner.net, X), np.arange(offset, offset + 6000)))
    learner.round({"offset": 6000, "pending": []})
    assert not learner.drift.in_drift and learner.decisions.read()[-1]["adaptation"]["adapting"] is False
    X2, y2 = data.X[start + 6000:start + 8000], data.y[start + 6000:start + 8000]
    learner.add(Examples(X2, y2, broken(learner, X2), np.arange(6001, 8001)))
    assert learner.drift.in_drift and learner.drift.alarms == 1
    return learner, data


def test_the_learner_adapts_its_rounds_while_in_drift(drifting_learner):
    learner, data = drifting_learner
    lr = [g["lr"] for g in learner.opt.param_groups]
    entry = learner.round({"offset": 8000, "pending": []})
    assert entry["drift"] is True
    a = entry["adaptation"]
    assert a == {"adapting": True, "replay_ratio": 1.0, "recent_since_offset": a["recent_since_offset"], "epochs": 2,
                 "lr_factor": 3.0, "gate_min_positives": 10}
    # the drift span's rows start with the alarm's window (the 500 labels up to the alarm, raised in
    # the broken version's stretch 6001-8000; label n has offset n + 1): nothing older is trained on
    # or replayed in this round
    alarm_label = learner.drift.drift_since
    assert 6000 < alarm_label <= 8000 and a["recent_since_offset"] == alarm_label - 500 + 1
    assert entry["trained_new_rows"] <= 8000 - a["recent_since_offset"] + 1
    assert entry["replayed_rows"] <= entry["trained_new_rows"]
    # the gate's window holds rows of the drift span only (and 10 positives suffice there): it judges
    # on the new concept; the older rows left it
    assert entry["evidence"]["min_positives"] == 10 and learner.window.offsets.min() >= a["recent_since_offset"]
    d = entry["drift_detector"]
    assert d["in_drift"] and d["alarms"] == 1 and d["recent_loss"] > 2 * d["reference_loss"]
    # the higher step size was for that round only: the kept optimizer has its own
    assert [g["lr"] for g in learner.opt.param_groups] == lr
    # the same state with the action off: rounds train as usual, still marked as in drift
    learner.config.drift_adapt = False
    X, y = data.X[TRAIN_ROWS + 18_000:TRAIN_ROWS + 18_500], data.y[TRAIN_ROWS + 18_000:TRAIN_ROWS + 18_500]
    learner.add(Examples(X, y, broken(learner, X), np.arange(8001, 8501)))
    entry = learner.round({"offset": 8500, "pending": []})
    assert entry["drift"] is True and entry["adaptation"] == {"adapting": False, "replay_ratio": 1.0,
                                                              "recent_since_offset": None, "epochs": 1,
                                                              "lr_factor": 1.0, "gate_min_positives": None}
    # a round outside the drift action steps at the config's lr_factor of the model's own rate
    # (the recommender's rounds: TrainerDomain.round_lr_factor), the kept optimizer unchanged
    learner.config.lr_factor = 0.25
    seen, train = [], learner.model.train

    def recording(net, opt, X, y, epochs, seed):
        seen.append([g["lr"] for g in opt.param_groups])
        return train(net, opt, X, y, epochs, seed)

    learner.model.train = recording
    learner.config.gate_min_positives = 1  # the window lets rows go to training at once
    X, y = data.X[TRAIN_ROWS + 18_500:TRAIN_ROWS + 20_500], data.y[TRAIN_ROWS + 18_500:TRAIN_ROWS + 20_500]
    learner.add(Examples(X, y, broken(learner, X), np.arange(8501, 10_501)))
    entry = learner.round({"offset": 10_500, "pending": []})
    assert entry["adaptation"]["lr_factor"] == 0.25 and entry["trained_new_rows"] > 0
    assert seen == [[0.25 * x for x in lr]] and [g["lr"] for g in learner.opt.param_groups] == lr


def test_the_report_marks_the_drift_span(drifting_learner, tmp_path):
    learner, _ = drifting_learner
    learner.round({"offset": 8000, "pending": []})
    entries = learner.decisions.read()
    spans = report.drift_spans(entries)
    assert len(spans) == 1 and spans[0]["ongoing"] and spans[0]["rounds"] == 1
    assert spans[0]["reference_loss"] < spans[0]["peak_recent_loss"]
    # a later calm round closes the span
    closed = report.drift_spans(entries + [{**entries[-1], "time": entries[-1]["time"] + 60, "drift": False}])
    assert not closed[0]["ongoing"] and closed[0]["end"] == entries[-1]["time"] + 60
    png, page = report.write_report(learner.decisions.path, tmp_path / "reports", "fraud")
    text = page.read_text()
    assert "<h2>Drift</h2>" in text and "ongoing" in text and "<th>drift</th>" in text
    assert png.stat().st_size > 10_000
