"""The learner on real creditcard rows: rounds publish or refuse with their figures; the
checkpoint restores exactly; the drift detector fires on a shift."""
import numpy as np
import pytest

from tests.fraud_fixtures import TRAIN_ROWS, bootstrap_small_fraud
from trainer.drift import PageHinkley
from trainer.learner import Examples, Learner, LearnerConfig
from trainer.domains.fraud import FraudModel


def examples(data, start, n, first_offset=1):
    X, y = data.X[start:start + n], data.y[start:start + n]
    return Examples(X, y, np.full(n, 0.01, np.float32), np.arange(first_offset, first_offset + n, dtype=np.int64))


@pytest.fixture
def world(tmp_path):
    # a window of 5 frauds, so a round's few thousand labels reach training (with 30 the window keeps
    # them all: the round trains nothing); no point rule nor must-beat bar: these tests are about the
    # steps after the gate (tests/test_gate.py tests the rule)
    registry, learner, data = bootstrap_small_fraud(tmp_path, LearnerConfig(min_events=100, epochs=1,
                                                                            gate_min_positives=5,
                                                                            gate_publish_margin=None,
                                                                            gate_min_gain=None))
    return tmp_path, registry, learner, data


def test_bootstrap_publishes_v1_with_calibrated_thresholds(world):
    _, registry, learner, _ = world
    m = registry.manifest("fraud", "1")
    assert m.metrics["pr_auc"] > 0.3 and m.learned_up_to == 0
    t = m.extra["thresholds"]
    assert 0 < t["review"] <= t["block"] <= 1
    assert m.extra["feature_names"][-1] == "amount" and len(m.extra["feature_names"]) == 29
    assert learner.decisions.read()[0]["decision"] == "bootstrap"


def test_a_round_publishes_a_version_that_records_what_it_learned(world):
    _, registry, learner, data = world
    learner.add(examples(data, TRAIN_ROWS + 10_000, 3000))
    assert learner.due()
    entry = learner.round({"offset": 3000, "pending": []})
    assert entry["decision"] == "published" and entry["version"] == "2"
    assert entry["onnx_parity_max_abs"] <= 1e-4 and entry["labels_seen"] == 3000
    m = registry.manifest("fraud", "2")
    assert m.learned_up_to == 3000 and m.parent == "1" and m.extra["gate"]["new_labels"] == 3000
    assert registry.current_version("fraud") == "2"


@pytest.mark.parametrize("config, words", [
    (dict(gate_margin=-1.0), "worse than serving"),  # a margin that asks for twice the champion's metric
    (dict(parity_tol=-1.0), "ONNX differs from PyTorch"),
    (dict(latency_budget_ms=0.0), "latency"),
])
def test_gate_refusals_keep_the_serving_version(world, config, words):
    _, registry, learner, data = world
    for k, v in config.items():
        setattr(learner.config, k, v)
    learner.add(examples(data, TRAIN_ROWS + 10_000, 4000))
    entry = learner.round({"offset": 4000, "pending": []})
    assert entry["decision"] == "refused" and any(words in r for r in entry["reasons"]), entry["reasons"]
    assert registry.current_version("fraud") == "1"
    assert learner.decisions.read()[-1]["decision"] == "refused"
    assert learner.labels_seen == 4000  # consumed once, even though not published


def test_checkpoint_restores_exactly(world):
    root, registry, learner, data = world
    learner.add(examples(data, TRAIN_ROWS + 10_000, 1000))
    learner.round({"offset": 1000, "pending": [999]})
    again = Learner(FraudModel(), registry, root / "trainer")
    assert again.restore()
    assert (again.offset, again.labels_seen, again.rounds) == (learner.offset, learner.labels_seen, learner.rounds)
    assert again.progress == {"offset": 1000, "pending": [999]}
    X = data.X[:50]
    np.testing.assert_allclose(again.model.predict(again.net, X), learner.model.predict(learner.net, X), rtol=1e-6)
    assert len(again.replay) == len(learner.replay) and len(again.window) == len(learner.window)
    np.testing.assert_array_equal(again.window.offsets, learner.window.offsets)


def test_page_hinkley_flags_a_shift_in_error():
    ph = PageHinkley(threshold=20.0)
    rng = np.random.default_rng(0)
    assert not any(ph.update(e) for e in rng.exponential(0.1, 2000))
    assert any(ph.update(e) for e in rng.exponential(1.0, 500))
    assert ph.in_drift and ph.alarms >= 1
