"""Integration: the real grpc.aio server with the V2 servicer, health, reflection, metrics."""
import asyncio
import json
import subprocess
import sys
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.inference import grpc_service_pb2 as pb
from tests import onnx_models
from tests.conftest import free_port
from tests.server_harness import infer_request, running, settings, until


async def test_health_follows_model_availability_and_infer_works(registry, model_files, linear_signature):
    s = settings(registry_dir=str(registry.root))
    async with running(s) as (app, stub, channel):
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(infer_request(np.zeros((1, 4), np.float32)))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        registry.publish("linear", model_files["v_a"], linear_signature)

        async def model_ready():
            return (await stub.ModelReady(pb.ModelReadyRequest(name="linear"))).ready

        async def health_serving():
            got = await health.Check(health_pb2.HealthCheckRequest(service=""))
            return got.status == health_pb2.HealthCheckResponse.SERVING

        await until(model_ready, "the published model to be ready")
        await until(health_serving, "health to follow the loaded model")
        for service in ("", "inference.GRPCInferenceService"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready

        x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
        call = stub.ModelInfer(infer_request(x), metadata=(("x-request-id", "abc-123"),))
        resp = await call
        assert (resp.model_name, resp.model_version, resp.id) == ("linear", "1", "req-1")
        assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("y", "FP32", [3, 1])]
        y = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(3, 1)
        np.testing.assert_allclose(y, onnx_models.linear_reference(x, seed=1), rtol=1e-5)
        assert dict(await call.trailing_metadata()).get("x-request-id") == "abc-123"

        # typed contents work too
        req = pb.ModelInferRequest(model_name="linear")
        t = req.inputs.add(name="x", datatype="FP32", shape=[3, 4])
        t.contents.fp32_contents.extend(x.ravel().tolist())
        resp2 = await stub.ModelInfer(req)
        assert resp2.raw_output_contents[0] == resp.raw_output_contents[0]

        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="linear"))
        assert (meta.name, list(meta.versions), meta.platform) == ("linear", ["1"], "onnxruntime_onnx")
        assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [("x", "FP32", [-1, 4])]
        assert (await stub.ServerMetadata(pb.ServerMetadataRequest())).name == "storefront"


def _raw(x):
    return x.tobytes()


