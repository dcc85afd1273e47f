"""The server layer under abuse, on real grpc.aio servers: admission control (overload is
shed by us, RESOURCE_EXHAUSTED at once and counted; the adaptive per-method limit shrinks
under a standing queue, never for one slow call), undecodable request bytes are
INVALID_ARGUMENT, unknown method names do not grow memory, health List and reflection v1
answer, shutdown drains without losing an admitted call (and ends even when a shutdown hook
hangs), and the trainer is NOT_SERVING
until it has a model for every domain it learns.

Admission tests drive time with a FakeClock given to the interceptor: a call's latency is
what the test says, so they need no sleeps and assert no timings."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from protos.common.v1 import common_pb2
from protos.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from shared import metrics
from shared.server import ServerApp
from shared.server.interceptors import AdaptiveLimit
from shared.settings import ServerSettings
from tests.server_harness import until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
V2 = "inference.GRPCInferenceService"


MODEL_INFER = f"/{V2}/ModelInfer"
FRAUD = "storefront.fraud.v1.Fraud"


class HeldInference(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer waits until released, so calls stay in flight exactly as long as a test says;
    a request whose id starts with "fast" is answered at once (and not counted as arrived).
    The other V2 methods are left to the generated base (they raise NotImplementedError)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = 0
        self._changed = asyncio.Condition()

    async def ModelInfer(self, request, context):
        if request.id.startswith("fast"):
            return pb.ModelInferResponse(id=request.id)
        async with self._changed:
            self.arrived += 1
            self._changed.notify_all()
        await self.release.wait()
        return pb.ModelInferResponse(id=request.id)

    async def wait_arrived(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.arrived >= n)


class FraudEcho(fraud_pb2_grpc.FraudServicer):
    """A Fraud server that answers without a model: for what the interceptor does with the
    bytes of a domain method's unary call and client stream."""

    def __init__(self) -> None:
        self.outcomes_read = 0

    async def ScoreTransaction(self, request, context):
        return fraud_pb2.ScoreTransactionResponse()

    async def StreamOutcomes(self, request_iterator, context):
        async for _ in request_iterator:
            self.outcomes_read += 1
        return common_pb2.ReportOutcomeResponse()


class FakeClock:
    """Seconds that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def server_settings(**overrides) -> ServerSettings:
    base = dict(host="127.0.0.1", port=0, metrics_port=0, grace_s=5.0, drain_s=0.0, log_format="text")
    base.update(overrides)
    return ServerSettings(**base)


@contextlib.asynccontextmanager
async def held_server(clock: FakeClock | None = None, fraud: FraudEcho | None = None, **overrides):
    held = HeldInference()

    def register(server) -> list[str]:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(held, server)
        if fraud is not None:
            fraud_pb2_grpc.add_FraudServicer_to_server(fraud, server)
            return [V2, FRAUD]
        return [V2]

    app = ServerApp("held", server_settings(**overrides), {}, register, v2=False)
    if clock is not None:  # read when each method is first wrapped, i.e. at its first call
        app.interceptor.clock = clock
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
    async with held_server(max_concurrent_rpcs=4, queue_delay_target_ms=0) as (app, held, stub, channel):
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
        await until(lambda: requests_total("ModelInfer", "RESOURCE_EXHAUSTED") == refused_before + 1,
                    "storefront_requests_total to count the refusal")  # counted as the handler returns
        assert shed_total("ModelInfer", "concurrency") == shed_before + 1
        # health is exempt: a saturated process still answers its load balancer
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(service=V2), timeout=10)).status == SERVING
        held.release.set()
        assert [r.id for r in await asyncio.gather(*calls)] == [f"r{i}" for i in range(4)]
        assert app.interceptor.in_flight == 0
        assert (await stub.ModelInfer(pb.ModelInferRequest(id="after"), timeout=30)).id == "after"


def gauge_limit(method: str) -> float:
    return metrics.ADMISSION_LIMIT.labels(method)._value.get()


def infer(rid: str) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(id=rid)


@pytest.mark.timeout(60)
async def test_one_slow_call_in_flight_does_not_shed_the_other_calls_of_its_method():
    # The rule this replaced refused every ModelInfer while the oldest one in flight was older
    # than 250 ms: one large request shed everybody for its whole duration.
    clock = FakeClock()
    async with held_server(clock=clock, max_concurrent_rpcs=8, queue_delay_target_ms=50) as (app, held, stub, channel):
        assert (await stub.ModelInfer(infer("fast-first"), timeout=30)).id == "fast-first"
        limit = app.interceptor.limits[MODEL_INFER]
        shed_before = shed_total("ModelInfer", "adaptive_limit") + shed_total("ModelInfer", "concurrency")
        slow = asyncio.ensure_future(stub.ModelInfer(infer("slow"), timeout=60))
        await held.wait_arrived(1)
        answered = 0
        for _ in range(50):  # 50 intervals of 100 ms with the slow call still in flight
            clock.now += 0.1
            answers = await asyncio.gather(*(stub.ModelInfer(infer(f"fast-{i}"), timeout=30) for i in range(6)))
            answered += len(answers)
        assert answered == 300 and limit.limit == 8
        # it finishes after 5 s, in an interval where faster calls finish too: no decrease
        held.release.set()
        assert (await slow).id == "slow"
        await stub.ModelInfer(infer("fast-same-interval"), timeout=30)
        clock.now += 0.1
        await stub.ModelInfer(infer("fast-next-interval"), timeout=30)  # closes the interval
        assert limit.limit == 8
        assert shed_total("ModelInfer", "adaptive_limit") + shed_total("ModelInfer", "concurrency") == shed_before


def complete_interval(limit: AdaptiveLimit, clock: FakeClock, latencies: list[float], ok: bool = True) -> None:
    """One 100 ms interval: its calls admitted together, each finishing `latency` after it
    started. The limiter acts on an interval when the next one's first call finishes."""
    clock.now += 0.1
    for _ in latencies:
        assert limit.try_acquire()
    for latency in latencies:
        limit.release(clock.now - latency, ok)


