"""The code behind every published learning statistic, against scikit-learn, brute force and
hand-computed cases: average precision / PR-AUC (the gate's vectorised metric, the fraud
domain's, the fraud eval's sorted-score and grouped-bootstrap copies), recall at an FPR,
ROC-AUC, HR@k / NDCG@k (bench.stats and the recommender domain's), the paired bootstraps
(bench.stats, the gate's, the fraud eval's) and the pricing eval's regret."""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from bench import stats
from bench.eval_fraud import SortedScores, ap_from_group_stats, bootstrap_counts, paired_bootstrap as fraud_bootstrap
from trainer.domains import fraud
from trainer.domains.recommender import ranking_metrics
from trainer.gate import (GateRule, average_precision_fn, compare, mean_metric, recall_at_fpr_fn,
                          stratified_weights)


def average_precision_score(*args, **kwargs):
    # imported when used: sklearn.metrics costs every xdist worker a second at collection
    from sklearn.metrics import average_precision_score as reference
    return reference(*args, **kwargs)


def roc_auc_score(*args, **kwargs):
    from sklearn.metrics import roc_auc_score as reference
    return reference(*args, **kwargs)


def scored(n: int, seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """Labels (about 10 % positive, at least 2) and scores that carry some signal, with many
    exact ties when `ties` (scores rounded to 1 decimal)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(np.int64)
    y[:2] = 1
    p = rng.random(n) * 0.7 + 0.3 * y
    return y, (np.round(p, 1) if ties else p)


# ---------------------------------------------------------------- average precision
def test_average_precision_hand_computed_and_perfect():
    # positives at ranks 1 and 3: precision 1/1 and 2/3, each adding half the recall
    y, p = np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])
    assert stats.average_precision(y, p) == pytest.approx((1 + 2 / 3) / 2)
    assert stats.average_precision(np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.8, 0.2])) == 1.0
    # all scores tied: one threshold, precision = the positive share
    assert stats.average_precision(np.array([1, 0, 0, 0]), np.full(4, 0.5)) == pytest.approx(0.25)
    assert math.isnan(stats.average_precision(np.zeros(5), np.arange(5.0)))


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True), (3, False)])
def test_every_average_precision_matches_sklearn(seed, ties):
    y, p = scored(2000, seed, ties)
    want = average_precision_score(y, p)
    assert stats.average_precision(y, p) == pytest.approx(want, abs=1e-12)
    assert fraud.pr_auc(y, p) == pytest.approx(want, abs=1e-12)
    s = SortedScores(p, y, np.zeros(len(y), np.int64))
    assert s.ap(np.ones(len(y))) == pytest.approx(want, abs=1e-12)
    assert ap_from_group_stats(*s.group_stats(1), np.ones((1, 1)))[0] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_average_precision_is_sklearn_with_sample_weights(ties):
    """A bootstrap resample is a weight per row: the gate's and the fraud eval's weighted AP
    must equal scikit-learn's on the same weights, and AP on the rows repeated that often."""
    y, p = scored(600, 7, ties)
    rng = np.random.default_rng(8)
    W = rng.integers(0, 4, size=(5, len(y))).astype(np.float64)
    W[:, :2] = 1  # every resample keeps a positive
    got = average_precision_fn(y, p, W)
    s = SortedScores(p, y, np.zeros(len(y), np.int64))
    for b in range(len(W)):
        want = average_precision_score(y, p, sample_weight=W[b])
        assert got[b] == pytest.approx(want, abs=1e-12)
        keep = np.repeat(np.arange(len(y)), W[b].astype(int))
        assert average_precision_score(y[keep], p[keep]) == pytest.approx(want, abs=1e-12)
        assert s.ap(W[b][np.argsort(-p, kind="stable")]) == pytest.approx(want, abs=1e-12)


def test_grouped_ap_of_a_resample_is_the_ap_of_the_repeated_groups():
    """The fraud eval resamples whole groups (its bootstrap units): the AP its group counts give
    must be the AP of the rows of each group repeated as often as the group was drawn."""
    y, p = scored(900, 11, True)
    group = np.arange(len(y)) % 9
    s = SortedScores(p, y, group)
    counts = bootstrap_counts(9, 6, seed=3)
    fast = ap_from_group_stats(*s.group_stats(9), counts)
    for r in range(len(counts)):
        keep = np.concatenate([np.flatnonzero(group == g).repeat(int(counts[r, g])) for g in range(9)])
        assert fast[r] == pytest.approx(average_precision_score(y[keep], p[keep]), abs=1e-12)
        assert s.ap_resampled(counts[r]) == pytest.approx(fast[r], abs=1e-12)


# ---------------------------------------------------------------- recall at an FPR, ROC-AUC
def recall_at_fpr_brute(y: np.ndarray, p: np.ndarray, fpr: float) -> float:
    """The highest recall of any threshold `score >= t` that lets at most floor(fpr x N) negatives through."""
    allowed = math.floor(fpr * (y == 0).sum() + 1e-9)
    best = 0.0
    for t in np.r_[np.unique(p), np.inf]:
        if ((p >= t) & (y == 0)).sum() <= allowed:
            best = max(best, ((p >= t) & (y == 1)).sum() / (y == 1).sum())
    return best


@pytest.mark.parametrize("seed,ties,fpr", [(0, False, 0.01), (1, True, 0.01), (2, False, 0.001), (3, True, 0.1),
                                           (4, True, 0.0)])
def test_recall_at_fpr_matches_brute_force(seed, ties, fpr):
    y, p = scored(3000, seed, ties)
    want = recall_at_fpr_brute(y, p, fpr)
    assert stats.recall_at_fpr(y, p, fpr) == pytest.approx(want, abs=1e-12)
    assert recall_at_fpr_fn(fpr)(y, p, np.ones((1, len(y))))[0] == pytest.approx(want, abs=1e-12)
    assert fraud.recall_at_fpr(y, p, fpr) == pytest.approx(want, abs=1e-12)


def test_recall_at_fpr_hand_computed():
    # 10 negatives, 1 % FPR allows 0 of them: only the positives above every negative count
    y = np.array([1, 1, 1] + [0] * 10)
    p = np.array([0.95, 0.9, 0.5] + [0.8] + [0.1] * 9)
    assert stats.recall_at_fpr(y, p, 0.01) == pytest.approx(2 / 3)
    # 10 % allows one negative: the threshold can go down to 0.5, past the 0.8 negative
    assert stats.recall_at_fpr(y, p, 0.1) == 1.0
    assert stats.recall_at_fpr(y, p, 1.0) == 1.0


def test_roc_auc_is_the_share_of_correctly_ordered_pairs():
    y, p = scored(400, 5, True)
    pos, neg = p[y == 1], p[y == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert fraud.roc_auc(y, p) == pytest.approx(pairs, abs=1e-12)
    assert roc_auc_score(y, p) == pytest.approx(pairs, abs=1e-12)


# ---------------------------------------------------------------- HR@k and NDCG@k
def ndcg_brute(ranked: list[int], relevant: set[int], k: int) -> float:
    """DCG of the list over the best DCG any ordering of the candidates can reach (brute force)."""
    def dcg(lst):
        return sum(1.0 / math.log2(i + 2) for i, x in enumerate(lst[:k]) if x in relevant)

    pool = list(dict.fromkeys(list(ranked) + sorted(relevant)))
    best = max(dcg(list(perm)) for perm in itertools.permutations(pool, min(k, len(pool))))
    return dcg(ranked) / best if best else 0.0


def test_hr_and_ndcg_hand_computed():
    assert stats.hit_at_k([5, 6, 7], {7}, k=3) == 1.0
    assert stats.hit_at_k([5, 6, 7], {7}, k=2) == 0.0
    # relevant at ranks 1 and 3 of 2 relevant: (1 + 1/log2(4)) / (1 + 1/log2(3))
    assert stats.ndcg_at_k([1, 2, 3], {1, 3}, k=3) == pytest.approx((1 + 0.5) / (1 + 1 / math.log2(3)))
    assert stats.ndcg_at_k([1, 2, 3], {1, 2}, k=3) == 1.0  # perfect ranking
    assert stats.ndcg_at_k([1, 2, 3], set(), k=3) == 0.0
    # more relevant items than k: the ideal is k relevant items, so a list of k relevant ones is perfect
    assert stats.ndcg_at_k([1, 2], {1, 2, 3, 4}, k=2) == 1.0


def test_ndcg_matches_brute_force_on_random_lists():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(1, 5))
        ranked = rng.permutation(7)[: int(rng.integers(1, 7))].tolist()
        relevant = set(rng.choice(8, size=int(rng.integers(0, 4)), replace=False).tolist())
        assert stats.ndcg_at_k(ranked, relevant, k) == pytest.approx(ndcg_brute(ranked, relevant, k), abs=1e-12)
        assert stats.hit_at_k(ranked, relevant, k) == float(bool(set(ranked[:k]) & relevant))


def test_single_target_rank_metrics_agree_with_the_list_metrics():
    """The recommender domain's HR/NDCG from 0-based ranks of one target (its manifest metrics)
    against bench.stats on the list that puts the target at that rank."""
    ranks = np.array([0, 3, 9, 10, 42])
    got = ranking_metrics(ranks, 10)
    lists = [[-1] * int(r) + [7] for r in ranks]
    assert got["hr@10"] == pytest.approx(np.mean([stats.hit_at_k(lst, {7}, 10) for lst in lists]))
    assert got["ndcg@10"] == pytest.approx(np.mean([stats.ndcg_at_k(lst, {7}, 10) for lst in lists]))


# ---------------------------------------------------------------- paired bootstraps
def test_paired_bootstrap_of_identical_arms_is_zero_and_ratio_one():
    a = np.random.default_rng(0).random(500)
    r = stats.paired_bootstrap(a, a.copy(), resamples=300)
    assert r["difference"] == 0.0 and r["difference_interval"] == [0.0, 0.0]
    assert r["ratio"] == 1.0 and r["ratio_interval"] == [pytest.approx(1.0), pytest.approx(1.0)]


def test_paired_bootstrap_interval_is_symmetric_for_mirrored_arms():
    """Swapping the arms mirrors the difference interval around 0 (same resamples)."""
    rng = np.random.default_rng(1)
    a, b = rng.random(400), rng.random(400)
    ab = stats.paired_bootstrap(a, b, resamples=500, seed=4)
    ba = stats.paired_bootstrap(b, a, resamples=500, seed=4)
    assert ab["difference"] == pytest.approx(-ba["difference"])
    assert ab["difference_interval"][0] == pytest.approx(-ba["difference_interval"][1])
    assert ab["difference_interval"][1] == pytest.approx(-ba["difference_interval"][0])
    assert ab["difference_interval"][0] < ab["difference"] < ab["difference_interval"][1]


def test_paired_bootstrap_covers_a_known_difference():
    """Hit rates 0.45 vs 0.40 on paired units (shared difficulty): the 95 % interval holds the
    true difference 0.05 in about 95 % of repeated experiments, and excludes 0 in most (power)."""
    rng = np.random.default_rng(2)
    covered = excludes_zero = 0
    trials = 200
    for t in range(trials):
        u = rng.random(800)  # a unit's difficulty, shared by both arms
        a = (u < 0.45).astype(float)
        b = (u < 0.40).astype(float)
        flip = rng.random(800) < 0.2  # some units' outcomes differ independently between the arms
        a[flip] = (rng.random(flip.sum()) < 0.45)
        b[flip] = (rng.random(flip.sum()) < 0.40)
        r = stats.paired_bootstrap(a, b, resamples=400, seed=t)
        lo, hi = r["difference_interval"]
        covered += lo <= 0.05 <= hi
        excludes_zero += lo > 0
    assert 0.89 * trials <= covered <= 0.99 * trials, covered
    assert excludes_zero >= 0.8 * trials, excludes_zero


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError):
        stats.paired_bootstrap(np.zeros(3), np.zeros(4))


