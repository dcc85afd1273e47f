"""One settings object per process, from CLI flags, then environment, then defaults.

Every field of a settings dataclass is a flag (`--max-batch-size 32`) and an environment
variable (`STOREFRONT_MAX_BATCH_SIZE=32`); a flag beats the environment, which beats the
default. Defaults run on one machine with nothing else installed. Services subclass
ServerSettings to add their own fields and change defaults (their port, their model).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any, Mapping, Sequence, TypeVar

from shared.channels import normalize_target

ENV_PREFIX = "STOREFRONT_"
T = TypeVar("T", bound="BaseSettings")


def _parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclasses.dataclass
class BaseSettings:
    @classmethod
    def env_name(cls, field: str) -> str:
        return ENV_PREFIX + field.upper()

    @classmethod
    def load(cls: type[T], argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
             description: str | None = None) -> T:
        env = os.environ if env is None else env
        hints = typing.get_type_hints(cls)
        ap = argparse.ArgumentParser(description=description or cls.__doc__)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
            flag = "--" + f.name.replace("_", "-")
            if kind is bool:
                ap.add_argument(flag, dest=f.name, type=_parse_bool, nargs="?", const=True, default=None,
                                help=f"{help_text} [env {cls.env_name(f.name)}, default {f.default}]")
            else:
                ap.add_argument(flag, dest=f.name, type=kind, default=None,
                                help=f"{help_text} [env {cls.env_name(f.name)}, default {f.default!r}]")
        ns = ap.parse_args(argv)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if getattr(ns, f.name) is not None:
                values[f.name] = getattr(ns, f.name)
            elif cls.env_name(f.name) in env:
                raw = env[cls.env_name(f.name)]
                try:
                    values[f.name] = _parse_bool(raw) if kind is bool else kind(raw)
                except ValueError as e:
                    ap.error(f"environment variable {cls.env_name(f.name)}={raw!r}: {e}")
        settings = cls(**values)
        problems = settings.validate()
        if problems:
            ap.error("; ".join(problems))
        return settings

    def validate(self) -> list[str]:
        return []

    def as_env(self) -> dict[str, str]:
        """These settings as environment variables (to hand to a child process)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[self.env_name(f.name)] = ("1" if v else "0") if isinstance(v, bool) else str(v)
        return out


