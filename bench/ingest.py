"""Ingest benchmark: how many feedback records per second reach the durable event log.

    python -m bench.ingest                       # 50,000 records, every path, 1 and 16 streams (~40 s)
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
- feedback-client: the production path. The real FeedbackClient (one per stream, as one per
  service replica; batch_max `--client-batch`) in another process sends to the real
  FeedbackCollector on a grpc.aio server in this process over loopback. Every record is recorded
  (`record_served` / `record_outcome`, as the fraud service calls them) before `start()`, so
  this is a backlog being drained; rate = records / (start() -> every record acknowledged).
  `record_us_per_record` is what recording cost, outside the clock.
- feedback-client-live: the same, recording while sending (a producer yields to the event loop
  every 64 records per client), as a busy service does; recording is inside the clock and the
  client CPU.
- grpc-collector: a hand-rolled sender (no in-flight bound, no spool) against the same collector:
  `--streams` bidirectional streams at once, each writing FeedbackBatch messages of
  `--client-batch` pre-serialized records and reading the AckBatch messages.
- grpc-ack-only: that sender against a servicer that acks each record (one AckBatch per batch)
  without storing it: the cost of the transport alone, for comparison.
Every collector path checks that the log holds every record and every ack was STORED.
Server CPU is this process's (every thread), client CPU the client process's. With --pin the gRPC
paths run a second time with the client process on one CPU and the server on the others.

What limits the gRPC paths (measured on 2 vCPUs, grpcio 1.85, batches of 256): the log. Before
batching (one message per record and one Ack message per record) the transport cost ~120 us of
server CPU and as much client CPU per record and one stream reached ~6,600 records/s. With
FeedbackBatch / AckBatch the transport costs ~2.5 us of server CPU per record (grpc-ack-only),
the collector ~17-23 us per record in all, of which ~14.5 us is the log (append-direct:
validation, inserts, commit); the FeedbackClient's sending costs ~3-6 us of client CPU per
record, recording one ~7-9 us. One stream through the real client now reaches ~35,000-55,000
records/s, depending on how the scheduler places the two processes on the two CPUs.

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
from shared.feedback.records import feedback_outcome
from bench.machine import machine_info as _machine_info, progress_printer
from ops.loadgen import self_cpu_s

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "ingest.json"
METHOD = "/storefront.feedback.v1.Feedback/Stream"
FEATURES = [f"V{i}" for i in range(1, 29)]
progress = progress_printer("ingest")


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
    return fb.FeedbackRecord(record_id=record_id, domain="fraud", served=served)


def fraud_outcome(record_id: str, prediction_id: str, occurred_at: float, *, is_fraud: bool = False,
                  received_at: float | None = None, source: str = "chargeback") -> fb.FeedbackRecord:
    """A fraud outcome record (a label) as the fraud service forwards it."""
    outcome = feedback_outcome(fraud_pb2.FraudOutcome(prediction_id=prediction_id, is_fraud=is_fraud,
                                                      occurred_at=occurred_at, source=source),
                               occurred_at, occurred_at if received_at is None else received_at)
    return fb.FeedbackRecord(record_id=record_id, domain="fraud", outcome=outcome)


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

def bench_direct(payloads: list[bytes], batch: int, folder: Path, open_log=None) -> dict[str, Any]:
    """open_log: a factory of the EventLog to measure (default: a SQLite log in folder)."""
    from trainer.eventlog import STORED, SqliteEventLog
    log = SqliteEventLog(folder / "direct.db") if open_log is None else open_log()
    try:
        stored = 0
        c0, t0 = self_cpu_s(), time.perf_counter()
        for i in range(0, len(payloads), batch):
            stored += sum(r.status == STORED for r in log.append_batch(payloads[i:i + batch]))
        seconds = time.perf_counter() - t0
        cpu = self_cpu_s() - c0
        assert stored == len(payloads) == log.count(), (stored, len(payloads), log.count())
    finally:
        log.close()
    return {"path": "append-direct", "records": len(payloads), "seconds": round(seconds, 3),
            "records_per_s": round(len(payloads) / seconds), "batch": batch,
            "server_cpu_us_per_record": round(cpu / len(payloads) * 1e6, 1), "client_cpu_us_per_record": None,
            "transactions": -(-len(payloads) // batch)}


def _client_calls(records: list[fb.FeedbackRecord]) -> list[tuple[str, tuple, dict]]:
    """The FeedbackClient calls that produce these records (what the fraud service calls)."""
    calls: list[tuple[str, tuple, dict]] = []
    for r in records:
        if r.WhichOneof("payload") == "outcome":
            calls.append(("record_outcome", (r.outcome,), {}))
            continue
        s = r.served
        request, response = fraud_pb2.ScoreTransactionRequest(), fraud_pb2.ScoreTransactionResponse()
        s.request.Unpack(request)
        s.response.Unpack(response)
        calls.append(("record_served", (s.prediction_id, s.model.name, s.model.version,
                                        {t.name: np.frombuffer(t.raw_data, np.float32).reshape(tuple(t.shape))
                                         for t in s.inputs},
                                        {t.name: np.frombuffer(t.raw_data, np.float32).reshape(tuple(t.shape))
                                         for t in s.outputs}),
                      {"request": request, "response": response, "served_at": s.served_at}))
    return calls


def _client_main(port: int, n: int, streams: int, seed: int, pin: set[int] | None, mode: str, client_batch: int,
                 conn) -> None:
    """In the client process: build the records, stream them, count acks by status.

    mode "raw": a hand-rolled sender (batches of client_batch pre-serialized records, no in-flight
    bound). "client": one real FeedbackClient per stream, every record recorded before start()
    (a backlog; the rate is start() -> all acked). "client-live": the same, recording while it
    sends (a producer yields to the loop every 64 records), as a busy service does."""
    if pin:
        os.sched_setaffinity(0, pin)
    records = fraud_stream(n, seed=seed)

    async def run_raw() -> dict[str, Any]:
        from shared.feedback import encode_batch

        payloads = [r.SerializeToString() for r in records]
        parts = [payloads[k::streams] for k in range(streams)]
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        await channel.channel_ready()
        stream = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=fb.AckBatch.FromString)
        counts = {"stored": 0, "duplicate": 0, "rejected": 0}
        names = {fb.ACK_STATUS_STORED: "stored", fb.ACK_STATUS_DUPLICATE: "duplicate",
                 fb.ACK_STATUS_REJECTED: "rejected"}
        messages = [0, 0]  # batches sent, ack messages received

        async def one(part: list[bytes]) -> None:
            call = stream()

            async def send() -> None:
                for i in range(0, len(part), client_batch):
                    await call.write(encode_batch(part[i:i + client_batch]))
                    messages[0] += 1
                await call.done_writing()

            sender = asyncio.get_running_loop().create_task(send())
            async for batch in call:
                messages[1] += 1
                for ack in batch.acks:
                    counts[names[ack.status]] += 1
            await sender

        c0, t0 = self_cpu_s(), time.perf_counter()
        await asyncio.gather(*(one(p) for p in parts))
        seconds = time.perf_counter() - t0
        cpu = self_cpu_s() - c0
        await channel.close()
        return {"seconds": seconds, "cpu_s": cpu, "acks": counts, "batches_sent": messages[0],
                "ack_messages": messages[1]}

    async def run_client(live: bool) -> dict[str, Any]:
        import tempfile

        from shared.feedback import FeedbackClient

        calls = _client_calls(records)
        shares = [calls[k::streams] for k in range(streams)]
        with tempfile.TemporaryDirectory(prefix="ingest-spool-") as spool:
            clients = [FeedbackClient(f"127.0.0.1:{port}", domain="fraud", spool_dir=Path(spool) / str(k),
                                      instance_id=f"bench{k}", max_buffer=n + 1, batch_max=client_batch)
                       for k in range(streams)]
            record_s = 0.0

            def record(k: int, chunk: list) -> None:
                c = clients[k]
                for name, args, kwargs in chunk:
                    if not getattr(c, name)(*args, **kwargs):
                        raise RuntimeError("record refused")

            if not live:  # the backlog, recorded before the clock starts
                t = time.perf_counter()
                for k, share in enumerate(shares):
                    record(k, share)
                record_s = time.perf_counter() - t
            c0, t0 = self_cpu_s(), time.perf_counter()
            for c in clients:
                c.start()
            if live:
                for i in range(0, max(map(len, shares)), 64):
                    for k, share in enumerate(shares):
                        record(k, share[i:i + 64])
                    await asyncio.sleep(0)
            ok = await asyncio.gather(*(c.flush(120) for c in clients))
            seconds = time.perf_counter() - t0
            cpu = self_cpu_s() - c0
            stats = [c.stats() for c in clients]
            for c in clients:
                await c.stop(flush_timeout_s=1)
        if not all(ok):
            raise RuntimeError(f"feedback clients did not flush: {stats}")
        total = {key: sum(st[key] for st in stats) for key in ("stored", "duplicate", "rejected", "spooled", "sent")}
        return {"seconds": seconds, "cpu_s": cpu, "record_s": record_s,
                "acks": {k: total[k] for k in ("stored", "duplicate", "rejected")},
                "spooled": total["spooled"], "sent": total["sent"]}

    conn.send("ready")
    conn.recv()
    if mode == "raw":
        out = asyncio.run(run_raw())
    else:
        out = asyncio.run(run_client(live=mode == "client-live"))
    conn.send(out)


def _cpu_split() -> tuple[set[int], set[int]] | None:
    """(server CPUs, client CPUs) for --pin: the first usable CPU for the client, the rest for the server."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return ({*cpus[1:]}, {cpus[0]}) if len(cpus) >= 2 else None