def test_the_adaptive_limit_shrinks_under_a_standing_queue_stops_at_the_floor_and_recovers():
    clock = FakeClock()
    limit = AdaptiveLimit(64, target_s=0.05, floor=4, clock=clock)  # x0.9 per bad interval, +1 per good one
    for _ in range(5):  # no load: calls take 10 ms
        complete_interval(limit, clock, [0.010, 0.012, 0.030])
    assert limit.limit == 64 and limit.baseline == pytest.approx(0.010)
    # one slow call among fast ones, interval after interval: the minimum stays 10 ms
    for _ in range(20):
        complete_interval(limit, clock, [0.010, 3.0])
    assert limit.limit == 64
    # failed calls are no samples, however fast (a validation error costs no queue time)
    for _ in range(3):
        complete_interval(limit, clock, [0.001], ok=False)
    assert limit.baseline == pytest.approx(0.010)
    # a standing queue: even the fastest call takes 200 ms (> max(2 x 10, 10 + 50) ms)
    seen = []
    for _ in range(35):
        complete_interval(limit, clock, [0.200, 0.250, 0.300])
        seen.append(limit.limit)
    assert seen[1] == pytest.approx(64 * 0.9)
    assert all(b < a for a, b in zip(seen[:20], seen[1:21]))  # x0.9 per interval down to ...
    assert min(seen) == 4 and seen[-1] == 4  # ... the floor, never below it
    assert limit.baseline < 0.200  # the queued latency was not learned as normal
    # the queue is gone: +1 per interval back to the ceiling
    complete_interval(limit, clock, [0.011])
    seen = []
    for _ in range(70):
        complete_interval(limit, clock, [0.011, 0.015])
        seen.append(limit.limit)
    assert seen[:3] == [5, 6, 7]
    assert seen[-1] == 64 and max(seen) == 64


def test_the_adaptive_limit_learns_a_method_that_became_slower_once_at_its_floor():
    # A new model version that is 20x slower at any concurrency: the limit goes to the floor,
    # where the latency still seen is the method's own, so the baseline follows and the limit
    # recovers instead of pinning a slow but healthy method at its floor.
    clock = FakeClock()
    limit = AdaptiveLimit(16, target_s=0.05, floor=2, clock=clock)
    for _ in range(3):
        complete_interval(limit, clock, [0.010])
    lowest = 16.0
    for _ in range(100):
        complete_interval(limit, clock, [0.200, 0.210])
        lowest = min(lowest, limit.limit)
    assert lowest == 2
    assert limit.limit == 16 and 0.1 <= limit.baseline <= 0.2


@pytest.mark.timeout(60)
async def test_a_method_at_its_adaptive_limit_sheds_extra_calls_at_once_and_counts_them():
    clock = FakeClock()
    async with held_server(clock=clock, max_concurrent_rpcs=8, queue_delay_target_ms=50) as (app, held, stub, channel):
        assert (await stub.ModelInfer(infer("fast-first"), timeout=30)).id == "fast-first"  # no load: 0 s
        limit = app.interceptor.limits[MODEL_INFER]
        assert limit.limit == 8 and gauge_limit("ModelInfer") == 8
        arrived, seen = 0, []
        for r in range(10):  # a standing queue: 4 calls in flight, each answered 1 s after it came
            calls = [asyncio.ensure_future(stub.ModelInfer(infer(f"q{r}-{i}"), timeout=30)) for i in range(4)]
            arrived += 4
            await held.wait_arrived(arrived)
            clock.now += 1.0
            held.release.set()
            assert len(await asyncio.gather(*calls)) == 4
            held.release.clear()
            seen.append(limit.limit)
        assert seen[:3] == [8, pytest.approx(7.2), pytest.approx(6.48)] and seen[-1] == 4  # the floor
        assert gauge_limit("ModelInfer") == 4

        shed_before = shed_total("ModelInfer", "adaptive_limit")
        refused_before = requests_total("ModelInfer", "RESOURCE_EXHAUSTED")
        calls = [asyncio.ensure_future(stub.ModelInfer(infer(f"held-{i}"), timeout=30)) for i in range(4)]
        arrived += 4
        await held.wait_arrived(arrived)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(infer("fast-over"), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "adaptive_limit" in e.value.details() and "(request id " in e.value.details()
        # counted when the handler returns, which may be just after the client got the status
        await until(lambda: shed_total("ModelInfer", "adaptive_limit") == shed_before + 1, "the shed counter")
        await until(lambda: requests_total("ModelInfer", "RESOURCE_EXHAUSTED") == refused_before + 1,
                    "storefront_requests_total to count the refusal")
        assert app.interceptor.in_flight == 4  # under the server-wide 8: the method's limit refused it
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(service=V2), timeout=10)).status == SERVING
        held.release.set()
        assert len(await asyncio.gather(*calls)) == 4  # in no time: the queue is gone

        # fast answers (the four held ones included), one interval after another: +1 each
        # interval, up to the ceiling
        for i in range(6):
            clock.now += 0.1
            await stub.ModelInfer(infer(f"fast-{i}"), timeout=30)
            seen.append(limit.limit)
        assert seen[-6:] == [5, 6, 7, 8, 8, 8] and gauge_limit("ModelInfer") == 8
        # five at once are admitted again
        assert len(await asyncio.gather(*(stub.ModelInfer(infer(f"again-{i}"), timeout=30) for i in range(5)))) == 5


