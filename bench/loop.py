"""Learning-loop benchmarks in one run: ingest rate into the durable log, and freshness.

    python -m bench.loop [--quick]

Runs bench.ingest (records/s through the real collector, and straight into the log) and
bench.freshness (ReportOutcome -> first response from a version that learned it, with the
trainer's default settings), prints both tables, and writes bench/results/loop.json:
{"date", "ingest": <bench/results/ingest.json>, "freshness": <bench/results/freshness.json>}.
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
    rc |= freshness.main(["--duration", "40" if args.quick else "120", "--out", str(fresh_out)])
    combined = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "ingest": json.loads(ingest_out.read_text()), "freshness": json.loads(fresh_out.read_text())}
    (RESULTS / "loop.json").write_text(json.dumps(combined, indent=2))
    print(f"wrote {RESULTS / 'loop.json'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
