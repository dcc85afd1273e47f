"""Start a real ServerApp in-process on a free loopback port, with a real registry behind it."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import threading

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



def _awaited_frames(coro, limit: int = 12) -> list[str]:
    """Where a suspended coroutine waits: its frame, then each one it awaits, innermost last
    (Task.print_stack shows only the outermost frame of a suspended task)."""
    lines = []
    while coro is not None and len(lines) < limit:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            lines.append(f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None) or getattr(coro, "gi_yieldfrom", None)
    return lines


def pending_work() -> str:
    """Every task of the running loop and every other thread, each with where it waits: what a
    hang's failure message needs to name its cause."""
    out = []
    for task in asyncio.all_tasks():
        out.append(f"task {task.get_name()}: " + " <- ".join(reversed(_awaited_frames(task.get_coro()))))
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        stack = []
        while frame is not None and len(stack) < 4:
            stack.append(f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
            frame = frame.f_back
        out.append(f"thread {names.get(ident, ident)}: " + " <- ".join(stack))
    return "\n".join(out)


@contextlib.asynccontextmanager
async def within(timeout_s: float, what: str):
    """Fail the block if it has not finished after timeout_s, naming `what` and, taken at that
    moment, every pending task and thread with where it waits: a hang fails at its own step
    with its cause in the message, not at pytest's timeout on the event loop's idle frame."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    snapshot = loop.call_later(timeout_s, lambda: seen.append(pending_work()))  # before the cancel below
    try:
        async with asyncio.timeout(timeout_s + 0.05):
            yield
    except TimeoutError as e:
        raise AssertionError(f"{what}: not done after {timeout_s:g} s; pending then:\n"
                             + (seen[0] if seen else pending_work())) from e
    finally:
        snapshot.cancel()


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
