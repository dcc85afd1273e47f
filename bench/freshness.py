"""Freshness: time from ReportOutcome to the first response served by a version that learned it.

    python -m bench.freshness [--duration 120] [--rate 50]

Starts the real trainer (default settings: it bootstraps fraud from the real data) and the
fraud service as processes, then a storefront client scores real transactions (the part of
the creditcard stream the bootstrap did not see) at --rate per second and reports each
label right after. For every outcome: its log offset (from the event log), the first
version whose manifest says it learned up to that offset, and the first time a response
came from that version; freshness = that time - the time the outcome was reported.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ops.procs import FraudLoop
from bench.storefront import Storefront
from shared.registry import ModelRegistry
from trainer.eventlog import SqliteEventLog

HORIZON_S = 30.0  # freshness_p95_all_s: outcomes reported at least this long before the traffic ended


def fraud_stream_rows():
    """(the creditcard data, the first row the bootstrap did not see)."""
    from trainer.domains.fraud_bootstrap import fraud_split
    from trainer.domains import fraud

    data = fraud.load_creditcard()
    _, _, rest = fraud_split(data)
    return data, len(data) - len(rest)


def measure(duration_s: float, rate: float, workdir: Path, trainer_args: list[str] = ()) -> dict:
    data, start_row = fraud_stream_rows()
    # no retention: the measurement reads every outcome's offset from the log after the run, and
    # retention deletes what the learner committed (without this, 148 of 5,169 outcomes were left)
    loop = FraudLoop(workdir, ["--retention-interval-s", "0", *trainer_args])
    t0 = time.time()
    print(f"[freshness] starting trainer (bootstrap from real data) and fraud service in {workdir}", file=sys.stderr)
    loop.start()
    print(f"[freshness] up after {time.time() - t0:.1f} s", file=sys.stderr)

    def outcome_offsets() -> dict[str, int]:
        with SqliteEventLog(loop.event_log) as log:
            return {e.prediction_id: e.offset for e in log.read(0, 10_000_000, domain="fraud", kind="outcome")}

    return traffic(f"127.0.0.1:{loop.fraud_port}", loop.registry, outcome_offsets, loop.stop, data, start_row,
                   duration_s, rate)


def traffic(target: str, registry_dir: Path, outcome_offsets, stop, data, start_row: int, duration_s: float,
            rate: float) -> dict:
    """Storefront traffic at `rate` for `duration_s` against a running loop (target: the fraud
    service, one address or its replicas), then `stop()` (its exit codes) and the freshness of
    every outcome: outcome_offsets() maps prediction id -> its offset in the event log."""
    print(f"[freshness] traffic for {duration_s:.0f} s at {rate}/s to {target}", file=sys.stderr)
    shop = Storefront(target, data, range(start_row, len(data)))
    try:
        shop.start(pause_s=1.0 / rate)
        end = time.time() + duration_s
        while time.time() < end:
            time.sleep(5)
            print(f"[freshness] {shop.outcomes} outcomes, versions seen {sorted(shop.versions, key=int)}", file=sys.stderr)
        shop.stop()
        time.sleep(2)
    finally:
        codes = stop()
    offsets = outcome_offsets()
    registry = ModelRegistry(registry_dir)
    learned = sorted((registry.manifest("fraud", v).learned_up_to or 0, int(v)) for v in registry.versions("fraud"))
    fresh = []
    of_outcome: dict[str, float] = {}
    for pid, t_reported in shop.reported.items():
        off = offsets.get(pid)
        if off is None:
            continue
        versions = [v for up_to, v in learned if up_to >= off and str(v) in shop.first_seen]
        if versions:
            fresh.append(shop.first_seen[str(min(versions))] - t_reported)
            of_outcome[pid] = fresh[-1]
    fresh_a = np.array(fresh)
    # Over every outcome reported at least HORIZON_S before the traffic ended, one no learned version
    # served by then counted as longer than the horizon: a percentile of all of them, not only of
    # those served in time (the last seconds' outcomes cannot be, so they are left out)
    t_end = max(shop.reported.values(), default=0.0)
    evaluated = [of_outcome.get(pid, np.inf) for pid, t in shop.reported.items() if t <= t_end - HORIZON_S]
    p95_all = float(np.percentile(evaluated, 95)) if evaluated else None
    return {
        "outcomes_reported": len(shop.reported), "outcomes_in_log": len(offsets),
        "outcomes_served_by_a_learned_version": len(fresh),
        "versions_published": len(learned), "versions_seen": sorted(shop.versions, key=int),
        "freshness_p50_s": round(float(np.percentile(fresh_a, 50)), 2) if len(fresh) else None,
        "freshness_p95_s": round(float(np.percentile(fresh_a, 95)), 2) if len(fresh) else None,
        "freshness_max_s": round(float(fresh_a.max()), 2) if len(fresh) else None,
        "errors": len(shop.errors), "exit_codes": list(codes), "duration_s": duration_s, "rate_per_s": rate,
        "horizon_s": HORIZON_S, "outcomes_evaluated": len(evaluated),
        "freshness_p95_all_s": None if p95_all is None or not np.isfinite(p95_all) else round(p95_all, 2),
        "p95_beyond_horizon": p95_all is not None and not np.isfinite(p95_all),
        # how far the learner had come when the traffic ended: the newest version's offset vs the log's
        "last_learned_offset": max((up_to for up_to, _ in learned), default=0),
        "last_outcome_offset": max(offsets.values(), default=0),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--rate", type=float, default=50.0, help="transactions (and labels) per second")
    ap.add_argument("--out", default="bench/results/freshness.json")
    ap.add_argument("--trainer-args", default="", help="extra trainer flags, e.g. '--gate-min-gain -1' (default: none, "
                                                      "the trainer's defaults)")
    args = ap.parse_args(argv)
    trainer_args = shlex.split(args.trainer_args)
    with tempfile.TemporaryDirectory(prefix="freshness-") as tmp:
        result = measure(args.duration, args.rate, Path(tmp), trainer_args)
    result["trainer_args"] = trainer_args
    print(f"Trainer: {' '.join(trainer_args) or 'defaults'}.\n")
    print("| outcomes | in a served version | versions | freshness p50 s | p95 s | max s | errors |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {result['outcomes_reported']} | {result['outcomes_served_by_a_learned_version']} | "
          f"{result['versions_published']} | {result['freshness_p50_s']} | {result['freshness_p95_s']} | "
          f"{result['freshness_max_s']} | {result['errors']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
