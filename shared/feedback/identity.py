"""How a service proves its identity to the trainer's collector: a token in gRPC metadata
and/or a TLS client certificate whose CN names its domain."""
from __future__ import annotations

from pathlib import Path

import grpc

# gRPC metadata key carrying a service's feedback token (the trainer's collector checks it).
TOKEN_METADATA = "x-storefront-feedback-token"


def read_secret(value: str) -> str:
    """A secret setting: the value itself, or '@<path>' for the file's contents (stripped), which
    keeps the secret out of process listings and environment dumps."""
    value = value or ""
    if value.startswith("@"):
        return Path(value[1:]).read_text().strip()
    return value.strip()


def client_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """TLS credentials to the trainer from PEM files: the CA that signed its certificate, and
    this service's client certificate and key when the trainer requires mTLS (its CN names the
    domain, e.g. CN=fraud)."""
    if bool(cert) != bool(key):
        raise ValueError("a client certificate and its key go together")
    return grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes(),
                                        private_key=Path(key).read_bytes() if key else None,
                                        certificate_chain=Path(cert).read_bytes() if cert else None)
