"""The server layer under abuse, on real grpc.aio servers: admission control (overload is
shed by us, RESOURCE_EXHAUSTED at once and counted), unknown method names do not grow
memory, health List and reflection v1 answer, shutdown drains without losing an admitted
call, and the trainer is NOT_SERVING until it has a model for every domain it learns."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from shared import metrics
from shared.server import ServerApp
from shared.settings import ServerSettings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
V2 = "inference.GRPCInferenceService"


class HeldInference(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer waits until released, so calls stay in flight exactly as long as a test says.
    The other V2 methods are left to the generated base (they raise NotImplementedError)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = 0
        self._changed = asyncio.Condition()

    async def ModelInfer(self, request, context):
        async with self._changed:
            self.arrived += 1
            self._changed.notify_all()
        await self.release.wait()
        return pb.ModelInferResponse(id=request.id)

    async def wait_arrived(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.arrived >= n)


def server_settings(**overrides) -> ServerSettings:
    base = dict(host="127.0.0.1", port=0, metrics_port=0, grace_s=5.0, drain_s=0.0, log_format="text")
    base.update(overrides)
    return ServerSettings(**base)


@contextlib.asynccontextmanager
async def held_server(**overrides):
    held = HeldInference()

    def register(server) -> list[str]:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(held, server)
        return [V2]

    app = ServerApp("held", server_settings(**overrides), {}, register, v2=False)
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield app, held, pb_grpc.GRPCInferenceServiceStub(channel), channel
    finally:
        held.release.set()
        await channel.close()
        await app.stop()


def requests_total(method: str, code: str) -> int:
    return sum(metrics.REQUEST_STATS.series(method, code)[:-1])


def shed_total(method: str, reason: str) -> float:
    return metrics.SHED.labels(method, reason)._value.get()


@pytest.mark.timeout(60)
async def test_over_the_concurrency_limit_calls_get_resource_exhausted_at_once_and_are_counted():
    async with held_server(max_concurrent_rpcs=4, max_queue_wait_ms=0) as (app, held, stub, channel):
        shed_before = shed_total("ModelInfer", "concurrency")
        refused_before = requests_total("ModelInfer", "RESOURCE_EXHAUSTED")
        calls = [asyncio.ensure_future(stub.ModelInfer(pb.ModelInferRequest(id=f"r{i}"), timeout=30))
                 for i in range(4)]
        await held.wait_arrived(4)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(pb.ModelInferRequest(id="over"), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in e.value.details() and "(request id " in e.value.details()
        assert held.arrived == 4  # refused before it reached the servicer
        assert requests_total("ModelInfer", "RESOURCE_EXHAUSTED") == refused_before + 1
        assert shed_total("ModelInfer", "concurrency") == shed_before + 1
        # health is exempt: a saturated process still answers its load balancer
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(service=V2), timeout=10)).status == SERVING
        held.release.set()
        assert [r.id for r in await asyncio.gather(*calls)] == [f"r{i}" for i in range(4)]
        assert app.interceptor.in_flight == 0
        assert (await stub.ModelInfer(pb.ModelInferRequest(id="after"), timeout=30)).id == "after"


@pytest.mark.timeout(60)
async def test_a_call_is_refused_while_the_oldest_admitted_one_has_waited_too_long():
    async with held_server(max_concurrent_rpcs=0, max_queue_wait_ms=50) as (app, held, stub, channel):
        shed_before = shed_total("ModelInfer", "queue_wait")
        first = asyncio.ensure_future(stub.ModelInfer(pb.ModelInferRequest(id="first"), timeout=30))
        await held.wait_arrived(1)
        await asyncio.sleep(0.1)  # the condition under test is time in flight: let 100 ms pass
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(pb.ModelInferRequest(id="late"), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue_wait" in e.value.details()
        assert shed_total("ModelInfer", "queue_wait") == shed_before + 1
        held.release.set()
        assert (await first).id == "first"
        # the queue is empty again: admitted
        assert (await stub.ModelInfer(pb.ModelInferRequest(id="next"), timeout=30)).id == "next"


@pytest.mark.timeout(180)
async def test_ten_thousand_unknown_method_names_get_unimplemented_and_do_not_grow_the_cache():
    async with held_server() as (app, held, stub, channel):
        held.release.set()
        await stub.ModelInfer(pb.ModelInferRequest(id="known"), timeout=30)
        known = app.interceptor.cache_size
        codes: dict[str, int] = {}

        async def call(i: int) -> None:
            rpc = channel.unary_unary(f"/fuzz.Service{i}/Method{i}")  # bytes in, bytes out
            try:
                await rpc(b"", timeout=30)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            codes[code] = codes.get(code, 0) + 1

        for start in range(0, 10_000, 250):
            await asyncio.gather(*(call(i) for i in range(start, start + 250)))
        assert codes == {"UNIMPLEMENTED": 10_000}
        assert app.interceptor.cache_size == known


@pytest.mark.timeout(60)
async def test_health_list_answers_and_unimplemented_methods_are_unimplemented_not_internal():
    async with held_server() as (app, held, stub, channel):
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.List(health_pb2.HealthListRequest(), timeout=10)
        assert {k: v.status for k, v in resp.statuses.items()} == {"": SERVING, V2: SERVING}
        internal_before = requests_total("ServerLive", "INTERNAL")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ServerLive(pb.ServerLiveRequest(), timeout=10)  # left to the generated base
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert requests_total("ServerLive", "INTERNAL") == internal_before
        assert requests_total("ServerLive", "UNIMPLEMENTED") >= 1


@pytest.mark.timeout(60)
async def test_reflection_v1_and_v1alpha_both_answer():
    async with held_server() as (app, held, stub, channel):
        rpc = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        call = rpc()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"))
        described = await call.read()
        await call.done_writing()
        names = {s.name for s in listed.list_services_response.service}
        assert {V2, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= names
        assert described.WhichOneof("message_response") == "file_descriptor_response"
        # v1alpha through grpcio-reflection's own client
        sync_channel = grpc.insecure_channel(app.address)
        try:
            db = ProtoReflectionDescriptorDatabase(sync_channel)
            services = await asyncio.to_thread(db.get_services)
            assert V2 in services
            fd = await asyncio.to_thread(db.FindFileContainingSymbol, V2)
            assert fd.package == "inference"
        finally:
            sync_channel.close()


@pytest.mark.timeout(60)
async def test_shutdown_drains_then_lets_every_admitted_call_finish_and_ends_watch_streams():
    async with held_server(drain_s=2.0, grace_s=30.0) as (app, held, stub, channel):
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        calls = [asyncio.ensure_future(stub.ModelInfer(pb.ModelInferRequest(id=f"r{i}"), timeout=60))
                 for i in range(16)]
        await held.wait_arrived(16)
        stopping = asyncio.ensure_future(app.stop())  # what SIGTERM does
        assert (await watch.read()).status == NOT_SERVING
        # during the drain window the server still admits calls
        late = asyncio.ensure_future(stub.ModelInfer(pb.ModelInferRequest(id="late"), timeout=60))
        await held.wait_arrived(17)
        held.release.set()
        answers = await asyncio.gather(*calls, late, return_exceptions=True)
        assert [a.id if isinstance(a, pb.ModelInferResponse) else repr(a) for a in answers] == \
            [f"r{i}" for i in range(16)] + ["late"]
        # the Watch stream ends (OK) instead of holding stop() for its 30 s grace
        assert await watch.read() is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
        await stopping


@pytest.mark.timeout(300)
async def test_trainer_is_not_serving_until_every_domain_it_learns_has_a_model(tmp_path):
    from tests.fraud_fixtures import bootstrap_small_fraud
    from trainer.service import TrainerSettings, make_app

    s = TrainerSettings(host="127.0.0.1", port=0, metrics_port=0, drain_s=0.0, grace_s=5.0, log_format="text",
                        domains="fraud", bootstrap=False, workdir=str(tmp_path / "trainer"),
                        registry_dir=str(tmp_path / "registry"), report_interval_s=0)

    async def status_of(app: ServerApp) -> int:
        async with grpc.aio.insecure_channel(app.address) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            return resp.status

    app = make_app(s)
    await app.start()  # no checkpoint, no version: nothing a service could load
    try:
        assert await status_of(app) == NOT_SERVING
    finally:
        await app.stop()

    await asyncio.to_thread(bootstrap_small_fraud, tmp_path)  # publishes version 1 of fraud
    app = make_app(s)
    await app.start()
    try:
        assert await status_of(app) == SERVING
    finally:
        await app.stop()
