"""Learning-loop benchmarks in one run: ingest rate into the durable log, and freshness.

    python -m bench.loop [--quick]

Runs bench.ingest (records/s through the real collector, and straight into the log) and
bench.freshness (ReportOutcome -> first response from a version that learned it) twice: with
the trainer's default settings, and on the loop's direct path (--gate-min-gain -1 --delivery
direct). By default a fraud candidate publishes only once the gate's window holds 30 frauds and
it beats the champion with confidence (at 50 transactions/s of this stream, about 0.17 % frauds,
that takes minutes), and then runs in shadow until live labels promote it (fraud's canary mode):
within the run the defaults may serve nothing new. The direct path measures the loop itself:
outcome -> log -> join -> round -> gate (refusal only) -> export -> publish -> reload. "Learned"
is a version's learned_up_to (the offset its learner committed): a label in the gate's
evaluation window is committed but held out of training until 30 newer frauds push it out. Prints
the tables and writes bench/results/loop.json: {"date", "ingest", "freshness" (defaults),
"freshness_direct"}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import freshness, ingest

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer records and a shorter freshness run")
    args = ap.parse_args(argv)
    ingest_out, fresh_out = RESULTS / "ingest.json", RESULTS / "freshness.json"
    rc = ingest.main(["--records", "20000" if args.quick else "50000", "--out", str(ingest_out)])
    duration = "40" if args.quick else "120"
    rc |= freshness.main(["--duration", duration, "--out", str(fresh_out)])
    direct = RESULTS / "freshness_direct.json"
    rc |= freshness.main(["--duration", duration, "--out", str(direct), "--trainer-args",
                          "--gate-min-gain -1 --delivery direct"])
    combined = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "ingest": json.loads(ingest_out.read_text()), "freshness": json.loads(fresh_out.read_text()),
                "freshness_direct": json.loads(direct.read_text())}
    (RESULTS / "loop.json").write_text(json.dumps(combined, indent=2))
    print(f"wrote {RESULTS / 'loop.json'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
