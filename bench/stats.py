"""The statistics behind the published learning figures, in one place.

- ranking: `hit_at_k` and `ndcg_at_k` of one ranked list against a set of relevant items
  (binary relevance; the ideal DCG is over min(relevant items, k) positions), the recommender
  eval's HR@10 / NDCG@10 per (customer, day);
- classification: `average_precision` (PR-AUC as scikit-learn's average_precision_score
  computes it) and `recall_at_fpr` are the gate's own vectorised metrics
  (trainer/gate.py) evaluated with unit weights, so a published figure and a gate decision
  can never disagree on what the metric is;
- `paired_bootstrap`: the interval of the difference and of the ratio of two methods'
  means over the same units (customer-days), resampling units with replacement and scoring
  both methods on the same resample.

tests/test_stats.py checks these, and the copies the other benches still carry (the fraud
eval's sorted-score PR-AUC and its grouped bootstrap, the pricing eval's regret), against
scikit-learn, brute force and hand-computed cases.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from trainer.gate import average_precision_fn, recall_at_fpr_fn


def hit_at_k(ranked: Sequence[Any], relevant: Iterable[Any], k: int = 10) -> float:
    """1.0 when any of the first k ranked items is relevant, else 0.0."""
    relevant = set(relevant)
    return float(any(x in relevant for x in list(ranked)[:k]))


def ndcg_at_k(ranked: Sequence[Any], relevant: Iterable[Any], k: int = 10) -> float:
    """NDCG@k with binary relevance: DCG of the first k ranked items (a repeated item counts
    once, at its first position) over the DCG of min(|relevant|, k) relevant items on top."""
    relevant = set(relevant)
    seen: set[Any] = set()
    gains = 0.0
    for i, x in enumerate(list(ranked)[:k]):
        if x in relevant and x not in seen:
            gains += 1.0 / math.log2(i + 2)
        seen.add(x)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return gains / ideal if ideal else 0.0


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision of scores p for binary labels y (nan without a positive)."""
    y = np.asarray(y)
    return float(average_precision_fn(y, p, np.ones((1, len(y))))[0])


def recall_at_fpr(y: np.ndarray, p: np.ndarray, fpr: float) -> float:
    """Recall at the threshold that lets at most floor(fpr x negatives) negatives through."""
    y = np.asarray(y)
    return float(recall_at_fpr_fn(fpr)(y, p, np.ones((1, len(y))))[0])


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, Any]:
    """Method a vs method b, each a value per unit (the same units, in the same order): the
    means, the observed difference mean(a) - mean(b) and ratio mean(a) / mean(b), and their
    percentile intervals over `resamples` resamples of the units (both methods scored on the
    same resample: the pairing removes the units' shared difficulty from the interval)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if not 0.5 < confidence < 1.0 or resamples < 1:
        raise ValueError("confidence in (0.5, 1), resamples >= 1")
    n = len(a)
    out: dict[str, Any] = {"units": n, "resamples": resamples, "confidence": confidence, "seed": seed}
    if n == 0:
        return {**out, "mean_a": math.nan, "mean_b": math.nan, "difference": math.nan,
                "difference_interval": [math.nan, math.nan], "ratio": math.nan, "ratio_interval": [math.nan, math.nan]}
    rng = np.random.default_rng(seed)
    diffs, ratios = np.empty(resamples), np.empty(resamples)
    chunk = max(1, min(resamples, 20_000_000 // max(1, n)))  # bounds the [chunk, n] index matrix
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(m, n))
        ma, mb = a[idx].mean(1), b[idx].mean(1)
        diffs[start:start + m] = ma - mb
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios[start:start + m] = ma / mb
    alpha = 1.0 - confidence
    q = [alpha / 2, 1 - alpha / 2]
    mean_a, mean_b = float(a.mean()), float(b.mean())
    finite = ratios[np.isfinite(ratios)]
    return {**out, "mean_a": mean_a, "mean_b": mean_b, "difference": mean_a - mean_b,
            "difference_interval": [float(v) for v in np.quantile(diffs, q)],
            "ratio": mean_a / mean_b if mean_b else math.nan,
            "ratio_interval": [float(v) for v in np.quantile(finite, q)] if len(finite) else [math.nan, math.nan]}
