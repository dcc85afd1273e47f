"""The gate: champion vs challenger on the same recent rows neither trained on, a paired
bootstrap that refuses "worse with confidence", and "deferred" when the window cannot tell.

Real learners on real creditcard rows: a candidate whose working weights learned flipped
labels, or were noised, is refused and the learner goes back to the champion; after an
injected drift (the strongest features change sign) the stale champion loses and a challenger
that learned the new concept is published; a window with too few frauds defers (learning
goes on, nothing is published) and survives a restart. The rule itself on plain arrays."""
from __future__ import annotations

import functools
import shutil

import numpy as np
import pytest
import torch

from shared.registry import ModelRegistry
from trainer import gate
from trainer.domains import fraud
from trainer.learner import Examples, Learner, LearnerConfig

BOOT_ROWS, HOLDOUT_ROWS = 40_000, 20_000  # rows 0..40k train v1, the next 20k are its holdout
STREAM = BOOT_ROWS + HOLDOUT_ROWS  # the stream the learner sees starts here
# the features that separate frauds best on this data; the injected drift flips their sign
DRIFTED = [fraud.FEATURES.index(f) for f in ("V4", "V10", "V11", "V12", "V14", "V17")]


def config(**kw) -> LearnerConfig:
    return LearnerConfig(epochs=1, **kw)


def model() -> fraud.FraudModel:
    # adversarial training makes every update several times slower and is not what is tested here
    return fraud.FraudModel(adv_epsilon=0.0)


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    """v1 bootstrapped once from real rows; each test learns in its own copy of the folders."""
    root = tmp_path_factory.mktemp("gate-boot")
    data = fraud.load_creditcard(limit=120_000)
    learner = Learner(model(), ModelRegistry(root / "registry"), root / "trainer", config())
    learner.bootstrap(data.X[:BOOT_ROWS], data.y[:BOOT_ROWS], data.X[BOOT_ROWS:STREAM], data.y[BOOT_ROWS:STREAM],
                      epochs=2)
    return root, data


@pytest.fixture
def world(boot, tmp_path):
    root, data = boot
    for sub in ("registry", "trainer"):
        shutil.copytree(root / sub, tmp_path / sub)
    registry = ModelRegistry(tmp_path / "registry")
    learner = Learner(model(), registry, tmp_path / "trainer", config())
    assert learner.restore()
    return tmp_path, registry, learner, data


def rows(data, start, n, first_offset, drift=False) -> Examples:
    X = data.X[start:start + n].copy()
    if drift:
        X[:, DRIFTED] *= -1.0
    return Examples(X, data.y[start:start + n].copy(), np.full(n, np.nan, np.float32),
                    np.arange(first_offset, first_offset + n, dtype=np.int64))


def copy_net(learner: Learner) -> torch.nn.Module:
    net = learner.model.new_network(np.zeros((1, learner.model.width), np.float32))
    net.load_state_dict(learner.net.state_dict())
    return net


def test_the_window_starts_with_the_bootstrap_holdout_sized_for_30_frauds(world):
    _, _, learner, data = world
    w = learner.window
    assert int(w.y.sum()) == 30 and 2000 <= len(w) < HOLDOUT_ROWS  # the newest holdout rows with 30 frauds
    np.testing.assert_array_equal(w.X, data.X[STREAM - len(w):STREAM])  # rows v1 never trained on


def test_a_candidate_that_learned_flipped_labels_is_refused(world):
    _, registry, learner, data = world
    champion = learner.net
    bad = copy_net(learner)
    opt = learner.model.optimizer(bad)
    # the working weights learned a feed whose labels were flipped (say, over deferred rounds)
    learner.model.train(bad, opt, data.X[STREAM:STREAM + 20_000], 1.0 - data.y[STREAM:STREAM + 20_000], epochs=2,
                        seed=0)
    learner.champion, learner.net, learner.opt = champion, bad, opt
    learner.add(rows(data, STREAM, 1000, 1))
    entry = learner.round({"offset": 1000, "pending": []})
    assert entry["decision"] == "refused", entry["evidence"]
    ev = entry["evidence"]
    assert ev["tier"] == "storefront" and ev["window_positives"] >= 30 and ev["window_rows"] >= 2000
    pr = ev["metrics"]["pr_auc"]
    assert pr["worse_with_confidence"] and pr["interval"][1] < -0.02 and pr["challenger"] < pr["champion"]
    assert any("pr_auc" in r and "worse than serving" in r for r in entry["reasons"])
    assert registry.current_version("fraud") == "1"
    # the learner is back on the champion's weights
    assert learner.champion is None
    X = data.X[:200]
    np.testing.assert_array_equal(learner.model.predict(learner.net, X), learner.model.predict(champion, X))
    logged = learner.decisions.read()[-1]
    assert logged["decision"] == "refused" and logged["evidence"]["metrics"]["pr_auc"]["interval"] == pr["interval"]


