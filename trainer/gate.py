"""The gate: champion vs challenger on the same recent rows neither trained on.

Three parts, each small enough to test on its own:

- `EvalWindow` sizing: the learner keeps the newest labeled rows out of training in a
  rolling window. Its size is what the metric needs, not a share of a round: the newest
  rows that hold at least `min_positives` positives (fraud: 30 frauds for PR-AUC and recall
  at the operating FPR) and at least `min_rows` rows, capped at `max_rows` (a rare class must
  not hold the whole stream out of training). Rows older than that leave the window into
  training, so no label is wasted; while a row is in the window no model trains on it, so
  the champion (trained on earlier rounds) and the challenger (trained on what left the
  window) are compared on rows neither has seen.

- `GateMetric`: a domain's metric as a vectorised function of (labels, predictions, resample
  weights [B, n]) -> [B] values, so one call scores every bootstrap resample. Row 0 of the
  weights may be all ones (the point estimate).

- `decide`: a paired, stratified bootstrap over the window rows (positives and negatives
  resampled separately, so every resample has the window's positive count; the same resample
  scores both models) of the relative difference challenger vs champion, oriented so that
  positive = better. The challenger is *refused* when the whole `confidence` interval of that
  difference lies below -margin: worse with confidence, by more than a relative margin (a
  relative margin, not an absolute tolerance: a loss of 0.011 and a PR-AUC of 0.8 need the same
  rule). It is *published* only when it must-beats the champion: the lower end of the
  `publish_confidence` interval (99 %, wider than the refusal's 95 %: a deferred challenger is
  looked at again every round) of the first storefront metric (the domain's main one: fraud
  PR-AUC) lies above `min_gain` (0: better with confidence), and, besides, no decided metric's
  point estimate is below -publish_margin. The fallback tier (below) refuses but never publishes
  under must-beat. Weaker rules let through candidates that a later window then found worse
  (bench/delivery.py judges every published candidate again on the labels that arrive after its
  decision): "not worse with confidence" alone published candidates that were a little worse on
  the window; "not worse with confidence and no worse by point estimate" published ties (a
  challenger equal to the champion looks worse on the next window half the time: 8 of 22, 36 %);
  must-beat with the fallback publishing let through one candidate better on log loss and worse
  on PR-AUC (1 of 6); must-beat at 95 % published 2 of 13 that were worse (the bar, looked at
  every round, is crossed by chance once in a while). A challenger that neither is refused nor
  beats the champion is *deferred*: the learner keeps training it, unpublished, and the next
  round judges it again against the same champion (so it publishes once what it learned shows).
  When the window cannot decide yet (too few rows, or too few positives for any metric of the
  domain) the decision is *deferred* too.

Each domain names its storefront metrics (decided on when the window has `min_positives`)
and optionally a fallback: a strictly proper score (log loss) that needs far fewer positives,
used only while the storefront metrics cannot be estimated yet. Without it a fraud stream
would defer for tens of thousands of transactions after every restart of the window; with
it, a collapse (label flips, noised weights) is still refused on a few frauds, while the
finer comparison waits for the positives it needs. Which rule decided is in the evidence.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

# (labels [n], predictions [n] or [n, k], weights [B, n]) -> metric per resample [B]
MetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

DECISIONS = ("published", "refused", "deferred")


@dataclasses.dataclass(frozen=True)
class GateMetric:
    name: str
    fn: MetricFn
    higher_is_better: bool


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """What a domain's gate compares and how big its window must be (defaults; the trainer's
    settings may override the sizes per domain)."""

    metrics: tuple[GateMetric, ...]  # the storefront metrics: decided on once min_positives are in the window
    positive: Callable[[np.ndarray], np.ndarray]  # labels -> bool: what counts as a positive
    min_positives: int
    min_rows: int
    max_rows: int  # the window never holds more rows (older ones are trained on)
    fallback: GateMetric | None = None  # a proper score, decided on with >= fallback_positives
    fallback_positives: int = 0
    seed_from_bootstrap: bool = True  # the bootstrap's holdout (rows v1 never trained on) starts the window


@dataclasses.dataclass(frozen=True)
class GateRule:
    resamples: int = 500
    confidence: float = 0.95
    margin: float = 0.02  # relative: the challenger may be this share worse before "worse" counts
    chunk: int = 100  # resamples scored at once (bounds memory: chunk x window rows)
    # relative: publish only when every decided metric's point estimate is at least -publish_margin
    # (0 = no worse than the champion on the window); None = no point rule (publish unless refused)
    publish_margin: float | None = 0.0
    # relative: publish only when the lower end of the first decided metric's interval lies above
    # this (0 = better than the champion with confidence, "must beat"; -0.02 = not worse than 2 %
    # with confidence); None = no such bar (only the point rule and the refusal)
    min_gain: float | None = 0.0
    # the two-sided confidence of the interval the must-beat bar reads (None: `confidence`). Higher
    # than the refusal's: a deferred challenger is judged again every round against the same
    # champion on a window that slides by one round, so a bar crossed by chance once in many looks
    # still publishes; in one full creditcard replay (bench/delivery.py --full) at 95 % 2 of 13
    # published fraud candidates were worse than their champion on the later labels, at 99 % 0 of
    # 12, with the same drift recovery (67,350 labels). A refusal stays at `confidence`: keeping
    # the champion is the safe side.
    publish_confidence: float | None = 0.99

    @property
    def bar_confidence(self) -> float:
        return self.confidence if self.publish_confidence is None else self.publish_confidence

    def validate(self) -> None:
        if self.resamples < 50 or not 0.5 < self.confidence < 1.0 or not -1.0 <= self.margin < 1.0:
            raise ValueError("gate: resamples >= 50, confidence in (0.5, 1), margin in [-1, 1)")
        if not 0.5 < self.bar_confidence < 1.0:
            raise ValueError("gate: publish_confidence in (0.5, 1) or None")
        if self.publish_margin is not None and not 0.0 <= self.publish_margin < 1.0:
            raise ValueError("gate: publish_margin in [0, 1) or None")
        if self.min_gain is not None and not -1.0 < self.min_gain < 1.0:
            raise ValueError("gate: min_gain in (-1, 1) or None")


# ---------------------------------------------------------------- window sizing
def window_start(positive: np.ndarray, min_positives: int, min_rows: int, max_rows: int) -> int:
    """Index (into rows in arrival order) where the window starts: the newest rows holding
    >= min_positives positives and >= min_rows rows, at most max_rows; everything before the
    start leaves into training. With fewer positives in all rows, everything up to max_rows
    stays (it is all the window has)."""
    n = len(positive)
    if n == 0:
        return 0
    pos_from_end = np.cumsum(np.asarray(positive, bool)[::-1])  # positives in the newest k+1 rows
    if min_positives > 0 and pos_from_end[-1] >= min_positives:
        need = int(np.searchsorted(pos_from_end, min_positives)) + 1
    elif min_positives > 0:
        need = n
    else:
        need = 0
    need = min(max(need, min_rows), max_rows, n)
    return n - need


# ---------------------------------------------------------------- vectorised metrics
def _as_2d(W: np.ndarray, n: int) -> np.ndarray:
    W = np.asarray(W, np.float64)
    return W.reshape(1, n) if W.ndim == 1 else W


def mean_metric(name: str, per_row: Callable[[np.ndarray, np.ndarray], np.ndarray], higher_is_better: bool,
                rows: Callable[[np.ndarray], np.ndarray] | None = None) -> GateMetric:
    """A metric that is a (weighted) mean of a per-row value, over all rows or over rows(y)."""

    def fn(y, p, W):
        v = np.asarray(per_row(y, p), np.float64)
        W = _as_2d(W, len(y))
        if rows is not None:
            keep = np.asarray(rows(y), bool)
            v, W = v[keep], W[:, keep]
        total = W.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, W @ v / total, np.nan)

    return GateMetric(name, fn, higher_is_better)


def _ranked_cumulative(y: np.ndarray, score: np.ndarray, W: np.ndarray):
    """Weighted true/false positives above each distinct score (descending), per resample:
    tp, fp [B, G] at the end of each tie group; P [B] the total positive weight."""
    order = np.argsort(-score, kind="stable")
    s = score[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each tie group
    pos = (y[order] > 0.5).astype(np.float64)
    Wo = W[:, order]
    tp = np.cumsum(Wo * pos, axis=1)[:, ends]
    fp = np.cumsum(Wo * (1.0 - pos), axis=1)[:, ends]
    return tp, fp


def average_precision_fn(y: np.ndarray, p: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Average precision (PR-AUC as sklearn's average_precision_score computes it: precision at
    each distinct threshold weighted by the recall it adds), with row weights per resample."""
    y, p = np.asarray(y), np.asarray(p, np.float64).reshape(-1)
    W = _as_2d(W, len(y))
    tp, fp = _ranked_cumulative(y, p, W)
    P = tp[:, -1]
    d_tp = np.diff(tp, axis=1, prepend=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        return np.where(P > 0, (d_tp * precision).sum(1) / P, np.nan)


def recall_at_fpr_fn(fpr: float) -> MetricFn:
    """Recall at the threshold that lets at most floor(fpr x negatives) negatives through, per
    resample: how the service's calibrated threshold behaves (each version's threshold is
    calibrated to a false-positive rate, so the comparison is recall at that rate)."""

    def fn(y, p, W):
        y, p = np.asarray(y), np.asarray(p, np.float64).reshape(-1)
        W = _as_2d(W, len(y))
        tp, fp = _ranked_cumulative(y, p, W)
        P, N = tp[:, -1], fp[:, -1]
        allowed = np.floor(fpr * N + 1e-9)
        ok = fp <= allowed[:, None]  # fp is non-decreasing along the groups
        last = ok.sum(1) - 1
        hit = np.where(last >= 0, np.take_along_axis(tp, np.maximum(last, 0)[:, None], 1)[:, 0], 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(P > 0, hit / P, np.nan)

    return fn


def log_loss_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-row log loss (the negative log-likelihood of the label); y may be a share in [0, 1]."""
    y = np.asarray(y, np.float64)
    p = np.clip(np.asarray(p, np.float64).reshape(-1), 1e-6, 1 - 1e-6)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


# ---------------------------------------------------------------- resampling
def stratified_weights(positive: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] counts of a bootstrap resample drawn within positives and within
    negatives separately (every resample keeps the window's positive count: a rare class
    resampled freely would leave some resamples with no positive at all)."""
    positive = np.asarray(positive, bool)
    n = len(positive)
    W = np.zeros((resamples, n), np.float64)
    for members in (np.flatnonzero(positive), np.flatnonzero(~positive)):
        m = len(members)
        if m == 0:
            continue
        draws = rng.integers(0, m, size=(resamples, m)) + (np.arange(resamples) * m)[:, None]
        W[:, members] = np.bincount(draws.ravel(), minlength=resamples * m).reshape(resamples, m)
    return W


def _relative(challenger: np.ndarray, champion: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Relative difference, positive = challenger better."""
    diff = challenger - champion if higher_is_better else champion - challenger
    with np.errstate(invalid="ignore", divide="ignore"):
        return diff / np.maximum(np.abs(champion), 1e-12)


def compare(metrics: Sequence[GateMetric], y: np.ndarray, p_champion: np.ndarray, p_challenger: np.ndarray,
            positive: np.ndarray, rule: GateRule, seed: int) -> dict[str, dict[str, Any]]:
    """Per metric: both values on the window, the observed relative difference and its paired
    bootstrap interval, and whether the challenger is worse with confidence."""
    rule.validate()
    rng = np.random.default_rng(seed)
    n = len(y)
    ones = np.ones((1, n))
    out: dict[str, dict[str, Any]] = {}
    rel = {m.name: [] for m in metrics}
    for start in range(0, rule.resamples, rule.chunk):
        W = stratified_weights(positive, min(rule.chunk, rule.resamples - start), rng)
        for m in metrics:
            rel[m.name].append(_relative(m.fn(y, p_challenger, W), m.fn(y, p_champion, W), m.higher_is_better))
    alpha, bar_alpha = 1.0 - rule.confidence, 1.0 - rule.bar_confidence
    for m in metrics:
        champ, chall = float(m.fn(y, p_champion, ones)[0]), float(m.fn(y, p_challenger, ones)[0])
        r = np.concatenate(rel[m.name])
        r = r[np.isfinite(r)]
        if len(r):
            lo, hi, bar_lo, bar_hi = (float(v) for v in np.quantile(
                r, [alpha / 2, 1 - alpha / 2, bar_alpha / 2, 1 - bar_alpha / 2]))
        else:
            lo = hi = bar_lo = bar_hi = float("nan")
        observed = float(_relative(np.array([chall]), np.array([champ]), m.higher_is_better)[0])
        out[m.name] = {"champion": champ, "challenger": chall, "higher_is_better": m.higher_is_better,
                       "relative_difference": observed, "interval": [lo, hi],
                       "publish_interval": [bar_lo, bar_hi],
                       "worse_with_confidence": bool(math.isfinite(hi) and hi < -rule.margin)}
    return out


def decide(spec: GateSpec, y: np.ndarray, p_champion: np.ndarray, p_challenger: np.ndarray, rule: GateRule,
           seed: int, *, min_positives: int | None = None, min_rows: int | None = None
           ) -> tuple[str, list[str], dict[str, Any]]:
    """(decision, reasons, evidence) for a challenger against the champion on the window rows.
    min_positives / min_rows override the spec's (trainer settings)."""
    min_pos = spec.min_positives if min_positives is None else min_positives
    min_rows = spec.min_rows if min_rows is None else min_rows
    positive = np.asarray(spec.positive(np.asarray(y)), bool)
    n, n_pos = len(y), int(positive.sum())
    evidence: dict[str, Any] = {
        "window_rows": n, "window_positives": n_pos, "min_rows": min_rows, "min_positives": min_pos,
        "resamples": rule.resamples, "confidence": rule.confidence, "margin": rule.margin, "seed": seed,
        "publish_margin": rule.publish_margin, "min_gain": rule.min_gain, "publish_confidence": rule.bar_confidence,
        "rule": f"refuse when the {rule.confidence:.0%} paired-bootstrap interval of the relative difference "
                f"lies below -{rule.margin:g}; "
                + ("" if rule.min_gain is None else
                   f"defer unless the first metric's {rule.bar_confidence:.0%} interval lies above {rule.min_gain:+g} "
                   f"(must beat); ")
                + ("" if rule.publish_margin is None else
                   f"defer when a point estimate is below -{rule.publish_margin:g} (learning goes on); ")
                + f"defer below {min_rows} rows or too few positives"}
    if n < min_rows:
        evidence["decided_on"] = []
        return "deferred", [f"window holds {n} rows < {min_rows}: cannot tell yet"], evidence
    if n_pos >= min_pos:
        metrics, tier = spec.metrics, "storefront"
    elif spec.fallback is not None and n_pos >= spec.fallback_positives:
        metrics, tier = (spec.fallback,), "fallback"
    else:
        evidence["decided_on"] = []
        need = min(min_pos, spec.fallback_positives) if spec.fallback is not None else min_pos
        return "deferred", [f"window holds {n_pos} positives < {need}: cannot tell yet"], evidence
    results = compare(metrics, np.asarray(y), p_champion, p_challenger, positive, rule, seed)
    evidence.update({"tier": tier, "decided_on": [m.name for m in metrics], "metrics": results})
    reasons = [f"{name} {r['challenger']:.4f} vs champion {r['champion']:.4f} "
               f"({r['relative_difference']:+.2%}, {rule.confidence:.0%} interval "
               f"[{r['interval'][0]:+.2%}, {r['interval'][1]:+.2%}] below -{rule.margin:.1%}): "
               f"worse than serving with confidence"
               for name, r in results.items() if r["worse_with_confidence"]]
    if reasons:
        return "refused", reasons, evidence
    if rule.min_gain is not None and tier == "fallback":
        # the fallback (log loss on a few positives) catches a collapse; it is not the metric the
        # storefront is judged on, so it never ships a candidate under must-beat: in drift, a
        # candidate published on +8.9 % log loss had a 3.4 % lower PR-AUC on the next window
        # (bench/delivery.py); the candidate waits, learning, for the positives the metrics need
        r = results[spec.fallback.name]
        return "deferred", [f"{spec.fallback.name} {r['challenger']:.4f} vs champion {r['champion']:.4f} "
                            f"({r['relative_difference']:+.2%}): not worse, but the storefront metrics need "
                            f"{min_pos} positives ({n_pos} in the window) before a candidate can beat the champion; "
                            f"learning goes on"], evidence
    if rule.min_gain is not None:
        name, r = next(iter(results.items()))
        low, high = r["publish_interval"]
        if not (math.isfinite(low) and low > rule.min_gain):
            return "deferred", [f"{name} {r['challenger']:.4f} vs champion {r['champion']:.4f} "
                                f"({r['relative_difference']:+.2%}, {rule.bar_confidence:.0%} interval "
                                f"[{low:+.2%}, {high:+.2%}] not above "
                                f"{rule.min_gain:+.1%}): not better with confidence yet, learning goes on"], evidence
    if rule.publish_margin is not None:
        behind = [f"{name} {r['challenger']:.4f} vs champion {r['champion']:.4f} ({r['relative_difference']:+.2%} "
                  f"< -{rule.publish_margin:.1%}, not worse with confidence): not better yet, learning goes on"
                  for name, r in results.items() if r["relative_difference"] < -rule.publish_margin]
        if behind:
            return "deferred", behind, evidence
    return "published", [], evidence


def parse_per_domain(spec: str, what: str) -> dict[str, int]:
    """'fraud=30,recommender=100' -> {domain: int} (trainer settings)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        try:
            n = int(value)
        except ValueError:
            n = -1
        if not sep or not name.strip() or n < 0:
            raise ValueError(f"{what} {part!r}: expected <domain>=<count >= 0>")
        out[name.strip()] = n
    return out
