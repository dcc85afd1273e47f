"""Ingest benchmark: how many feedback records per second reach the durable event log.

    python -m bench.ingest                       # 50,000 records, every path, 1 and 16 streams (~1 min)
    python -m bench.ingest --records 10000 --streams 4
    python -m bench.ingest --pin                 # gRPC paths also with client and server on separate CPUs

Records are realistic fraud feedback: per scored transaction one served prediction (the model's
30 float features as one FP32 [1,30] tensor, its FP32 [1,1] output, the packed
ScoreTransactionRequest with V1..V28, amount and refs, the packed response with 3 reason codes)
and, a few hundred records later, its outcome (label): about 1,100 bytes per served record and
130 per outcome. Half the records are served predictions, half outcomes.

Paths, each on a fresh SQLite log (WAL, synchronous=FULL, real fsyncs) in a temporary folder:
- append-direct: `SqliteEventLog.append_batch` in groups of `--batch`, from serialized records,
  no gRPC: the ceiling of the log itself (validation, inserts, commits).
- grpc-collector: the real FeedbackCollector on a grpc.aio server in this process over loopback;
  the client (another process) opens `--streams` bidirectional streams at once (1 = one replica,
  16 = sixteen replicas sharing the trainer), spreads the records over them, writes every record
  and reads one Ack per record. Rate = records / (first write -> last ack).
- grpc-ack-only: the same client against a servicer that acks each record without storing it:
  the cost of the transport alone (one message in and one out per record), for comparison.
Server CPU is this process's (every thread), client CPU the client process's. With --pin the gRPC
paths run a second time with the client process on one CPU and the server on the others (the
scheduler otherwise bounces grpc's threads between both CPUs; same CPU cost, less waiting).

What limits the gRPC paths (measured on 2 vCPUs, grpcio 1.85): the transport, not the log. One
message in and one Ack out per record (the contract) cost ~120 us of server CPU and as much
client CPU per record over one stream (~65 us each over 16 streams, where grpc's threads
batch more per wake-up); `perf` on the server puts ~60% of its CPU in the kernel, most of it
switching between grpc's event-engine thread, the asyncio poller and the event loop, ~12% in
grpc's Cython layer, ~18% in the interpreter and ~3% in SQLite. The collector adds ~20-35 us
per record (validation, insert, group commit) on top. append-direct shows the log alone.

Prints a markdown table on stdout and writes bench/results/ingest.json:
{"date", "machine", "settings", "results": [{"path", "records", "seconds", "records_per_s",
"server_cpu_us_per_record", "client_cpu_us_per_record", ...}]}.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import any_pb2

from protos.common.v1 import common_pb2
from protos.feedback.v1 import feedback_pb2 as fb
from protos.fraud.v1 import fraud_pb2

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "ingest.json"
METHOD = "/storefront.feedback.v1.Feedback/Stream"
FEATURES = [f"V{i}" for i in range(1, 29)]
T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[ingest {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- realistic records

def _pack(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def fraud_served(record_id: str, prediction_id: str, served_at: float, *, rng: np.random.Generator | None = None,
                 model_version: str = "20240101T000000Z-0001", probability: float | None = None) -> fb.FeedbackRecord:
    """A fraud served-prediction record as the fraud service sends it."""
    rng = rng or np.random.default_rng(zlib.crc32(prediction_id.encode()))
    v = rng.standard_normal(28)
    amount = float(np.round(rng.lognormal(3.5, 1.2), 2))
    p = float(rng.beta(0.5, 20.0)) if probability is None else probability
    model = common_pb2.ModelRef(name="fraud", version=model_version)
    request = fraud_pb2.ScoreTransactionRequest(
        transaction_id=f"tx-{prediction_id}", amount=amount, timestamp=served_at - 0.05,
        customer_ref=f"cust-{rng.integers(1 << 40):x}", card_ref=f"card-{rng.integers(1 << 40):x}",
        features={name: float(x) for name, x in zip(FEATURES, v)})
    top = np.argsort(-v)[:3]
    response = fraud_pb2.ScoreTransactionResponse(
        prediction_id=prediction_id, fraud_probability=p,
        decision=fraud_pb2.DECISION_BLOCK if p >= 0.9 else fraud_pb2.DECISION_REVIEW if p >= 0.5
        else fraud_pb2.DECISION_ALLOW,
        reasons=[fraud_pb2.ReasonCode(feature=FEATURES[i], contribution=float(abs(v[i])) * 0.3 + 0.01,
                                      value=float(v[i])) for i in top],
        model=model, review_threshold=0.5, block_threshold=0.9)
    x = np.concatenate([v, [amount, served_at % 172800.0]]).astype(np.float32).reshape(1, 30)
    served = fb.ServedPrediction(
        prediction_id=prediction_id, model=model, served_at=served_at,
        inputs=[fb.Tensor(name="features", datatype="FP32", shape=[1, 30], raw_data=x.tobytes())],
        outputs=[fb.Tensor(name="probability", datatype="FP32", shape=[1, 1],
                           raw_data=np.array([[p]], dtype=np.float32).tobytes())],
        request=_pack(request), response=_pack(response))
    return fb.FeedbackRecord(record_id=record_id, domain=fb.DOMAIN_FRAUD, served=served)


def fraud_outcome(record_id: str, prediction_id: str, occurred_at: float, *, is_fraud: bool = False,
                  received_at: float | None = None, source: str = "chargeback") -> fb.FeedbackRecord:
    """A fraud outcome record (a label) as the fraud service forwards it."""
    outcome = fb.Outcome(prediction_id=prediction_id, occurred_at=occurred_at,
                         received_at=occurred_at if received_at is None else received_at,
                         fraud=fraud_pb2.FraudOutcome(prediction_id=prediction_id, is_fraud=is_fraud,
                                                      occurred_at=occurred_at, source=source))
    return fb.FeedbackRecord(record_id=record_id, domain=fb.DOMAIN_FRAUD, outcome=outcome)


def fraud_stream(n: int, *, seed: int = 0, instance: str = "fraud-bench-1", label_lag: int = 256,
                 start: float = 1.7e9) -> list[fb.FeedbackRecord]:
    """n records: served predictions, each followed `label_lag` predictions later by its outcome
    (about 0.2% fraud)."""
    rng = np.random.default_rng(seed)
    out: list[fb.FeedbackRecord] = []
    served_times: list[float] = []
    seq = 0
    i = 0
    while len(out) < n:
        t = start + i * 0.01
        pid = f"{instance}-p{i:010d}"
        out.append(fraud_served(f"{instance}-{seq:012d}", pid, t, rng=rng))
        served_times.append(t)
        seq += 1
        j = i - label_lag
        if j >= 0 and len(out) < n:
            out.append(fraud_outcome(f"{instance}-{seq:012d}", f"{instance}-p{j:010d}", t + 1.0,
                                     is_fraud=bool(rng.random() < 0.002)))
            seq += 1
        i += 1
    return out


# ---------------------------------------------------------------- measurements

def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_direct(payloads: list[bytes], batch: int, folder: Path) -> dict[str, Any]:
    from trainer.eventlog import STORED, SqliteEventLog
    log = SqliteEventLog(folder / "direct.db")
    try:
        stored = 0
        c0, t0 = _cpu_self(), time.perf_counter()
        for i in range(0, len(payloads), batch):
            stored += sum(r.status == STORED for r in log.append_batch(payloads[i:i + batch]))
        seconds = time.perf_counter() - t0
        cpu = _cpu_self() - c0
        assert stored == len(payloads) == log.count(), (stored, len(payloads), log.count())
    finally:
        log.close()
    return {"path": "append-direct", "records": len(payloads), "seconds": round(seconds, 3),
            "records_per_s": round(len(payloads) / seconds), "batch": batch,
            "server_cpu_us_per_record": round(cpu / len(payloads) * 1e6, 1), "client_cpu_us_per_record": None,
            "transactions": -(-len(payloads) // batch)}


def _client_main(port: int, n: int, streams: int, seed: int, pin: set[int] | None, conn) -> None:
    """In the client process: build the records, stream them, count acks by status."""
    if pin:
        os.sched_setaffinity(0, pin)
    payloads = [r.SerializeToString() for r in fraud_stream(n, seed=seed)]
    parts = [payloads[k::streams] for k in range(streams)]

    async def run() -> dict[str, Any]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        await channel.channel_ready()
        stream = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=fb.Ack.FromString)
        counts = {"stored": 0, "duplicate": 0, "rejected": 0}
        names = {fb.ACK_STATUS_STORED: "stored", fb.ACK_STATUS_DUPLICATE: "duplicate",
                 fb.ACK_STATUS_REJECTED: "rejected"}

        async def one(part: list[bytes]) -> None:
            call = stream()

            async def send() -> None:
                for raw in part:
                    await call.write(raw)
                await call.done_writing()

            sender = asyncio.get_running_loop().create_task(send())
            async for ack in call:
                counts[names[ack.status]] += 1
            await sender

        c0, t0 = _cpu_self(), time.perf_counter()
        await asyncio.gather(*(one(p) for p in parts))
        seconds = time.perf_counter() - t0
        cpu = _cpu_self() - c0
        await channel.close()
        return {"seconds": seconds, "cpu_s": cpu, "acks": counts}

    conn.send("ready")
    conn.recv()
    conn.send(asyncio.run(run()))


def _cpu_split() -> tuple[set[int], set[int]] | None:
    """(server CPUs, client CPUs) for --pin: the first usable CPU for the client, the rest for the server."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return ({*cpus[1:]}, {cpus[0]}) if len(cpus) >= 2 else None


