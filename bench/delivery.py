"""Safe continuous delivery (issue 12): the gate, canary decisions, drift recovery, bytes kept.

    python -m bench.delivery [--full] [--rows N --drift-row N] [--log-hours 2] [--skip gate,canary,...]

Every part goes through the production path. The default is scaled down so the whole bench
runs in `make bench` (measured: 48-53 minutes on 2 cores shared with other work, load 9-15; the
gate and drift replay are about 60 % of it, `--skip` re-measures parts); --full replays the whole creditcard stream
(about an hour). The scale is printed first and recorded in the results.

(a) gate + (c) drift: bench/drift.py's measurement, called in this process (its creditcard
    replay, its injected abrupt drift, its runs `action on` / `action off` / frozen; the
    production Learner's rounds: replay, the gate, ONNX export, parity, latency, publish). During
    the `action on` run every round's decision is counted, and every published candidate is
    judged again LATER, on rows disjoint from the gate window that decided it: frozen copies of
    the challenger (the published version) and of the champion it replaced, on the labels that
    arrive after the decision (no model trained on them), oldest first, until they hold the
    positives and rows the gate's window needs outside drift (fraud: 30 frauds, 2,000 rows), with
    the gate's metrics and rule (trainer.gate.decide). "Worse" = a lower point estimate of the
    first metric the gate decides on (PR-AUC); "beyond the margin" = more than the gate's relative
    margin (2 %) lower; "with confidence" = the gate would refuse it there. --gate-baseline (on with
    --full) adds two runs judged the same way: the gate's rule before must-beat (publish unless the
    point estimate is behind or the candidate is worse with confidence), and must-beat on the
    refusal's 95 % interval instead of the 99 % one (--gate-publish-confidence). The runs' results are also written to bench/results/drift.json.
(b) canary: a real trainer process (delivery canary, canary mode for fraud, share 0.5; rounds
    off so only the two candidates below run) and a real fraud service process over one
    registry; 32 concurrent clients score real creditcard transactions and report their real
    labels through the service (every fraud of rows 30,000-60,000 and ten legitimate rows per
    fraud, so both arms get frauds quickly). A candidate with noised weights, then one with the
    champion's weights, are published through Learner._publish_and_save (the step after the gate:
    export, parity, latency, calibrated thresholds, publish, start_canary); the trainer's
    CanaryDecider judges each on live labels. Reported: decision, seconds from start_canary to the
    decision, labels per arm, failed requests (ScoreTransaction and ReportOutcome).
(d) bytes: registry version folders after a bootstrap of each domain (tests/suite_fixtures:
    small real first versions), then `python -m ops.up --demo` (the whole suite, real traffic and
    outcomes of every domain through the services) with retention off; the event log's payloads
    (the serialized FeedbackRecords the services sent) per domain and kind, and versions
    published during the demo.
(e) disk over time: SqliteEventLog + one Joiner per domain + the learner's commit (a consumer
    commit every 200 labels or 30 s, as DomainLoop does; no training) + retention passes every
    60 s with the trainer's default RetentionPolicy, at 200 events/s of record time. Time is
    compressed through the records' own clock (served_at / occurred_at) and retain(now=...): the
    records are copies of the real ones captured in (d) (new ids and times). Label delays:
    fraud 30 s, pricing 10 s, recommender 5 s (the demo's order of magnitude, not the 14-day
    chargeback tail). The log's size on disk (database + WAL) is sampled every retention pass.

Writes bench/results/delivery.json (with bench/machine.py's machine info) and prints markdown
tables on stdout; progress on stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import drift as drift_bench
from bench.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "delivery.json"
PARTS = ("gate", "canary", "bytes", "disk")
PART_KEYS = {"gate": ("gate", "drift"), "canary": ("canary",), "bytes": ("bytes",), "disk": ("disk",)}
BASELINE_RUN = "action on, gate without the must-beat bar"
BAR95_RUN = "action on, must-beat bar at 95 %"  # the bar on the refusal's interval (before it read 99 %)
# `make bench` runs the default; --full replays the whole creditcard stream (about an hour on 2 cores)
SCALES = {"default": {"rows": 100_000, "drift_row": 50_000, "gate_baseline": False},
          "full": {"rows": 0, "drift_row": 80_000, "gate_baseline": True}}
T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[delivery {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ------------------------------------------------------------------------- (a) + (c)
class LaterWindow:
    """Watches the Learner's rounds (bench/drift.py's observer): counts decisions and judges each
    published candidate against the champion it replaced on a LATER window, disjoint from the gate
    window that decided it: the labels that arrive after the decision (Learner.pending at the
    following rounds, before anything trains on them), oldest first, until they hold as many
    positives and rows as the gate's window needs outside drift (fraud: 30 frauds, 2,000 rows). Both
    models are frozen copies taken at the decision, so neither trained on a row of that window. The
    comparison is the gate's own (trainer.gate.decide, same metrics, bootstrap and margins)."""

    def __init__(self) -> None:
        self.decisions: list[dict[str, Any]] = []
        self.judged: list[dict[str, Any]] = []
        self._champion = None
        self._waiting: list[dict[str, Any]] = []

    def before_round(self, learner) -> None:
        self._champion = copy.deepcopy(learner.champion if learner.champion is not None else learner.net)
        new = learner.pending  # labels that arrived since the last decision: no model has seen them
        still = []
        for w in self._waiting:
            w["rows"] = w["rows"].concat(new)
            if not self._judge(learner, w):
                still.append(w)
        self._waiting = still

    def _judge(self, learner, w: dict[str, Any]) -> bool:
        from trainer.gate import decide

        spec = learner.model.gate_spec()
        need = learner._min_positives()
        min_rows = spec.min_rows if learner.config.gate_min_rows is None else learner.config.gate_min_rows
        rows = w["rows"]
        pos = np.cumsum(spec.positive(rows.y))
        if not len(pos) or pos[-1] < need or len(rows) < min_rows:
            return False
        n = max(int(np.searchsorted(pos, need)) + 1, min_rows)
        later = rows.take(slice(0, n))
        p_champion = learner.model.predict(w["champion"], later.X)
        p_challenger = learner.model.predict(w["candidate"], later.X)
        rule = learner._gate_rule()
        decision, _, ev = decide(spec, later.y, p_champion, p_challenger, rule, seed=w["round"],
                                 min_positives=need, min_rows=min_rows)
        metrics = ev["metrics"]
        first = ev["decided_on"][0]
        # a round whose labels all stayed in the window trains nothing: the candidate is the champion
        # (a tie, published); counted apart, so copies do not dilute the share of worse candidates
        copy_of_champion = bool(np.array_equal(p_champion, p_challenger))
        r = metrics[first]
        self.judged.append({
            "published_round": w["round"], "version": w["version"], "drift": w["drift"],
            "later_window_rows": n, "later_window_positives": int(ev["window_positives"]),
            "later_window_offsets": [int(later.offsets.min()), int(later.offsets.max())],
            "rows_shared_with_deciding_window": int(np.isin(later.offsets, w["window_offsets"]).sum()),
            "metric": first, "tier": ev["tier"],
            "metrics": {k: {"champion": v["champion"], "challenger": v["challenger"],
                            "relative_difference": v["relative_difference"], "interval": v["interval"]}
                        for k, v in metrics.items()},
            "gate_relative_difference": w["gate_relative_difference"], "copy_of_champion": copy_of_champion,
            "worse": bool(r["relative_difference"] < 0),
            "worse_on_any_metric": any(v["relative_difference"] < 0 for v in metrics.values()),
            "worse_beyond_margin": bool(r["relative_difference"] < -rule.margin),
            "worse_with_confidence": decision == "refused"})
        return True

    def after_round(self, learner, entry: dict[str, Any]) -> None:
        from trainer.learner import Examples

        ev = entry.get("evidence") or {}
        self.decisions.append({"round": entry.get("round"), "decision": entry["decision"],
                               "drift": bool(entry.get("drift")), "window_rows": entry.get("window_rows"),
                               "window_positives": ev.get("window_positives"), "tier": ev.get("tier")})
        if entry["decision"] == "published":
            first = (ev.get("decided_on") or [None])[0]
            self._waiting.append({
                "champion": self._champion, "candidate": copy.deepcopy(learner.net), "round": entry.get("round"),
                "version": entry.get("version"), "drift": bool(entry.get("drift")),
                "window_offsets": learner.window.offsets.copy(),
                "gate_relative_difference": first and ev["metrics"][first]["relative_difference"],
                "rows": Examples.empty(learner.model.width)})

    def summary(self, margin: float) -> dict[str, Any]:
        count = {d: sum(1 for x in self.decisions if x["decision"] == d) for d in ("published", "refused", "deferred")}
        copies = [j for j in self.judged if j["copy_of_champion"]]
        judged = [j for j in self.judged if not j["copy_of_champion"]]

        def share(key: str) -> float | None:
            return round(sum(j[key] for j in judged) / len(judged), 4) if judged else None

        return {"rounds": len(self.decisions), **count,
                "published_in_drift": sum(1 for x in self.decisions if x["decision"] == "published" and x["drift"]),
                "published_judged_on_later_window": len(judged),
                "judged_copies_of_the_champion": len(copies),
                "published_not_judged": count["published"] - len(judged) - len(copies),
                "metric": judged[0]["metric"] if judged else None,
                "worse_on_later_window": sum(j["worse"] for j in judged), "worse_share": share("worse"),
                "worse_on_any_metric": sum(j["worse_on_any_metric"] for j in judged),
                "worse_on_any_metric_share": share("worse_on_any_metric"),
                "worse_beyond_margin": sum(j["worse_beyond_margin"] for j in judged),
                "worse_beyond_margin_share": share("worse_beyond_margin"), "margin": margin,
                "worse_with_confidence": sum(j["worse_with_confidence"] for j in judged),
                "median_relative_difference": round(statistics.median(j["metrics"][j["metric"]]["relative_difference"]
                                                                      for j in judged), 4) if judged else None,
                "rows_shared_with_deciding_windows": sum(j["rows_shared_with_deciding_window"] for j in judged),
                "median_later_window_rows": int(statistics.median(j["later_window_rows"] for j in judged))
                if judged else None,
                "target_worse_share": 0.05}


