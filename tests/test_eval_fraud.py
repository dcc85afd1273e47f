"""The fraud eval's baselines and judgements on a small synthetic stream (no model of ours trains):
the weighted River logistic regression is chosen on the warm-up alone, River's AMF run is cached
by what it depends on and reused only on a match, the retrain target is judged at its margin, and
the attack's radius is converted into the features' own units."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import eval_fraud
from trainer.domains.fraud import FraudData


def stream(rows: int, seed: int = 0) -> FraudData:
    """A time-ordered stream with ~5 % frauds whose first three features carry the signal."""
    rng = np.random.default_rng(seed)
    y = (rng.random(rows) < 0.05).astype(np.float32)
    X = rng.normal(size=(rows, 29)).astype(np.float32)
    X[:, :3] += 1.5 * y[:, None]
    X[:, -1] = np.abs(X[:, -1]) * 50
    t = np.sort(rng.uniform(0, rows * 10.0, rows))
    return FraudData(X, y, t)


@pytest.fixture
def synthetic(monkeypatch):
    """Config whose rows load() answers with a synthetic stream (the eval's loader cache, by rows)."""
    data: dict = {}
    monkeypatch.setattr(eval_fraud, "_DATA", data)

    def use(d: FraudData, warmup: int) -> eval_fraud.Config:
        data[len(d)] = d
        return eval_fraud.Config(rows=len(d), warmup=warmup, delay_s=50.0, verbose=False)
    return use


def test_weighted_lr_is_chosen_on_the_warmup_alone(monkeypatch):
    # a smaller grid than the eval's (the same code path; every candidate is a River run)
    monkeypatch.setattr(eval_fraud, "RIVER_LR_WEIGHTS", (1.0, 30.0, "running"))
    monkeypatch.setattr(eval_fraud, "RIVER_LR_RATES", (0.01, 0.1))
    d = stream(900)
    X, y = eval_fraud.river_rows(d)
    W = 600
    chosen = eval_fraud.select_river_lr(X, y, d.t, W, 50.0)
    assert len(chosen["grid"]) == len(eval_fraud.RIVER_LR_WEIGHTS) * len(eval_fraud.RIVER_LR_RATES)
    best = max(g["warmup_pr_auc"] for g in chosen["grid"])
    assert next(g for g in chosen["grid"] if g["weight_pos"] == chosen["weight_pos"]
                and g["lr"] == chosen["lr"])["warmup_pr_auc"] == best
    # the scored part of the stream (labels and features after the warm-up) cannot move the choice
    y2, X2 = y.copy(), X.copy()
    y2[W:] = ~y2[W:]
    X2[W:] = 0.0
    assert eval_fraud.select_river_lr(X2, y2, d.t, W, 50.0) == chosen


def test_running_weight_is_the_class_ratio_learned_so_far():
    lr = eval_fraud.RunningWeightLR("running", 0.01)
    x = {name: 0.0 for name in eval_fraud.RIVER_FEATURES}
    for label in [False] * 30 + [True] * 3:
        lr.learn_one(x, label)
    lr.learn_one(x, False)  # the weight is set before this step: 30 legitimate / 3 frauds
    assert lr.loss.weight_pos == 10.0
    assert eval_fraud.RunningWeightLR(30.0, 0.01).loss.weight_pos == 30.0


def test_amf_run_is_cached_by_rows_and_parameters(synthetic, monkeypatch, tmp_path):
    monkeypatch.setitem(eval_fraud.AMF_PARAMS, "n_estimators", 2)
    cache = tmp_path / "amf.npz"
    cfg = synthetic(stream(700), warmup=300)
    first = eval_fraud.run_river(cfg, "river-amf", 0, "use", cache)
    assert first["cache"]["used"] is False and cache.exists()
    assert np.isfinite(first["scores"]).all() and len(first["scores"]) == 400
    again = eval_fraud.run_river(cfg, "river-amf", 0, "use", cache)
    assert again["cache"]["used"] is True and np.array_equal(again["scores"], first["scores"])
    # other rows of the same length, or other parameters: the cache does not answer, the run is redone
    other = synthetic(stream(700, seed=1), warmup=300)
    assert eval_fraud.run_river(other, "river-amf", 0, "use", cache)["cache"]["used"] is False
    monkeypatch.setitem(eval_fraud.AMF_PARAMS, "dirichlet", 0.25)
    assert eval_fraud.run_river(other, "river-amf", 0, "use", cache)["cache"]["used"] is False
    assert eval_fraud.run_river(other, "river-amf", 0, "use", cache)["cache"]["used"] is True


def comparison(a: str, b: str, diff: float, lo: float) -> dict:
    return {"a": a, "b": b, "diff_mean": diff, "ci95": [lo, diff + 0.02]}


@pytest.mark.parametrize("diff,passes", [(-0.0199, True), (-0.0201, False), (0.01, True)])
def test_retrain_target_is_judged_against_the_best_retrain_at_its_margin(diff, passes):
    comps = [comparison("incremental-mlp-adv", "retrain-hgb", diff, diff - 0.03),
             comparison("incremental-mlp-adv", "retrain-mlp", diff + 0.1, diff),
             comparison("incremental-mlp-adv", "river-amf", 0.05, -0.01)]
    t = eval_fraud.judge_targets(comps, {}, "incremental-mlp-adv", "retrain-hgb", "river-amf", 0.2)
    judged = t["within_0.02_of_best_full_retrain"]
    assert judged["best_retrain"] == "retrain-hgb" and judged["diff"] == diff and judged["pass"] is passes
    assert judged["ci_lower_within_margin"] is (diff - 0.03 >= -0.02)
    assert t["above_river_best"]["pass"] is True and t["above_river_best"]["ci_excludes_0"] is False


def test_attack_strength_in_raw_units():
    std = torch.linspace(0.5, 3.0, 29)
    mean = torch.zeros(29)
    out = eval_fraud.attack_strength([{"std": std, "mean": mean}, {"std": std.clone(), "mean": mean}], [0.2, 1.0])
    assert out["scaler_same_in_every_version"] is True
    assert out["eps0.2"]["v1_v28_max_shift_raw"]["max"] == pytest.approx(0.2 * float(std[27]), abs=1e-3)
    assert out["eps0.2"]["v1_v28_max_shift_raw"]["min"] == pytest.approx(0.1, abs=1e-3)
    assert out["eps1"]["amount_max_factor"] == pytest.approx(math.exp(3.0), abs=1e-3)
    moved = eval_fraud.attack_strength([{"std": std}, {"std": std * 1.1}], [0.2])
    assert moved["scaler_same_in_every_version"] is False


@pytest.mark.long
@pytest.mark.timeout(600)
def test_the_whole_eval_runs_on_a_slice_of_the_real_stream(tmp_path):
    """Every job of the default run (the production loop plain and adversarial, the retrains,
    River) on the stream's first 30,000 rows, in one process: the result holds every model and
    the targets' judgements (a job whose call no longer matches its function fails here, not
    80 minutes into `make eval-fraud`)."""
    import json

    out = tmp_path / "fraud.json"
    assert eval_fraud.main(["--quick", "--rows", "30000", "--seeds", "1", "--jobs", "1", "--resamples", "50",
                            "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert {"incremental-mlp", "frozen-mlp", "retrain-hgb", "retrain-mlp", "river-lr", "river-lr-weighted"} <= set(
        r["summary"])
    inc = r["details"]["incremental-mlp"][0]
    assert inc["versions"] >= 1 and inc["exports"]["production_exporter"] >= 1
    assert "within_0.02_of_best_full_retrain" in r["targets"]
