"""Start a real ServerApp in-process on a free loopback port, with a real registry behind it."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import grpc

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from shared.serve_onnx import OnnxServerSettings, make_app
from shared.server import ServerApp


async def until(condition, what: str = "condition", timeout_s: float = 30.0) -> None:
    """Wait for a condition the server makes true (a state change, a counter it records after
    answering), not for a fixed delay; the condition may return an awaitable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        got = condition()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def settings(**overrides) -> OnnxServerSettings:
    base = dict(host="127.0.0.1", port=0, metrics_port=0, name="linear", poll_interval_s=0.05, grace_s=1.0,
                log_format="text")
    base.update(overrides)
    return OnnxServerSettings(**base)


@contextlib.asynccontextmanager
async def running(s: OnnxServerSettings, app: ServerApp | None = None):
    app = app or make_app(s)
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield app, pb_grpc.GRPCInferenceServiceStub(channel), channel
    finally:
        await channel.close()
        await app.stop()


def infer_request(x, model="linear", input_name="x", version="") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version, id="req-1")
    req.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def replace(s, **kw):
    return dataclasses.replace(s, **kw)