def gate_and_drift(args) -> tuple[dict[str, Any], dict[str, Any]]:
    from trainer.learner import LearnerConfig

    cfg = drift_bench.Config(rows=args.rows, drift_row=args.drift_row)
    observer = LaterWindow()
    defaults = LearnerConfig()
    # the same run with weaker rules, judged the same way: publish unless behind (point) or refused
    # (no must-beat bar), and the must-beat bar on the refusal's 95 % interval
    baselines = {BASELINE_RUN: ({"gate_min_gain": None}, LaterWindow()),
                 BAR95_RUN: ({"gate_publish_confidence": defaults.gate_confidence}, LaterWindow())
                 } if args.gate_baseline else {}
    extra = tuple((name, overrides, watcher) for name, (overrides, watcher) in baselines.items())
    drift_bench.quiet_logs()
    progress(f"(a)+(c) drift replay: {f'{args.rows:,}' if args.rows else 'all'} rows, drift at {args.drift_row:,}, rounds of {cfg.round_labels} "
             f"labels; runs action on / off / frozen{''.join(' / ' + b for b in baselines)}")
    report = drift_bench.measure(cfg, observer=observer, extra=extra)
    drift_bench.write(report)
    margin = defaults.gate_margin
    gate = {"summary": observer.summary(margin), "decisions": observer.decisions, "judged": observer.judged,
            "rule": {"confidence": defaults.gate_confidence, "publish_confidence": defaults.gate_publish_confidence,
                     "min_gain": defaults.gate_min_gain, "margin": margin},
            "stream": f"creditcard, first {report['protocol']['rows']:,} rows, drift injected at row "
                      f"{cfg.drift_row:,} (bench/drift.py), run `action on`"}
    if baselines:
        gate["baselines"] = [{"run": name, "overrides": overrides, **watcher.summary(margin), "judged": watcher.judged}
                             for name, (overrides, watcher) in baselines.items()]
    return gate, report


