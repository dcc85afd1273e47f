"""Cancelling a learning round at shutdown without ever publishing half of one.

A round runs in a worker thread: it trains, gates, then reaches its *commit point* (the
learner's `_save`: the checkpoint is written, then, for a published round, the version). The
trainer's shutdown first lets the round run for a grace period; then it cancels it:

- if the round has not reached its commit point, it will raise `RoundCancelled` when it does:
  nothing is checkpointed or published. The checkpoint's offset did not move, so after a
  restart the joiner reads the round's labels again and they are learned then: nothing lost;
- if it has passed the commit point, it is writing its checkpoint / publishing right now:
  `cancel()` says so, and the shutdown waits for it (seconds) rather than logging "stopped"
  while a publish is under way.

Both sides take one lock, so "passed the commit point" and "cancelled" are never both missed:
a cancellation seen after the commit point cannot stop a publish that already began, and one
made before it always stops the round.
"""
from __future__ import annotations

import threading


class RoundCancelled(Exception):
    """Raised at a round's commit point after shutdown cancelled it: nothing was checkpointed or published."""


class RoundCancel:
    """Given to a Learner as `learner.cancel`; its `_save` calls `commit_point()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._committing = False

    def begin_round(self) -> None:
        """A new round starts: it has not reached its commit point."""
        with self._lock:
            self._committing = False

    def commit_point(self, what: str = "round") -> None:
        """Called by the round right before it checkpoints / publishes."""
        with self._lock:
            if self._cancelled:
                raise RoundCancelled(f"{what}: abandoned at shutdown before checkpointing or publishing")
            self._committing = True

    def cancel(self) -> bool:
        """No round may commit from now on. True when the running round had already passed its
        commit point (it is checkpointing / publishing and will finish)."""
        with self._lock:
            self._cancelled = True
            return self._committing

    def is_set(self) -> bool:
        with self._lock:
            return self._cancelled
