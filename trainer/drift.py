"""Page-Hinkley test on a stream of prequential errors (the loss of what was served).

Signals drift when the cumulative deviation of the error above its running mean exceeds
`threshold`; `delta` is the magnitude of change tolerated. Drift state lasts until
`cooldown` further observations pass without a new alarm.
"""
from __future__ import annotations


class PageHinkley:
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