def test_a_candidate_with_noised_weights_is_refused(world):
    _, registry, learner, data = world
    champion = learner.net
    noisy = copy_net(learner)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.mlp.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std())
    learner.champion, learner.net, learner.opt = champion, noisy, learner.model.optimizer(noisy)
    learner.add(rows(data, STREAM, 1000, 1))
    entry = learner.round({"offset": 1000, "pending": []})
    assert entry["decision"] == "refused", entry["evidence"]
    assert any(r["worse_with_confidence"] for r in entry["evidence"]["metrics"].values())
    assert registry.current_version("fraud") == "1" and learner.champion is None


def test_after_a_drift_a_challenger_that_learned_the_new_concept_is_published(world):
    _, registry, learner, data = world
    offset, better = 1, None
    for start in range(STREAM, 120_000 - 8000 + 1, 8000):  # the stream after an abrupt concept change
        learner.add(rows(data, start, 8000, offset, drift=True))
        offset += 8000
        entry = learner.round({"offset": offset - 1, "pending": []})
        assert entry["decision"] in ("published", "refused", "deferred")
        pr = entry["evidence"]["metrics"]["pr_auc"]
        if entry["decision"] == "published" and pr["interval"][0] > 0:
            better = entry
            break
    assert better is not None, "no challenger beat the stale champion with confidence"
    pr = better["evidence"]["metrics"]["pr_auc"]
    assert pr["challenger"] > pr["champion"]
    m = registry.manifest("fraud", better["version"])
    assert registry.current_version("fraud") == better["version"]
    assert m.extra["gate"]["evidence"]["metrics"]["pr_auc"]["interval"] == pr["interval"]
    assert m.extra["gate"]["evidence"]["window_positives"] >= 30


def test_too_few_frauds_defer_and_nothing_is_published_blindly(world):
    root, registry, learner, data = world
    # a window that starts empty (a bootstrap without a holdout, or one of another population)
    learner.window = Examples.empty(learner.model.width)
    chunk = rows(data, STREAM, 2500, 1)
    assert int(chunk.y.sum()) < 5  # real rows: one fraud in these 2,500 transactions
    before = learner.model.predict(learner.net, data.X[:200])
    learner.add(chunk)
    entry = learner.round({"offset": 2500, "pending": []})
    assert entry["decision"] == "deferred" and "cannot tell yet" in entry["reasons"][0]
    assert entry["evidence"]["window_positives"] < 5 and entry["evidence"]["decided_on"] == []
    assert registry.current_version("fraud") == "1"  # nothing published blindly
    assert learner.champion is not None  # v1 still judges the next candidate
    # the window keeps every row it holds out of training: nothing was trained on this round
    assert len(learner.window) == 2500 and entry["trained_rows"] == 0
    np.testing.assert_array_equal(learner.model.predict(learner.champion, data.X[:200]), before)
    # a restart restores the window and the champion exactly
    again = Learner(model(), registry, root / "trainer", config())
    assert again.restore()
    np.testing.assert_array_equal(again.window.offsets, learner.window.offsets)
    np.testing.assert_array_equal(again.model.predict(again.champion, data.X[:200]), before)


# ---------------------------------------------------------------- the rule on plain arrays
def spec(min_positives=30, min_rows=100, fallback_positives=5) -> gate.GateSpec:
    return fraud.gate_spec().__class__(
        metrics=fraud.gate_spec().metrics, positive=lambda y: y > 0.5, min_positives=min_positives,
        min_rows=min_rows, max_rows=100_000, fallback=fraud.gate_spec().fallback,
        fallback_positives=fallback_positives)


