"""Drift detection on the prequential loss of what was served (each label scored by the
version that served it, before it was learned).

`LossDrift` (the learner's detector) compares the mean loss of a recent window of labels
with a reference level measured before it, and alarms when the recent loss is clearly
higher. Unlike Page-Hinkley, which re-baselines on the worse level after an alarm (a blind,
frozen model then looks "normal" a few thousand labels later), the reference is frozen at
the alarm: drift lasts until the recent loss is back under the pre-drift level plus a
tolerance, however long that takes. Only then does a fresh reference start to build.

Why a window mean with a z-margin and a relative margin: the per-label loss is heavy-tailed
(fraud: ~0.2 % positives, each missed one costs 50-500x a legitimate row), so the window's
mean is noisy even when nothing changed. The alarm needs the recent mean above the
reference by both `z` standard errors of a window mean (from the reference's own spread)
and `margin` times the reference (so a tiny, statistically real change does not count as
drift worth acting on).

Every alarm increments `storefront_trainer_drift_alarms_total{model}` and logs a WARNING
with the figures; the end of a drift span logs an INFO line. `storefront_trainer_drift`
(trainer/service.py) reads `in_drift` after every batch of labels, so it stays 1 for the
whole span.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from prometheus_client import Counter

log = logging.getLogger(__name__)

DRIFT_ALARMS = Counter("storefront_trainer_drift_alarms_total",
                       "Drift alarms: the recent prequential loss rose clearly above its pre-drift level", ["model"])


class LossDrift:
    """Recent-window loss against a frozen pre-drift reference.

    window: labels in the recent window (the alarm and the all-clear compare its mean);
    reference: labels of the reference before it (the newest ones, while not in drift);
    min_reference: labels the reference needs before an alarm is possible;
    z, margin: alarm when recent > ref + max(z * ref_sd / sqrt(window), margin * ref);
    clear_tolerance: drift ends when recent <= ref * (1 + clear_tolerance);
    check_every: labels between two checks (a batch of labels is checked in steps of this,
    so a large batch cannot hide a short excursion, and a check costs O(window + reference)).
    """

    def __init__(self, model: str = "", window: int = 5000, reference: int = 20_000, min_reference: int = 5000,
                 z: float = 4.0, margin: float = 2.0, clear_tolerance: float = 0.2, check_every: int = 100) -> None:
        if window < 10 or reference < 10 or not 1 <= min_reference <= reference or check_every < 1:
            raise ValueError("window and reference must be >= 10, 1 <= min_reference <= reference, check_every >= 1")
        if z < 0 or margin < 0 or clear_tolerance < 0:
            raise ValueError("z, margin and clear_tolerance must be >= 0")
        self.model = model
        self.window, self.reference, self.min_reference = int(window), int(reference), int(min_reference)
        self.z, self.margin, self.clear_tolerance, self.check_every = float(z), float(margin), float(clear_tolerance), int(check_every)
        self._buf = np.zeros(0, np.float64)  # newest losses: reference part, then the recent window
        self.labels = 0  # losses seen
        self.alarms = 0
        self.in_drift = False
        self.ref_mean = math.nan  # the level the recent window is compared with (frozen while in drift)
        self.ref_sd = math.nan
        self.ref_rows = 0
        self.recent_mean = math.nan
        self.drift_since = None  # label count at the alarm of the current (or last) span
        self.cleared_at = None  # label count at the end of the last span
        self._frozen: tuple[float, float, int] | None = None  # pre-drift reference, kept until a fresh one is ready
        self._since_check = 0
        # labels at the last all-clear (or start): a WARNING says how long the stream looked normal
        self._calm_since = 0

    # ---- input ----
    def update(self, loss: float) -> bool:
        """One label's loss; True when it raised an alarm."""
        return self.update_many(np.asarray([loss], np.float64))

    def update_many(self, losses: np.ndarray) -> bool:
        """A batch of labels' losses (in arrival order); True when the batch raised an alarm."""
        losses = np.asarray(losses, np.float64).reshape(-1)
        losses = losses[np.isfinite(losses)]
        alarmed = False
        i = 0
        while i < len(losses):
            step = min(len(losses) - i, self.check_every - self._since_check)
            self._append(losses[i:i + step])
            i += step
            self._since_check += step
            if self._since_check >= self.check_every:
                self._since_check = 0
                alarmed |= self._check()
        return alarmed

    def _append(self, chunk: np.ndarray) -> None:
        self.labels += len(chunk)
        self._buf = np.concatenate([self._buf, chunk])
        # while in drift only the recent window matters (the reference is frozen); otherwise
        # keep the reference behind it too
        keep = self.window if self.in_drift else self.window + self.reference
        if len(self._buf) > keep:
            self._buf = self._buf[-keep:]

    # ---- decisions ----
    def _reference(self) -> tuple[float, float, int] | None:
        """(mean, sd, rows) of the reference in force: the fresh one once it is large enough,
        else the one frozen at the last alarm (so the span after a drift is still watched)."""
        ref = self._buf[:-self.window] if len(self._buf) > self.window else self._buf[:0]
        if len(ref) >= self.min_reference:
            return float(ref.mean()), float(ref.std()), len(ref)
        return self._frozen

    def _check(self) -> bool:
        if len(self._buf) < self.window:
            return False
        recent = self._buf[-self.window:]
        self.recent_mean = float(recent.mean())
        if self.in_drift:
            ref_mean = self.ref_mean
            if self.recent_mean <= ref_mean * (1.0 + self.clear_tolerance):
                self._clear()
            return False
        ref = self._reference()
        if ref is None:
            return False
        self.ref_mean, self.ref_sd, self.ref_rows = ref
        rise = max(self.z * self.ref_sd / math.sqrt(self.window), self.margin * self.ref_mean)
        if self.recent_mean > self.ref_mean + rise:
            self._alarm()
            return True
        return False

    def _alarm(self) -> None:
        self.alarms += 1
        self.in_drift = True
        self.drift_since = self.labels
        self._frozen = (self.ref_mean, self.ref_sd, self.ref_rows)
        self._buf = self._buf[-self.window:]
        DRIFT_ALARMS.labels(self.model).inc()
        log.warning("%s: drift: recent loss %.5f over the last %d labels vs pre-drift reference %.5f (sd %.5f, %d "
                    "labels); %d labels since the stream last looked normal; alarm %d",
                    self.model, self.recent_mean, self.window, self.ref_mean, self.ref_sd, self.ref_rows,
                    self.labels - self._calm_since, self.alarms)

    def _clear(self) -> None:
        self.in_drift = False
        self.cleared_at = self.labels
        self._calm_since = self.labels
        # the recovered window starts the fresh reference; the frozen one stays in force until
        # that has min_reference labels
        self._buf = self._buf[-self.window:]
        log.info("%s: drift over: recent loss %.5f over the last %d labels is back under the pre-drift reference "
                 "%.5f (+%.0f %%) after %d labels in drift", self.model, self.recent_mean, self.window, self.ref_mean,
                 100 * self.clear_tolerance, self.labels - (self.drift_since or 0))

    # ---- reporting ----
    @property
    def labels_in_drift(self) -> int:
        """Labels since the alarm of the current span (0 when not in drift)."""
        return self.labels - self.drift_since if self.in_drift and self.drift_since is not None else 0

    def figures(self) -> dict[str, Any]:
        """The detector's state for a round's decision-log entry (and the learning report)."""
        def num(v: float) -> float | None:
            return None if v != v else round(float(v), 6)

        return {"in_drift": self.in_drift, "alarms": self.alarms, "reference_loss": num(self.ref_mean),
                "recent_loss": num(self.recent_mean), "window": self.window, "labels": self.labels,
                "labels_in_drift": self.labels_in_drift}


