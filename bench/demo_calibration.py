"""`make demo` as a benchmark: does the recommender's served click probability approach the
observed click rate within the demo (issue 16)?

    nice .venv/bin/python -m bench.demo_calibration     # writes bench/results/demo_calibration.json

Runs exactly what `make demo` runs (`python -m ops.up --demo SECONDS`) in a fresh suite folder,
so every domain is bootstrapped from the bundled real data first (a few minutes), on ports
shifted by --port-offset; its output goes to var/demo_calibration.log. The demo sends
real Ta Feng customers' Recommend traffic and the clicks their later baskets imply
(ops/scenario_recommend.py: 3 % of shown items not bought, 30 % of those bought), under the
demo's trainer settings (ops/up.py DEMO_TRAINER_SETTINGS: the recommender's label window 10 s, so
shown and unclicked items become negatives within the demo; direct delivery; the recommender's
gate on the click log loss of shown items); then it waits for the round that learns its last
impressions and prints the learning report's click calibration.

Reported, from the trainer's decision log (trainer/report.py calibration_rows): per recommender
version, the mean served click probability against the observed click rate and the expected
calibration error, served (the prequential window: each label scored by the version that
served it) and on the gate's window when it was published.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "demo_calibration.json"


def summary_lines(out: str) -> list[str]:
    """The demo's own summary lines (`demo: <domain>: registry v1 -> vN; ...`)."""
    return [line for line in out.splitlines() if line.startswith("demo: ") and ": registry v" in line]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demo_calibration", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=float, default=60.0, help="seconds of demo traffic (make demo: 60)")
    ap.add_argument("--var", default="", help="suite folder (default: a fresh temporary one, bootstrapped)")
    ap.add_argument("--copy-of", default="", help="start from a copy of this stopped, bootstrapped suite folder "
                    "(what `make up` left in var) instead of bootstrapping")
    ap.add_argument("--port-offset", type=int, default=600)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    from ops.up import DEMO_TRAINER_SETTINGS
    from trainer.report import calibration_rows, calibration_table, read_decisions

    tmp = None if args.var else tempfile.TemporaryDirectory(prefix="demo-calibration-")
    var = Path(args.var or tmp.name)
    if args.copy_of:
        shutil.copytree(args.copy_of, var, dirs_exist_ok=True)
    log_path = ROOT / "var" / "demo_calibration.log"  # the suite's own lines (var/: not committed)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # a bootstrap on busy cores can outlast make demo's default 15 minutes of startup
    cmd = [sys.executable, "-m", "ops.up", "--var", str(var), "--port-offset", str(args.port_offset),
           "--startup-timeout-s", "3600", "--demo", f"{args.demo:g}"]
    start = f"a copy of {args.copy_of}" if args.copy_of else "a fresh folder bootstraps every domain first"
    print(f"running `python -m ops.up --demo {args.demo:g}` in {var} ({start}; its output in "
          f"{log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path})", flush=True)
    started = time.time()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        out = log_path.read_text()
        entries = read_decisions(var / "trainer" / "decisions" / "recommender.jsonl")
    finally:
        if tmp is not None:
            tmp.cleanup()
    took = time.time() - started
    serving_at = next((line for line in out.splitlines() if line.strip() == "all services serving"), None)
    rows = calibration_rows(entries)
    result = {"bench": "demo_calibration", "command": " ".join(["python", *cmd[1:]]), "exit_status": proc.returncode,
              "demo_s": args.demo, "wall_s": round(took, 1),
              "bootstrapped_here": not args.copy_of, "demo_trainer_settings": DEMO_TRAINER_SETTINGS,
              "all_services_serving": serving_at is not None,
              "demo_summary": summary_lines(out), "calibration_by_version": rows,
              "rounds": sum(1 for e in entries if "prequential" in e and e.get("kind") != "canary"),
              "decisions": [e.get("decision") for e in entries], "machine": machine_info()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n`make demo` ({args.demo:g} s of traffic; the demo's trainer settings {DEMO_TRAINER_SETTINGS}), "
          f"{took:.0f} s in all{' with the bootstrap' if not args.copy_of else ''}; exit status {proc.returncode}\n")
    for line in result["demo_summary"]:
        print(f"- {line}")
    print("\nRecommender click calibration per version (trainer/report.py; served: the prequential window of the "
          "last round while it was the newest version; gate window: the gate's window when it was published):\n")
    print("\n".join(calibration_table(entries)) or "(no calibration recorded)")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