_MODES = {"grpc-collector": "raw", "grpc-ack-only": "raw", "feedback-client": "client",
          "feedback-client-live": "client-live"}


async def bench_grpc(path: str, n: int, streams: int, seed: int, folder: Path, batch: int, client_batch: int,
                     pin: bool = False, linger_s: float = 0.001, open_log=None) -> dict[str, Any]:
    """The client process (mode by path) against our collector, or (grpc-ack-only) a servicer that
    acks every record without storing it. open_log: a factory of the collector's EventLog
    (default: a SQLite log in folder)."""
    split = _cpu_split() if pin else None
    before = os.sched_getaffinity(0) if split else None
    if split:
        os.sched_setaffinity(0, split[0])
    from trainer.collector import FeedbackCollector, add_collector, split_batch
    from trainer.eventlog import SqliteEventLog

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    log = collector = None
    if path != "grpc-ack-only":
        log = SqliteEventLog(folder / "collector.db") if open_log is None else open_log()
        collector = FeedbackCollector(log, max_batch=batch, linger_s=linger_s)
        add_collector(server, collector)
    else:
        async def ack_only(requests, context):
            # Pipelined like the collector (one task reads, this one writes acks), without storing:
            # one AckBatch per FeedbackBatch, naming each record (which is decoded for its id).
            ids: asyncio.Queue = asyncio.Queue()

            async def read() -> None:
                async for raw in requests:
                    ids.put_nowait([fb.FeedbackRecord.FromString(r).record_id for r in split_batch(raw)])
                ids.put_nowait(None)

            reader = asyncio.get_running_loop().create_task(read())
            while (rids := await ids.get()) is not None:
                acks = fb.AckBatch()
                add = acks.acks.add
                for rid in rids:
                    add(record_id=rid, status=fb.ACK_STATUS_STORED)
                await context.write(acks.SerializeToString())
            await reader
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "storefront.feedback.v1.Feedback", {"Stream": grpc.stream_stream_rpc_method_handler(ack_only)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_client_main, args=(port, n, streams, seed, split[1] if split else None, _MODES[path],
                                                  client_batch, child), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    try:
        msg = await loop.run_in_executor(None, parent.recv)
        assert msg == "ready"
        c0 = self_cpu_s()
        parent.send("go")
        out = await loop.run_in_executor(None, parent.recv)
        server_cpu = self_cpu_s() - c0
    finally:
        await server.stop(1.0)
        proc.join(10)
        if collector is not None:
            await collector.close()
        if before:
            os.sched_setaffinity(0, before)
    row: dict[str, Any] = {"path": path, "records": n, "seconds": round(out["seconds"], 3),
                           "records_per_s": round(n / out["seconds"]), "streams": streams, "pinned": bool(split),
                           "client_batch": client_batch,
                           "server_cpu_us_per_record": round(server_cpu / n * 1e6, 1),
                           "client_cpu_us_per_record": round(out["cpu_s"] / n * 1e6, 1), "acks": out["acks"]}
    if "batches_sent" in out:
        row.update(batches_sent=out["batches_sent"], ack_messages=out["ack_messages"])
    if "record_s" in out:
        row.update(spooled=out["spooled"], sent=out["sent"])
        if out["record_s"]:  # backlog: recording happened before the clock, shown apart
            row["record_us_per_record"] = round(out["record_s"] / n * 1e6, 1)
    if log is not None:
        stored = log.count()
        log.close()
        row.update(stored_in_log=stored, transactions=collector.batches,
                   mean_transaction_records=round(n / max(1, collector.batches), 1))
        if stored != n or out["acks"]["stored"] != n:
            raise RuntimeError(f"collector stored {stored} and acked {out['acks']} of {n} records")
    return row


def machine_info() -> dict[str, Any]:
    import sqlite3

    return _machine_info(grpcio=grpc.__version__, sqlite=sqlite3.sqlite_version)


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
    ap.add_argument("--client-batch", type=int, default=256,
                    help="most records per FeedbackBatch message (the FeedbackClient's batch_max)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--linger-ms", type=float, default=1.0, help="collector linger_s, in milliseconds")
    ap.add_argument("--pin", action="store_true",
                    help="also measure the gRPC paths with the client on one CPU and the server on the others")
    ap.add_argument("--paths", default=",".join(("append-direct", *_MODES)))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    opts = ap.parse_args(argv)
    paths = [p.strip() for p in opts.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p != "append-direct" and p not in _MODES]
    if unknown:
        ap.error(f"unknown path(s) {unknown}; known: append-direct, {', '.join(_MODES)}")
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
                for path in _MODES:
                    if path not in paths:
                        continue
                    progress(f"{path}, {streams} stream(s){', pinned' if pin else ''}")
                    row = asyncio.run(bench_grpc(path, opts.records, streams, opts.seed, folder, opts.batch,
                                                 opts.client_batch, pin, opts.linger_ms / 1000))
                    progress(f"  {row['records_per_s']:,} records/s")
                    results.append(row)
                    for f in folder.glob("collector.db*"):
                        f.unlink()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine,
              "settings": {"records": opts.records, "streams": stream_counts, "batch": opts.batch,
                           "client_batch": opts.client_batch, "pin": opts.pin, "linger_ms": opts.linger_ms,
                           "synchronous": "FULL", "journal_mode": "WAL"},
              "results": results}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    progress(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