# ------------------------------------------------------------------------- (b) canary
def canary(args) -> dict[str, Any]:
    import grpc

    from ops.procs import FraudLoop
    from protos.fraud.v1 import fraud_pb2, fraud_pb2_grpc
    from tests.fraud_fixtures import bootstrap_small_fraud
    from trainer.domains.fraud import FEATURES, FraudModel
    from trainer.learner import Learner, LearnerConfig

    out: dict[str, Any] = {"candidates": []}
    with tempfile.TemporaryDirectory(prefix="bench-delivery-canary-") as tmp:
        root = Path(tmp)
        progress("(b) bootstrap: the fraud model on 30,000 creditcard rows (tests/fraud_fixtures)")
        registry, boot, data = bootstrap_small_fraud(root)
        # the publishing side (the step after the gate) runs on a copy of the checkpoint: the trainer owns its own
        shutil.copytree(root / "trainer" / "checkpoints", root / "publisher" / "checkpoints")
        publisher = Learner(FraudModel(), registry, root / "publisher",
                            LearnerConfig(delivery="canary", canary_mode="canary", canary_share=args.canary_share))
        assert publisher.restore()
        loop = FraudLoop(root, ["--delivery", "canary", "--canary-modes", "fraud=canary", "--canary-share",
                                str(args.canary_share), "--canary-timeout-s", "240", "--min-events", "1000000000",
                                "--max-interval-s", "1e9", "--poll-interval-s", "0.2", "--retention-interval-s", "0",
                                "--report-interval-s", "0", "--gc-keep-last", "0"],
                         ["--poll-interval-s", "0.2"])
        progress("(b) starting the trainer and the fraud service")
        loop.start()
        settings = {"trainer": "--delivery canary --canary-modes fraud=canary --canary-share "
                               f"{args.canary_share} (other canary settings: defaults: 200 labels and 5 positives "
                               "per arm, margin 5 %, 500 resamples, the newest 20,000 labels per arm tested; promotion "
                               "decided on PR-AUC and recall at the operating FPR once each arm holds 30 frauds, "
                               "roll-back on those and the served log loss); rounds off",
                    "service": "fraud service defaults, --poll-interval-s 0.2", "clients": 32}
        out["settings"] = settings
        frauds = np.flatnonzero(data.y[30_000:60_000] == 1) + 30_000
        legit = np.flatnonzero(data.y[30_000:60_000] == 0)[: 10 * len(frauds)] + 30_000
        rows = np.random.default_rng(0).permutation(np.concatenate([frauds, legit]))
        hold_X, hold_y = data.X[30_000:40_000], data.y[30_000:40_000]
        try:
            for kind in ("noised weights", "champion's weights"):
                net = copy.deepcopy(publisher.net)
                if kind == "noised weights":
                    import torch

                    gen = torch.Generator().manual_seed(0)
                    with torch.no_grad():
                        for prm in net.parameters():
                            if prm.dim() < 2:  # weight matrices only (norm scales must stay positive)
                                continue
                            prm.add_(torch.randn(prm.shape, generator=gen) * args.noise * (prm.std() + 1e-3))
                p = publisher.model.predict(net, hold_X)
                entry = publisher._publish_and_save(hold_y, p, {}, decision="published",
                                                    candidate=(net, publisher.model.optimizer(net)))
                if entry["decision"] != "published" or "canary" not in entry:
                    raise RuntimeError(f"candidate not started as canary: {entry}")
                version, started = entry["version"], entry["canary"]["started"]
                progress(f"(b) {kind}: version {version} started as canary (share {args.canary_share})")
                run = asyncio.run(drive_until_decided(f"127.0.0.1:{loop.fraud_port}", registry, data, rows, version,
                                                      fraud_pb2, fraud_pb2_grpc, grpc, FEATURES, args.canary_timeout_s))
                decided = [d for d in read_jsonl(loop.workdir / "decisions" / "fraud.jsonl")
                           if d.get("kind") == "canary" and d.get("version") == version]
                d = decided[-1] if decided else None
                row = {"candidate": kind, "version": version, "decision": d["decision"] if d else "none",
                       "seconds_to_decision": round(d["time"] - started, 1) if d else None,
                       "arms": (d or {}).get("canary", {}).get("arms"), "reasons": (d or {}).get("reasons"),
                       "current_after": registry.current_version("fraud"), **run}
                progress(f"(b) {kind}: {row['decision']} after {row['seconds_to_decision']} s, "
                         f"{row['failed_requests']} failed of {row['requests']}")
                out["candidates"].append(row)
                publisher.canary_decided(version, promoted=(d or {}).get("decision") == "canary_promoted")
        finally:
            codes = loop.stop()
            out["exit_codes"] = {"fraud": codes[0], "trainer": codes[1]}
    return out


