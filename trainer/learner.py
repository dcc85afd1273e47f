"""The incremental learner of one domain: joined events -> update -> gate -> export -> publish.

Long file: one class whose round is one transaction (replay, gate, export, publish, checkpoint share
its state); what stands apart already lives in gate.py, drift.py, canary.py, export.py.

One round:
1. take the joined examples the joiner produced since the last round into the evaluation
   window: the newest labels, held out of training for as long as the gate's metric needs
   them (trainer/gate.py: enough positives and rows, not a share of the round); the rows
   the window no longer needs leave it and are this round's training rows;
2. warm-start a candidate from the working weights, update it on those rows mixed with a
   replay sample of older ones (against forgetting);
3. gate it against the champion (the published version) on the window, rows neither
   trained on: a paired bootstrap refuses it when it is worse with confidence, and defers
   when the window cannot tell yet (the candidate then stays the learner's working weights,
   unpublished, and the next round's candidate is judged against the same champion); its
   ONNX outputs must match PyTorch's within `parity_tol`; its batch-1 latency must be within budget;
4. publish it to the registry (manifest: metrics, gate figures, the event offset it
   learned up to), and write the checkpoint (weights, optimizer, replay buffer, offset)
   atomically. The checkpoint's offset is the only source of truth for where learning
   resumes, so a crash between two steps never trains an event twice or skips one.
Every decision (published, refused or deferred, with its evidence) goes to the decision log.
"""
from __future__ import annotations

import abc
import dataclasses
import io
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from shared.registry import ModelRegistry, RegistryError
from trainer.drift import LossDrift
from trainer.export import batch1_latency_ms, build_tensorrt_engine, parity
from trainer.gate import GateRule, GateSpec, decide, window_start

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Examples:
    X: np.ndarray  # model input rows, exactly as served
    y: np.ndarray  # labels
    served_p: np.ndarray  # what the serving model answered (for prequential error)
    offsets: np.ndarray  # event-log offset of each label

    @classmethod
    def empty(cls, width: int) -> "Examples":
        return cls(np.zeros((0, width), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32),
                   np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.y)

    def concat(self, other: "Examples") -> "Examples":
        return Examples(np.concatenate([self.X, other.X]), np.concatenate([self.y, other.y]),
                        np.concatenate([self.served_p, other.served_p]), np.concatenate([self.offsets, other.offsets]))

    def take(self, idx) -> "Examples":
        return Examples(self.X[idx], self.y[idx], self.served_p[idx], self.offsets[idx])