class PageHinkley:
    """Page-Hinkley test on a stream of errors: alarm when the cumulative deviation of the
    error above its running mean exceeds `threshold` (`delta`: the change tolerated).

    Not the learner's detector any more: it re-baselines on the worse level after each
    alarm (reset()), so a model that never recovers stops being flagged; LossDrift keeps the
    pre-drift level instead. Kept as a general-purpose change-point test."""

    def __init__(self, delta: float = 0.005, threshold: float = 50.0, min_samples: int = 100,
                 cooldown: int = 500) -> None:
        self.delta, self.threshold, self.min_samples, self.cooldown = delta, threshold, min_samples, cooldown
        self.reset()
        self.alarms = 0
        self._since_alarm = cooldown

    def reset(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.cum = 0.0
        self.min_cum = 0.0

    def update(self, error: float) -> bool:
        """Add one error; True when this observation raised an alarm."""
        self.n += 1
        self.mean += (error - self.mean) / self.n
        self.cum += error - self.mean - self.delta
        self.min_cum = min(self.min_cum, self.cum)
        self._since_alarm += 1
        if self.n >= self.min_samples and self.cum - self.min_cum > self.threshold:
            self.alarms += 1
            self._since_alarm = 0
            self.reset()
            return True
        return False

    @property
    def in_drift(self) -> bool:
        return self._since_alarm < self.cooldown
