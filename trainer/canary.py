"""Canary and shadow on live labels: promote or roll back a published candidate by what happens.

After the gate passes a candidate, the learner publishes it as a version and starts it as the
registry's CANARY (not CURRENT; trainer/learner.py `_publish_and_save`, `delivery="canary"`).
Services load it beside the champion (shared/reload.py) and either answer a deterministic share
of request keys with it ("canary") or score every request with it without answering ("shadow");
every served record names the version that answered and, in shadow mode, carries the shadow's
run (ServedPrediction.shadow). `CanaryDecider.observe` sees every joined label of the domain as
the trainer's loop polls them and decides:

- Evidence: only predictions served since the canary started (the same time window for both
  versions; labels of older predictions say nothing about this candidate).
  - canary mode: two arms, the labels of what the champion answered and of what the canary
    answered. They are different requests, so the comparison is *unpaired*: each arm is
    bootstrap-resampled on its own (stratified: positives and negatives separately, as the gate
    does) and the relative difference of the metric is taken per resample.
  - shadow mode: both versions scored the same requests, so the comparison is *paired* on the
    labeled requests that carry a shadow score: trainer.gate.compare, the gate's own paired
    bootstrap.
- Metric: the domain's prequential loss of the served score (`DomainModel.prequential_loss`: log
  loss of the probability served, a strictly proper score that needs few positives), and for
  domains whose storefront gate metrics are defined on the served score (fraud: PR-AUC and recall
  at the operating FPR) those too, once each arm holds the gate's `min_positives`.
- Decision, once each arm holds `min_labels` labels and `min_positives` positives, re-tested
  only after the smaller arm grew by `retest_growth` (peeking after every label would inflate
  the error rate of a repeated test):
  - rolled_back: some metric is worse with confidence (its whole interval below -margin):
    `registry.abort_canary` (CURRENT never moved; services drop the candidate on their next poll);
  - promoted: every metric it is decided on is not worse with confidence (its whole interval
    above -margin; a non-inferiority test): `registry.promote` (CURRENT := the candidate). As in
    the gate, the loss decides only while the storefront metrics cannot be estimated (tier
    "loss"); once they can (tier "storefront+loss") promotion is decided on them, and the loss
    can still roll back. Unpaired, the log loss of two arms is the noisiest figure there is
    (a missed fraud costs ~50x a legitimate row): a canary with the champion's own weights,
    33,000 labels per arm under load, still had a loss interval reaching -5.7 % while PR-AUC
    and recall were within +-4 %, and was never promoted (bench/delivery.py);
  - timeout: neither after `timeout_s` since the canary started: decided for the champion
    (abort). "Cannot tell" is not a reason to ship.
- Cost: a test bootstraps every label of both arms; at most `max_labels` per arm (the newest)
  are tested, so a test under heavy traffic stays a fraction of a second to seconds instead of
  growing with the traffic while the trainer's loop waits on it.
Each decision goes to the learner's decision log (decision "canary_promoted", "canary_rolled_back"
or "canary_timeout", with both arms' figures), to storefront_trainer_canary_decisions_total
{model, decision} and to the learning report; the learner is told (it continues from the
promoted weights, or goes back to the champion's).

One canary at a time per model: candidates that pass the gate while one runs are not published
(decision "held"; the learner keeps training and the next passing round after the decision
publishes): replacing a running canary with every new round would never let one gather enough
labels to be judged. After a trainer restart the evidence starts again (it is not checkpointed);
the timeout still counts from the canary's start, so a canary never runs unbounded.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
from prometheus_client import Counter, Gauge

from protos.feedback.v1 import feedback_pb2 as fb
from shared.registry import CANARY_MODES, CanaryState, ModelRegistry, RegistryError
from trainer.gate import GateMetric, GateRule, _relative, compare, mean_metric, stratified_weights

log = logging.getLogger(__name__)

DECISIONS = Counter("storefront_trainer_canary_decisions_total",
                    "Canary decisions on live labels by model and decision (promoted, rolled_back, timeout)",
                    ["model", "decision"])
LABELS = Gauge("storefront_trainer_canary_labels", "Labels gathered for the running canary, by model and arm "
               "(champion, canary; shadow mode: paired)", ["model", "arm"])
TRAINER_CANARY_SHARE = Gauge("storefront_trainer_canary_share", "Share of request keys the trainer started the "
                             "running canary with (0: no canary, or shadow)", ["model"])

# domains whose storefront gate metrics are functions of the served score alone (a 1-D probability):
# the live comparison uses them besides the loss. The recommender's gate ranks every catalog item
# (HR@10 needs the rank column of a full scoring), which a served record does not hold.
STOREFRONT_ON_SERVED_SCORE = frozenset({"fraud"})

OUTCOMES = ("promoted", "rolled_back", "timeout")


@dataclasses.dataclass
class CanaryConfig:
    mode: str = "canary"  # what a new candidate starts as: canary | shadow
    share: float = 0.1  # canary mode: share of request keys it answers
    min_labels: int = 200  # labels per arm (shadow: labeled pairs) before any decision
    min_positives: int = 5  # positives per arm before any decision
    timeout_s: float = 1800.0  # then the champion stays
    margin: float = 0.05  # relative: promote when the interval lies above -margin, roll back below it
    confidence: float = 0.95
    resamples: int = 500
    retest_growth: float = 0.25  # test again once the smaller arm grew by this share
    max_labels: int = 20_000  # per arm, the newest: bounds a test's cost (its interval is already narrow there)

    def validate(self) -> None:
        if self.mode not in CANARY_MODES:
            raise ValueError(f"canary mode {self.mode!r}: one of {CANARY_MODES}")
        if not 0.0 < self.share <= 1.0:
            raise ValueError("canary share must be in (0, 1]")
        if (self.min_labels < 1 or self.min_positives < 0 or not self.timeout_s > 0 or self.retest_growth < 0
                or self.max_labels < self.min_labels):
            raise ValueError("canary: min_labels >= 1, min_positives >= 0, timeout_s > 0, retest_growth >= 0, "
                             "max_labels >= min_labels")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError("canary margin must be in [0, 1)")
        GateRule(self.resamples, self.confidence, self.margin).validate()


def compare_unpaired(metrics: Sequence[GateMetric], y_a: np.ndarray, p_a: np.ndarray, y_b: np.ndarray,
                     p_b: np.ndarray, positive: Callable[[np.ndarray], np.ndarray], rule: GateRule,
                     seed: int) -> dict[str, dict[str, Any]]:
    """Per metric, champion (a) vs challenger (b) measured on different rows: both values, the
    observed relative difference (positive = challenger better), its bootstrap interval from
    resampling each arm on its own (stratified by `positive`), and the verdicts."""
    rule.validate()
    rng = np.random.default_rng(seed)
    pos_a, pos_b = np.asarray(positive(y_a), bool), np.asarray(positive(y_b), bool)
    rel: dict[str, list[np.ndarray]] = {m.name: [] for m in metrics}
    for start in range(0, rule.resamples, rule.chunk):
        k = min(rule.chunk, rule.resamples - start)
        Wa, Wb = stratified_weights(pos_a, k, rng), stratified_weights(pos_b, k, rng)
        for m in metrics:
            rel[m.name].append(_relative(m.fn(y_b, p_b, Wb), m.fn(y_a, p_a, Wa), m.higher_is_better))
    alpha = 1.0 - rule.confidence
    out: dict[str, dict[str, Any]] = {}
    for m in metrics:
        champ = float(m.fn(y_a, p_a, np.ones((1, len(y_a))))[0])
        chall = float(m.fn(y_b, p_b, np.ones((1, len(y_b))))[0])
        r = np.concatenate(rel[m.name])
        r = r[np.isfinite(r)]
        lo, hi = ((float(v) for v in np.quantile(r, [alpha / 2, 1 - alpha / 2])) if len(r)
                  else (float("nan"), float("nan")))
        out[m.name] = {"champion": champ, "challenger": chall, "higher_is_better": m.higher_is_better,
                       "relative_difference": float(_relative(np.array([chall]), np.array([champ]),
                                                              m.higher_is_better)[0]),
                       "interval": [lo, hi], "worse_with_confidence": bool(math.isfinite(hi) and hi < -rule.margin)}
    return out


LOSS = "served_loss"


def verdict(results: dict[str, dict[str, Any]], promote_on: Sequence[str], margin: float
            ) -> tuple[str | None, list[str]]:
    """(decision, reasons) from a comparison's per-metric results: "rolled_back" when any metric is
    worse with confidence; "promoted" when every metric in promote_on has its interval above
    -margin (not worse with confidence); None (no decision yet) otherwise."""
    worse = [n for n, r in results.items() if r["worse_with_confidence"]]
    if worse:
        return "rolled_back", [
            f"{n} {results[n]['challenger']:.4g} vs champion {results[n]['champion']:.4g} "
            f"({results[n]['relative_difference']:+.2%}, interval [{results[n]['interval'][0]:+.2%}, "
            f"{results[n]['interval'][1]:+.2%}] below -{margin:.1%}): worse with confidence" for n in worse]
    decided = [(n, results[n]) for n in promote_on]
    if decided and all(math.isfinite(r["interval"][0]) and r["interval"][0] >= -margin for _, r in decided):
        return "promoted", [
            f"{n} {r['challenger']:.4g} vs champion {r['champion']:.4g} ({r['relative_difference']:+.2%}, "
            f"interval [{r['interval'][0]:+.2%}, {r['interval'][1]:+.2%}] above -{margin:.1%}): "
            f"not worse with confidence" for n, r in decided]
    return None, []


@dataclasses.dataclass
class _Arm:
    y: list[np.ndarray] = dataclasses.field(default_factory=list)
    p: list[np.ndarray] = dataclasses.field(default_factory=list)
    n: int = 0

    def add(self, y: np.ndarray, p: np.ndarray) -> None:
        keep = np.isfinite(p)
        if keep.any():
            self.y.append(np.asarray(y, np.float64)[keep])
            self.p.append(np.asarray(p, np.float64)[keep])
            self.n += int(keep.sum())

    def arrays(self, newest: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if not self.y:
            return np.zeros(0), np.zeros(0)
        y, p = np.concatenate(self.y), np.concatenate(self.p)
        if newest is not None and len(y) > newest:
            # keep the kept lists short too: older labels are never tested again
            y, p = y[-newest:], p[-newest:]
            self.y, self.p = [y], [p]
        return y, p


class CanaryDecider:
    """Judges the running canary of one model on the labels the domain loop joins (module doc).

    model: the domain's DomainModel (examples, prequential_loss, gate_spec). on_decision(entry):
    called after the registry acted (the learner's bookkeeping: promoted or rolled back)."""

    def __init__(self, model, registry: ModelRegistry, config: CanaryConfig, decisions,
                 on_decision: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        config.validate()
        self.model = model
        self.name = model.name
        self.registry = registry
        self.config = config
        self.decisions = decisions  # trainer.learner.DecisionLog
        self.on_decision = on_decision
        self.clock = clock
        self.state: CanaryState | None = None
        self._reset(None)
        self._error: str | None = None

    def _reset(self, state: CanaryState | None) -> None:
        self.state = state
        self.champion_arm, self.canary_arm = _Arm(), _Arm()
        self.paired_y: list[np.ndarray] = []
        self.paired_champion: list[np.ndarray] = []
        self.paired_shadow: list[np.ndarray] = []
        self.pairs = 0
        self._tested_at = 0  # size of the smaller arm at the last test
        self.last_evidence: dict[str, Any] | None = None
        for arm in ("champion", "canary", "paired"):
            LABELS.labels(self.name, arm).set(0)

    # ---- evidence ----
    def _read(self) -> CanaryState | None:
        try:
            state = self.registry.canary(self.name)
        except RegistryError as e:
            if str(e) != self._error:
                self._error = str(e)
                log.error("%s: cannot read the CANARY pointer, no canary decision until it reads: %s", self.name, e)
            return None
        self._error = None
        return state

    def observe(self, joined: Sequence[Any], examples=None) -> dict[str, Any] | None:
        """Take this poll's joined labels (and, when the caller already built them, the learner's
        Examples of them: rows are matched by outcome offset); decide when due. Returns the
        decision entry when one was taken."""
        state = self._read()
        if state is None:
            if self.state is not None:
                log.info("%s: canary %s ended outside this decider (operator or another trainer)", self.name,
                         self.state.version)
                self._reset(None)
            TRAINER_CANARY_SHARE.labels(self.name).set(0)
            return None
        if self.state is None or state.version != self.state.version or state.started != self.state.started:
            self._reset(state)
            log.info("%s: judging %s %s against champion %s on live labels", self.name, state.mode, state.version,
                     state.champion)
        self.state = state
        TRAINER_CANARY_SHARE.labels(self.name).set(state.share if state.mode == "canary" else 0)
        if joined:
            self._gather(state, joined, examples)
        return self._maybe_decide(state)

    def _gather(self, state: CanaryState, joined: Sequence[Any], examples) -> None:
        since = [j for j in joined if j.served.served_at >= state.started]
        if not since:
            return
        if state.mode == "shadow":
            with_shadow = [j for j in since if j.served.HasField("shadow")
                           and j.served.shadow.model.version == state.version and j.model_version == state.champion]
            if not with_shadow:
                return
            champ = self._rows(with_shadow, examples)
            shadow = self.model.examples([_as_shadow(j) for j in with_shadow])
            # pairs by outcome offset: a label both versions' rows exist for
            common, ci, si = np.intersect1d(champ.offsets, shadow.offsets, return_indices=True)
            if len(common):
                ok = np.isfinite(champ.served_p[ci]) & np.isfinite(shadow.served_p[si])
                self.paired_y.append(np.asarray(champ.y[ci][ok], np.float64))
                self.paired_champion.append(np.asarray(champ.served_p[ci][ok], np.float64))
                self.paired_shadow.append(np.asarray(shadow.served_p[si][ok], np.float64))
                self.pairs += int(ok.sum())
                LABELS.labels(self.name, "paired").set(self.pairs)
            return
        for version, arm, label in ((state.champion, self.champion_arm, "champion"),
                                    (state.version, self.canary_arm, "canary")):
            rows = [j for j in since if j.model_version == version]
            if rows:
                ex = self._rows(rows, examples)
                arm.add(ex.y, ex.served_p)
                LABELS.labels(self.name, label).set(arm.n)

    def _rows(self, joined: Sequence[Any], examples):
        """The learner's Examples of these joined labels: taken from `examples` by outcome
        offset when given (examples() is then not run twice over the same labels), else built."""
        if examples is None:
            return self.model.examples(joined)
        wanted = np.array([j.offset for j in joined], np.int64)
        return examples.take(np.flatnonzero(np.isin(examples.offsets, wanted)))

    # ---- decision ----
    def _rule(self) -> GateRule:
        c = self.config
        return GateRule(resamples=c.resamples, confidence=c.confidence, margin=c.margin)

    def _metrics(self, n_pos: int) -> tuple[tuple[GateMetric, ...], tuple[str, ...], str]:
        """The metrics compared, those promotion is decided on, and the tier's name."""
        metrics: tuple[GateMetric, ...] = (mean_metric(LOSS, self.model.prequential_loss, False),)
        spec = self.model.gate_spec()
        if self.name in STOREFRONT_ON_SERVED_SCORE and n_pos >= spec.min_positives:
            return spec.metrics + metrics, tuple(m.name for m in spec.metrics), "storefront+loss"
        return metrics, (LOSS,), "loss"

    def _maybe_decide(self, state: CanaryState) -> dict[str, Any] | None:
        c = self.config
        now = self.clock()
        elapsed = now - state.started
        positive = self.model.gate_spec().positive
        if state.mode == "shadow":
            y = np.concatenate(self.paired_y) if self.paired_y else np.zeros(0)
            p_champion = np.concatenate(self.paired_champion) if self.paired_champion else np.zeros(0)
            p_shadow = np.concatenate(self.paired_shadow) if self.paired_shadow else np.zeros(0)
            if len(y) > c.max_labels:  # the newest pairs (older ones are never tested again)
                y, p_champion, p_shadow = y[-c.max_labels:], p_champion[-c.max_labels:], p_shadow[-c.max_labels:]
                self.paired_y, self.paired_champion, self.paired_shadow = [y], [p_champion], [p_shadow]
            smallest = len(y)
            n_pos = int(np.asarray(positive(y), bool).sum()) if len(y) else 0
            arms = {"paired": {"labels": len(y), "positives": n_pos}}
        else:
            (ya, pa), (yb, pb) = self.champion_arm.arrays(c.max_labels), self.canary_arm.arrays(c.max_labels)
            pos_a = int(np.asarray(positive(ya), bool).sum()) if len(ya) else 0
            pos_b = int(np.asarray(positive(yb), bool).sum()) if len(yb) else 0
            smallest, n_pos = min(len(ya), len(yb)), min(pos_a, pos_b)
            arms = {"champion": {"labels": len(ya), "positives": pos_a},
                    "canary": {"labels": len(yb), "positives": pos_b}}
        enough = smallest >= c.min_labels and n_pos >= c.min_positives
        results: dict[str, dict[str, Any]] | None = None
        tier = None
        # the labels gathered (a capped arm keeps growing in labels seen, not in rows tested)
        seen = self.pairs if state.mode == "shadow" else min(self.champion_arm.n, self.canary_arm.n)
        promote_on: tuple[str, ...] = ()
        if enough and seen >= self._tested_at * (1 + c.retest_growth):
            self._tested_at = seen
            metrics, promote_on, tier = self._metrics(n_pos)
            seed = int(state.started) % (2**31) + seen
            if state.mode == "shadow":
                results = compare(metrics, y, p_champion, p_shadow, np.asarray(positive(y), bool), self._rule(), seed)
            else:
                results = compare_unpaired(metrics, ya, pa, yb, pb, positive, self._rule(), seed)
            self.last_evidence = {"arms": arms, "tier": tier, "metrics": results}
        decision: str | None = None
        reasons: list[str] = []
        if results is not None:
            decision, reasons = verdict(results, promote_on, c.margin)
        if decision is None and elapsed >= c.timeout_s:
            decision = "timeout"
            reasons = [f"no decision after {elapsed:.0f} s (timeout {c.timeout_s:g} s) on "
                       + ", ".join(f"{a}: {v['labels']} labels/{v['positives']} positives" for a, v in arms.items())
                       + ": the champion stays"]
        if decision is None:
            return None
        return self._act(state, decision, reasons, {"arms": arms, "tier": tier, "metrics": results or
                                                    (self.last_evidence or {}).get("metrics"),
                                                    "elapsed_s": elapsed})

    def _act(self, state: CanaryState, decision: str, reasons: list[str], evidence: dict[str, Any]
             ) -> dict[str, Any] | None:
        try:
            if decision == "promoted":
                self.registry.promote(self.name, state.version)
            else:
                self.registry.abort_canary(self.name, state.version)
        except RegistryError as e:
            # another actor (an operator, a second trainer) ended it first, or the lock is busy:
            # nothing was changed here; the next poll reads the pointer again
            log.warning("%s: canary %s %s not applied: %s", self.name, state.version, decision, e)
            if e.reason == "no_canary":
                self._reset(None)
            return None
        DECISIONS.labels(self.name, decision).inc()
        TRAINER_CANARY_SHARE.labels(self.name).set(0)
        entry = {"time": self.clock(), "model": self.name, "decision": f"canary_{decision}", "kind": "canary",
                 "version": state.version, "champion": state.champion, "mode": state.mode, "share": state.share,
                 "started": state.started, "reasons": reasons, "canary": evidence}
        try:
            self.decisions.write(entry)
        except OSError:
            log.exception("%s: cannot write the canary decision to the decision log", self.name)
        (log.info if decision == "promoted" else log.warning)(
            "%s: canary %s %s after %.0f s: %s", self.name, state.version, decision.replace("_", " "),
            evidence["elapsed_s"], "; ".join(reasons))
        self._reset(None)
        if self.on_decision is not None:
            self.on_decision(entry)
        return entry


def _as_shadow(j):
    """A copy of a joined label whose served prediction is what the shadow computed (its inputs,
    outputs and version), so the domain's own examples() turns it into the shadow's served score."""
    served = fb.ServedPrediction()
    served.CopyFrom(j.served)
    del served.inputs[:]
    del served.outputs[:]
    served.inputs.extend(j.served.shadow.inputs)
    served.outputs.extend(j.served.shadow.outputs)
    served.model.version = j.served.shadow.model.version
    served.ClearField("shadow")
    return dataclasses.replace(j, served=served, model_version=served.model.version)


def parse_modes(spec: str) -> dict[str, str]:
    """'fraud=shadow,recommender=canary' -> {domain: mode}."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, mode = part.partition("=")
        if not sep or not name.strip() or mode.strip() not in CANARY_MODES:
            raise ValueError(f"canary_modes {part!r}: expected <domain>=<{'|'.join(CANARY_MODES)}>")
        out[name.strip()] = mode.strip()
    return out