def test_gate_compare_identical_and_clearly_worse_challengers():
    rng = np.random.default_rng(3)
    y = (rng.random(3000) < 0.1).astype(float)
    good = rng.random(3000) * 0.5 + 0.5 * y
    bad = rng.random(3000)  # no signal
    metric = dataclasses.replace(mean_metric("ap-proxy", lambda y_, p_: p_ * (2 * y_ - 1), True))
    rule = GateRule(resamples=300)
    same = compare([metric], y, good, good.copy(), y > 0.5, rule, seed=0)["ap-proxy"]
    assert same["interval"] == [0.0, 0.0] and not same["worse_with_confidence"]
    from trainer.gate import GateMetric

    ap = GateMetric("average_precision", average_precision_fn, True)
    worse = compare([ap], y, good, bad, y > 0.5, rule, seed=0)["average_precision"]
    assert worse["worse_with_confidence"] and worse["interval"][1] < 0
    assert worse["champion"] == pytest.approx(average_precision_score(y, good))


def test_stratified_resamples_keep_the_positive_count():
    positive = np.zeros(50, bool)
    positive[[3, 17, 40]] = True
    W = stratified_weights(positive, 200, np.random.default_rng(0))
    assert (W[:, positive].sum(1) == 3).all() and (W[:, ~positive].sum(1) == 47).all()