BAD_REQUESTS = {
    "wrong shape": (lambda r: (r.inputs[0].shape.__setitem__(1, 5), r.raw_input_contents.__setitem__(0, _raw(np.zeros((1, 5), np.float32)))), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    "wrong dtype": (lambda r: setattr(r.inputs[0], "datatype", "FP64"), grpc.StatusCode.INVALID_ARGUMENT, "datatype"),
    "NaN": (lambda r: r.raw_input_contents.__setitem__(0, _raw(np.array([[np.nan, 0, 0, 0]], np.float32))), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "inf": (lambda r: r.raw_input_contents.__setitem__(0, _raw(np.array([[np.inf, 0, 0, 0]], np.float32))), grpc.StatusCode.INVALID_ARGUMENT, "infinite"),
    "unknown model": (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "unknown model"),
    "unknown version": (lambda r: setattr(r, "model_version", "9"), grpc.StatusCode.NOT_FOUND, "version"),
    "empty": (lambda r: (r.ClearField("inputs"), r.ClearField("raw_input_contents")), grpc.StatusCode.INVALID_ARGUMENT, "no inputs"),
    "no model name": (lambda r: setattr(r, "model_name", ""), grpc.StatusCode.INVALID_ARGUMENT, "model name"),
    "unknown input": (lambda r: setattr(r.inputs[0], "name", "z"), grpc.StatusCode.INVALID_ARGUMENT, "unknown input"),
    "short bytes": (lambda r: r.raw_input_contents.__setitem__(0, b"\x00" * 7), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    "zero rows": (lambda r: (r.inputs[0].shape.__setitem__(0, 0), r.raw_input_contents.__setitem__(0, b"")), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    "too many rows": (lambda r: (r.inputs[0].shape.__setitem__(0, 2000), r.raw_input_contents.__setitem__(0, _raw(np.zeros((2000, 4), np.float32)))), grpc.StatusCode.INVALID_ARGUMENT, "at most"),
    "unknown output": (lambda r: r.outputs.add(name="nope"), grpc.StatusCode.INVALID_ARGUMENT, "unknown output"),
    "raw and typed": (lambda r: r.inputs[0].contents.fp32_contents.extend([0.0] * 4), grpc.StatusCode.INVALID_ARGUMENT, "use one"),
    "missing typed values": (lambda r: (r.ClearField("raw_input_contents"), r.inputs[0].contents.fp32_contents.extend([1.0])), grpc.StatusCode.INVALID_ARGUMENT, "values"),
}


async def test_bad_requests_get_clear_client_errors_never_internal(registry, model_files, linear_signature):
    registry.publish("linear", model_files["v_a"], linear_signature)
    async with running(settings(registry_dir=str(registry.root))) as (app, stub, channel):
        for label, (mutate, code, words) in BAD_REQUESTS.items():
            req = infer_request(np.zeros((1, 4), np.float32))
            mutate(req)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ModelInfer(req)
            assert e.value.code() == code, (label, e.value.code(), e.value.details())
            assert words in e.value.details(), (label, e.value.details())
            assert "(request id " in e.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # and the server still answers
        resp = await stub.ModelInfer(infer_request(np.zeros((1, 4), np.float32)))
        assert resp.model_version == "1"


async def test_reflection_and_metrics_endpoint(registry, model_files, linear_signature):
    registry.publish("linear", model_files["v_a"], linear_signature)
    mport = free_port()
    async with running(settings(registry_dir=str(registry.root), metrics_port=mport)) as (app, stub, channel):
        await stub.ModelInfer(infer_request(np.zeros((2, 4), np.float32)))
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = refl.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        resp = await call.read()
        await call.done_writing()
        names = {s.name for s in resp.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics").read().decode())
    for needle in ('storefront_requests_total{code="OK",method="ModelInfer"}',
                   "storefront_request_latency_seconds_bucket",
                   'storefront_batch_size_count{model="linear"}',
                   'storefront_queue_depth{model="linear"}',
                   'storefront_model_info{model="linear",provider="CPUExecutionProvider",version="1"} 1.0',
                   'storefront_model_reloads_total{model="linear",result="loaded"}'):
        assert needle in body, needle


TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as g
url = sys.argv[1]
c = g.InferenceServerClient(url)
x = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
inp = g.InferInput("x", [2, 4], "FP32")
inp.set_data_from_numpy(x)
res = c.infer("linear", [inp], outputs=[g.InferRequestedOutput("y")], request_id="t-1")
meta = c.get_model_metadata("linear", as_json=True)
bad = None
try:
    c.infer("linear", [g.InferInput("x", [2, 4], "FP64")])
except Exception as e:
    bad = str(e)
print(json.dumps({"live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready("linear"),
                  "y": res.as_numpy("y").tolist(), "version": res.get_response().model_version,
                  "inputs": meta["inputs"], "server": c.get_server_metadata(as_json=True)["name"], "bad": bad}))
"""


async def test_tritonclient_is_a_real_v2_client(registry, model_files, linear_signature):
    """tritonclient.grpc talks to our server (run in a child: its stubs clash with ours in one process)."""
    registry.publish("linear", model_files["v_a"], linear_signature)
    async with running(settings(registry_dir=str(registry.root))) as (app, stub, channel):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", TRITON_CLIENT, app.address,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    got = json.loads(out)
    assert got["live"] and got["ready"] and got["model_ready"]
    assert got["version"] == "1" and got["server"] == "storefront"
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
    np.testing.assert_allclose(np.array(got["y"]), onnx_models.linear_reference(x, seed=1), rtol=1e-5)
    assert got["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert "INVALID_ARGUMENT" in got["bad"] and "datatype" in got["bad"]


async def test_requests_past_their_deadline_are_dropped_before_running(registry, model_files, linear_signature):
    registry.publish("linear", model_files["v_a"], linear_signature)
    async with running(settings(registry_dir=str(registry.root), max_batch_size=1)) as (app, stub, channel):
        model = app.models["linear"].current
        original, rows_run, release = model.run, [], threading.Event()

        def held_run(feeds):  # each run is recorded, then holds the only worker until released
            rows_run.append(feeds["x"][0, 0].item())
            if not release.wait(timeout=60):
                raise TimeoutError("the test never released the held run")
            return original(feeds)

        model.run = held_run
        held = asyncio.ensure_future(stub.ModelInfer(infer_request(np.full((1, 4), 1.0, np.float32)), timeout=60))
        await until(lambda: rows_run == [1.0], "the first request to occupy the only worker")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(infer_request(np.full((1, 4), 2.0, np.float32)), timeout=0.05)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        assert (await held).model_version == "1"
        # one worker, first in first out: a request sent after the expired one runs only once the
        # expired one has left the queue, so its answer proves the expired one was dropped, not pending
        assert (await stub.ModelInfer(infer_request(np.full((1, 4), 3.0, np.float32)), timeout=60)).model_version == "1"
        assert rows_run == [1.0, 3.0]  # the expired request never reached the session