async def drive_until_decided(address, registry, data, rows, version, fraud_pb2, fraud_pb2_grpc, grpc, FEATURES,
                              timeout_s: float) -> dict[str, Any]:
    """32 clients: ScoreTransaction then ReportOutcome with the real label, until the registry's
    CANARY is gone (the trainer decided) or timeout_s."""
    stop = asyncio.Event()
    counter = iter(range(10**9))
    failures: dict[str, int] = {}
    versions: dict[str, int] = {}
    requests = 0
    channel = grpc.aio.insecure_channel(address)
    stub = fraud_pb2_grpc.FraudStub(channel)

    async def client(c: int) -> None:
        nonlocal requests
        while not stop.is_set():
            n = next(counter)
            i = int(rows[n % len(rows)])
            x = data.X[i]
            req = fraud_pb2.ScoreTransactionRequest(transaction_id=f"tx-{n}", amount=float(x[-1]), timestamp=time.time(),
                                                    card_ref=f"card-{n}", features=dict(zip(FEATURES, map(float, x[:-1]))))
            try:
                resp = await stub.ScoreTransaction(req, timeout=10)
                requests += 1
                versions[resp.model.version] = versions.get(resp.model.version, 0) + 1
                await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=resp.prediction_id,
                                                                 is_fraud=bool(data.y[i])), timeout=10)
            except grpc.aio.AioRpcError as e:
                key = e.code().name
                failures[key] = failures.get(key, 0) + 1

    async def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = await asyncio.to_thread(registry.canary, "fraud")
            if state is None or state.version != version:
                break
            await asyncio.sleep(0.1)
        stop.set()

    t0 = time.monotonic()
    tasks = [asyncio.create_task(client(c)) for c in range(32)]
    await watch()
    await asyncio.gather(*tasks, return_exceptions=True)
    took = time.monotonic() - t0
    await channel.close()
    return {"requests": requests, "failed_requests": sum(failures.values()), "failures": failures,
            "answered_by_version": versions, "load_seconds": round(took, 1),
            "requests_per_s": round(requests / took, 1) if took else None}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------- (d) bytes
