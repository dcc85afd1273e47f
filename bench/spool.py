"""The feedback spool: SQLite (shared/feedback/spool.py) against the custom segment format it
replaced, measured in the same run on the same disk.

    python -m bench.spool [--runs 5] [--records 20000] [--durable 300] [--dir /tmp]

The custom spool is the one at commit CUSTOM_SPOOL_COMMIT (the last with it), read with
`git show` and loaded into this process: no copy of it is kept in the tree. Both get the same
records: real served fraud FeedbackRecords (shared.feedback.records.served_record, 30 float
features, 223 bytes), unique record ids.

- durable, fsync per record: append one record, sync; what outcome_ack_durable costs per call.
- group commit, fsync per batch: append 256 records, sync; what the sender does while the
  trainer is away.
- replay: open a spool of --records records left by a previous process (startup scan or count
  included), read them oldest first in batches of 256 (as the sender does), ack each, sync.
- bytes on disk per record: every file in the folder divided by the records, while open after
  the last sync (SQLite: database + log) and after close (SQLite checkpoints the log in).

Each figure is the median of --runs runs (a fresh folder each); the ratio is SQLite / custom.
Writes bench/results/spool.json (with bench/machine.py's machine info) and prints a markdown
table on stdout; progress on stderr.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.machine import machine_info, progress_printer
from shared.feedback.records import served_record
from shared.feedback.spool import Spool as SqliteSpool

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "spool.json"
CUSTOM_SPOOL_COMMIT = "84258f5c270d091e13d6117291f8e7e8959e4fae"
BATCH = 256
MAX_BYTES = 1 << 30


def custom_spool_class() -> type:
    """The custom segment spool as it was at CUSTOM_SPOOL_COMMIT, loaded from git."""
    src = subprocess.run(["git", "show", f"{CUSTOM_SPOOL_COMMIT}:shared/feedback/spool.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    module = types.ModuleType("bench_custom_spool")
    sys.modules[module.__name__] = module
    exec(compile(src, f"{CUSTOM_SPOOL_COMMIT[:7]}:shared/feedback/spool.py", "exec"), module.__dict__)
    return module.Spool


def records(n: int, prefix: str) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        rid = f"{prefix}-{i:012d}"
        x = np.full((1, 30), i, dtype=np.float32)
        out.append((rid, served_record(rid, "fraud", f"p{i}", "fraud", "v1", {"features": x},
                                       {"probability": x[:, :1]}, served_at=1_700_000_000.0 + i)))
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def durable_per_record(cls: type, folder: Path, recs: list[tuple[str, bytes]]) -> float:
    spool = cls(folder, MAX_BYTES)
    t0 = time.perf_counter()
    for entry in recs:
        assert spool.append([entry]) == 1 and spool.sync()
    elapsed = time.perf_counter() - t0
    spool.close()
    return len(recs) / elapsed


def group_commit(cls: type, folder: Path, recs: list[tuple[str, bytes]]) -> tuple[float, float, float]:
    """records/s appending BATCH at a time with a sync each; bytes/record open and closed."""
    spool = cls(folder, MAX_BYTES)
    t0 = time.perf_counter()
    for i in range(0, len(recs), BATCH):
        chunk = recs[i:i + BATCH]
        assert spool.append(chunk) == len(chunk) and spool.sync()
    elapsed = time.perf_counter() - t0
    open_bytes = folder_bytes(folder)
    spool.close()
    return len(recs) / elapsed, open_bytes / len(recs), folder_bytes(folder) / len(recs)


def replay(cls: type, folder: Path, n: int) -> tuple[float, float]:
    """(records/s from open to the last ack synced, seconds to open) of a spool left by group_commit."""
    t0 = time.perf_counter()
    spool = cls(folder, MAX_BYTES)
    opened = time.perf_counter() - t0
    cursor = spool.first_cursor()
    seen = 0
    while batch := spool.read(cursor, BATCH):
        for _, _, where in batch:
            spool.ack(where)
        seen += len(batch)
        spool.sync()
    elapsed = time.perf_counter() - t0
    assert seen == n and spool.pending == 0, (seen, spool.pending)
    spool.close()
    return n / elapsed, opened


def measure(name: str, cls: type, opts: argparse.Namespace, root: Path, progress: Callable[[str], None]) -> dict:
    runs: dict[str, list[float]] = {k: [] for k in ("durable_records_per_s", "batch_records_per_s", "replay_records_per_s",
                                                     "open_s", "bytes_per_record_open", "bytes_per_record_closed")}
    for run in range(opts.runs):
        folder = root / f"{name}-durable-{run}"
        runs["durable_records_per_s"].append(durable_per_record(cls, folder, records(opts.durable, f"d{run}")))
        shutil.rmtree(folder)
        folder = root / f"{name}-batch-{run}"
        rate, open_bytes, closed_bytes = group_commit(cls, folder, records(opts.records, f"b{run}"))
        runs["batch_records_per_s"].append(rate)
        runs["bytes_per_record_open"].append(open_bytes)
        runs["bytes_per_record_closed"].append(closed_bytes)
        rate, opened = replay(cls, folder, opts.records)
        runs["replay_records_per_s"].append(rate)
        runs["open_s"].append(opened)
        shutil.rmtree(folder)
        progress(f"{name} run {run + 1}/{opts.runs}: durable {runs['durable_records_per_s'][-1]:,.0f}/s, "
                 f"batch {runs['batch_records_per_s'][-1]:,.0f}/s, replay {runs['replay_records_per_s'][-1]:,.0f}/s")
    return {"median": {k: statistics.median(v) for k, v in runs.items()}, "runs": runs}


ROWS = [("durable_records_per_s", "appends/s, fsync per record", "{:,.0f}"),
        ("batch_records_per_s", f"appends/s, fsync per batch of {BATCH}", "{:,.0f}"),
        ("replay_records_per_s", "replay records/s (open, read, ack, sync)", "{:,.0f}"),
        ("open_s", "open (scan or count), s", "{:.3f}"),
        ("bytes_per_record_open", "bytes on disk per record, open", "{:,.0f}"),
        ("bytes_per_record_closed", "bytes on disk per record, closed", "{:,.0f}")]


def table(report: dict[str, Any]) -> str:
    custom, sqlite = report["custom"]["median"], report["sqlite"]["median"]
    lines = [f"Feedback spool, medians of {report['settings']['runs']} runs ({report['settings']['records']:,} records, "
             f"{report['settings']['durable']} durable appends, record {report['settings']['record_bytes']} bytes)", "",
             "| measure | custom segments | SQLite | SQLite / custom |", "|---|---:|---:|---:|"]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | {fmt.format(custom[key])} | {fmt.format(sqlite[key])} | "
                     f"{report['ratio'][key]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--records", type=int, default=20_000, help="records for group commit and replay")
    ap.add_argument("--durable", type=int, default=300, help="records appended one fsync each")
    ap.add_argument("--dir", default=None, help="where the spool folders go (default: the system temp folder)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    opts = ap.parse_args(argv)
    progress = progress_printer("spool")
    machine = machine_info(sqlite=sqlite3.sqlite_version)
    root = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=opts.dir))
    try:
        impls = {"custom": custom_spool_class(), "sqlite": SqliteSpool}
        results = {name: measure(name, cls, opts, root, progress) for name, cls in impls.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = {key: results["sqlite"]["median"][key] / results["custom"]["median"][key] for key, _, _ in ROWS}
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "settings": {"runs": opts.runs, "records": opts.records, "durable": opts.durable, "batch": BATCH,
                           "record_bytes": len(records(1, "x")[0][1]), "folder": str(Path(opts.dir or tempfile.gettempdir())),
                           "custom_spool_commit": CUSTOM_SPOOL_COMMIT},
              **results, "ratio": ratio}
    Path(opts.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
