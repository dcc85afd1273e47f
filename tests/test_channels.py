"""shared/channels.py: one client over several replicas. Two real gRPC servers on loopback ports,
each answering the standard health Check with its own status: the client's calls land on both
(round_robin), and once one server is gone every call still succeeds (UNAVAILABLE is retried on
the other replica, by gRPC's own retry policy)."""
from __future__ import annotations

import asyncio
import json
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ops.procs import free_port
from shared.channels import (aio_channel, client_options, is_loopback, normalize_target, service_config, sync_channel,
                             target_hosts)
from shared.settings import DomainSettings


class Replica(health_pb2_grpc.HealthServicer):
    """A health service that counts its calls: which replica answered."""

    def __init__(self) -> None:
        self.calls = 0

    def Check(self, request, context):
        self.calls += 1
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def serve(replica: Replica) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(replica, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_targets_are_normalized_and_lists_of_names_refused():
    assert normalize_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert normalize_target("127.0.0.1:50051, 127.0.0.1:50061") == "ipv4:127.0.0.1:50051,127.0.0.1:50061"
    assert normalize_target("ipv4:10.0.0.1:1,10.0.0.2:1") == "ipv4:10.0.0.1:1,10.0.0.2:1"
    assert normalize_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert normalize_target("dns:///fraud.internal:50051") == "dns:///fraud.internal:50051"
    with pytest.raises(ValueError, match="dns:///"):
        normalize_target("fraud-a:50051,fraud-b:50051")
    with pytest.raises(ValueError, match="IPv4 and IPv6"):
        normalize_target("127.0.0.1:1,[::1]:2")
    assert target_hosts("dns:///fraud.internal:50051") == ["fraud.internal"]
    assert is_loopback("ipv4:127.0.0.1:1,127.0.0.1:2") and is_loopback("localhost:1")
    assert not is_loopback("ipv4:127.0.0.1:1,10.0.0.2:2")
    # a service refuses a trainer_target gRPC could not use, at start-up
    problems = DomainSettings(trainer_target="trainer-a:50050,trainer-b:50050").validate()
    assert any(p.startswith("trainer_target:") for p in problems), problems


def test_service_config_is_round_robin_with_a_bounded_unavailable_retry():
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    policy = config["methodConfig"][0]["retryPolicy"]
    assert config["methodConfig"][0]["name"] == [{}]  # every method
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"] and 2 <= policy["maxAttempts"] <= 5
    options = dict(client_options([("grpc.max_receive_message_length", 1 << 20), ("grpc.enable_retries", 0)]))
    assert options["grpc.lb_policy_name"] == "round_robin"
    assert options["grpc.enable_retries"] == 0 and options["grpc.max_receive_message_length"] == 1 << 20  # theirs win


def test_calls_spread_over_both_replicas_and_survive_one_going_away():
    a, b = Replica(), Replica()
    server_a, port_a = serve(a)
    server_b, port_b = serve(b)
    try:
        with sync_channel(f"127.0.0.1:{port_a},127.0.0.1:{port_b}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            # wait_for_ready on the first call only: both subchannels connect in the background
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True)
            grpc.channel_ready_future(channel).result(timeout=10)
            for _ in range(200):
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert a.calls > 20 and b.calls > 20, (a.calls, b.calls)  # round_robin, not pick_first
            server_a.stop(grace=None).wait()
            before = b.calls
            for _ in range(100):  # none fails: the calls that meet the gone replica go to the other
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert b.calls - before == 100
    finally:
        server_a.stop(grace=None)
        server_b.stop(grace=None)


def test_an_asyncio_client_of_a_refusing_replica_and_a_live_one_gets_every_answer():
    """A replica that is down from the start (its port refuses connections) next to a live one:
    the asyncio channel answers every call from the live one."""
    live = Replica()
    server, port = serve(live)
    dead_port = free_port()  # nothing listens there

    async def go() -> None:
        async with aio_channel(f"ipv4:127.0.0.1:{dead_port},127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            replies = await asyncio.gather(*(stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                                             for _ in range(50)))
            assert all(r.status == health_pb2.HealthCheckResponse.SERVING for r in replies)

    try:
        asyncio.run(go())
        assert live.calls == 50
    finally:
        server.stop(grace=None)