@pytest.mark.timeout(60)
async def test_undecodable_request_bytes_are_invalid_argument_not_unknown():
    fraud = FraudEcho()
    async with held_server(fraud=fraud) as (app, held, stub, channel):
        garbage = b"\xff" * 7  # a truncated varint: no message type decodes it
        for method, request_type in [(MODEL_INFER, "inference.ModelInferRequest"),
                                     (f"/{FRAUD}/ScoreTransaction", "storefront.fraud.v1.ScoreTransactionRequest"),
                                     ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest")]:
            short = method.rsplit("/", 1)[-1]
            before = requests_total(short, "INVALID_ARGUMENT")
            rpc = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await rpc(garbage, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.value.details())
            assert f"request could not be decoded as {request_type}" in e.value.details()
            assert "Unexpected" not in e.value.details() and "DecodeError" not in e.value.details()
            await until(lambda: requests_total(short, "INVALID_ARGUMENT") == before + 1, f"{short} counted")
        assert held.arrived == 0

        # a client stream: the messages before the bad one are read, then the call ends
        before = requests_total("StreamOutcomes", "INVALID_ARGUMENT")
        stream = channel.stream_unary(f"/{FRAUD}/StreamOutcomes", request_serializer=None, response_deserializer=None)
        good = fraud_pb2.FraudOutcome(prediction_id="p-1", is_fraud=True).SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stream(iter([good, garbage, good]), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request could not be decoded as storefront.fraud.v1.FraudOutcome" in e.value.details()
        assert fraud.outcomes_read == 1
        await until(lambda: requests_total("StreamOutcomes", "INVALID_ARGUMENT") == before + 1, "the stream counted")
        await until(lambda: app.interceptor.in_flight == 0, "no call in flight")

        # well-formed bytes still work on every path
        ok = channel.unary_unary(f"/{FRAUD}/ScoreTransaction", request_serializer=None, response_deserializer=None)
        assert await ok(fraud_pb2.ScoreTransactionRequest().SerializeToString(), timeout=10) == b""
        assert (await stream(iter([good, good]), timeout=10)) == b""
        assert fraud.outcomes_read == 3


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
        # the interceptor counts the call once the handler returns, which may be after the
        # client already holds the status
        await until(lambda: requests_total("ServerLive", "UNIMPLEMENTED") >= 1, "ServerLive counted as UNIMPLEMENTED")
        assert requests_total("ServerLive", "INTERNAL") == internal_before


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


@pytest.mark.timeout(60)
async def test_a_shutdown_hook_that_never_ends_is_abandoned_by_name_and_the_later_steps_still_run(caplog):
    """The worst hook: it waits forever and swallows its cancellation. stop() still returns,
    says which hook it left behind, and runs the hooks after it. (The hook here ends when the
    test releases it, after stop() returned: the event loop's own teardown would wait for it.)"""
    async with held_server() as (app, held, stub, channel):
        app.stop_step_timeout_s = 0.2
        ran, stuck_started, released = [], asyncio.Event(), asyncio.Event()
        left_behind: list[asyncio.Task] = []

        async def wait_for_a_dead_dependency() -> None:
            stuck_started.set()
            left_behind.append(asyncio.current_task())
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await released.wait()  # the cancellation swallowed: still stuck

        async def flush_what_is_left() -> None:
            ran.append("flushed")

        app.on_stop[:] = [wait_for_a_dead_dependency, flush_what_is_left]
        with caplog.at_level("ERROR", logger="shared.server.bootstrap"):
            await app.stop()
        assert stuck_started.is_set() and ran == ["flushed"]
        [line] = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
        assert "wait_for_a_dead_dependency" in line and "0.2 s" in line
        assert not left_behind[0].done()  # stop() returned while the hook was still stuck
        released.set()
        await left_behind[0]


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