def setting(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ServerSettings(BaseSettings):
    """Settings every gRPC server process shares (services and the trainer)."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)")
    port: int = setting(18111, "gRPC port")
    metrics_port: int = setting(-1, "Prometheus HTTP port; -1 = gRPC port + 1000, 0 = off")
    registry_dir: str = setting("var/registry", "model registry folder")
    max_message_mb: int = setting(64, "largest gRPC message, MiB")
    tls_cert: str = setting("", "server certificate (PEM); with tls_key enables TLS")
    tls_key: str = setting("", "server private key (PEM)")
    tls_client_ca: str = setting("", "CA bundle for client certificates; set = mTLS required")
    keepalive_time_s: float = setting(30.0, "HTTP/2 keepalive ping interval")
    keepalive_timeout_s: float = setting(10.0, "close a connection whose ping is not answered in this time")
    grace_s: float = setting(5.0, "seconds in-flight RPCs get to finish on shutdown")
    drain_s: float = setting(1.0, "on shutdown, keep serving this long with health NOT_SERVING so polling "
                                  "load balancers move away (skipped if nothing ever health-checked us)")
    max_concurrent_rpcs: int = setting(128, "RPCs in flight before new ones get RESOURCE_EXHAUSTED at once "
                                            "(health and reflection exempt); 0 = no limit")
    queue_delay_target_ms: float = setting(
        250.0, "adaptive admission per unary method: while even its fastest call of each 100 ms exceeds its "
               "no-load latency by more than this (and by 2x), a standing queue, its concurrency limit shrinks "
               "x0.9 per 100 ms (floor 4), else grows by 1 up to max_concurrent_rpcs; calls over the limit get "
               "RESOURCE_EXHAUSTED at once; 0 = off")
    workers: int = setting(1, "server processes sharing the port (SO_REUSEPORT)")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting("json", "json (one object per line) or text")

    def _at_least_one(self) -> tuple[str, ...]:
        return ("workers", "max_message_mb")

    def validate(self) -> list[str]:
        p = []
        if not 0 <= self.port <= 65535:
            p.append(f"port {self.port} out of range")
        if self.workers > 1 and self.port == 0:
            p.append("workers > 1 needs a fixed port")
        for name in self._at_least_one():
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1")
        if bool(self.tls_cert) != bool(self.tls_key):
            p.append("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            p.append("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.log_format not in ("json", "text"):
            p.append("log_format must be json or text")
        if self.drain_s < 0 or self.max_concurrent_rpcs < 0 or self.queue_delay_target_ms < 0:
            p.append("drain_s, max_concurrent_rpcs and queue_delay_target_ms must be >= 0")
        return p

    @property
    def resolved_metrics_port(self) -> int:
        return self.port + 1000 if self.metrics_port == -1 else self.metrics_port


@dataclasses.dataclass
class ServingSettings(ServerSettings):
    """Settings of a process that serves models: runtime, hot reload, batching."""

    poll_interval_s: float = setting(0.5, "how often to look for a new model version")
    providers: str = setting("auto", "execution providers: auto, or a comma list of tensorrt,cuda,cpu")
    intra_op_threads: int = setting(1, "ONNX Runtime threads inside one operator")
    inter_op_threads: int = setting(1, "ONNX Runtime threads across operators")
    trt_fp16: bool = setting(False, "let TensorRT build fp16 engines")
    trt_cache_dir: str = setting("var/trt-cache", "TensorRT engine cache (one folder per model version)")
    max_batch_size: int = setting(64, "most rows merged into one session run (1 = no batching)")
    max_queue_delay_us: int = setting(0, "how long a short queue waits for more rows, microseconds")
    max_queue_size: int = setting(1024, "requests waiting for a run before RESOURCE_EXHAUSTED")
    batch_workers: int = setting(1, "session runs in flight at once per model")
    max_request_rows: int = setting(1024, "largest batch one request may carry")

    def runtime_options(self):
        from shared.runtime.session import RuntimeOptions

        return RuntimeOptions(providers=self.providers, intra_op_threads=self.intra_op_threads,
                              inter_op_threads=self.inter_op_threads, trt_fp16=self.trt_fp16,
                              trt_cache_dir=self.trt_cache_dir)

    def _at_least_one(self) -> tuple[str, ...]:
        return (*super()._at_least_one(), "max_batch_size", "max_queue_size", "batch_workers", "max_request_rows",
                "intra_op_threads", "inter_op_threads")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.max_queue_delay_us < 0:
            p.append("max_queue_delay_us must be >= 0")
        return p


@dataclasses.dataclass
class DomainSettings(ServingSettings):
    """Settings every domain service adds: its model and its feedback stream to the trainer."""

    model_name: str = setting("", "model name in the registry (default: the domain)")
    trainer_target: str = setting("127.0.0.1:50050", "trainer's feedback endpoint: HOST:PORT, or every "
                                  "trainer replica (ipv4:IP:PORT,IP:PORT or dns:///NAME:PORT; round_robin); "
                                  "empty = no feedback")
    spool_dir: str = setting("", "where feedback waits while the trainer is unreachable (default var/spool/<domain>)")
    spool_max_mb: int = setting(256, "feedback spool size limit; beyond it records are dropped (and logged)")
    feedback_token: str = setting("", "this service's token for the trainer's feedback stream (trainer: feedback_tokens); "
                                  "'@<file>' reads it from a file; empty = none (a trainer without tokens "
                                  "then accepts loopback peers only)")
    trainer_tls_ca: str = setting("", "CA bundle (PEM) of the trainer's certificate; set = TLS to the trainer")
    trainer_tls_cert: str = setting("", "client certificate (PEM) for an mTLS trainer; its CN names the domain")
    trainer_tls_key: str = setting("", "private key (PEM) of trainer_tls_cert")
    trainer_tls_server_name: str = setting("", "name expected in the trainer's certificate, when not the target host")
    prediction_id_key_file: str = setting("", "HMAC keys signing prediction ids, one hex key per line (first "
                                          "signs, all verify); shared by every replica; created if missing; "
                                          "default <registry_dir>/../secrets/prediction-ids.key")
    outcome_rate_per_s: float = setting(5000.0, "outcomes per second one caller (client certificate CN, else IP) "
                                        "may report; beyond: RESOURCE_EXHAUSTED; 0 = no limit")
    outcome_burst: int = setting(10000, "outcomes a caller may report at once above outcome_rate_per_s")
    outcome_ack_durable: bool = setting(False, "answer ReportOutcome only once the outcome is fsync'd in the "
                                        "feedback spool (survives kill -9; one fsync per call)")
    canary: str = setting("follow", "follow: serve the candidate the registry's CANARY pointer names beside the "
                          "champion, as it says (canary: its share of request keys; shadow: scores every request, "
                          "answers none); off: the champion (CURRENT) answers everything")
    shadow_max_inflight: int = setting(64, "shadow mode: most shadow scorings running at once; beyond, and while the "
                                       "batch queue is half full, a request is not shadowed (counted)")
    shadow_timeout_ms: float = setting(1000.0, "shadow mode: a shadow scoring not done by then is dropped (counted)")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.trainer_target:
            try:
                normalize_target(self.trainer_target)
            except ValueError as e:
                p.append(f"trainer_target: {e}")
        if bool(self.trainer_tls_cert) != bool(self.trainer_tls_key):
            p.append("trainer_tls_cert and trainer_tls_key go together")
        if self.trainer_tls_cert and not self.trainer_tls_ca:
            p.append("trainer_tls_cert (mTLS to the trainer) needs trainer_tls_ca")
        if self.outcome_rate_per_s < 0 or self.outcome_burst < 1:
            p.append("outcome_rate_per_s must be >= 0 (0 = no limit) and outcome_burst >= 1")
        if self.canary not in ("follow", "off"):
            p.append(f"canary must be 'follow' or 'off', not {self.canary!r}")
        if self.shadow_max_inflight < 1 or not self.shadow_timeout_ms > 0:
            p.append("shadow_max_inflight must be >= 1 and shadow_timeout_ms > 0")
        return p
