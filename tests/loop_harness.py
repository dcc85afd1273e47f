"""Real processes for end-to-end tests: the trainer and the fraud service as subprocesses,
plus a storefront-like client that scores real transactions and reports their labels."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from protos.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from tests.conftest import free_port
from trainer.domains.fraud import FEATURES

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name, self.args, self.log_path = name, args, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Proc":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, *self.args], cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        return self

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"{self.name} did not stop on SIGTERM; log: {self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")


def wait_serving(address: str, timeout: float = 120.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"{address} not SERVING after {timeout} s")


class Loop:
    """Trainer + fraud service over one registry, each its own process."""

    def __init__(self, root: Path, trainer_args: list[str] = ()) -> None:
        self.root = root
        self.registry, self.workdir, self.spool = root / "registry", root / "trainer", root / "spool"
        self.trainer_port, self.fraud_port = free_port(), free_port()
        self.trainer = Proc("trainer", ["-m", "trainer", "serve", "--port", str(self.trainer_port), "--metrics-port", "0",
                                        "--workdir", str(self.workdir), "--registry-dir", str(self.registry),
                                        "--bootstrap", "0", "--poll-interval-s", "0.2", "--log-format", "text",
                                        *trainer_args], root / "trainer.log")
        self.fraud = Proc("fraud", ["-m", "services.fraud.main", "--port", str(self.fraud_port), "--metrics-port", "0",
                                    "--registry-dir", str(self.registry), "--trainer-target",
                                    f"127.0.0.1:{self.trainer_port}", "--spool-dir", str(self.spool),
                                    "--poll-interval-s", "0.2", "--log-format", "text"], root / "fraud.log")

    @property
    def event_log(self) -> Path:
        return self.workdir / "events.db"


def score_request(data, i: int) -> fraud_pb2.ScoreTransactionRequest:
    row = data.X[i]
    return fraud_pb2.ScoreTransactionRequest(transaction_id=f"tx-{i}", amount=float(row[-1]),
                                             features={n: float(v) for n, v in zip(FEATURES, row[:-1])})


class Storefront:
    """Scores transactions and reports each label right after (label delay is the trainer's
    business: the joiner is what handles a delay). Counts every call and its result."""

    def __init__(self, address: str, data, rows: range) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = fraud_pb2_grpc.FraudStub(self.channel)
        self.data, self.rows = data, rows
        self.scored = 0
        self.outcomes = 0
        self.errors: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def one(self, i: int) -> str:
        resp = self.stub.ScoreTransaction(score_request(self.data, i), timeout=10)
        self.scored += 1
        self.versions.add(resp.model.version)
        self.stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=resp.prediction_id,
                                                       is_fraud=bool(self.data.y[i]), source="chargeback"), timeout=10)
        self.outcomes += 1
        return resp.model.version

    def run(self, pause_s: float = 0.0) -> None:
        for i in self.rows:
            if self._stop.is_set():
                return
            try:
                self.one(i)
            except grpc.RpcError as e:
                self.errors.append(f"{e.code().name}: {e.details()}")
            if pause_s:
                time.sleep(pause_s)

    def start(self, pause_s: float = 0.0) -> "Storefront":
        self._thread = threading.Thread(target=self.run, args=(pause_s,), daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.channel.close()
