"""Drift recovery on the real creditcard stream with an injected abrupt drift.

    python -m bench.drift [--rows 200000] [--drift-row 80000] [--compare-actions] [--quick]

Stream: trainer.domains.fraud.load_creditcard() in time order. From `--drift-row` on, the
`--drift-features` features that separate fraud best on the warm-up (|standardized mean
difference|) are replaced by a fixed random signed permutation of themselves (feature i takes
-feature pi(i), same seed every run): the marginals barely move, but the direction a frozen
model learned for fraud now points elsewhere, a change it cannot follow.

Protocol: the one of bench/eval_fraud.py (test, then train, label delay `--delay-s` of the
dataset's Time): bootstrap (= publish v1) on the first `--warmup` rows, then labels are fed
to the production Learner (Learner.add) in arrival order, and a round (Learner.round: update
with replay, the gate as it is in the tree, ONNX export, parity and latency checks,
checkpoint, publish) runs whenever Learner.due() says so (`--round-labels` new labels; the
wall-clock trigger is off). Each row is scored by ONNX Runtime on the registry's CURRENT
version at the row's time. As in eval_fraud's fast runs, the bootstrap is exported with the
production exporter and later versions write their weights into that graph (same checker,
same gate); adversarial training is off (it triples the training time and is not what is
measured here).

Runs, in one process, in sequence: `action on` (LearnerConfig defaults: the drift detector
and its action, Learner.adaptation), `action off` (drift_adapt=False: same detector, rounds
unchanged), `frozen` (v1, never updated). --compare-actions adds the candidate actions the
default was chosen from.

Recovery: the pre-drift level is each run's recall at 1 % FPR over all scored rows before the
drift (threshold from those rows' legitimate scores). After the drift, recall at 1 % FPR is
computed prequentially on a rolling window of the last `--window-frauds` post-drift frauds
(and the legitimate rows of the same span, which set the threshold). A run has recovered at
the first window whose recall is >= 90 % of its pre-drift level and stays there for the
next `--hold` windows. Reported: post-drift labels the learner had received, and wall seconds
since the first post-drift label was delivered, when the row ending that window was scored;
rows scored since the drift; the detector's alarm and all-clear (labels after the drift).

Writes bench/results/drift.json (--quick: var/bench-drift-quick.json) and prints a markdown
table on stdout; progress on stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "drift.json"
QUICK = ROOT / "var" / "bench-drift-quick.json"
FPR = 0.01  # the operating point: the fraud service's "review" threshold (trainer.domains.fraud.TARGET_FPR)

# Candidate actions while in drift (LearnerConfig overrides), measured with --compare-actions;
# the default (LearnerConfig's drift_* fields) is the one that recovered fastest without
# hurting the pre-drift level.
ACTIONS: dict[str, dict[str, Any]] = {
    "recent rows only, gate window as outside drift (30 frauds)": dict(drift_gate_min_positives=None),
    "recent rows only, 10-fraud window, lr x3": dict(drift_lr_factor=3.0),
    "no replay, all rows, 10-fraud window": dict(drift_replay_ratio=0.0, drift_replay_recent=False),
}
ACTION_FIELDS = ("drift_replay_ratio", "drift_replay_recent", "drift_epochs", "drift_lr_factor", "drift_gate_min_positives")


@dataclasses.dataclass
class Config:
    rows: int | None = 200_000  # a slice: the three runs take about 3 minutes on 2 cores
    warmup: int = 20_000
    drift_row: int = 80_000
    drift_features: int = 8
    drift_seed: int = 7
    delay_s: float = 3600.0
    round_labels: int = 1000
    delivery: int = 100
    bootstrap_epochs: int = 20
    window_frauds: int = 30
    hold: int = 10


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def inject_drift(X: np.ndarray, y: np.ndarray, cfg: Config) -> dict[str, Any]:
    """In place: from cfg.drift_row on, the most fraud-separating features (on the warm-up)
    become a fixed random signed permutation of themselves."""
    W = cfg.warmup
    Xw, yw = X[:W, :28].astype(np.float64), y[:W] > 0.5  # V1..V28 (the amount is left alone)
    sep = np.abs(Xw[yw].mean(0) - Xw[~yw].mean(0)) / (Xw.std(0) + 1e-9)
    idx = np.argsort(-sep)[:cfg.drift_features]
    rng = np.random.default_rng(cfg.drift_seed)
    perm = idx[rng.permutation(len(idx))]
    while np.any(perm == idx):  # every chosen feature moves
        perm = idx[rng.permutation(len(idx))]
    D = cfg.drift_row
    X[D:, idx] = -X[D:, perm]
    names = [f"V{i + 1}" for i in range(28)]
    return {"row": D, "features": [names[i] for i in idx], "become": [f"-{names[j]}" for j in perm]}


def recall_at_fpr(y: np.ndarray, p: np.ndarray, fpr: float = FPR) -> float:
    from trainer.domains.fraud import recall_at_fpr as r

    return float(r(y, p, fpr))


def rolling_recall(y: np.ndarray, p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row index of the fraud ending each window, recall at FPR over the last k frauds and the
    legitimate rows of the same span), over rows already restricted to after the drift."""
    frauds = np.flatnonzero(y > 0.5)
    ends, vals = [], []
    for i in range(k - 1, len(frauds)):
        lo, hi = frauds[i - k + 1], frauds[i] + 1
        ends.append(frauds[i])
        vals.append(recall_at_fpr(y[lo:hi], p[lo:hi]))
    return np.asarray(ends, np.int64), np.asarray(vals, np.float64)