def test_fraud_eval_bootstrap_of_identical_runs_is_zero():
    y, p = scored(500, 9, False)
    group = np.arange(500) % 10
    runs = [SortedScores(p, y, group)]
    diff = fraud_bootstrap(runs, [SortedScores(p.copy(), y, group)], 10, 50, seed=1)
    assert diff.shape == (50,) and np.allclose(diff, 0.0)
    counts = bootstrap_counts(10, 50, seed=1)
    assert (counts.sum(1) == 10).all()


# ---------------------------------------------------------------- pricing regret
def test_regret_on_a_two_price_toy_market():
    """A market with a known best price: demand 1 - p / (2 r) on [0.8 r, 1.2 r], revenue
    p (1 - p / (2 r)) peaks at p = r (value r / 2). A policy quoting 1.2 r earns 0.48 r: 4 %
    regret; one that alternates r and 1.2 r loses half that."""
    from bench.eval_pricing import regret_pct, summarize
    from bench.pricing_sim import Arrivals, Market

    @dataclasses.dataclass
    class LinearMarket(Market):
        family = "linear (test)"

        def conversion(self, product, segment, price):
            return np.clip(1.0 - price / (2.0 * self.reference[product]), 0.0, 1.0)

    market = LinearMarket(products=["a"], reference=np.array([10.0]), segment_share=np.array([1.0]),
                          product_share=np.array([1.0]), min_price=np.array([1.0]), max_price=np.array([100.0]),
                          max_change_pct=20.0, units=[np.array([1.0])], cost=np.array([0.0]),
                          margin=np.array([False]), segments=("all",))
    assert market.oracle_segment_prices()[0, 0] == pytest.approx(10.0)
    n = 1000
    arr = Arrivals(product=np.zeros(n, np.int64), segment=np.zeros(n, np.int64), hour=np.zeros(n, np.int64),
                   u=np.random.default_rng(0).random(n), units=np.ones(n))
    high = np.full(n, 12.0)
    alternate = np.where(np.arange(n) % 2 == 0, 10.0, 12.0)
    out = summarize(market, arr, {"oracle": np.full(n, 10.0), "high": high, "alternate": alternate})["revenue"]
    assert out["oracle"]["regret_pct_of_oracle"] == pytest.approx(0.0, abs=1e-9)
    assert out["high"]["regret_pct_of_oracle"] == pytest.approx(4.0)
    assert out["alternate"]["regret_pct_of_oracle"] == pytest.approx(2.0)
    assert regret_pct(np.array([5.0, 5.0]), np.array([5.0, 4.0]), np.array([True, True])) == pytest.approx(10.0)
    assert regret_pct(np.array([5.0, 5.0]), np.array([5.0, 4.0]), np.array([True, False])) == 0.0
