"""Trainer failover on Redis (issue 14), with real processes: two trainers share the event log on a
real redis-server (appendfsync always), the registry and the workdir; the toy service streams its
feedback to the standby's collector (any replica accepts feedback) while the active trainer learns.

- kill -9 the active trainer mid-stream: the standby takes the toy's lease over with a larger
  fencing token, resumes from the committed position, and afterwards the log holds every record
  sent exactly once and the checkpoint's labels_seen equals the labels sent; every manifest
  published under the lease records its token.
- kill -9 redis-server mid-stream and start it again: the service spools and retries, nothing is
  lost, nothing is stored twice, every label is learned once.

Here, in the toy domain's folder, because the toy is the smallest domain (and only this folder
may name it).
"""
from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import grpc
import pytest

from ops.procs import Proc, free_port, wait_serving
from shared.redis_conn import redis_client
from shared.registry import ModelRegistry
from tests.loop_harness import wait_until
from tests.redis_server import RedisServer
from tests.toy_domain import toy_pb2, toy_pb2_grpc
from tests.toy_domain.trainer_plugin import W_LIVE, draw
from trainer.eventlog import OUTCOME, SERVED
from trainer.eventlog_redis import RedisEventLog
from trainer.learner import Checkpoint
from trainer.lease import LearnerLease
from trainer.plugins import load_domains

PLUGIN = "tests.toy_domain.trainer_plugin"
PER_PHASE = 150  # points (a served prediction and its label each) sent before and after the fault


def trainer_proc(tmp_path: Path, name: str, redis_url: str, port: int, token: str) -> Proc:
    # lease TTL 4 s: short enough for a quick takeover, long enough that a renewal delayed by a
    # training thread holding the GIL on a loaded 2-core machine does not lose the lease
    # no must-beat bar (--gate-min-gain -1): every round's version is what carries the lease's
    # token here; whether a challenger beats the champion is tests/test_gate.py's subject
    return Proc(name, ["-m", "trainer", "serve", "--domain-modules", PLUGIN, "--port", str(port),
                       "--metrics-port", "0", "--workdir", str(tmp_path / "trainer"),
                       "--registry-dir", str(tmp_path / "registry"), "--event-log-url", redis_url,
                       "--lease-ttl-s", "4", "--lease-poll-s", "0.1", "--log-format", "text",
                       "--delivery", "direct", "--min-events", "100", "--max-interval-s", "1",
                       "--poll-interval-s", "0.1", "--retention-interval-s", "0", "--epochs", "2",
                       "--report-interval-s", "0", "--gate-min-gain", "-1"], tmp_path / f"{name}.log",
                env={"STOREFRONT_FEEDBACK_TOKENS": f"toy={token}"})


def toy_proc(tmp_path: Path, port: int, trainer_port: int, token: str) -> Proc:
    return Proc("toy", ["-m", "tests.toy_domain.service", "--port", str(port), "--metrics-port", "0",
                        "--registry-dir", str(tmp_path / "registry"), "--trainer-target", f"127.0.0.1:{trainer_port}",
                        "--spool-dir", str(tmp_path / "spool"), "--poll-interval-s", "0.2", "--log-format", "text"],
                tmp_path / "toy.log", env={"STOREFRONT_FEEDBACK_TOKEN": token})


def holder(url: str):
    async def ask():
        client = redis_client(url)
        try:
            return await LearnerLease(client, "toy", owner="test").holder()
        finally:
            await client.aclose()

    return asyncio.run(ask())


def send(stub, X, y) -> None:
    for x, label in zip(X, y):
        resp = stub.Score(toy_pb2.ScoreRequest(x=x.tolist()), timeout=10)
        ack = stub.ReportOutcome(toy_pb2.ToyOutcome(prediction_id=resp.prediction_id, positive=bool(label)),
                                 timeout=10)
        assert ack.accepted == 1


def labels_seen(tmp_path: Path) -> int:
    path = tmp_path / "trainer" / "checkpoints" / "toy.pt"
    return int(Checkpoint(path).load()["labels_seen"]) if path.exists() else -1


def assert_logged_exactly_once(log: RedisEventLog, points: int) -> None:
    wait_until(lambda: log.count("toy", SERVED) == points and log.count("toy", OUTCOME) == points, 60,
               f"{points} served records and {points} labels in the event log")
    entries = log.read(0, 10 * points)
    assert len(entries) == 2 * points
    assert len({e.record_id for e in entries}) == 2 * points  # exactly once: no record twice
    assert log.client.xlen(log.stream) == 2 * points


def kill_all(*procs: Proc) -> None:
    for proc in procs:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill9()


