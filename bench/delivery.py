"""Safe continuous delivery (issue 12): the gate, canary decisions, drift recovery, bytes kept.

    python -m bench.delivery [--rows 120000 --drift-row 60000] [--log-hours 1.25] [--skip gate,canary,...]

Every part goes through the production path, scaled down so the whole bench takes about ten
minutes on 2 cores (each part prints its scale):

(a) gate + (c) drift: bench/drift.py's measurement, called in this process (its creditcard
    replay, its injected abrupt drift, its runs `action on` / `action off` / frozen; the
    production Learner's rounds: replay, the gate, ONNX export, parity, latency, publish). During
    the `action on` run every round's decision is counted, and every published candidate is
    judged again one round later: the challenger (the published version) against the champion
    it replaced, on the NEXT round's gate window (rows neither trained on), with the gate's own
    metric and rule (Learner._gate: paired bootstrap). "Worse" = a lower point estimate of the
    first metric the gate decides on; "worse with confidence" = the gate would refuse it.
    The run's results are also written to bench/results/drift.json.
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
T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[delivery {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ------------------------------------------------------------------------- (a) + (c)
class NextWindow:
    """Watches the Learner's rounds (bench/drift.py's observer): counts decisions and judges each
    published candidate against the champion it replaced on the next round's gate window."""

    def __init__(self) -> None:
        self.decisions: list[dict[str, Any]] = []
        self.judged: list[dict[str, Any]] = []
        self._champion = None
        self._waiting: dict[str, Any] | None = None

    def before_round(self, learner) -> None:
        self._champion = copy.deepcopy(learner.champion if learner.champion is not None else learner.net)

    def after_round(self, learner, entry: dict[str, Any]) -> None:
        if self._waiting is not None and len(learner.window):
            w = self._waiting
            decision, _, ev = learner._gate(w["champion"], w["candidate"], learner.window)
            first = (ev.get("decided_on") or [None])[0]
            r = ev["metrics"][first] if first else None
            seen = np.isin(learner.window.offsets, w["window_offsets"])
            self.judged.append({
                "published_round": w["round"], "version": w["version"], "next_window_rows": len(learner.window),
                "next_window_positives": int(ev["window_positives"]),
                "share_of_rows_in_publishing_window": round(float(seen.mean()), 3), "metric": first,
                "tier": ev.get("tier"), "champion": r and r["champion"], "challenger": r and r["challenger"],
                "relative_difference": r and r["relative_difference"], "interval": r and r["interval"],
                "worse": bool(r is not None and r["relative_difference"] < 0),
                "worse_with_confidence": decision == "refused", "undecided": r is None})
            self._waiting = None
        self.decisions.append({"round": entry.get("round"), "decision": entry["decision"],
                               "drift": bool(entry.get("drift")), "window_rows": entry.get("window_rows"),
                               "tier": (entry.get("evidence") or {}).get("tier")})
        if entry["decision"] == "published":
            self._waiting = {"champion": self._champion, "candidate": copy.deepcopy(learner.net),
                             "round": entry.get("round"), "version": entry.get("version"),
                             "window_offsets": learner.window.offsets.copy()}

    def summary(self) -> dict[str, Any]:
        count = {d: sum(1 for x in self.decisions if x["decision"] == d) for d in ("published", "refused", "deferred")}
        judged = [j for j in self.judged if not j["undecided"]]
        worse = sum(j["worse"] for j in judged)
        return {"rounds": len(self.decisions), **count,
                "published_judged_on_next_window": len(judged),
                "published_not_judged": count["published"] - len(judged),
                "worse_on_next_window": worse,
                "worse_share": round(worse / len(judged), 4) if judged else None,
                "worse_with_confidence_on_next_window": sum(j["worse_with_confidence"] for j in judged),
                "median_relative_difference": round(statistics.median(j["relative_difference"] for j in judged), 4)
                if judged else None,
                "median_share_of_next_window_rows_seen_by_the_gate": round(statistics.median(
                    j["share_of_rows_in_publishing_window"] for j in judged), 3) if judged else None,
                "target_worse_share": 0.05}