def bytes_per_event(args) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    from protos.feedback.v1 import feedback_pb2 as fb
    from shared.registry import ModelRegistry
    from tests.suite_fixtures import bootstrap_small_suite
    from trainer.eventlog import SqliteEventLog

    out: dict[str, Any] = {}
    templates: dict[str, list[bytes]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-delivery-bytes-") as tmp:
        var = Path(tmp) / "var"
        progress("(d) bootstrap_small_suite: small real first versions of every domain")
        bootstrap_small_suite(var)
        registry = ModelRegistry(var / "registry")
        boot = {m: {v: du(registry.version_dir(m, v)) for v in registry.versions(m)} for m in registry.models()}
        offset = 6000 + os.getpid() % 8000
        progress(f"(d) ops.up --demo {args.demo_s:g} (the whole suite; retention off)")
        env = {**os.environ, "STOREFRONT_RETENTION_INTERVAL_S": "0"}
        proc = subprocess.run([sys.executable, "-m", "ops.up", "--var", str(var), "--port-offset", str(offset),
                               "--demo", f"{args.demo_s:g}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=env)
        demo_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("demo: ")]
        out["demo"] = {"exit_status": proc.returncode, "summary": demo_lines}
        if proc.returncode != 0:
            progress(f"(d) ops.up exited {proc.returncode}: {proc.stdout[-2000:]}")
        sizes: dict[tuple[str, str], list[int]] = {}
        with SqliteEventLog(var / "trainer" / "events.db") as log:
            after = 0
            while True:
                batch = log.read(after, 5000)
                if not batch:
                    break
                for e in batch:
                    kind = e.kind
                    if kind == "served":
                        s = e.record.served
                        if s.HasField("shadow"):
                            kind = "served (with shadow)"
                    sizes.setdefault((e.domain, kind), []).append(len(e.payload))
                    if e.kind in ("served", "outcome"):
                        key = f"{e.domain}/{e.kind}"
                        if len(templates.setdefault(key, [])) < 200 and not (e.kind == "served" and
                                                                              e.record.served.HasField("shadow")):
                            templates[key].append(e.payload)
                after = batch[-1].offset
            disk, rows = log.disk_bytes(), log.count()
        out["events"] = [{"domain": d, "kind": k, "records": len(v), "median_bytes": int(statistics.median(v)),
                          "mean_bytes": round(statistics.fmean(v), 1), "max_bytes": max(v)}
                         for (d, k), v in sorted(sizes.items())]
        out["log"] = {"rows": rows, "disk_bytes": disk, "disk_bytes_per_row": round(disk / rows, 1) if rows else None}
        registry = ModelRegistry(var / "registry")
        out["registry"] = []
        for m in sorted(registry.models()):
            versions = {v: du(registry.version_dir(m, v)) for v in registry.versions(m)}
            first = boot.get(m, {})
            later = [b for v, b in versions.items() if v not in first]
            out["registry"].append({"model": m, "bootstrap_versions": len(first),
                                    "bytes_per_bootstrap_version": int(statistics.median(first.values())) if first else None,
                                    "versions_published_in_demo": len(later),
                                    "median_bytes_per_demo_version": int(statistics.median(later)) if later else None,
                                    "model_folder_bytes": du(registry.model_dir(m))})
    return out, templates


# ------------------------------------------------------------------------- (e) disk over time
DOMAIN_RATES = {"fraud": 40, "recommender": 30, "pricing": 30}  # served/s; as many outcomes: 200 events/s
LABEL_DELAY_S = {"fraud": 30, "recommender": 5, "pricing": 10}


class Cloner:
    """Copies of real records with new ids and times (parsed once, re-serialized per copy)."""

    def __init__(self, domain: str, served: list[bytes], outcomes: list[bytes]) -> None:
        from protos.feedback.v1 import feedback_pb2 as fb

        self.domain = domain
        self.served = [fb.FeedbackRecord.FromString(b) for b in served]
        self.outcomes = [fb.FeedbackRecord.FromString(b) for b in outcomes]
        self.n = 0

    def served_copy(self, pid: str, at: float) -> bytes:
        rec = self.served[self.n % len(self.served)]
        self.n += 1
        rec.record_id = f"{self.domain}-bench-s-{pid}"
        rec.served.prediction_id, rec.served.served_at = pid, at
        return rec.SerializeToString()

    def outcome_copy(self, pid: str, at: float) -> bytes:
        rec = self.outcomes[self.n % len(self.outcomes)]
        self.n += 1
        rec.record_id = f"{self.domain}-bench-o-{pid}"
        o = rec.outcome
        o.prediction_id, o.occurred_at, o.received_at = pid, at, at
        from trainer.plugins import default_domains

        member = default_domains()[rec.domain].unpack_outcome(o)  # the domain's outcome message
        member.prediction_id = pid
        if "occurred_at" in member.DESCRIPTOR.fields_by_name:
            member.occurred_at = at
        o.domain_outcome.Pack(member)
        return rec.SerializeToString()


def disk_over_time(args, templates: dict[str, list[bytes]]) -> dict[str, Any]:
    from trainer.eventlog import SqliteEventLog
    from trainer.joiner import Joiner
    from trainer.service import TrainerSettings

    s = TrainerSettings()
    policy = s.retention_policy()
    seconds = int(args.log_hours * 3600)
    rate = sum(DOMAIN_RATES.values()) * 2
    progress(f"(e) {seconds * rate:,} events at {rate}/s of record time ({args.log_hours:g} h) through SqliteEventLog "
             "+ joiners + retention (trainer defaults)")
    cloners = {d: Cloner(d, templates[f"{d}/served"], templates[f"{d}/outcome"]) for d in DOMAIN_RATES}
    # record time starts now: the log stamps received_at with the wall clock, which the age rule
    # (15 days) compares with retain's `now`; over a few hours of record time it never applies
    start = float(int(time.time()))
    now = [start]
    samples: list[dict[str, Any]] = []
    deleted: dict[str, int] = {}
    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-delivery-disk-") as tmp:
        log = SqliteEventLog(Path(tmp) / "events.db")
        joiners = {d: Joiner(log, s.label_windows(), domain=d, grace_s=s.join_grace_s, clock=lambda: now[0])
                   for d in DOMAIN_RATES}
        labels = {d: 0 for d in DOMAIN_RATES}
        last_commit = {d: start for d in DOMAIN_RATES}
        served_pids: dict[str, list[list[str]]] = {d: [] for d in DOMAIN_RATES}
        appended = 0
        try:
            for sec in range(seconds):
                now[0] = start + sec
                batch = []
                for d, r in DOMAIN_RATES.items():
                    c = cloners[d]
                    pids = [f"{d[0]}{sec:07d}-{k:03d}" for k in range(r)]
                    served_pids[d].append(pids)
                    batch += [c.served_copy(pid, now[0] + k / r) for k, pid in enumerate(pids)]
                    j = sec - LABEL_DELAY_S[d]
                    if j >= 0:
                        batch += [c.outcome_copy(pid, now[0] + k / r) for k, pid in enumerate(served_pids[d][j])]
                        served_pids[d][j] = []
                log.append_batch(batch)
                appended += len(batch)
                for d, jn in joiners.items():
                    labels[d] += len(jn.poll(4096))
                    # the learner's round: every 200 labels, or 30 s after the last with at least one;
                    # its checkpointed progress is committed as the log consumer (DomainLoop._commit)
                    if labels[d] >= s.min_events or (labels[d] and now[0] - last_commit[d] >= s.max_interval_s):
                        cp = jn.checkpoint()
                        log.commit_offset(f"learner-{d}", cp["offset"], {"domain": d, **cp})
                        labels[d], last_commit[d] = 0, now[0]
                if (sec + 1) % int(s.retention_interval_s) == 0:
                    rep = log.retain(policy, now=now[0] + 1)
                    for (d, reason), n in rep.deleted.items():
                        deleted[f"{d}/{reason}"] = deleted.get(f"{d}/{reason}", 0) + n
                    rows = log.rows_by_kind()
                    samples.append({"record_minute": round((sec + 1) / 60, 1), "events_appended": appended,
                                    "disk_bytes_before_pass": rep.bytes_before, "disk_bytes": rep.bytes_after,
                                    "rows": rep.rows_after, "dropped_unprocessed": rep.dropped_unprocessed,
                                    "rows_by_domain": {d: rows.get((d, "served"), 0) + rows.get((d, "outcome"), 0)
                                                       for d in DOMAIN_RATES},
                                    "pass_seconds": round(rep.seconds, 3),
                                    "wall_seconds": round(time.perf_counter() - wall0, 1)})
                    if len(samples) % 10 == 0:
                        progress(f"(e) record minute {samples[-1]['record_minute']:g}: {appended:,} events, "
                                 f"{rep.bytes_after / 2**20:.1f} MB, {rep.rows_after:,} rows")
        finally:
            log.close()
    return {"mode": "SqliteEventLog + Joiner per domain + consumer commits as DomainLoop + retain(now=record time); "
                    "time compressed through the records' clock (no training)",
            "record_seconds": seconds, "events": appended, "rate_events_per_s": rate, "served_per_s": DOMAIN_RATES,
            "label_delay_s": LABEL_DELAY_S, "policy": {"windows": policy.windows, "slack_s": policy.slack_s,
                                                       "learned_domains": sorted(policy.learned_domains),
                                                       "max_age_s": policy.max_age_s, "max_bytes": policy.max_bytes,
                                                       "hard_max_bytes": policy.hard_max_bytes,
                                                       "interval_s": s.retention_interval_s},
            "deleted": deleted, "wall_seconds": round(time.perf_counter() - wall0, 1), "samples": samples}


# ------------------------------------------------------------------------- output
def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def render(rep: dict[str, Any]) -> str:
    out: list[str] = []
    for part, date in (rep.get("carried_over") or {}).items():
        out += [f"Part `{part}` was skipped in this run (--skip): its tables are the run of {date}.", ""]
    if "gate" in rep:
        g, s = rep["gate"], rep["gate"]["summary"]

        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.1f} %"

        median = "-" if s["median_relative_difference"] is None else f"{100 * s['median_relative_difference']:+.2f} %"
        s = {**s, "metric": s["metric"] or "the first gate metric"}
        rule = g["rule"]
        out += ["### (a) Gate decisions on a creditcard replay with an injected drift", "",
                f"{g['stream']}. Every round of the production Learner (gate: paired bootstrap on the rolling window; "
                f"published only when it must-beats the champion: the lower end of the {100 * rule['publish_confidence']:g} % "
                "interval of the main metric's relative difference above 0; refused when the "
                f"{100 * rule['confidence']:g} % interval lies below -{100 * rule['margin']:g} %; deferred otherwise, "
                "learning goes on). Each "
                "published candidate is judged again, against the champion it replaced, on a LATER window disjoint "
                "from the one that decided it: the labels that arrived after the decision, until they hold the gate's "
                f"positives (median {s['median_later_window_rows'] or 0:,} rows; rows shared with the deciding windows: "
                f"{s['rows_shared_with_deciding_windows']}), with the gate's metrics and rule. Published candidates "
                f"identical to the champion (rounds whose labels all stayed in the window train nothing) are left "
                f"out of the shares: {s['judged_copies_of_the_champion']}. Target: <= 5 % of "
                f"published candidates worse there. \"Worse\": lower {s['metric']} (point estimate); beyond the "
                f"margin: more than {100 * s['margin']:g} % lower; with confidence: the gate would refuse it.", "",
                "| rounds | published (in drift) | refused | deferred | judged on a later window | worse "
                f"({s['metric']}) | worse on any gate metric | worse beyond the margin | worse with confidence | "
                "median relative difference |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                f"| {s['rounds']} | {s['published']} ({s['published_in_drift']}) | {s['refused']} | {s['deferred']} | "
                f"{s['published_judged_on_later_window']} | {s['worse_on_later_window']} ({pct(s['worse_share'])}) | "
                f"{s['worse_on_any_metric']} ({pct(s['worse_on_any_metric_share'])}) | {s['worse_beyond_margin']} "
                f"({pct(s['worse_beyond_margin_share'])}) | {s['worse_with_confidence']} | {median} |", ""]
        for b in g.get("baselines", []):
            what = {BASELINE_RUN: "Without the must-beat bar (publish unless behind by point estimate or worse with "
                                  "confidence)",
                    BAR95_RUN: "With the must-beat bar on the 95 % interval (the refusal's)"}.get(b["run"], b["run"])
            out += [f"{what}, same stream and measurement: "
                    f"{b['published']} published, {b['worse_on_later_window']} of "
                    f"{b['published_judged_on_later_window']} judged worse ({pct(b['worse_share'])}), "
                    f"{b['worse_beyond_margin']} beyond the margin, {b['worse_with_confidence']} with confidence.", ""]
    if "canary" in rep:
        c = rep["canary"]
        out += ["### (b) Canary on live labels under load (c=32)", "",
                f"Real trainer and fraud service processes; {c['settings']['trainer']}. 32 clients score real "
                "transactions and report their real labels through the service (frauds enriched: ten legitimate "
                "rows per fraud). Candidates published by the post-gate step (Learner._publish_and_save).", "",
                "| candidate | version | decision | seconds to decision | labels (positives) champion / canary | "
                "requests | req/s | failed requests | answered by version |", "|---|---:|---|---:|---|---:|---:|---:|---|"]
        for r in c["candidates"]:
            arms = r.get("arms") or {}
            a, b = arms.get("champion", {}), arms.get("canary", {})
            by = ", ".join(f"v{k}: {v:,}" for k, v in sorted(r["answered_by_version"].items()))
            out.append(f"| {r['candidate']} | {r['version']} | {r['decision']} | {r['seconds_to_decision']} | "
                       f"{a.get('labels', '-')} ({a.get('positives', '-')}) / {b.get('labels', '-')} "
                       f"({b.get('positives', '-')}) | {r['requests']:,} | {r['requests_per_s']} | "
                       f"{r['failed_requests']} | {by} |")
        out.append("")
    if "drift" in rep:
        out += ["### (c) Drift recovery: action on / off / frozen (bench/drift.py, same run as (a))", "",
                drift_bench.render(rep["drift"]), ""]
    if "bytes" in rep:
        b = rep["bytes"]
        out += ["### (d) Bytes per event and per registry version", "",
                "Event log payloads (the serialized FeedbackRecords the services sent) after `ops.up --demo` "
                f"on small real first versions of every domain; {b['log']['rows']:,} events, "
                f"{_mb(b['log']['disk_bytes'])} MB on disk ({b['log']['disk_bytes_per_row']:,} bytes per event "
                "with indexes and page slack).", "",
                "| domain | kind | records | median bytes | mean bytes | max bytes |", "|---|---|---:|---:|---:|---:|"]
        for e in b["events"]:
            out.append(f"| {e['domain']} | {e['kind']} | {e['records']:,} | {e['median_bytes']:,} | "
                       f"{e['mean_bytes']:,.0f} | {e['max_bytes']:,} |")
        out += ["", "Registry: one version folder per model (small bootstrap versions: tests/suite_fixtures; the "
                "recommender's full-size version, trained on all of Ta Feng, is larger, not measured here).", "",
                "| model | bytes per bootstrap version | versions published during the demo (canary delivery: CURRENT "
                "may stay v1) | median bytes per demo version | model folder after the demo |", "|---|---:|---:|---:|---:|"]
        for r in b["registry"]:
            out.append(f"| {r['model']} | {r['bytes_per_bootstrap_version'] or 0:,} | {r['versions_published_in_demo']} | "
                       f"{r['median_bytes_per_demo_version'] or 0:,} | {r['model_folder_bytes']:,} |")
        demo = "; ".join(x.replace("demo: ", "") for x in b["demo"]["summary"][-3:])
        out += ["", f"Demo: {demo}", ""]
    if "disk" in rep:
        d = rep["disk"]
        windows = {k: int(v) for k, v in d["policy"]["windows"].items()}
        out += ["### (e) Event log on disk with retention at 200 events/s", "",
                f"{d['events']:,} events = {d['record_seconds'] / 3600:g} h of record time at {d['rate_events_per_s']} "
                f"events/s ({d['mode']}), in {d['wall_seconds']:.0f} s. Served/s {d['served_per_s']}, one outcome each, "
                f"label delays {d['label_delay_s']} s. Policy: the trainer's defaults (label windows "
                f"{windows} s + {d['policy']['slack_s']:g} s slack; "
                "fraud and pricing predictions go once their label is learned; a pass every "
                f"{d['policy']['interval_s']:g} s). The recommender keeps every prediction for its 1 h window + slack, "
                "so its share only stops growing after ~71 minutes.", "",
                "| record minute | events appended | rows kept | fraud / recommender / pricing rows | disk before the "
                "pass (MB) | disk after (MB) | dropped unprocessed |", "|---:|---:|---:|---|---:|---:|---:|"]
        n = len(d["samples"])
        picks = sorted({i for i in range(n) if i < 3 or (i + 1) % 10 == 0} | {n - 1}) if n else []
        for i in picks:
            x = d["samples"][i]
            rd = x["rows_by_domain"]
            out.append(f"| {x['record_minute']:g} | {x['events_appended']:,} | {x['rows']:,} | {rd['fraud']:,} / "
                       f"{rd['recommender']:,} / {rd['pricing']:,} | {_mb(x['disk_bytes_before_pass'])} | "
                       f"{_mb(x['disk_bytes'])} | {x['dropped_unprocessed']} |")
        out += ["", f"Deleted by retention: {d['deleted']}", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.delivery", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help=f"the full scale {SCALES['full']} instead of the default {SCALES['default']}")
    ap.add_argument("--rows", type=int, default=None, help="(a)/(c): first N creditcard rows (0: all; default: the scale's)")
    ap.add_argument("--drift-row", type=int, default=None, help="(a)/(c): where the drift is injected (default: the scale's)")
    ap.add_argument("--gate-baseline", action=argparse.BooleanOptionalAction, default=None,
                    help="(a): also run the replay with the gate's rule before must-beat (publish unless behind by point "
                         "estimate or worse with confidence) and with the must-beat bar on the 95 %% interval, judged "
                         "the same way (default: the scale's)")
    ap.add_argument("--canary-share", type=float, default=0.5)
    ap.add_argument("--canary-timeout-s", type=float, default=180.0, help="(b): give up waiting for a decision")
    ap.add_argument("--noise", type=float, default=1.0,
                    help="(b): noise added to the bad candidate's weight matrices, x each matrix's std")
    ap.add_argument("--demo-s", type=float, default=15.0, help="(d): seconds of ops.up --demo traffic")
    ap.add_argument("--log-hours", type=float, default=2.0,
                    help="(e): hours of record time at 200 events/s (the recommender keeps an hour of labels: retention levels the disk off after it, and the second hour shows it flat)")
    ap.add_argument("--skip", default="", help=f"comma list of parts to skip: {','.join(PARTS)} (a skipped part keeps "
                                                "its last results in --out, marked with their date)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    scale = SCALES["full" if args.full else "default"]
    for key, value in scale.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.rows = args.rows or None  # 0: the whole stream
    skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    if skip - set(PARTS):
        ap.error(f"--skip: unknown part(s) {sorted(skip - set(PARTS))}")
    started = time.time()
    rep: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "scale": {"name": "full" if args.full else "default", "rows": args.rows or "all",
                                     "drift_row": args.drift_row, "gate_baseline": args.gate_baseline,
                                     "demo_s": args.demo_s, "log_hours": args.log_hours,
                                     "canary_share": args.canary_share}}
    progress(f"scale: {rep['scale']}")
    if "gate" not in skip:
        rep["gate"], rep["drift"] = gate_and_drift(args)
    if "canary" not in skip:
        rep["canary"] = canary(args)
    templates = None
    if "bytes" not in skip or "disk" not in skip:
        rep["bytes"], templates = bytes_per_event(args)
    if "disk" not in skip:
        rep["disk"] = disk_over_time(args, templates)
    # a skipped part keeps its last recorded results (with the date of the run that measured them),
    # so re-measuring one part does not drop the others from the results and the docs
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    for part in sorted(skip):
        keys = [k for k in PART_KEYS[part] if k in previous and k not in rep]
        if keys:
            for k in keys:
                rep[k] = previous[k]
            rep.setdefault("carried_over", {})[part] = previous.get("carried_over", {}).get(part, previous.get("date"))
    rep["seconds_total"] = round(time.time() - started, 1)
    rep["machine"] = machine_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=2, default=float) + "\n")
    rows = f"{args.rows:,}" if args.rows else "all"
    print(f"Scale ({'--full' if args.full else 'default, scaled down; --full for the whole stream'}): creditcard "
          f"replay of {rows} rows (drift at {args.drift_row:,}"
          f"{', and the gate baseline run' if args.gate_baseline else ''}); canary share "
          f"{args.canary_share:g}; {args.demo_s:g} s demo; {args.log_hours:g} h of record time for the disk curve. "
          f"{rep['machine']['cpus_usable']} CPUs, {rep['seconds_total']:.0f} s in all.\n")
    print(render(rep))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
