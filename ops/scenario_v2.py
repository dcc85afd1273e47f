"""Load on any KServe V2 endpoint: ModelInfer requests shaped from the model's ModelMetadata.

    python -m ops.loadtest v2 --target 127.0.0.1:18111 --model mlp -c 32 -d 10

Requests carry the inputs as raw_input_contents, seeded random for float inputs and zeros
for the others, the first axis = the batch, other dynamic axes = 1; so any model whose inputs
have one batch axis works. `run_load` is the benchmarks' entry (bench.serving, bench.overload):
a closed loop on one model that also counts which model version answered, and when each
version first answered (hot swaps); its keys are in its docstring and bench/README.md.
"""
from __future__ import annotations

import math
from typing import Any

import grpc
import numpy as np

from ops.loadgen import CHANNEL_OPTIONS, Window, client_summary, generate, summary
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pbg
from shared.runtime.dtypes import CONTENTS_FIELD_OF_V2, NUMPY_OF_V2

InputSpec = tuple[str, str, list[int]]  # (name, V2 datatype, shape with -1 for dynamic axes)


async def model_inputs(stub: pbg.GRPCInferenceServiceStub, model: str, timeout: float = 10.0) -> list[InputSpec]:
    """Every input of `model`, from ModelMetadata."""
    md = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=timeout)
    return [(t.name, t.datatype, list(t.shape)) for t in md.inputs]


def make_inputs(specs: list[InputSpec], batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs fitting the specs: the first axis = batch, other dynamic axes = 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, datatype, shape in specs:
        if datatype not in NUMPY_OF_V2:
            raise ValueError(f"input {name!r}: datatype {datatype} is not supported by the load generator")
        dims = [batch if i == 0 else (1 if d < 0 else d) for i, d in enumerate(shape)]
        dtype = NUMPY_OF_V2[datatype]
        out[name] = rng.standard_normal(dims).astype(dtype) if dtype.kind == "f" else np.zeros(dims, dtype=dtype)
    return out


def build_request(model: str, inputs: dict[str, np.ndarray], datatypes: dict[str, str],
                  version: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, x in inputs.items():
        t = req.inputs.add()
        t.name, t.datatype = name, datatypes[name]
        t.shape.extend(x.shape)
        req.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    return req


def decode_response(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output of a response as an array (raw or typed contents)."""
    out = {}
    for i, o in enumerate(resp.outputs):
        dtype = NUMPY_OF_V2[o.datatype]
        if resp.raw_output_contents:
            y = np.frombuffer(resp.raw_output_contents[i], dtype=dtype)
        else:
            y = np.asarray(getattr(o.contents, CONTENTS_FIELD_OF_V2[o.datatype]), dtype=dtype)
        out[o.name] = y.reshape(list(o.shape))
    return out


async def requests_for(stub: pbg.GRPCInferenceServiceStub, model: str, count: int = 1, batch: int = 1,
                       seed: int = 0, timeout: float = 10.0) -> list[pb.ModelInferRequest]:
    """`count` requests with different seeded inputs for `model`."""
    specs = await model_inputs(stub, model, timeout)
    datatypes = {n: dt for n, dt, _ in specs}
    return [build_request(model, make_inputs(specs, batch, seed + k), datatypes) for k in range(count)]


async def infer_once(target: str, model: str, inputs: dict[str, np.ndarray],
                     timeout: float = 30.0) -> tuple[dict[str, np.ndarray], str]:
    """One ModelInfer on a fresh channel: (outputs by name, model_version of the answer)."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        specs = await model_inputs(stub, model, timeout)
        req = build_request(model, inputs, {n: dt for n, dt, _ in specs})
        resp = await stub.ModelInfer(req, timeout=timeout)
        return decode_response(resp), resp.model_version


async def scenario(channel: grpc.aio.Channel, args):
    """The `v2` scenario of ops.loadtest: 64 different requests for --model, cycled."""
    stub = pbg.GRPCInferenceServiceStub(channel)
    reqs = await requests_for(stub, args.model, count=64, seed=args.seed, timeout=args.timeout)

    async def call(i: int):
        return await stub.ModelInfer(reqs[i % len(reqs)], timeout=args.timeout)

    async def drain() -> None:
        return None

    return call, drain


def _version_key(v: str) -> tuple[int, float, str]:
    return (0, float(v), "") if v.isdigit() else (1, math.inf, v)


async def run_load(target: str, model: str, *, concurrency: int = 1, duration: float = 10.0,
                   warmup: float = 2.0, channels: int = 1, batch: int = 1, timeout: float = 10.0,
                   seed: int = 0, window: Window | None = None) -> dict[str, Any]:
    """Closed-loop load on target's ModelInfer for `model`; the summary of the measured window.

    Keys: target, model, concurrency, channels, batch, warmup_s, duration_s, ok, errors
    (total), errors_by_code ({status name: count}), rps, p50_ms, p90_ms, p99_ms, p999_ms,
    mean_ms, max_ms, versions ({model_version: answers}), version_first_seen_s ({version:
    seconds after the window opened when it first answered}), client_cpu_us_per_req,
    client_cpu_pct, client_loop_lag_max_ms (longest stall of this event loop in the window),
    warmup_errors, and "window" (what `window` returned) when given.
    """
    if channels < 1 or batch < 1:
        raise ValueError("channels and batch must be >= 1")
    chans = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(channels)]
    try:
        stubs = [pbg.GRPCInferenceServiceStub(ch) for ch in chans]
        (req,) = await requests_for(stubs[0], model, batch=batch, seed=seed, timeout=max(timeout, 10.0))
        # One checked call outside the timing: every output has the batch axis first.
        resp = await stubs[0].ModelInfer(req, timeout=max(timeout, 30.0))
        for name, y in decode_response(resp).items():
            if y.ndim == 0 or y.shape[0] != batch:
                raise RuntimeError(f"output {name!r} has shape {list(y.shape)}, expected {batch} rows first")
        calls = [stub.ModelInfer for stub in stubs]
        versions: dict[str, int] = {}
        first_seen: dict[str, float] = {}

        def seen(response: pb.ModelInferResponse, at_s: float) -> None:
            v = response.model_version
            versions[v] = versions.get(v, 0) + 1
            first_seen.setdefault(v, at_s)

        rec = await generate(lambda i: calls[i % channels](req, timeout=timeout), duration=duration, warmup=warmup,
                             concurrency=concurrency, window=window, on_response=seen)
    finally:
        for ch in chans:
            await ch.close()
    s = summary(rec)
    out: dict[str, Any] = {
        "target": target, "model": model, "concurrency": concurrency, "channels": channels, "batch": batch,
        "warmup_s": warmup, "duration_s": duration, "ok": s["ok"], "errors": sum(s["errors"].values()),
        "errors_by_code": s["errors"], "rps": s["rps"],
        **{k: s[k] for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms", "max_ms")},
        "versions": dict(sorted(versions.items(), key=lambda kv: _version_key(kv[0]))),
        "version_first_seen_s": {v: round(t, 4) for v, t in sorted(first_seen.items(), key=lambda kv: kv[1])},
        **client_summary(rec),
    }
    if window is not None:
        out["window"] = rec.window_result
    return out