def recovery(y: np.ndarray, p: np.ndarray, D: int, pre: float, cfg: Config) -> dict[str, Any]:
    ends, vals = rolling_recall(y[D:], p[D:], cfg.window_frauds)
    target = 0.9 * pre
    out: dict[str, Any] = {"target_recall": round(target, 4), "windows": len(vals),
                           "min_window_recall": round(float(vals.min()), 4) if len(vals) else None,
                           "last_window_recall": round(float(vals[-1]), 4) if len(vals) else None}
    ok = vals >= target
    for i in range(len(vals)):
        if ok[i] and ok[i:i + cfg.hold + 1].all():
            out.update(recovered=True, row=int(D + ends[i]), window_index=i)
            return out
    out.update(recovered=False, row=None, window_index=None)
    return out


def run_learner(cfg: Config, X, y, t, overrides: dict[str, Any], label: str, observer: Any = None) -> dict[str, Any]:
    """One run of the replay. observer (optional): its before_round(learner) and
    after_round(learner, entry) are called around every Learner.round (bench/delivery.py
    judges each published candidate on the next round's window there)."""
    from bench.eval_fraud import model_kwargs, ort_session, seeded_model
    from bench.eval_fraud import Config as EvalConfig
    from shared.registry import ModelRegistry
    from trainer.learner import Examples, Learner, LearnerConfig

    t0 = time.perf_counter()
    N, W, D = len(y), cfg.warmup, cfg.drift_row
    model = seeded_model(0, **model_kwargs(EvalConfig(), adversarial=False))
    arrival = t + cfg.delay_s
    scores = np.full(N, np.nan, np.float32)
    labels_at = np.zeros(N, np.int64)  # labels delivered when each row was scored
    wall_at = np.zeros(N, np.float64)
    rounds: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []  # detector transitions, in labels delivered
    first_post_wall = None
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        registry = ModelRegistry(Path(tmp) / "registry")
        learner = Learner(model, registry, Path(tmp) / "trainer",
                          LearnerConfig(min_events=cfg.round_labels, max_interval_s=math.inf, **overrides))
        h = max(0, W - 5000)
        entry = learner.bootstrap(X[:W], y[:W], X[h:W], y[h:W], cfg.bootstrap_epochs)
        frozen = np.full(N, np.nan, np.float32)
        frozen[W:] = model.predict(learner.net, X[W:])
        session = ort_session(registry.model_path(model.name, str(entry["version"])))
        ptr, j = W, W
        was = False
        while ptr < N:
            need = cfg.round_labels
            if learner.drift.in_drift:
                need = max(1, int(need * learner.config.drift_cadence_factor))
            g = max(1, min(cfg.delivery, need - len(learner.pending)))
            if j < D:
                g = min(g, D - j)  # the first post-drift label starts a delivery (for its wall clock)
            j_end = min(j + g, N)
            stop = N if j >= N else int(np.searchsorted(t, arrival[j_end - 1], side="left"))
            if stop > ptr:
                scores[ptr:stop] = session.run(["probability"], {"features": X[ptr:stop]})[0][:, 0]
                labels_at[ptr:stop] = j
                wall_at[ptr:stop] = time.perf_counter()
                ptr = stop
            if ptr >= N:
                break
            if j >= D and first_post_wall is None:
                first_post_wall = time.perf_counter()
            learner.add(Examples(X[j:j_end], y[j:j_end], scores[j:j_end], np.arange(j, j_end, dtype=np.int64) + 1))
            j = j_end
            if learner.drift.in_drift != was:
                was = learner.drift.in_drift
                events.append({"event": "alarm" if was else "clear", "labels_after_drift": int(j - D),
                               **learner.drift.figures()})
            if learner.due():
                r0 = time.perf_counter()
                if observer is not None:
                    observer.before_round(learner)
                entry = learner.round()
                if observer is not None:
                    observer.after_round(learner, entry)
                rounds.append({"row": int(ptr), "decision": entry["decision"], "drift": bool(entry["drift"]),
                               "adapting": bool(entry["adaptation"]["adapting"]),
                               "seconds": round(time.perf_counter() - r0, 3)})
                if entry["decision"] == "published":
                    session = ort_session(registry.model_path(model.name, str(entry["version"])))
    progress(f"{label}: {len(rounds)} rounds ({sum(r['decision'] == 'published' for r in rounds)} published, "
             f"{sum(r['adapting'] for r in rounds)} adapting) in {time.perf_counter() - t0:.0f} s")
    return {"scores": scores, "frozen": frozen, "labels_at": labels_at, "wall_at": wall_at,
            "first_post_wall": first_post_wall, "rounds": rounds, "events": events,
            "seconds": time.perf_counter() - t0}


