"""`python -m ops.up` (what `make up` runs) brings the trainer and the services up, says
`all services serving` once every health service says SERVING, and stops cleanly on Ctrl-C."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from ops.ports import COUNTER_FILE, next_ticket
from ops.up import DEMO_TRAINER_SETTINGS, REDIS_PORT, REPLICA_PORT_STEP, SERVICES, TRAINER
from protos.fraud.v1 import fraud_pb2_grpc
from tests.suite_fixtures import bootstrap_small_suite
from tests.loop_harness import score_request
from shared.channels import sync_channel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory):
    """registry + checkpoints of every domain, as a first start would make (built once)."""
    var = tmp_path_factory.mktemp("bootstrapped")
    worlds = bootstrap_small_suite(var)
    return var, worlds


OFFSET_COUNTER = COUNTER_FILE.with_name(COUNTER_FILE.name.replace("free-port", "port-offset"))


def free_port_offset(replicas: int = 1) -> int:
    """A --port-offset whose every gRPC and metrics port (+1000) is free, above the kernel's
    ephemeral range (32768-60999 here), where no other test's port-0 server can land: with xdist
    a demo's trainer once found its metrics port taken by another test's server. With replicas,
    every replica's ports and the redis-server's."""
    def layout(n: int) -> list[int]:  # every gRPC port of n replicas (and the redis-server's past one)
        ports = [c.port + REPLICA_PORT_STEP * i for c in (TRAINER, *SERVICES) for i in range(n)]
        return ports + [REDIS_PORT] if n > 1 else ports

    base = layout(replicas)
    # offsets come from one counter every xdist worker shares (ops.ports.next_ticket), a widest
    # layout apart: two tests drawing at once get disjoint ports (random draws overlapped ~1 % of the time)
    widest = layout(2)
    stride = max(widest) - min(widest) + 1
    low, high = 61000 - min(widest), 65535 - 1000 - max(widest)
    slots = (high - low) // stride
    for _ in range(200):
        offset = low + (next_ticket(OFFSET_COUNTER) % slots) * stride
        ports = [p + offset for p in base] + [p + offset + 1000 for p in base]
        try:
            for p in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return offset
    raise RuntimeError("no free port offset above the ephemeral range")


def fresh_var(bootstrapped, tmp_path) -> Path:
    var = tmp_path / "var"
    shutil.copytree(bootstrapped[0], var)
    return var


def start_until_serving(var: Path, offset: int, *extra: str, timeout_s: float = 180
                        ) -> tuple[subprocess.Popen, str]:
    """`python -m ops.up` on var, its output read up to `all services serving` (asserted)."""
    proc = subprocess.Popen([sys.executable, "-m", "ops.up", "--var", str(var), "--port-offset", str(offset), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip() == "all services serving":
                break
        out = "".join(lines)
        assert "all services serving" in out, out[-3000:]
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc, out


def test_up_serves_everything_and_stops_on_ctrl_c(bootstrapped, tmp_path):
    var = fresh_var(bootstrapped, tmp_path)
    _, _, data = bootstrapped[1]["fraud"]
    offset = free_port_offset()
    proc, out = start_until_serving(var, offset)
    try:
        for c in [TRAINER, *SERVICES]:
            assert f"gRPC 127.0.0.1:{c.port + offset}" in out
        with grpc.insecure_channel(f"127.0.0.1:{SERVICES[0].port + offset}") as ch:
            resp = fraud_pb2_grpc.FraudStub(ch).ScoreTransaction(score_request(data, 50_000), timeout=10)
            assert resp.model.version == "1"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, rest[-3000:]
    assert rest.rstrip().endswith("stopped")
    assert "[fraud]" in rest and "[trainer]" in rest  # each child's lines, prefixed, until it drained


def test_up_scaled_runs_two_of_everything_on_redis_and_stops_on_ctrl_c(bootstrapped, tmp_path):
    """`make up-scaled`: a redis-server, two trainers (one holds each domain's learner lease), two
    replicas of each service on their own ports; a client of both fraud replicas is answered by
    both; Ctrl-C stops everything cleanly (Redis last)."""
    var = fresh_var(bootstrapped, tmp_path)
    _, _, data = bootstrapped[1]["fraud"]
    offset = free_port_offset(replicas=2)
    proc, out = start_until_serving(var, offset, "--replicas", "2", "--redis", timeout_s=240)
    try:
        assert f"redis://127.0.0.1:{REDIS_PORT + offset}/0" in out
        for c in [TRAINER, *SERVICES]:
            for i in range(2):
                assert f"{c.name}-{i + 1}" in out and f"gRPC 127.0.0.1:{c.port + offset + REPLICA_PORT_STEP * i}" in out
        fraud = SERVICES[0]
        both = f"ipv4:127.0.0.1:{fraud.port + offset},127.0.0.1:{fraud.port + offset + REPLICA_PORT_STEP}"
        assert f"fraud          every replica: {both}" in out
        with sync_channel(both) as ch:
            stub = fraud_pb2_grpc.FraudStub(ch)
            versions = [stub.ScoreTransaction(score_request(data, 50_000 + i), timeout=10).model.version
                        for i in range(20)]
        assert versions == ["1"] * 20
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, rest[-3000:]
    assert rest.rstrip().endswith("stopped")
    # the trainers' event log is on Redis (no SQLite file), and both fraud replicas answered
    assert not (var / "trainer" / "events.db").exists()
    assert "[redis]" in out + rest and "Ready to accept connections" in out
    for name in ("fraud-1", "fraud-2", "trainer-1", "trainer-2"):
        assert f"[{name}]" in out + rest, name


def _served_new_version(line: str) -> str | None:
    """The domain of a demo progress line whose service answered with a version after v1."""
    m = re.match(r"\s+(\S+)\s+\d+ requests\s+\d+ errors\s+served (\S+)", line)
    if m and any(v != "v1" for v in m.group(2).split(",")):
        return m.group(1)
    return None


def learned_versions(out: str, domain: str) -> set[str]:
    """The versions after v1 the demo's progress lines show the domain's service answering with."""
    served = set()
    for line in out.splitlines():
        m = re.match(rf"\s+{domain}\s+\d+ requests\s+\d+ errors\s+served (\S+)", line)
        if m:
            served |= {v.removeprefix("v") for v in m.group(1).split(",") if v != "v1"}
    return served


@pytest.mark.long
def test_demo_shows_new_versions_learned_from_its_traffic_being_served(bootstrapped, tmp_path):
    """`make demo`: real traffic and outcomes from the datasets through the live suite; the
    trainer publishes versions learned from them and the services answer with them. The demo
    runs until its progress lines show every service answering with a version learned from the
    traffic, then Ctrl-C ends it: its summary still reports every domain, and all stops cleanly."""
    var = fresh_var(bootstrapped, tmp_path)
    offset = free_port_offset()
    # the demo's own trainer settings (ops/up.py DEMO_TRAINER_SETTINGS: direct delivery, a 10 s
    # recommender label window), not the caller's
    env = {k: v for k, v in os.environ.items() if k.removeprefix("STOREFRONT_").lower() not in DEMO_TRAINER_SETTINGS}
    proc = subprocess.Popen([sys.executable, "-m", "ops.up", "--var", str(var), "--port-offset", str(offset),
                             "--demo", "600"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)
    lines, learned = [], set()
    try:
        deadline = time.monotonic() + 300
        while learned != {s.domain for s in SERVICES} and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if (domain := _served_new_version(line)) is not None:
                learned.add(domain)
        assert learned == {s.domain for s in SERVICES}, "".join(lines)[-4000:]
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-4000:]
    assert "all services serving" in out and "[demo" in out and out.rstrip().endswith("stopped")
    for s in SERVICES:
        summary = next(line for line in out.splitlines() if line.startswith(f"demo: {s.domain}: registry"))
        assert summary.endswith(", 0 errors"), summary
        picked = int(summary.split("(")[1].split(" new version")[0])
        assert picked >= 1, summary  # at least one version learned during the demo was served
    # the demo's learning report: the recommender's click calibration per version, from the
    # trainer's decision log (trainer/report.py), the version the service picked up included
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("recommender: click calibration per version")))
    end = lines.index(next(line for line in lines[start:] if line.startswith("demo: learning reports in")))
    table = [line for line in lines[start + 1:end] if line.startswith("| ")]  # the services' lines may interleave
    assert table[0].startswith("| version | published (UTC) | served: mean click p | served: click rate"), table
    assert {row.split(" | ")[0].removeprefix("| ") for row in table[1:]} >= {"1", *learned_versions(out, "recommender")}