def synthetic(n=5000, frauds=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.zeros(n, np.float32)
    y[rng.choice(n, frauds, replace=False)] = 1
    p = np.clip(rng.beta(1, 30, n) + y * rng.beta(4, 2, n), 0, 1).astype(np.float32)
    return y, p


def test_identical_predictions_are_never_worse_nor_better():
    y, p = synthetic()
    decision, reasons, ev = gate.decide(spec(), y, p, p.copy(), gate.GateRule(), seed=1)
    # a tie does not beat the champion: deferred (a tie published is worse on the next window half the time)
    assert decision == "deferred" and "not better with confidence" in reasons[0] and ev["min_gain"] == 0.0
    for m in ev["metrics"].values():
        assert m["relative_difference"] == 0 and m["interval"] == [0.0, 0.0] and not m["worse_with_confidence"]
    # without the must-beat bar a tie passes (only the refusal and the point rule remain)
    assert gate.decide(spec(), y, p, p.copy(), gate.GateRule(min_gain=None), seed=1)[:2] == ("published", [])


def test_only_a_challenger_better_with_confidence_is_published():
    y, p = synthetic()
    fast = functools.partial(gate.GateRule, resamples=200)  # the figures below hold at 200 resamples
    # the champion lost most of the frauds' scores; the challenger has them: clearly better
    weak = np.where(y > 0.5, p * 0.3, p).astype(np.float32)
    decision, reasons, ev = gate.decide(spec(), y, weak, p, fast(), seed=1)
    pr = ev["metrics"]["pr_auc"]
    assert decision == "published" and reasons == [] and pr["interval"][0] > 0, pr
    # a bar above the gain it shows defers it (the interval's lower end is the evidence, not the point)
    high = fast(min_gain=pr["publish_interval"][0] + 0.01)
    decision, reasons, _ = gate.decide(spec(), y, weak, p, high, seed=1)
    assert decision == "deferred" and "not better with confidence yet" in reasons[0]
    # a gain on two frauds only is not evidence enough: deferred; a negative bar (not worse than 2 %
    # with confidence) publishes it
    behind = p.copy()
    behind[np.flatnonzero(y > 0.5)[:2]] = 0.02
    decision, _, ev = gate.decide(spec(), y, behind, p, fast(), seed=1)
    assert decision == "deferred" and ev["metrics"]["pr_auc"]["relative_difference"] > 0
    assert gate.decide(spec(), y, behind, p, fast(min_gain=-0.02), seed=1)[0] == "published"
    # a worse challenger is still refused first, whatever the bar
    worse = np.where(y > 0.5, p * 0.3, p).astype(np.float32)
    assert gate.decide(spec(), y, p, worse, fast(min_gain=-0.5), seed=1)[0] == "refused"
    for bad in (-1.0, 1.0):
        with pytest.raises(ValueError):
            fast(min_gain=bad).validate()


def test_the_must_beat_bar_reads_the_wider_publish_interval_and_the_refusal_the_narrower():
    y, p = synthetic()
    fast = functools.partial(gate.GateRule, resamples=200)
    assert fast().publish_confidence == 0.99 and fast().confidence == 0.95
    # a champion that lost k frauds' scores: the smallest k whose gain the 95 % interval shows
    # but the 99 % one does not is deferred by default, published when the bar reads 95 %
    for k in range(2, 16):
        champion = p.copy()
        champion[np.flatnonzero(y > 0.5)[:k]] = 0.02
        _, _, ev = gate.decide(spec(), y, champion, p, fast(), seed=1)
        pr = ev["metrics"]["pr_auc"]
        if pr["interval"][0] > 0 >= pr["publish_interval"][0]:
            break
    else:
        pytest.fail("no challenger between the two intervals' bars")
    assert pr["publish_interval"][0] <= pr["interval"][0] <= pr["interval"][1] <= pr["publish_interval"][1]
    decision, reasons, ev = gate.decide(spec(), y, champion, p, fast(), seed=1)
    assert decision == "deferred" and "99% interval" in reasons[0] and ev["publish_confidence"] == 0.99
    for same in (0.95, None):  # None: the bar reads the refusal's interval
        assert gate.decide(spec(), y, champion, p, fast(publish_confidence=same), seed=1)[0] == "published"
    # the refusal keeps reading the 95 % interval
    worse = np.where(y > 0.5, p * 0.3, p).astype(np.float32)
    decision, reasons, _ = gate.decide(spec(), y, p, worse, fast(), seed=1)
    assert decision == "refused" and "95% interval" in reasons[0]
    for bad in (0.5, 1.0):
        with pytest.raises(ValueError):
            fast(publish_confidence=bad).validate()


def test_a_clearly_worse_challenger_is_refused_and_a_slightly_different_one_is_not():
    y, p = synthetic()
    rng = np.random.default_rng(2)
    worse = np.where(y > 0.5, p * 0.3, p).astype(np.float32)  # frauds lose most of their score
    decision, reasons, ev = gate.decide(spec(), y, p, worse, gate.GateRule(), seed=1)
    assert decision == "refused" and ev["metrics"]["pr_auc"]["interval"][1] < -0.02
    jitter = np.clip(p + rng.normal(0, 1e-4, len(p)), 0, 1).astype(np.float32)
    assert gate.decide(spec(), y, p, jitter, gate.GateRule(), seed=1)[0] != "refused"
    assert gate.decide(spec(), y, p, jitter, gate.GateRule(publish_margin=None, min_gain=None), seed=1)[0] == "published"


def test_a_challenger_behind_on_the_window_but_not_worse_with_confidence_is_deferred_not_published():
    y, p = synthetic()
    behind = p.copy()
    behind[np.flatnonzero(y > 0.5)[:2]] = 0.02  # two frauds fall among the legitimate scores
    decision, reasons, ev = gate.decide(spec(), y, p, behind, gate.GateRule(), seed=1)
    pr = ev["metrics"]["pr_auc"]
    assert pr["relative_difference"] < 0 and not pr["worse_with_confidence"]  # the confidence rule lets it pass
    assert decision == "deferred" and ev["publish_margin"] == 0.0
    # without the must-beat bar, the point rule is what defers it
    rule = gate.GateRule(min_gain=None)
    decision, reasons, _ = gate.decide(spec(), y, p, behind, rule, seed=1)
    assert decision == "deferred" and "not better yet" in reasons[0]
    # a margin wider than the gap, or no point rule, publishes it; the reverse comparison publishes
    assert gate.decide(spec(), y, p, behind, gate.GateRule(publish_margin=0.05, min_gain=None), seed=1)[0] == "published"
    assert gate.decide(spec(), y, p, behind, gate.GateRule(publish_margin=None, min_gain=None), seed=1)[0] == "published"
    assert gate.decide(spec(), y, behind, p, rule, seed=1)[0] == "published"
    with pytest.raises(ValueError):
        gate.GateRule(publish_margin=-0.1).validate()


def test_the_decision_is_deferred_below_the_window_sizes_and_falls_back_between():
    y, p = synthetic(n=5000, frauds=3)
    assert gate.decide(spec(), y, p, p, gate.GateRule(), seed=0)[0] == "deferred"  # 3 < 5 frauds
    y, p = synthetic()
    assert gate.decide(spec(min_rows=10_000), y, p, p, gate.GateRule(), seed=0)[0] == "deferred"  # too few rows
    y, p = synthetic(n=5000, frauds=12)
    decision, _, ev = gate.decide(spec(), y, p, p, gate.GateRule(min_gain=None), seed=0)
    assert decision == "published" and ev["tier"] == "fallback" and ev["decided_on"] == ["log_loss"]
    # under must-beat the fallback refuses a collapse but never ships: even a much better log loss waits
    # for the positives the storefront metrics need
    sharper = np.where(y > 0.5, np.maximum(p, 0.9), p * 0.5).astype(np.float32)
    decision, reasons, ev = gate.decide(spec(), y, p, sharper, gate.GateRule(), seed=0)
    assert ev["tier"] == "fallback" and ev["metrics"]["log_loss"]["interval"][0] > 0
    assert decision == "deferred" and "storefront metrics need 30 positives (12 in the window)" in reasons[0]
    collapsed = np.where(y > 0.5, 0.01, 0.6).astype(np.float32)
    assert gate.decide(spec(), y, p, collapsed, gate.GateRule(), seed=0)[0] == "refused"


def test_the_bootstrap_is_paired_seeded_and_stratified():
    y, p = synthetic()
    worse = np.where(y > 0.5, p * 0.8, p).astype(np.float32)
    a = gate.compare(spec().metrics, y, p, worse, y > 0.5, gate.GateRule(), seed=7)
    b = gate.compare(spec().metrics, y, p, worse, y > 0.5, gate.GateRule(), seed=7)
    assert a == b  # a fixed seed per round: the same evidence decides the same way
    W = gate.stratified_weights(y > 0.5, 200, np.random.default_rng(0))
    assert (W[:, y > 0.5].sum(1) == (y > 0.5).sum()).all() and (W.sum(1) == len(y)).all()


def test_vectorised_metrics_match_the_reference_implementations():
    y, p = synthetic(n=3000, frauds=40, seed=3)
    p = np.round(p, 2)  # ties, as real scores have
    ones = np.ones((1, len(y)))
    assert gate.average_precision_fn(y, p, ones)[0] == pytest.approx(fraud.pr_auc(y, p), abs=1e-12)
    assert gate.recall_at_fpr_fn(0.01)(y, p, ones)[0] == pytest.approx(fraud.recall_at_fpr(y, p, 0.01), abs=1e-12)
    # a resample's counts weigh rows exactly like repeating them
    W = gate.stratified_weights(y > 0.5, 1, np.random.default_rng(1))
    rep = np.repeat(np.arange(len(y)), W[0].astype(int))
    assert gate.average_precision_fn(y, p, W)[0] == pytest.approx(fraud.pr_auc(y[rep], p[rep]), abs=1e-12)


def test_the_window_is_the_newest_rows_the_metric_needs():
    pos = np.zeros(100, bool)
    pos[[10, 50, 90]] = True
    assert gate.window_start(pos, 2, 5, 1000) == 50  # the newest rows holding 2 positives
    assert gate.window_start(pos, 2, 70, 1000) == 30  # ... and at least 70 rows
    assert gate.window_start(pos, 5, 5, 1000) == 0  # not enough positives: all of it stays
    assert gate.window_start(pos, 5, 5, 40) == 60  # ... up to the cap