def summarize(name: str, y, p, cfg: Config, run: dict[str, Any] | None) -> dict[str, Any]:
    W, D = cfg.warmup, cfg.drift_row
    pre = recall_at_fpr(y[W:D], p[W:D])
    rec = recovery(y, p, D, pre, cfg)
    row: dict[str, Any] = {"run": name, "pre_drift_recall": round(pre, 4),
                           "post_drift_recall": round(recall_at_fpr(y[D:], p[D:]), 4), **rec,
                           "labels_to_recover": None, "seconds_to_recover": None, "rows_to_recover": None}
    if rec["recovered"]:
        r = rec["row"]
        row["rows_to_recover"] = int(r - D)
        if run is not None:
            row["labels_to_recover"] = int(max(0, run["labels_at"][r] - D))
            row["seconds_to_recover"] = round(float(run["wall_at"][r] - run["first_post_wall"]), 1)
    if run is not None:
        rounds = run["rounds"]
        row.update({"rounds": len(rounds), "published": sum(r["decision"] == "published" for r in rounds),
                    "rounds_adapting": sum(r["adapting"] for r in rounds),
                    "rounds_in_drift": sum(r["drift"] for r in rounds), "detector": run["events"],
                    "run_seconds": round(run["seconds"], 1)})
    return row


def measure(cfg: Config, compare_actions: bool = False, observer: Any = None,
            extra: tuple[tuple[str, dict[str, Any], Any], ...] = ()) -> dict[str, Any]:
    """The whole measurement in this process: the replay with the drift injected, runs `action on`
    (watched by `observer`, if given), `action off`, the frozen model (and the candidate actions
    with compare_actions, and `extra` runs: (name, LearnerConfig overrides, observer or None)).
    Returns the report drift.json holds (render() prints its table)."""
    from trainer.domains.fraud import load_creditcard
    from trainer.learner import LearnerConfig

    started = time.time()
    data = load_creditcard(cfg.rows)
    X, y, t = data.X.copy(), data.y, data.t
    if not cfg.warmup < cfg.drift_row < len(y):
        raise ValueError(f"the drift row must be inside the stream ({cfg.warmup:,} < row < {len(y):,})")
    drift = inject_drift(X, y, cfg)
    progress(f"{len(y):,} rows ({int(y.sum())} frauds), warm-up {cfg.warmup:,}, drift at row {cfg.drift_row:,}: "
             f"{', '.join(f'{a}<-{b}' for a, b in zip(drift['features'], drift['become']))}")
    defaults = LearnerConfig()
    action = {k: getattr(defaults, k) for k in ACTION_FIELDS}
    runs: list[tuple[str, dict[str, Any]]] = [("action on", {}), ("action off", {"drift_adapt": False})]
    if compare_actions:
        runs += [(f"candidate: {k}", v) for k, v in ACTIONS.items() if {**action, **v} != action]
    observers = {"action on": observer}
    for name, overrides, watcher in extra:
        runs.append((name, overrides))
        observers[name] = watcher
    rows = []
    frozen_scores = None
    for name, overrides in runs:
        run = run_learner(cfg, X, y, t, overrides, name, observers.get(name))
        rows.append(summarize(name, y, run["scores"], cfg, run) | {"config": overrides or action})
        if frozen_scores is None:
            frozen_scores = run["frozen"]
    rows.insert(2, summarize("frozen", y, frozen_scores, cfg, None))
    D = cfg.drift_row
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "protocol": {"data": "creditcard (trainer.domains.fraud.load_creditcard), time order", "rows": len(y),
                     "frauds": int(y.sum()), "warmup_rows": cfg.warmup, "drift": drift,
                     "pre_drift_scored_rows": D - cfg.warmup, "pre_drift_frauds": int(y[cfg.warmup:D].sum()),
                     "post_drift_rows": len(y) - D, "post_drift_frauds": int(y[D:].sum()),
                     "label_delay_s": cfg.delay_s, "round_labels": cfg.round_labels, "label_delivery": cfg.delivery,
                     "operating_fpr": FPR, "rolling_window_frauds": cfg.window_frauds, "hold_windows": cfg.hold,
                     "recovered": "first rolling window with recall >= 0.9 x the run's pre-drift recall that stays "
                                  f">= it for the next {cfg.hold} windows",
                     "learner": "trainer.learner.Learner + FraudModel(adv_epsilon=0), temporary registry; rounds: "
                                "Learner.round as in the tree (replay, gate, export, parity, latency, publish)",
                     "default_action": action, "seconds_total": round(time.time() - started, 1)},
        "results": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.drift", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="first N rows of the stream (0: all)")
    ap.add_argument("--drift-row", type=int, default=Config.drift_row)
    ap.add_argument("--drift-features", type=int, default=Config.drift_features)
    ap.add_argument("--round-labels", type=int, default=Config.round_labels)
    ap.add_argument("--delay-s", type=float, default=Config.delay_s)
    ap.add_argument("--window-frauds", type=int, default=Config.window_frauds)
    ap.add_argument("--hold", type=int, default=Config.hold)
    ap.add_argument("--compare-actions", action="store_true", help="also run the candidate actions (ACTIONS)")
    ap.add_argument("--quick", action="store_true", help="first 120,000 rows, drift at 60,000; var/ output")
    args = ap.parse_args(argv)
    cfg = Config(rows=(args.rows or None) if args.rows is not None else Config.rows, drift_row=args.drift_row,
                 drift_features=args.drift_features, round_labels=args.round_labels, delay_s=args.delay_s,
                 window_frauds=args.window_frauds, hold=args.hold)
    if args.quick:
        cfg.rows, cfg.drift_row = 120_000, 60_000
    out_path = QUICK if args.quick else RESULTS
    quiet_logs()
    try:
        report = measure(cfg, compare_actions=args.compare_actions)
    except ValueError as e:
        ap.error(str(e))
    write(report, out_path)
    print(render(report))
    print(f"\nwrote {out_path} in {report['protocol']['seconds_total']:.0f} s", file=sys.stderr)
    return 0


