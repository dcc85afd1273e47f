"""Client channels to one service or trainer, or to several replicas of it.

Every client of ours (a service's feedback stream to the trainer, the load tests, the demo)
opens its channel here, so a target may name several replicas and the load spreads over them:

    127.0.0.1:50051                                 one address (as before)
    ipv4:10.0.0.5:50051,10.0.0.6:50051              several addresses (gRPC's ipv4: / ipv6: schemes)
    10.0.0.5:50051,10.0.0.6:50051                   the same, written without the scheme (IP literals only)
    dns:///fraud.internal:50051                     every address the name resolves to

Nothing here is home-made balancing: gRPC's own `round_robin` policy picks a connected replica
for each call, and the service config's retry policy sends a call that failed with UNAVAILABLE
(the replica went away before it answered: its connection refused or reset) again, to another
replica, a bounded number of times with backoff. Only UNAVAILABLE is retried: the call never got
an answer (gRPC does not retry once the server sent its response headers), so the other replica
sees it as the first. ReportOutcome is safe to send twice (de-duplicated by outcome identity); a
ScoreTransaction sent twice is answered twice, and only the answer the caller got has its outcome
reported. The services' feedback stream opens its channel with max_attempts=1 (round_robin, no
retry policy): its sender reconnects and replays by itself (shared/feedback/sender.py).

Channel options (grpc core's names): `grpc.lb_policy_name`, `grpc.service_config` (load
balancing and the retry policy: https://grpc.io/docs/guides/service-config,
https://grpc.io/docs/guides/retry), `grpc.enable_retries`.
"""
from __future__ import annotations

import ipaddress
import json
from typing import Sequence

import grpc

LB_POLICY = "round_robin"
# Attempts in all (gRPC caps it at 5): the first and up to three more. With two replicas one of
# which is gone, the second attempt already lands on the live one; the others cover a replica
# restarting while the other is being replaced.
RETRY_MAX_ATTEMPTS = 4
RETRY_INITIAL_BACKOFF_S = 0.05
RETRY_MAX_BACKOFF_S = 1.0
RETRY_BACKOFF_MULTIPLIER = 2.0
RETRYABLE_CODES = ("UNAVAILABLE",)
SCHEMES = ("ipv4:", "ipv6:", "dns:", "unix:", "unix-abstract:", "vsock:")


def service_config(max_attempts: int = RETRY_MAX_ATTEMPTS) -> str:
    """The service config (JSON) every client channel carries: round_robin over the target's
    addresses, and the retry policy for every method (`"name": [{}]`); max_attempts 1 = no
    retry policy (round_robin alone)."""
    if max_attempts == 1:
        return json.dumps({"loadBalancingConfig": [{LB_POLICY: {}}]})
    if not 2 <= max_attempts <= 5:
        raise ValueError("max_attempts must be in 1..5 (gRPC caps retries at 5 attempts)")
    return json.dumps({
        "loadBalancingConfig": [{LB_POLICY: {}}],
        "methodConfig": [{
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": f"{RETRY_INITIAL_BACKOFF_S}s",
                "maxBackoff": f"{RETRY_MAX_BACKOFF_S}s",
                "backoffMultiplier": RETRY_BACKOFF_MULTIPLIER,
                "retryableStatusCodes": list(RETRYABLE_CODES),
            },
        }],
    })


def client_options(extra: Sequence[tuple[str, object]] = (), max_attempts: int = RETRY_MAX_ATTEMPTS
                   ) -> list[tuple[str, object]]:
    """Channel options for a client of one or several replicas; `extra` is added (and a key in it
    that names one of ours replaces ours)."""
    ours = {"grpc.lb_policy_name": LB_POLICY, "grpc.enable_retries": int(max_attempts > 1),
            "grpc.service_config": service_config(max_attempts),
            # the service config is ours: a DNS TXT record must not swap in another policy
            "grpc.service_config_disable_resolution": 1}
    theirs = dict(extra)
    return [*((k, v) for k, v in ours.items() if k not in theirs), *theirs.items()]


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _split_host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host, port


def normalize_target(target: str) -> str:
    """The gRPC target of `target`: a single HOST:PORT or a target with a scheme as given;
    several IP:PORT separated by commas get the ipv4: (or ipv6:) scheme gRPC wants for a list.
    Several host names in one list have no scheme in gRPC: name them by one DNS name instead."""
    target = target.strip()
    if not target:
        raise ValueError("empty target")
    if target.startswith(SCHEMES) or "," not in target:
        return target
    addresses = [a.strip() for a in target.split(",")]
    ips = [_ip_literal(_split_host_port(a)[0]) for a in addresses]
    if any(ip is None for ip in ips):
        raise ValueError(f"{target!r}: a list of addresses must be IP:PORT each (ipv4:a:port,b:port); "
                         "for host names use one DNS name that resolves to every replica (dns:///name:port)")
    versions = {ip.version for ip in ips}
    if len(versions) != 1:
        raise ValueError(f"{target!r}: IPv4 and IPv6 addresses cannot share one target")
    return ("ipv4:" if versions == {4} else "ipv6:") + ",".join(addresses)


def target_hosts(target: str) -> list[str]:
    """The hosts a target names (the address list, or the DNS name), without ports."""
    target = normalize_target(target)
    body = target
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            body = target[len(scheme):]
    if target.startswith("dns:"):
        body = target.removeprefix("dns:").lstrip("/")
        if "/" in body:  # dns://authority/name:port
            body = body.split("/", 1)[1]
    elif target.startswith(("unix:", "unix-abstract:", "vsock:")):
        return [target]
    return [_split_host_port(a.strip())[0].strip("[]") if ":" in a else a.strip() for a in body.split(",")]


def is_loopback(target: str) -> bool:
    """Whether every host the target names is this machine's loopback."""
    hosts = target_hosts(target)
    return all(h == "localhost" or ((ip := _ip_literal(h)) is not None and ip.is_loopback) for h in hosts)


def aio_channel(target: str, credentials: grpc.ChannelCredentials | None = None,
                options: Sequence[tuple[str, object]] = (), max_attempts: int = RETRY_MAX_ATTEMPTS
                ) -> grpc.aio.Channel:
    """An asyncio channel to target's replicas (TLS with credentials, else plaintext);
    max_attempts 1 for a caller that retries by itself (the feedback stream: see there)."""
    target, opts = normalize_target(target), client_options(options, max_attempts)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=opts)
    return grpc.aio.insecure_channel(target, options=opts)


def sync_channel(target: str, credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A blocking channel to target's replicas (TLS with credentials, else plaintext)."""
    target, opts = normalize_target(target), client_options(options)
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=opts)
    return grpc.insecure_channel(target, options=opts)