def test_kill9_of_the_active_trainer_the_standby_takes_over_and_learns_every_label_once(tmp_path: Path):
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    token = secrets.token_urlsafe(32)
    port_a, port_b, toy_port = free_port(), free_port(), free_port()
    # two trainer replicas on one Redis, one workdir, one registry (the shared volume)
    a = trainer_proc(tmp_path, "trainer-a", server.url, port_a, token)
    b = trainer_proc(tmp_path, "trainer-b", server.url, port_b, token)
    registry = ModelRegistry(tmp_path / "registry")
    log = RedisEventLog(server.url, domains=load_domains(PLUGIN))
    toy = None
    try:
        a.start()
        b.start()  # at once: whichever takes the lease first bootstraps the toy, the other waits
        wait_serving(f"127.0.0.1:{port_a}", 120, a)
        wait_serving(f"127.0.0.1:{port_b}", 60, b)  # a standby serves as a collector
        first = holder(server.url)
        assert first is not None and first.token == 1, first
        by_pid = {str(a.pid): (a, b, port_b), str(b.pid): (b, a, port_a)}
        active, standby, standby_port = by_pid[first.owner.split(":")[1]]
        toy = toy_proc(tmp_path, toy_port, standby_port, token)  # feedback goes to the standby's collector
        toy.start()
        wait_serving(f"127.0.0.1:{toy_port}", 60, toy)

        X, y = draw(2 * PER_PHASE, seed=2, w=W_LIVE)
        with grpc.insecure_channel(f"127.0.0.1:{toy_port}") as channel:
            stub = toy_pb2_grpc.ToyStub(channel)
            send(stub, X[:PER_PHASE], y[:PER_PHASE])
            # the active trainer learns what the standby's collector stored (one shared log)
            wait_until(lambda: labels_seen(tmp_path) >= 100, 60, "the active trainer's first rounds")
            active.kill9()  # mid-stream: the second half is still to come
            send(stub, X[PER_PHASE:], y[PER_PHASE:])
            wait_until(lambda: (h := holder(server.url)) is not None and h.owner.split(":")[1] == str(standby.pid),
                       30, "the standby to take the toy's lease over")
            assert holder(server.url).token > first.token

        assert_logged_exactly_once(log, 2 * PER_PHASE)
        wait_until(lambda: labels_seen(tmp_path) >= 2 * PER_PHASE, 90, "every label learned")
        assert labels_seen(tmp_path) == 2 * PER_PHASE  # none twice, none skipped
        assert log.committed("learner-toy")[0] > 0
        # every version published under the lease records its fencing token; the standby's are larger
        tokens = {}
        for version in registry.versions("toy"):
            extra = registry.manifest("toy", version).extra
            if "lease" in extra:
                tokens[version] = extra["lease"]["token"]
        assert first.token in tokens.values() and max(tokens.values()) > first.token, tokens
        assert toy.stop() == 0 and standby.stop() == 0, (toy.tail(), standby.tail())
    finally:
        kill_all(*(p for p in (toy, a, b) if p is not None))
        log.close()
        server.stop()


def test_redis_restart_mid_stream_loses_nothing(tmp_path: Path):
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    token = secrets.token_urlsafe(32)
    port, toy_port = free_port(), free_port()
    trainer = trainer_proc(tmp_path, "trainer", server.url, port, token)
    toy = toy_proc(tmp_path, toy_port, port, token)
    log = RedisEventLog(server.url, domains=load_domains(PLUGIN))
    try:
        trainer.start()
        wait_serving(f"127.0.0.1:{port}", 120, trainer)
        toy.start()
        wait_serving(f"127.0.0.1:{toy_port}", 60, toy)
        X, y = draw(2 * PER_PHASE, seed=3, w=W_LIVE)
        with grpc.insecure_channel(f"127.0.0.1:{toy_port}") as channel:
            stub = toy_pb2_grpc.ToyStub(channel)
            send(stub, X[:PER_PHASE], y[:PER_PHASE])
            server.kill()  # SIGKILL: only what the AOF has survives
            send(stub, X[PER_PHASE:], y[PER_PHASE:])  # the service answers; its feedback waits
            # down for longer than the Redis client's retries: the collector's appends fail, its
            # streams end UNAVAILABLE, and the service spools and resends
            wait_until(lambda: "event log append of" in trainer.tail(200_000), 60, "the collector's append to fail")
            # ... and longer than the learner lease: the trainer stops counting on it (its own clock)
            wait_until(lambda: "learner lease token 1 lost" in trainer.tail(200_000), 60, "the lease to run out")
            server.start()  # same port, replays the AOF
        assert_logged_exactly_once(log, 2 * PER_PHASE)
        wait_until(lambda: labels_seen(tmp_path) >= 2 * PER_PHASE, 90, "every label learned")
        assert labels_seen(tmp_path) == 2 * PER_PHASE
        # the lease ran out while Redis was down and was taken again: the fence counter survived in the AOF
        wait_until(lambda: (h := holder(server.url)) is not None and h.token >= 2, 30, "the lease taken again")
        assert toy.stop() == 0 and trainer.stop() == 0, (toy.tail(), trainer.tail())
    finally:
        kill_all(toy, trainer)
        log.close()
        server.stop()