def gate_and_drift(args) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = drift_bench.Config(rows=args.rows, drift_row=args.drift_row)
    observer = NextWindow()
    drift_bench.quiet_logs()
    progress(f"(a)+(c) drift replay: {args.rows:,} rows, drift at {args.drift_row:,}, rounds of {cfg.round_labels} labels")
    report = drift_bench.measure(cfg, observer=observer)
    drift_bench.write(report)
    gate = {"summary": observer.summary(), "decisions": observer.decisions, "judged": observer.judged,
            "stream": f"creditcard, first {report['protocol']['rows']:,} rows, drift injected at row "
                      f"{cfg.drift_row:,} (bench/drift.py), run `action on`"}
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
                               "per arm, margin 5 %, 500 resamples); rounds off",
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
    if "gate" in rep:
        g, s = rep["gate"], rep["gate"]["summary"]
        share = "-" if s["worse_share"] is None else f"{100 * s['worse_share']:.1f} %"
        median = "-" if s["median_relative_difference"] is None else f"{100 * s['median_relative_difference']:+.2f} %"
        out += ["### (a) Gate decisions on a creditcard replay with an injected drift", "",
                f"{g['stream']}. Every round of the production Learner (gate: paired bootstrap on the rolling window). "
                "Each published candidate is judged again on the NEXT round's gate window, against the champion it "
                "replaced, with the gate's metric and rule. Target: <= 5 % of published candidates worse there.", "",
                "| rounds | published | refused | deferred | published judged on the next window | worse there "
                "(point estimate) | share | worse with confidence | median relative difference | median share of "
                "next-window rows the gate had seen |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                f"| {s['rounds']} | {s['published']} | {s['refused']} | {s['deferred']} | "
                f"{s['published_judged_on_next_window']} | {s['worse_on_next_window']} | {share} | "
                f"{s['worse_with_confidence_on_next_window']} | {median} | "
                f"{s['median_share_of_next_window_rows_seen_by_the_gate']} |", ""]
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
    ap.add_argument("--rows", type=int, default=120_000, help="(a)/(c): first N creditcard rows")
    ap.add_argument("--drift-row", type=int, default=60_000, help="(a)/(c): where the drift is injected")
    ap.add_argument("--canary-share", type=float, default=0.5)
    ap.add_argument("--canary-timeout-s", type=float, default=180.0, help="(b): give up waiting for a decision")
    ap.add_argument("--noise", type=float, default=1.0,
                    help="(b): noise added to the bad candidate's weight matrices, x each matrix's std")
    ap.add_argument("--demo-s", type=float, default=15.0, help="(d): seconds of ops.up --demo traffic")
    ap.add_argument("--log-hours", type=float, default=1.25, help="(e): hours of record time at 200 events/s")
    ap.add_argument("--skip", default="", help=f"comma list of parts to skip: {','.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    if skip - set(PARTS):
        ap.error(f"--skip: unknown part(s) {sorted(skip - set(PARTS))}")
    started = time.time()
    rep: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "scale": {"rows": args.rows, "drift_row": args.drift_row, "demo_s": args.demo_s,
                                     "log_hours": args.log_hours, "canary_share": args.canary_share}}
    if "gate" not in skip:
        rep["gate"], rep["drift"] = gate_and_drift(args)
    if "canary" not in skip:
        rep["canary"] = canary(args)
    templates = None
    if "bytes" not in skip or "disk" not in skip:
        rep["bytes"], templates = bytes_per_event(args)
    if "disk" not in skip:
        rep["disk"] = disk_over_time(args, templates)
    rep["seconds_total"] = round(time.time() - started, 1)
    rep["machine"] = machine_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=2, default=float) + "\n")
    print(f"Scale: creditcard replay of {args.rows:,} rows (drift at {args.drift_row:,}); canary share "
          f"{args.canary_share:g}; {args.demo_s:g} s demo; {args.log_hours:g} h of record time for the disk curve. "
          f"{rep['machine']['cpus_usable']} CPUs, {rep['seconds_total']:.0f} s in all.\n")
    print(render(rep))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