def quiet_logs() -> None:
    """One torch thread (as the trainer's rounds), the drift detector's lines, not the learner's."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainer.learner").setLevel(logging.ERROR)  # one line per round: too chatty here
    logging.getLogger("trainer.drift").setLevel(logging.INFO)  # the alarm and all-clear lines


def write(report: dict[str, Any], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")


def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "never"
    return f"{v:,.{nd}f}" if isinstance(v, float) else f"{v:,}"


def render(report: dict[str, Any]) -> str:
    p = report["protocol"]
    d = p["drift"]
    lines = [f"Creditcard stream, {p['rows']:,} rows; abrupt drift injected at row {d['row']:,} "
             f"({', '.join(f'{a}<-{b}' for a, b in zip(d['features'], d['become']))}); {p['pre_drift_frauds']} "
             f"frauds scored before it, {p['post_drift_frauds']} after; label delay {p['label_delay_s']:.0f} s, "
             f"rounds of {p['round_labels']} labels. Recovery: rolling recall at {100 * p['operating_fpr']:g} % FPR "
             f"over the last {p['rolling_window_frauds']} post-drift frauds back to 90 % of the run's pre-drift "
             f"level (and holding for {p['hold_windows']} windows). Default action while in drift: "
             f"{p['default_action']}. {report['machine']['cpus_usable']} CPUs, {p['seconds_total']:.0f} s.", "",
             "| run | pre-drift recall | target | post-drift recall | labels to recover | seconds to recover | "
             "rows to recover | min / last window recall | alarm at (labels after drift) | all-clear at | "
             "rounds adapting |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in report["results"]:
        det = r.get("detector") or []
        alarm = next((e["labels_after_drift"] for e in det if e["event"] == "alarm"), None)
        clear = next((e["labels_after_drift"] for e in det if e["event"] == "clear"), None)
        lines.append(f"| {r['run']} | {r['pre_drift_recall']:.3f} | {r['target_recall']:.3f} | "
                     f"{r['post_drift_recall']:.3f} | "
                     f"{_f(r['labels_to_recover']) if r['recovered'] else 'never'} | "
                     f"{_f(r['seconds_to_recover'], 1) if r['recovered'] else 'never'} | "
                     f"{_f(r['rows_to_recover']) if r['recovered'] else 'never'} | "
                     f"{_f(r['min_window_recall'])} / {_f(r['last_window_recall'])} | "
                     f"{'-' if 'detector' not in r else _f(alarm)} | {'-' if 'detector' not in r else _f(clear)} | "
                     f"{r.get('rounds_adapting', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
