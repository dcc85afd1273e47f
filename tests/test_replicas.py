"""Two replicas of the fraud service behind one round-robin client (issue 14), real processes:
the trainer, two fraud services on one registry (each its own port and feedback spool, both
answering ReportOutcome only once the outcome is fsync'd in their spool), and the load generator
(ops/loadgen.py, closed loop, 16 workers) through one two-target channel (shared/channels.py).

kill -9 one replica under load: calls that meet it are retried on the other (gRPC's retry
policy), so the load generator sees no error; and no outcome it was told was accepted is lost:
each reaches the trainer's event log, once the killed replica is back on its spool (as an
orchestrator restarts it) and replays what it had accepted but not yet delivered.
"""
from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from bench.storefront import score_request
from ops.loadgen import generate
from ops.procs import Proc, free_port, wait_serving
from protos.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from shared.channels import aio_channel
from tests.fraud_fixtures import bootstrap_small_fraud
from tests.loop_harness import wait_until
from trainer.eventlog import OUTCOME, SERVED, SqliteEventLog

CONCURRENCY = 16
BEFORE_KILL = 300  # outcomes accepted before the kill, and again after it
MAX_LOAD_S = 120.0  # the load ends once enough outcomes came after the kill; this bounds a broken run


def fraud_replica(root: Path, name: str, port: int, trainer_port: int, token: str) -> Proc:
    return Proc(name, ["-m", "services.fraud.main", "--port", str(port), "--metrics-port", "0",
                       "--registry-dir", str(root / "registry"), "--trainer-target", f"127.0.0.1:{trainer_port}",
                       "--spool-dir", str(root / "spool" / name), "--outcome-ack-durable", "true",
                       "--log-format", "text"], root / f"{name}.log", env={"STOREFRONT_FEEDBACK_TOKEN": token})


def event_log_entries(path: Path) -> list:
    with SqliteEventLog(path) as log:
        return log.read(0, 1_000_000, domain="fraud")


def test_kill9_of_one_fraud_replica_under_load_loses_no_call_and_no_outcome(tmp_path: Path):
    _, _, data = bootstrap_small_fraud(tmp_path)
    token = secrets.token_urlsafe(32)
    trainer_port, port_a, port_b = free_port(), free_port(), free_port()
    # the trainer only collects here (no learning round: --min-events beyond what the test sends)
    trainer = Proc("trainer", ["-m", "trainer", "serve", "--port", str(trainer_port), "--metrics-port", "0",
                               "--workdir", str(tmp_path / "trainer"), "--registry-dir", str(tmp_path / "registry"),
                               "--domains", "fraud", "--bootstrap", "false", "--min-events", "1000000",
                               "--retention-interval-s", "0", "--log-format", "text"], tmp_path / "trainer.log",
                   env={"STOREFRONT_FEEDBACK_TOKENS": f"fraud={token}"})
    a = fraud_replica(tmp_path, "fraud-a", port_a, trainer_port, token)
    b = fraud_replica(tmp_path, "fraud-b", port_b, trainer_port, token)
    procs = [trainer, a, b]
    try:
        for p in procs:
            p.start()
        wait_serving(f"127.0.0.1:{trainer_port}", 120, trainer)
        wait_serving(f"127.0.0.1:{port_a}", 120, a)
        wait_serving(f"127.0.0.1:{port_b}", 120, b)

        events = tmp_path / "trainer" / "events.db"

        def serving_instances() -> set[str]:
            """The feedback clients (one per replica process) whose served records are in the log."""
            return {e.record_id.rsplit("-", 1)[0] for e in event_log_entries(events) if e.kind == SERVED}

        accepted: list[str] = []  # prediction ids whose outcome the service answered as accepted
        killed_after: list[int] = []

        async def load():
            async with aio_channel(f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}") as channel:
                stub = fraud_pb2_grpc.FraudStub(channel)
                stop = asyncio.Event()

                async def call(i: int):
                    row = i % len(data.y)
                    resp = await stub.ScoreTransaction(score_request(data, row), timeout=10)
                    ack = await stub.ReportOutcome(fraud_pb2.FraudOutcome(
                        prediction_id=resp.prediction_id, is_fraud=bool(data.y[row]), source="chargeback"), timeout=10)
                    assert ack.accepted == 1, ack
                    accepted.append(resp.prediction_id)
                    return resp

                async def window(t_start: float, t_end: float) -> None:
                    # both replicas answer (their served records reach the trainer), enough outcomes in
                    while len(accepted) < BEFORE_KILL or len(await asyncio.to_thread(serving_instances)) < 2:
                        await asyncio.sleep(0.05)
                    killed_after.append(len(accepted))
                    await asyncio.to_thread(a.kill9)  # mid-load: 16 calls in flight over both replicas
                    while len(accepted) < killed_after[0] + BEFORE_KILL:
                        await asyncio.sleep(0.05)
                    stop.set()

                return await generate(call, duration=MAX_LOAD_S, concurrency=CONCURRENCY, window=window, stop=stop)

        rec = asyncio.run(load())
        assert killed_after, "the load ended before the kill"
        assert len(accepted) >= killed_after[0] + BEFORE_KILL, (len(accepted), killed_after)
        # not one call failed: those that met the killed replica were answered by the other
        assert dict(rec.errors) == {} and dict(rec.warmup_errors) == {}, (rec.errors, rec.warmup_errors)
        assert len(set(accepted)) == len(accepted)

        # the killed replica restarts on its spool and replays what it had accepted (fsync'd) but
        # not yet delivered; the trainer stores each record once (by record id and outcome identity)
        a = fraud_replica(tmp_path, "fraud-a", port_a, trainer_port, token)
        procs[1] = a
        a.start()
        wait_serving(f"127.0.0.1:{port_a}", 120, a)
        wait_until(lambda: set(accepted) <= {e.prediction_id for e in event_log_entries(events) if e.kind == OUTCOME},
                   60, "every accepted outcome in the trainer's event log")
        entries = event_log_entries(events)
        outcomes = [e.prediction_id for e in entries if e.kind == OUTCOME]
        assert set(outcomes) == set(accepted)
        # An outcome the killed replica had fsync'd but not yet answered was retried on the other and
        # accepted there too: stored under two record ids, one outcome identity (the joiner emits its
        # first only, trainer/eventlog.py). At most the calls in flight at the kill.
        assert len(outcomes) - len(set(outcomes)) <= CONCURRENCY
        assert [p.stop() for p in (a, b, trainer)] == [0, 0, 0], (a.tail(), b.tail(), trainer.tail())
    finally:
        for p in procs:
            if p.proc is not None and p.proc.poll() is None:
                p.kill9()