class DomainModel(abc.ABC):
    """What the learner needs from a domain: its network, training step, metric and export."""

    name: str  # registry model name
    width: int  # input row width

    @abc.abstractmethod
    def examples(self, joined: Sequence[Any]) -> Examples:
        """Training rows from the joiner's JoinedExamples of this domain."""

    @abc.abstractmethod
    def new_network(self, bootstrap_X: np.ndarray) -> torch.nn.Module: ...

    @abc.abstractmethod
    def train(self, net: torch.nn.Module, opt: torch.optim.Optimizer, X: np.ndarray, y: np.ndarray,
              epochs: int, seed: int) -> None: ...

    @abc.abstractmethod
    def predict(self, net: torch.nn.Module, X: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def gate_spec(self) -> "GateSpec":
        """The gate's metrics (vectorised over bootstrap resamples) and window sizes."""

    @abc.abstractmethod
    def report_metrics(self, y: np.ndarray, p: np.ndarray) -> dict[str, float]: ...

    @abc.abstractmethod
    def export(self, net: torch.nn.Module, path: Path) -> tuple[Path, torch.nn.Module]:
        """Write the ONNX file; return it and the module it was exported from (for parity)."""

    @abc.abstractmethod
    def signature_inputs(self, X: np.ndarray) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def manifest_extra(self, y: np.ndarray, p: np.ndarray) -> dict[str, Any]: ...

    def optimizer(self, net: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(net.parameters(), lr=1e-3)

    # ---- optional hooks (defaults fit a model with one probability output per row) ----
    def finish_bootstrap(self, net: torch.nn.Module) -> None:
        """Called once the bootstrap's epochs are done, before the first version is evaluated
        and exported: what the bootstrap data could not teach is undone here (default: nothing)."""

    def prequential_loss(self, y: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Per-example loss of what was served (the drift detector's input): log loss."""
        p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
        return -(y * np.log(p) + (1 - y) * np.log(1 - p))

    def parity(self, module: torch.nn.Module, path: Path, feeds: dict[str, np.ndarray]) -> float:
        """Largest difference between the ONNX file's and the module's outputs on feeds."""
        return parity(module, path, feeds)

    def latency_ms(self, path: Path, feeds: dict[str, np.ndarray]) -> float:
        """The gate's latency figure (default: median batch-1 latency on one thread)."""
        return batch1_latency_ms(path, feeds)

    def extra_files(self, net: torch.nn.Module, folder: Path) -> list[Path]:
        """Files published beside model.onnx (written under folder, a temporary directory)."""
        return []

    def domain_state(self) -> dict[str, Any]:
        """What the model keeps besides the weights (vocabularies...), saved in the checkpoint."""
        return {}

    def load_domain_state(self, state: dict[str, Any]) -> None:
        """Restore domain_state() (called before new_network on restore)."""

    def upgrade_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint written by an older version of this domain, in today's layout (rows,
        weights and optimizer state), or as it is when it already is (default: as it is). Called
        on restore, after load_domain_state: an upgrade of the model's layout must not cost the
        labels the checkpoint learned, nor its replay buffer."""
        return state

    def prequential_metrics(self, y: np.ndarray, served_p: np.ndarray) -> dict[str, float]:
        """Metrics of what was served (scored before its label was learned) over the learner's
        recent window: the learning report's curve. Default: report_metrics on those rows,
        plus the mean of prequential_loss (the drift detector's loss)."""
        out = dict(self.report_metrics(y, served_p))
        if len(y):
            out["log_loss"] = float(np.mean(self.prequential_loss(y, served_p)))
        return out


@dataclasses.dataclass
class LearnerConfig:
    min_events: int = 200  # a round starts once this many new labels arrived ...
    max_interval_s: float = 30.0  # ... or this long after the last round, with at least one
    replay_size: int = 20_000
    replay_ratio: float = 1.0  # replayed rows per new row in an update
    epochs: int = 3
    # the gate (trainer/gate.py): window sizes default to the domain's GateSpec (None)
    gate_min_positives: int | None = None  # positives the window needs for the storefront metrics
    gate_min_rows: int | None = None  # rows the window needs for any decision
    gate_resamples: int = 500  # paired bootstrap resamples per round
    gate_confidence: float = 0.95  # two-sided interval of the relative difference
    gate_margin: float = 0.02  # refuse when the interval lies below -margin (relative)
    # publish only when no decided metric's point estimate is below -this (relative; None = off): a
    # challenger behind the champion on the window but not worse with confidence is deferred
    gate_publish_margin: float | None = 0.0
    # must beat: publish only when the lower end of the main metric's interval lies above this
    # (relative; 0 = better than the champion with confidence; None = no such bar). A tie published
    # is worse than the champion on the next window half the time (bench/delivery.py)
    gate_min_gain: float | None = 0.0
    # the confidence of the interval that bar reads (trainer/gate.py GateRule.publish_confidence)
    gate_publish_confidence: float = 0.99
    parity_tol: float = 1e-4
    latency_budget_ms: float = 5.0
    drift_cadence_factor: float = 0.25  # while drift lasts, rounds start after this share of min_events
    # drift detector (trainer.drift.LossDrift): recent window of labels vs the frozen pre-drift loss
    # window and margin measured on the creditcard stream without injected drift (bench/drift.py):
    # its fraud bursts alone raise a 2,000-label window's loss 2-4x (18 alarms in 264k labels at
    # 2,000 / +50 %); 5,000 labels and +200 % leave 3 there (0 on 4 synthetic streams of that shape)
    drift_window: int = 5000  # labels in the recent window
    drift_margin: float = 2.0  # alarm: recent loss above the reference by this share (and 4 standard errors)
    drift_clear_tolerance: float = 0.2  # drift ends when the recent loss is back under reference * (1 + this)
    # the action while in drift (Learner.adaptation): measured by bench/drift.py
    drift_adapt: bool = True
    drift_replay_ratio: float = 1.0  # replayed rows per new row while in drift ...
    drift_replay_recent: bool = True  # ... drawn only from rows labeled since the drift began (not the old concept)
    drift_epochs: int = 3  # passes over each round's rows while in drift
    drift_lr_factor: float = 1.0  # step size multiplier while in drift
    lr_factor: float = 1.0  # step size multiplier of a round outside drift (the model's own step size x this)
    # positives the gate's window holds while in drift (None: as outside drift). A window sized for 30
    # frauds keeps ~15k of the newest transactions out of training, and right after a drift most of
    # them are of the old concept: the post-drift frauds reach training ~30 frauds late and the gate
    # judges on the old concept. In drift the window holds only rows of the drift span (with
    # drift_replay_recent), and this many positives: the rest is released into training
    drift_gate_min_positives: int | None = 10
    # the must-beat bar while in drift (None: gate_min_gain, as outside drift; e.g. -0.02 relaxes it
    # to "not worse than 2 % with confidence", to replace a drifting champion sooner)
    drift_gate_min_gain: float | None = None
    prequential_window: int = 5000  # labels the prequential metrics of each round are computed over
    # delivery of a version that passed the gate (trainer/canary.py): "canary" publishes it and starts it
    # as the registry's CANARY (live labels then promote or roll it back); "direct" makes it CURRENT.
    # "direct" here: a canary needs a CanaryDecider judging it, which the trainer service runs (its
    # `delivery` setting defaults to canary); a Learner driven on its own (benches, tests) has none
    delivery: str = "direct"
    canary_mode: str = "canary"  # canary (a share of request keys) | shadow (scores all, answers none)
    canary_share: float = 0.1


class Checkpoint:
    """Weights, optimizer, replay buffer and the offset learned up to, written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def load(self) -> dict[str, Any]:
        return torch.load(self.path, weights_only=False)


class DecisionLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


SEED = -1  # offset of the window rows that came from the bootstrap's holdout, not the stream


class Learner:
    def __init__(self, model: DomainModel, registry: ModelRegistry, workdir: Path,
                 config: LearnerConfig | None = None) -> None:
        self.model = model
        self.registry = registry
        self.config = config or LearnerConfig()
        self.workdir = Path(workdir)
        self.checkpoint = Checkpoint(self.workdir / "checkpoints" / f"{model.name}.pt")
        self.decisions = DecisionLog(self.workdir / "decisions" / f"{model.name}.jsonl")
        self.pending = Examples.empty(model.width)
        # the gate's evaluation window: the newest labels, not trained on while they are in it
        self.window = Examples.empty(model.width)
        # the published weights while the working weights (self.net) differ from them, after
        # deferred rounds; None = the working weights are the champion
        self.champion: torch.nn.Module | None = None
        # the weights of the version running as the registry's CANARY (delivery "canary"), kept until
        # live labels decide: promoted, they become the champion's; rolled back, self.champion (the
        # weights CURRENT serves) is what the learner goes back to
        self.canary_net: torch.nn.Module | None = None
        self.canary_version: str | None = None
        self.drift = LossDrift(model.name, window=self.config.drift_window, margin=self.config.drift_margin,
                               clear_tolerance=self.config.drift_clear_tolerance)
        # event offsets of the newest drift_window labels the detector saw; at an alarm the oldest of
        # them is where the drift span's rows start (Learner.adaptation trains on rows from there on)
        self._detector_offsets = np.zeros(0, np.int64)
        self.drift_start_offset: int | None = None
        self.last_round = time.monotonic()
        self.net: torch.nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.replay = Examples.empty(model.width)
        self.offset = 0  # last event-log offset whose label is in the weights or the window
        self.progress: dict[str, Any] = {"offset": 0, "pending": []}  # the joiner's checkpoint
        self.trained_rows = 0
        self.labels_seen = 0  # labels consumed by rounds: each event exactly once, across restarts
        self.rounds = 0
        # (label, served prediction) of the newest labels: each round reports the served
        # model's prequential metrics over it (not checkpointed: a restart starts a new window)
        self.recent = Examples.empty(model.width)
        self._rng = np.random.default_rng(0)

    # ---- state ----
    def restore(self) -> bool:
        """Load the checkpoint; False when there is none (bootstrap first)."""
        if not self.checkpoint.exists():
            return False
        state = self.checkpoint.load()
        self.model.load_domain_state(state.get("domain", {}))
        state = self.model.upgrade_checkpoint(state)
        self.net = self.model.new_network(np.zeros((1, self.model.width), np.float32))
        self.net.load_state_dict(state["net"])
        self.opt = self.model.optimizer(self.net)
        self.opt.load_state_dict(state["opt"])
        self.replay = state["replay"]
        # a checkpoint from before the window kept its last holdout: rows no version trained on
        self.window = state.get("window", state.get("holdout", Examples.empty(self.model.width)))
        self.champion = None
        if state.get("champion") is not None:
            self.champion = self.model.new_network(np.zeros((1, self.model.width), np.float32))
            self.champion.load_state_dict(state["champion"])
        self.canary_net, self.canary_version = None, state.get("canary_version")
        if state.get("canary") is not None:
            self.canary_net = self.model.new_network(np.zeros((1, self.model.width), np.float32))
            self.canary_net.load_state_dict(state["canary"])
        self.offset = int(state["offset"])
        self.progress = state.get("progress", {"offset": self.offset, "pending": []})
        self.trained_rows = int(state.get("trained_rows", 0))
        self.rounds = int(state.get("rounds", 0))
        self.labels_seen = int(state.get("labels_seen", 0))
        return True

    # trainer.shutdown.RoundCancel, set by the trainer: at shutdown a round that reaches this commit
    # point raises RoundCancelled, so it neither checkpoints nor publishes (its labels are re-read
    # after the restart, since the checkpoint's offset did not move)
    cancel: Any = None
    # trainer HA (trainer/service.py, Redis mode): called before each checkpoint write and right before
    # each registry publish; raises (trainer.lease.LeaseLost) when this trainer no longer holds the
    # domain's lease, else returns what goes into the manifest (the lease's fencing token)
    fence: Any = None

    def _save(self) -> None:
        if self.cancel is not None:
            self.cancel.commit_point(self.model.name)
        if self.fence is not None:
            self.fence()
        self.checkpoint.save({"net": self.net.state_dict(), "opt": self.opt.state_dict(), "replay": self.replay,
                              "window": self.window, "offset": self.offset,
                              "champion": None if self.champion is None else self.champion.state_dict(),
                              "canary": None if self.canary_net is None else self.canary_net.state_dict(),
                              "canary_version": self.canary_version, "progress": self.progress, "trained_rows": self.trained_rows,
                              "labels_seen": self.labels_seen, "rounds": self.rounds,
                              "domain": self.model.domain_state()})

    # ---- bootstrap ----
    def bootstrap(self, X: np.ndarray, y: np.ndarray, holdout_X: np.ndarray, holdout_y: np.ndarray,
                  epochs: int, progress=None) -> dict[str, Any]:
        """Train the first version from a real dataset, publish it, write the checkpoint."""
        self.net = self.model.new_network(X)
        self.opt = self.model.optimizer(self.net)
        for epoch in range(epochs):
            self.model.train(self.net, self.opt, X, y, epochs=1, seed=epoch)
            if progress is not None:
                progress(epoch + 1, epochs)
        self.model.finish_bootstrap(self.net)
        p = self.model.predict(self.net, holdout_X)
        keep = self._rng.choice(len(y), size=min(len(y), self.config.replay_size), replace=False)
        self.replay = Examples(X[keep], y[keep], np.full(len(keep), np.nan, np.float32), np.zeros(len(keep), np.int64))
        self.trained_rows = len(y)
        self.champion = None
        spec = self.model.gate_spec()
        if spec.seed_from_bootstrap and len(holdout_y):
            # the holdout's newest rows (no version trained on them) start the gate's window, so the
            # first rounds can already be judged; the rest of the holdout stays what it was: unused.
            # Offset SEED marks them: when the stream pushes them out they are dropped, not trained
            # on (they are not the stream's labels, and training on them all at once when the window
            # first fills would make one round many times longer than the others)
            held = Examples(np.asarray(holdout_X, np.float32), np.asarray(holdout_y, np.float32),
                            np.full(len(holdout_y), np.nan, np.float32), np.full(len(holdout_y), SEED, np.int64))
            self.window = held.take(slice(self._window_start(held), len(held)))
        return self._publish_and_save(holdout_y, p, {"bootstrap_rows": len(y)}, decision="bootstrap")

    # ---- incremental rounds ----
    def add(self, examples: Examples) -> None:
        if len(examples) == 0:
            return
        self.pending = self.pending.concat(examples)
        # prequential error of what was served, for the drift detector
        known = ~np.isnan(examples.served_p)
        if known.any():
            # offsets of the labels the detector holds: the buffer's last entry is its label number labels - 1
            offsets = np.concatenate([self._detector_offsets, examples.offsets[known]])
            if self.drift.update_many(self.model.prequential_loss(examples.y[known], examples.served_p[known])):
                first = self.drift.drift_since - self.drift.window  # label number where the alarm's window starts
                at = max(0, first - (self.drift.labels - len(offsets)))
                self.drift_start_offset = int(offsets[at:].min())
            self._detector_offsets = offsets[-self.drift.window:]

    def due(self) -> bool:
        need = self.config.min_events
        if self.drift.in_drift:
            need = max(1, int(need * self.config.drift_cadence_factor))
        if len(self.pending) >= need:
            return True
        return len(self.pending) > 0 and time.monotonic() - self.last_round >= self.config.max_interval_s

    def adaptation(self) -> dict[str, Any]:
        """How this round trains: replayed rows per new row, passes, step size multiplier.
        While the detector reports drift (and drift_adapt is on), the drift_* values: the
        replay buffer is mostly pre-drift rows, which pull the candidate back to the old
        concept (bench/drift.py measures the recovery with and without)."""
        c = self.config
        if c.drift_adapt and self.drift.in_drift:
            # rows labeled since the drift began (the alarm's window and everything after it), by event
            # offset: the replay buffer's tail is not that (rows reach it only when the window lets them go)
            since = self.drift_start_offset if c.drift_replay_recent else None
            return {"adapting": True, "replay_ratio": c.drift_replay_ratio, "recent_since_offset": since,
                    "epochs": c.drift_epochs, "lr_factor": c.drift_lr_factor,
                    "gate_min_positives": c.drift_gate_min_positives}
        return {"adapting": False, "replay_ratio": c.replay_ratio, "recent_since_offset": None, "epochs": c.epochs,
                "lr_factor": c.lr_factor, "gate_min_positives": None}

    def round(self, progress: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """One update-gate-publish round over the pending examples. Returns the decision.

        progress: the joiner's checkpoint taken after it produced the last pending example
        ({"offset", "pending"}); it is stored in the model checkpoint, so a restart resumes
        reading exactly after what this round consumed.
        """
        if len(self.pending) == 0:
            return None
        if self.net is None:
            raise RuntimeError(f"no checkpoint for {self.model.name}: run `python -m trainer bootstrap` first")
        self.last_round = time.monotonic()
        new = self.pending
        self.pending = Examples.empty(self.model.width)
        prequential = self._prequential(new)
        # the new labels join the window; the rows it no longer needs leave it into training
        adapt = self.adaptation()
        held = self.window.concat(new)
        start = self._window_start(held, adapt["gate_min_positives"])
        since = adapt["recent_since_offset"]
        if since is not None:
            # in drift the gate judges on the new concept only: rows labeled before the drift span leave
            # the window (not trained on either, below); with too few positives left it defers
            recent = np.flatnonzero(held.offsets >= since)
            start = max(start, int(recent[0]) if len(recent) else len(held))
        train, window = held.take(slice(0, start)), held.take(slice(start, len(held)))
        seed_dropped = int((train.offsets == SEED).sum())
        if seed_dropped:
            train = train.take(train.offsets != SEED)
        champion = self.champion if self.champion is not None else self.net
        candidate = self.model.new_network(np.zeros((1, self.model.width), np.float32))
        candidate.load_state_dict(self.net.state_dict())
        opt = self.model.optimizer(candidate)
        opt.load_state_dict(self.opt.state_dict())
        X, y = train.X, train.y
        pool = self.replay
        if since is not None:
            # in drift: rows of the old concept are neither trained on nor replayed (they are still
            # remembered in the replay buffer, for after the drift)
            old = train.offsets < since
            if old.any():
                X, y = train.X[~old], train.y[~old]
            pool = self.replay.take(self.replay.offsets >= since)
        trained_new = len(y)
        if len(pool) and trained_new and adapt["replay_ratio"] > 0:
            k = min(len(pool), max(1, int(trained_new * adapt["replay_ratio"])))
            idx = self._rng.choice(len(pool), size=k, replace=False)
            X, y = np.concatenate([X, pool.X[idx]]), np.concatenate([y, pool.y[idx]])
        if len(y):
            base_lr = [g["lr"] for g in opt.param_groups]
            for g in opt.param_groups:
                g["lr"] *= adapt["lr_factor"]
            try:
                self.model.train(candidate, opt, X, y, epochs=adapt["epochs"], seed=self.rounds)
            finally:  # the optimizer is kept (checkpointed) with its normal step size
                for g, lr in zip(opt.param_groups, base_lr):
                    g["lr"] = lr
        self.rounds += 1
        # the offsets covered: everything up to the newest label of this round
        if progress is not None:
            self.progress = dict(progress)
        up_to = int(max(new.offsets.max(), self.offset, self.progress.get("offset", 0)))
        figures: dict[str, Any] = {"round": self.rounds, "new_labels": len(new), "trained_rows": len(train),
                                   "trained_new_rows": trained_new, "replayed_rows": len(y) - trained_new,
                                   "window_rows": len(window),
                                   "seed_rows_dropped": seed_dropped,
                                   "offsets": [int(new.offsets.min()), int(new.offsets.max())],
                                   "drift": self.drift.in_drift, "drift_detector": self.drift.figures(),
                                   "adaptation": adapt, "prequential": prequential}
        decision, reasons, evidence = self._gate(champion, candidate, window, adapt["gate_min_positives"],
                                                 adapting=adapt["adapting"])
        figures["evidence"] = evidence
        primary = next(iter(evidence.get("metrics", {}).items()), None)
        if primary is not None:  # the learning report's chart: candidate vs serving on the main metric
            figures.update({"gate_metric": primary[0], "candidate": primary[1]["challenger"],
                            "serving": primary[1]["champion"]})
        # every label of this round is now accounted for, whether or not the candidate ships:
        # trained on (it left the window) or held in the window (checkpointed with it)
        self.trained_rows += len(train)
        self.labels_seen += len(new)
        figures["labels_seen"] = self.labels_seen
        self._remember(train)
        self.window = window
        self.offset = up_to
        if decision == "refused":
            # back to the champion's weights (the labels stay in the replay buffer)
            self._revert_to_champion()
            entry = self._decide("refused", figures, reasons)
            self._save()
            return entry
        if decision == "deferred":
            # the window cannot tell yet: nothing is published blindly, but learning goes on from
            # the candidate; the champion keeps serving and judges the next round's candidate
            self.champion = champion
            self.net, self.opt = candidate, opt
            entry = self._decide("deferred", figures, reasons)
            self._save()
            return entry
        eval_y = np.concatenate([window.y, self.replay.y[-5000:]])
        eval_p = self.model.predict(candidate, np.concatenate([window.X, self.replay.X[-5000:]]))
        return self._publish_and_save(eval_y, eval_p, figures, decision="published", candidate=(candidate, opt))

    # ---- the gate ----
    def _gate_rule(self, adapting: bool = False) -> GateRule:
        c = self.config
        min_gain = c.drift_gate_min_gain if adapting and c.drift_gate_min_gain is not None else c.gate_min_gain
        return GateRule(resamples=c.gate_resamples, confidence=c.gate_confidence, margin=c.gate_margin,
                        publish_margin=c.gate_publish_margin, min_gain=min_gain,
                        publish_confidence=c.gate_publish_confidence)

    def _min_positives(self, in_drift: int | None = None) -> int:
        spec: GateSpec = self.model.gate_spec()
        if in_drift is not None:
            return in_drift
        return spec.min_positives if self.config.gate_min_positives is None else self.config.gate_min_positives

    def _window_start(self, rows: Examples, in_drift_positives: int | None = None) -> int:
        """Where the window starts in rows (arrival order): what the gate's metric needs (while
        adapting to a drift: in_drift_positives)."""
        spec: GateSpec = self.model.gate_spec()
        min_pos = self._min_positives(in_drift_positives)
        min_rows = spec.min_rows if self.config.gate_min_rows is None else self.config.gate_min_rows
        return window_start(spec.positive(rows.y), min_pos, min_rows, max(spec.max_rows, min_rows))

    def _gate(self, champion: torch.nn.Module, challenger: torch.nn.Module, window: Examples,
              in_drift_positives: int | None = None, adapting: bool = False) -> tuple[str, list[str], dict[str, Any]]:
        """Champion vs challenger on the window (rows neither trained on): the decision, its
        reasons and evidence. A fixed seed per round: the same round decides the same way."""
        spec = self.model.gate_spec()
        p_champion = self.model.predict(champion, window.X) if len(window) else np.zeros(0)
        p_challenger = self.model.predict(challenger, window.X) if len(window) else np.zeros(0)
        return decide(spec, window.y, p_champion, p_challenger, self._gate_rule(adapting), seed=self.rounds,
                      min_positives=self._min_positives(in_drift_positives), min_rows=self.config.gate_min_rows)

    def _revert_to_champion(self) -> None:
        """A refused candidate is dropped: the working weights go back to the published ones
        (which may undo deferred rounds' training: their rows stay in the replay buffer)."""
        if self.champion is not None:
            self.net = self.champion
            self.opt = self.model.optimizer(self.net)
            self.champion = None

    def _prequential(self, new: Examples) -> dict[str, float]:
        served = ~np.isnan(new.served_p)
        if served.any():
            window = self.recent.concat(new.take(served))
            self.recent = window.take(slice(max(0, len(window) - self.config.prequential_window), len(window)))
        if len(self.recent) == 0:
            return {}
        try:
            out = self.model.prequential_metrics(self.recent.y, self.recent.served_p)
        except Exception:  # a metric that cannot be computed must not stop learning
            log.exception("%s: prequential metrics failed", self.model.name)
            return {}
        return {"window_rows": len(self.recent), **{k: float(v) for k, v in out.items()}}

    def _remember(self, ex: Examples) -> None:
        if len(ex) == 0:
            return
        self.replay = self.replay.concat(ex)
        if len(self.replay) > self.config.replay_size:
            # reservoir-like: keep a uniform sample of the older part plus all of the newest
            n = self.config.replay_size
            old = len(self.replay) - len(ex)
            keep_old = self._rng.choice(old, size=max(0, n - len(ex)), replace=False) if old else np.zeros(0, int)
            idx = np.concatenate([np.sort(keep_old), np.arange(old, len(self.replay))])[-n:]
            self.replay = self.replay.take(idx)

    def _publish_and_save(self, y: np.ndarray, p: np.ndarray, figures: dict[str, Any], decision: str,
                          candidate: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None) -> dict[str, Any]:
        """Export and check the candidate (default: the current weights); if it passes, make it
        the learner's weights, write the checkpoint, then publish. Checkpoint before publish:
        a crash in between loses a version, never trains its events a second time."""
        net, opt = candidate if candidate is not None else (self.net, self.opt)
        canary = candidate is not None and self.config.delivery == "canary"
        if canary:
            running = self._running_canary()
            if running is not None:
                # one canary at a time (trainer/canary.py): this candidate is not published; learning
                # goes on from it, judged (like after a deferred round) against the champion CURRENT serves
                self.champion = self.champion if self.champion is not None else self.net
                self.net, self.opt = net, opt
                entry = self._decide("held", figures, [f"passed the gate, not published: {running} is running; "
                                                       f"the next passing round after its decision is"])
                self._save()
                return entry
        reasons = []
        with tempfile.TemporaryDirectory() as tmp:
            path, module = self.model.export(net, Path(tmp) / "model.onnx")
            feeds = self.model.signature_inputs(self.replay.X[:64] if len(self.replay) else
                                                np.zeros((4, self.model.width), np.float32))
            diff = self.model.parity(module, path, feeds)
            latency = self.model.latency_ms(path, feeds)
            figures.update({"onnx_parity_max_abs": diff, "batch1_latency_ms": latency})
            if not diff <= self.config.parity_tol:
                reasons.append(f"ONNX differs from PyTorch by {diff:.2e} > {self.config.parity_tol}")
            if latency > self.config.latency_budget_ms:
                reasons.append(f"batch-1 latency {latency:.3f} ms over budget {self.config.latency_budget_ms} ms")
            if reasons:
                if candidate is not None:
                    self._revert_to_champion()
                entry = self._decide("refused", figures, reasons)
                self._save()
                return entry
            metrics = self.model.report_metrics(y, p)
            figures["metrics"] = metrics
            engine = build_tensorrt_engine(path)
            extra = self.model.manifest_extra(y, p)
            files = list(self.model.extra_files(net, Path(tmp))) + ([engine] if engine else [])
            champion = self.champion if self.champion is not None else self.net  # what CURRENT serves
            self.net, self.opt = net, opt
            self.champion = None  # what is published is what the learner continues from
            if canary and self.registry.current_version(self.model.name) is not None:
                # ... but as a canary it is not the champion until live labels promote it
                self.champion, self.canary_net = champion, net
            else:
                canary = False
            self._save()
            fenced = self.fence() if self.fence is not None else {}
            manifest = self.registry.publish(self.model.name, path, self._signature(path), metrics=metrics,
                                             learned_up_to=self.offset, extra={**extra, **fenced, "gate": figures},
                                             extra_files=files, make_current=not canary)
        figures["version"] = manifest.version
        figures["delivery"] = "canary" if canary else "direct"
        if canary:
            self.canary_version = manifest.version
            try:
                state = self.registry.start_canary(self.model.name, manifest.version, self.config.canary_mode,
                                                   self.config.canary_share, note=f"gate passed in round {self.rounds}")
                figures["canary"] = state.to_json()
            except RegistryError as e:  # e.g. an operator started one meanwhile: this version waits, unstarted
                figures["canary_error"] = str(e)
                log.warning("%s: version %s published but not started as canary: %s", self.model.name,
                            manifest.version, e)
            self._save()
        return self._decide(decision, figures, [])

    def _running_canary(self) -> str | None:
        """'canary <version>' while the registry runs one for this model (an unreadable CANARY
        counts as running: nothing is started over a pointer that cannot be read), else None."""
        try:
            state = self.registry.canary(self.model.name)
        except RegistryError as e:
            return f"an unreadable CANARY ({e.reason})"
        return None if state is None else f"{state.mode} {state.version}"

    def canary_decided(self, version: str, promoted: bool) -> None:
        """Live labels decided the canary (trainer/canary.py; called between rounds): promoted, its
        weights are the champion's from now on; rolled back (or timed out), the learner goes back to
        the champion's weights (rounds trained since on the candidate's are dropped like a refused
        candidate's: their rows stay in the replay buffer)."""
        if self.canary_version != version:
            return  # not the canary this learner started (an operator's): nothing of ours changes
        if promoted:
            if self.canary_net is not None:
                self.champion = None if self.net is self.canary_net else self.canary_net
        else:
            self._revert_to_champion()
        self.canary_net, self.canary_version = None, None
        self._save()

    def reconcile_canary(self) -> None:
        """After a restart: a canary this learner started that has ended meanwhile (decided just
        before a crash, or by an operator) is settled by what the registry says now."""
        if self.canary_version is None:
            return
        try:
            if self.registry.canary(self.model.name) is not None:
                return
            current = self.registry.current_version(self.model.name)
        except RegistryError:
            return
        self.canary_decided(self.canary_version, promoted=current == self.canary_version)

    @staticmethod
    def _signature(path: Path):
        from shared.runtime.signature import signature_of_onnx

        return signature_of_onnx(path)

    def _decide(self, decision: str, figures: dict[str, Any], reasons: Sequence[str]) -> dict[str, Any]:
        entry = {"time": time.time(), "model": self.model.name, "decision": decision, "reasons": list(reasons),
                 "offset": self.offset, **figures}
        self.decisions.write(entry)
        (log.info if decision != "refused" else log.warning)(
            "%s: %s %s", self.model.name, decision, json.dumps({k: v for k, v in entry.items() if k != "metrics"},
                                                               default=float))
        return entry
