"""Run benchmarks and write docs/BENCHMARKS.md (each table with its command, date and machine)
and the README's headline figures (bench/headline.py).

    python -m bench.suite                   # the `make bench` set (serving, hot swap, loop, domain serving, recommender eval)
    python -m bench.suite eval-fraud        # any steps by name (see --list); others keep their last section
    python -m bench.suite --docs-only       # rebuild docs/BENCHMARKS.md and the README's figures from what is recorded

Each step runs as a child process with its output shown live; its stdout (the markdown
tables every benchmark prints) is kept in bench/results/sections/<step>.md together with
the command, the date, how long it took, its exit status and the machine. BENCHMARKS.md is
put together from every recorded section, so running one step refreshes only its section
and the document always says when each table was measured; the README's figures table is
regenerated from bench/results/*.json the same way. Exit status: 1 if a step failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench import headline
from bench.machine import machine_info
from ops.generated import write_block

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ROOT / "bench" / "results" / "sections"
DOC = ROOT / "docs" / "BENCHMARKS.md"
README = headline.README
RESULTS = headline.RESULTS


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    title: str
    argv: tuple[str, ...]  # after the Python interpreter
    what: str
    in_default: bool = True


STEPS = [
    Step("serving", "Serving: V2 server vs in-process ONNX Runtime, batching, hot swap", ("-m", "bench.serving"),
         "Requests/s, p50/p99 and server CPU per request at fixed concurrency for the two benchmark models; "
         "micro-batching on vs off; failed requests and p99 while a new version is published about every second."),
    Step("loop", "Learning loop: ingest and freshness", ("-m", "bench.loop"),
         "Records/s into the durable event log through the real collector; time from an outcome reaching the "
         "fraud service to the first response from a version that learned it, with the trainer's defaults and on "
         "the direct path (no must-beat bar, no canary: the loop itself)."),
    Step("fraud-serving", "Fraud: ScoreTransaction vs V2 ModelInfer", ("-m", "bench.fraud_serving"),
         "p99 of the domain API against the plain V2 call of the same model in the same process and run (c=32); "
         "then the same pair on a fraud service with the feedback off, which separates the API's own cost from "
         "recording what it served for the trainer (whose ingest shares the two cores)."),
    Step("recommender-serving", "Recommender: Recommend on a 100k-item catalog", ("-m", "bench.recommender_serving"),
         "Recommend p50/p99 and req/s at c=1, 8, 32, batched vs unbatched in the same run."),
    Step("pricing-serving", "Pricing: Quote vs V2 ModelInfer", ("-m", "bench.pricing_serving"),
         "Quote p99 against the plain V2 call of the same model in the same process and run (c=32)."),
    Step("overload", "Overload: admission control at 2.5x capacity", ("-m", "bench.overload"),
         "Requests/s, admitted p50/p99 and calls by status code: closed-loop steady load at capacity, then an "
         "open loop at 2.5x it, with admission control on (defaults) and off; medians of 2 rounds.",
         in_default=False),
    Step("eval-recommender", "Recommender: prequential evaluation on Ta Feng", ("-m", "bench.eval_recommender"),
         "HR@10 / NDCG@10 over the last 30 days, every ranking by the exported ONNX graphs of the version the "
         "registry serves, one production learning round (joined outcomes, gate, export, publish) a day, against "
         "popularity, buy-again by distinct days, recency-weighted buy-again and TIFU-KNN on the same (customer, day)s; "
         "the model / strongest-baseline ratio with a paired bootstrap interval; the bootstrap's graphs on the same "
         "pairs, never replaced and with each day's recent sales: what the daily rounds add (about 6 minutes on 2 "
         "cores: the committed run took 334 s)."),
    Step("eval-fraud", "Fraud: prequential evaluation on the creditcard stream", ("-m", "bench.eval_fraud"),
         "PR-AUC, ROC-AUC, recall at 0.1 % / 1 % FPR: incremental loop vs full retrain vs River; robustness "
         "under PGD (about 16 minutes on two cores: the committed run took 959 s, River's AMF from its cache; "
         "`--amf refresh` runs it again, about 14 minutes more).", in_default=False),
    Step("drift", "Fraud: recovery from an injected abrupt drift", ("-m", "bench.drift", "--compare-actions"),
         "Creditcard replay with a signed permutation of the 8 most fraud-separating features from row 80,000 on: "
         "labels and wall seconds until rolling recall at 1 % FPR is back to 90 % of its pre-drift level, with the "
         "drift action on, off, candidate actions, and a frozen model (about 6 minutes).", in_default=False),
    Step("delivery", "Safe delivery: gate, canary, drift recovery, bytes kept", ("-m", "bench.delivery"),
         "Creditcard replay with an injected drift: rounds published / refused / deferred and published candidates "
         "worse than the champion they replaced on a later window disjoint from the gate's (target <= 5 %); canary "
         "rollback and promotion under c=32 with time to decision and failed requests (target 0); drift recovery with "
         "the action on / off vs frozen; bytes per event and per registry version per domain; the event log's disk at "
         "200 events/s with retention (target: flat). Scaled down for `make bench` (the scale is printed; about 10 "
         "minutes on 2 cores); `python -m bench.delivery --full` for the whole stream."),
    Step("eval-pricing", "Pricing: market simulation against the best fixed price", ("-m", "bench.eval_pricing"),
         "Revenue and regret of the live service vs the reference price and epsilon-greedy.", in_default=False),
    Step("demo-calibration", "Recommender: click calibration in `make demo`",
         ("-m", "bench.demo_calibration", "--demo", "120"),
         "`python -m ops.up --demo 120` (what `make demo` runs): real Ta Feng Recommend traffic with "
         "clicks at storefront rates; per recommender version, the mean served click probability against the "
         "observed click rate and the expected calibration error, from the trainer's learning report (in a fresh "
         "folder every domain is bootstrapped first: 15-25 minutes on 2 busy cores; `--copy-of` starts from a "
         "copy of a bootstrapped one).", in_default=False),
    Step("scaled", "Beyond one host: Redis Streams ingest, fraud replicas, freshness with replicas", ("-m", "bench.scaled"),
         "Records/s into the event log on Redis Streams (appendfsync always and everysec; direct and through the "
         "collector); requests/s through one vs two fraud replicas behind one round_robin client (c=32) and freshness "
         "p95 with two replicas and two trainers on Redis (4-10 minutes on 2 cores, the first fraud bootstrap "
         "included).", in_default=False),
    Step("fuzz", "Hostile requests: status codes and memory", ("-m", "bench.fuzz"),
         "At least 3,000 hostile requests per service (domain APIs, outcomes, KServe V2, unknown methods, "
         "undecodable bytes) against the whole suite; targets: 0 INTERNAL, 0 UNKNOWN, 0 failed well-formed "
         "requests among them; resident memory before and after.", in_default=False),
]
BY_NAME = {s.name: s for s in STEPS}


def _available(step: Step) -> bool:
    import importlib.util

    return step.argv[0] != "-m" or importlib.util.find_spec(step.argv[1]) is not None


def run_step(step: Step, python: str = sys.executable) -> int:
    cmd = [python, *step.argv]
    shown = "python " + " ".join(shlex.quote(a) for a in step.argv)
    print(f"\n=== {step.name}: {shown}", file=sys.stderr, flush=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:  # live, and kept
        sys.stdout.write(line)
        sys.stdout.flush()
        out.append(line)
    rc = proc.wait()
    took = time.monotonic() - t0
    SECTIONS.mkdir(parents=True, exist_ok=True)
    meta = {"step": step.name, "command": shown, "started": started, "seconds": round(took), "exit_status": rc,
            "machine": machine_info()}
    (SECTIONS / f"{step.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    (SECTIONS / f"{step.name}.md").write_text("".join(out))
    return rc


def _machine_line(m: dict) -> str:
    return (f"{m.get('cpu_model') or 'unknown CPU'}, {m.get('cpus_usable')} usable cores, "
            f"Python {m.get('python')}, {m.get('platform')}, load average at the end {m.get('loadavg')}")


def build_doc() -> str:
    parts = ["# Benchmarks", "",
             "Written by `make bench` (`python -m bench.suite`); each section was produced by the command it names, "
             "on the machine and at the date it names. Machines are noisy: compare rows of one table (measured in "
             "the same run), not figures across tables or machines. How each benchmark works: `bench/README.md`.",
             "", "| section | measured | took | exit |", "|---|---|---|---|"]
    sections = []
    for step in STEPS:
        meta_path, body_path = SECTIONS / f"{step.name}.json", SECTIONS / f"{step.name}.md"
        if not meta_path.exists() or not body_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        status = "ok" if meta["exit_status"] == 0 else f"exit {meta['exit_status']}"
        parts.append(f"| [{step.title}](#{step.name}) | {meta['started']} | {meta['seconds']} s | {status} |")
        sections += [f'<a id="{step.name}"></a>', f"## {step.title}", "", step.what, "",
                     f"- command: `{meta['command']}`", f"- measured: {meta['started']}, took {meta['seconds']} s, "
                     f"exit status {meta['exit_status']}", f"- machine: {_machine_line(meta['machine'])}", "",
                     body_path.read_text().rstrip(), ""]
    return "\n".join(parts + [""] + sections).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("steps", nargs="*", help="step names (default: the `make bench` set)")
    ap.add_argument("--list", action="store_true", help="list the steps and exit")
    ap.add_argument("--docs-only", action="store_true",
                    help="only rebuild docs/BENCHMARKS.md and the README's figures")
    args = ap.parse_args(argv)
    if args.list:
        for s in STEPS:
            print(f"{s.name:22s} {'default ' if s.in_default else 'on demand'}  python {' '.join(s.argv)}")
        return 0
    unknown = [n for n in args.steps if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown step(s) {unknown}; see --list")
    rc = 0
    if not args.docs_only:
        chosen = [BY_NAME[n] for n in args.steps] or [s for s in STEPS if s.in_default and _available(s)]
        for step in chosen:
            if not _available(step):
                print(f"{step.name}: {step.argv[1]} is not in this checkout", file=sys.stderr)
                rc = 1
                continue
            rc |= 1 if run_step(step) else 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(build_doc())
    write_block(README, headline.BLOCK, headline.table(RESULTS))
    print(f"wrote {DOC} and the figures in {README}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