async def bench_grpc(n: int, streams: int, seed: int, folder: Path | None, batch: int,
                     pin: bool = False, linger_s: float = 0.001) -> dict[str, Any]:
    """The client process against our collector (folder given) or an ack-only servicer."""
    split = _cpu_split() if pin else None
    before = os.sched_getaffinity(0) if split else None
    if split:
        os.sched_setaffinity(0, split[0])
    from trainer.collector import FeedbackCollector, add_collector
    from trainer.eventlog import SqliteEventLog

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    log = collector = None
    if folder is not None:
        log = SqliteEventLog(folder / "collector.db")
        collector = FeedbackCollector(log, max_batch=batch, linger_s=linger_s)
        add_collector(server, collector)
    else:
        async def ack_only(requests, context):
            # Pipelined like the collector (one task reads, this one writes acks), without storing.
            ids: asyncio.Queue = asyncio.Queue()

            async def read() -> None:
                async for raw in requests:
                    ids.put_nowait(fb.FeedbackRecord.FromString(raw).record_id)
                ids.put_nowait(None)

            reader = asyncio.get_running_loop().create_task(read())
            while (rid := await ids.get()) is not None:
                await context.write(fb.Ack(record_id=rid, status=fb.ACK_STATUS_STORED).SerializeToString())
            await reader
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "storefront.feedback.v1.Feedback", {"Stream": grpc.stream_stream_rpc_method_handler(ack_only)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_client_main, args=(port, n, streams, seed, split[1] if split else None, child),
                       daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    try:
        msg = await loop.run_in_executor(None, parent.recv)
        assert msg == "ready"
        c0 = _cpu_self()
        parent.send("go")
        out = await loop.run_in_executor(None, parent.recv)
        server_cpu = _cpu_self() - c0
    finally:
        await server.stop(1.0)
        proc.join(10)
        if collector is not None:
            await collector.close()
        if before:
            os.sched_setaffinity(0, before)
    row: dict[str, Any] = {"path": "grpc-collector" if folder is not None else "grpc-ack-only", "records": n,
                           "seconds": round(out["seconds"], 3), "records_per_s": round(n / out["seconds"]),
                           "streams": streams, "pinned": bool(split),
                           "server_cpu_us_per_record": round(server_cpu / n * 1e6, 1),
                           "client_cpu_us_per_record": round(out["cpu_s"] / n * 1e6, 1), "acks": out["acks"]}
    if log is not None:
        stored = log.count()
        log.close()
        row.update(stored_in_log=stored, transactions=collector.batches,
                   mean_transaction_records=round(n / max(1, collector.batches), 1))
        if stored != n or out["acks"]["stored"] != n:
            raise RuntimeError(f"collector stored {stored} and acked {out['acks']} of {n} records")
    return row


def machine_info() -> dict[str, Any]:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import sqlite3
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model, "platform": platform.platform(),
            "python": platform.python_version(), "grpcio": grpc.__version__, "sqlite": sqlite3.sqlite_version,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Ingest into the event log, {report['date']}: {m['cpu_count']} CPUs ({m['cpu_model']}), "
             f"SQLite {m['sqlite']} WAL synchronous=FULL; client and server share the machine.", "",
             "| path | streams | records | seconds | records/s | server CPU us/record | client CPU us/record |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        cc = r.get("client_cpu_us_per_record")
        name = r["path"] + (" (pinned)" if r.get("pinned") else "")
        lines.append(f"| {name} | {r.get('streams', '-')} | {r['records']:,} | {r['seconds']:.2f} | {r['records_per_s']:,} | "
                     f"{r['server_cpu_us_per_record']} | {'-' if cc is None else cc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--streams", default="1,16", help="client streams (replicas) in parallel; a comma list runs each")
    ap.add_argument("--batch", type=int, default=512, help="most records per log transaction")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--linger-ms", type=float, default=1.0, help="collector linger_s, in milliseconds")
    ap.add_argument("--pin", action="store_true",
                    help="also measure the gRPC paths with the client on one CPU and the server on the others")
    ap.add_argument("--paths", default="append-direct,grpc-collector,grpc-ack-only")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    opts = ap.parse_args(argv)
    paths = [p.strip() for p in opts.paths.split(",") if p.strip()]
    stream_counts = [int(x) for x in opts.streams.split(",") if x.strip()]
    results = []
    machine = machine_info()  # load average before the measurements
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        folder = Path(tmp)
        if "append-direct" in paths:
            progress(f"building {opts.records:,} records")
            payloads = [r.SerializeToString() for r in fraud_stream(opts.records, seed=opts.seed)]
            progress(f"append-direct: {len(payloads):,} records, {sum(map(len, payloads)) / len(payloads):.0f} "
                     f"bytes each on average")
            results.append(bench_direct(payloads, opts.batch, folder))
            del payloads
        for pin in ((False, True) if opts.pin else (False,)):
            for streams in stream_counts:
                for path, where in (("grpc-collector", folder), ("grpc-ack-only", None)):
                    if path not in paths:
                        continue
                    progress(f"{path}, {streams} stream(s){', pinned' if pin else ''}")
                    results.append(asyncio.run(bench_grpc(opts.records, streams, opts.seed, where, opts.batch,
                                                          pin, opts.linger_ms / 1000)))
                    if where is not None:
                        for f in folder.glob("collector.db*"):
                            f.unlink()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine,
              "settings": {"records": opts.records, "streams": stream_counts, "batch": opts.batch, "pin": opts.pin,
                           "linger_ms": opts.linger_ms, "synchronous": "FULL", "journal_mode": "WAL"},
              "results": results}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    progress(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
