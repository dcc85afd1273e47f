"""The suite's real processes (trainer, services) as children: for `make up`, benchmarks and e2e tests."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from ops.ports import free_port
from ops.redis_server import RedisServer
from shared.channels import normalize_target

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    """One child process in its own session (so kill -9 takes its whole group), logging to a file."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.args, self.log_path = name, args, Path(log_path)
        self.env = dict(env or {})  # added to ours (secrets go here, never into args: ps shows args)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Proc":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, *self.args], cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                                     start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

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
            raise RuntimeError(f"{self.name} did not stop on SIGTERM; log: {self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")


def wait_serving(address: str, timeout: float = 180.0, proc: Proc | None = None) -> None:
    """Until the standard health service at address says SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}: {proc.tail()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{address} not SERVING after {timeout} s")


class FraudLoop:
    """Trainer + fraud service over one registry and work folder, each its own process."""

    def __init__(self, root: Path, trainer_args: list[str] = (), fraud_args: list[str] = ()) -> None:
        self.root = Path(root)
        self.registry, self.workdir, self.spool = self.root / "registry", self.root / "trainer", self.root / "spool"
        self.trainer_port, self.fraud_port = free_port(), free_port()
        token = secrets.token_urlsafe(32)  # the fraud service's identity on the feedback stream
        self.trainer = Proc("trainer", ["-m", "trainer", "serve", "--port", str(self.trainer_port), "--metrics-port", "0",
                                        "--workdir", str(self.workdir), "--registry-dir", str(self.registry),
                                        "--log-format", "text", "--domains", "fraud", *trainer_args], self.root / "trainer.log",
                            env={"STOREFRONT_FEEDBACK_TOKENS": f"fraud={token}"})
        self.fraud = Proc("fraud", ["-m", "services.fraud.main", "--port", str(self.fraud_port), "--metrics-port", "0",
                                    "--registry-dir", str(self.registry), "--trainer-target",
                                    f"127.0.0.1:{self.trainer_port}", "--spool-dir", str(self.spool),
                                    "--log-format", "text", *fraud_args], self.root / "fraud.log",
                          env={"STOREFRONT_FEEDBACK_TOKEN": token})

    @property
    def event_log(self) -> Path:
        return self.workdir / "events.db"

    def start(self, timeout: float = 300.0) -> "FraudLoop":
        self.trainer.start()
        self.fraud.start()
        try:
            wait_serving(f"127.0.0.1:{self.trainer_port}", timeout, self.trainer)
            wait_serving(f"127.0.0.1:{self.fraud_port}", timeout, self.fraud)
        except BaseException:  # the caller never gets the loop to stop: stop what was started
            self.stop()
            raise
        return self

    def stop(self) -> tuple[int, int]:
        return self.fraud.stop(), self.trainer.stop()


class ScaledFraudLoop:
    """The fraud loop in Redis mode (issue 14), each its own process: a redis-server (appendfsync
    always), `replicas` trainers on its event log (one workdir and registry, as on a shared volume)
    and `replicas` fraud services, whose feedback clients name every trainer (round_robin)."""

    def __init__(self, root: Path, replicas: int = 2, trainer_args: list[str] = (), fraud_args: list[str] = ()) -> None:
        self.root = Path(root)
        self.registry, self.workdir = self.root / "registry", self.root / "trainer"
        self.redis = RedisServer(self.root / "redis", appendfsync="always")
        token = secrets.token_urlsafe(32)
        self.trainer_ports = [free_port() for _ in range(replicas)]
        self.fraud_ports = [free_port() for _ in range(replicas)]
        trainers = ",".join(f"127.0.0.1:{p}" for p in self.trainer_ports)
        self.trainers = [Proc(f"trainer-{i + 1}", [
            "-m", "trainer", "serve", "--port", str(port), "--metrics-port", "0", "--workdir", str(self.workdir),
            "--registry-dir", str(self.registry), "--log-format", "text", "--domains", "fraud",
            "--event-log-url", self.redis.url, *trainer_args], self.root / f"trainer-{i + 1}.log",
            env={"STOREFRONT_FEEDBACK_TOKENS": f"fraud={token}"}) for i, port in enumerate(self.trainer_ports)]
        self.frauds = [Proc(f"fraud-{i + 1}", [
            "-m", "services.fraud.main", "--port", str(port), "--metrics-port", "0", "--registry-dir",
            str(self.registry), "--trainer-target", trainers, "--spool-dir", str(self.root / "spool" / f"fraud-{i + 1}"),
            "--log-format", "text", *fraud_args], self.root / f"fraud-{i + 1}.log",
            env={"STOREFRONT_FEEDBACK_TOKEN": token}) for i, port in enumerate(self.fraud_ports)]

    def fraud_target(self, replicas: int | None = None) -> str:
        """The first `replicas` (default all) fraud replicas as one gRPC target."""
        return normalize_target(",".join(f"127.0.0.1:{p}" for p in self.fraud_ports[:replicas]))

    def start(self, timeout: float = 900.0) -> "ScaledFraudLoop":
        """The redis-server first (its port is chosen when it starts), then the trainers (the lease
        holder bootstraps fraud when the registry has none), then the services."""
        self.redis.start()
        try:
            for p in self.trainers:
                p.args[p.args.index("--event-log-url") + 1] = self.redis.url
                p.start()
            for p, port in zip(self.trainers, self.trainer_ports):
                wait_serving(f"127.0.0.1:{port}", timeout, p)
            for p in self.frauds:
                p.start()
            for p, port in zip(self.frauds, self.fraud_ports):
                wait_serving(f"127.0.0.1:{port}", timeout, p)
        except BaseException:
            self.stop()
            raise
        return self

    def stop_processes(self) -> list[int]:
        """Stop the services, then the trainers (exit codes; -9: killed after not stopping); Redis stays."""
        codes = []
        for p in [*self.frauds, *self.trainers]:
            try:
                codes.append(p.stop())
            except RuntimeError:
                codes.append(-9)
        return codes

    def stop(self) -> list[int]:
        codes = self.stop_processes()
        self.redis.stop()
        return codes
