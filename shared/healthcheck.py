"""Ask a server's standard gRPC health service whether it serves; for Docker and compose healthchecks.

    python -m shared.healthcheck [HOST:PORT] [--service NAME] [--timeout 3]
                                 [--tls-ca PEM [--tls-cert PEM --tls-key PEM] [--server-name NAME]]

Exit 0 when the status is SERVING, 1 otherwise (NOT_SERVING, an unknown service, an
unreachable server, a timeout, bad arguments), after printing one line: the status, or
the error. `--service ""` (the default) asks about the server as a whole; a server built
on shared.server also answers for each of its services by full name
(e.g. storefront.fraud.v1.Fraud, storefront.feedback.v1.Feedback).

Without HOST:PORT the target is 127.0.0.1:$STOREFRONT_PORT (the host is $STOREFRONT_HOST
when that names one address rather than all of them), so one HEALTHCHECK line in an image
fits every process that image runs. Exit code 2 is never used: Docker reserves it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2, which Docker reserves
        self.print_usage(sys.stderr)
        print(f"error: {message}", flush=True)
        raise SystemExit(1)


def default_target(env: Mapping[str, str] | None = None) -> str | None:
    """127.0.0.1:$STOREFRONT_PORT (or $STOREFRONT_HOST:$STOREFRONT_PORT), None when the port is not set."""
    env = os.environ if env is None else env
    port = env.get("STOREFRONT_PORT", "").strip()
    if not port:
        return None
    host = env.get("STOREFRONT_HOST", "").strip()
    if host in _WILDCARDS:
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def check(target: str, service: str = "", timeout: float = 3.0,
          credentials: grpc.ChannelCredentials | None = None, server_name: str = "") -> tuple[bool, str]:
    """(serving, one line saying why) for one Health.Check call."""
    options = [("grpc.enable_retries", 0)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    channel = (grpc.secure_channel(target, credentials, options=options) if credentials is not None
               else grpc.insecure_channel(target, options=options))
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return resp.status == SERVING, status
    except grpc.RpcError as e:
        code = e.code().name if e.code() is not None else "UNKNOWN"
        details = " ".join((e.details() or "").split())
        return False, f"{code}: {details}" if details else code
    finally:
        channel.close()


def _credentials(args) -> grpc.ChannelCredentials | None:
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m shared.healthcheck",
                 description="Exit 0 when a gRPC server's health service says SERVING, 1 otherwise.")
    ap.add_argument("target", nargs="?", default=None,
                    help="HOST:PORT (default 127.0.0.1:$STOREFRONT_PORT)")
    ap.add_argument("--service", default="", help="service to ask about; empty = the whole server")
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds for the whole check")
    ap.add_argument("--tls-ca", default="", help="CA bundle (PEM) to verify the server; turns TLS on")
    ap.add_argument("--tls-cert", default="", help="client certificate (PEM) for mTLS")
    ap.add_argument("--tls-key", default="", help="client private key (PEM) for mTLS")
    ap.add_argument("--server-name", default="", help="name to verify the server certificate against")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.timeout <= 0:
        ap.error("--timeout must be > 0")
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    target = args.target or default_target()
    if not target:
        ap.error("no target: pass HOST:PORT or set STOREFRONT_PORT")
    try:
        creds = _credentials(args)
    except OSError as e:
        print(f"error: {e}", flush=True)
        return 1
    ok, line = check(target, args.service, args.timeout, creds, args.server_name)
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
