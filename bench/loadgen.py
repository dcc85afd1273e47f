"""Closed-loop grpc.aio load generator for KServe V2 `ModelInfer`.

`concurrency` coroutines share one channel (by default) and each loops: send one request,
await its reply, send the next. Warm-up first, then a measured window of `duration` seconds.
A request counts when it starts and finishes inside the window; an error counts when the
request started inside the window (by gRPC status code). Requests carry the input as
raw_input_contents (batch 1 by default); the input name, width and datatype come from
ModelMetadata, so any model whose inputs have one batch axis works.

Reusable: `await run_load(target, model, concurrency=32, duration=10)` returns a dict
(see LOAD_KEYS in bench/README.md). `window=` runs a coroutine beside the load that is
told the window's start and end, to take measurements (CPU) or act (publish a version)
exactly there; its return value comes back under "window".

    python -m bench.loadgen --target 127.0.0.1:18111 --model mlp -c 32 -d 10 [--warmup 2]

prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import resource
import sys
import time
from typing import Any, Awaitable, Callable

import grpc
import numpy as np

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pbg

NUMPY_OF_V2 = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64,
               "INT32": np.int32, "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]

# window(t_start, t_end) -> awaitable; both times on the time.perf_counter() clock
Window = Callable[[float, float], Awaitable[Any]]


def percentile_ms(lat: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(lat, q)) * 1e3, 3) if lat.size else None


def latency_summary(latencies_s: list[float] | np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/p99.9, mean and max, in milliseconds, of latencies given in seconds."""
    lat = np.asarray(latencies_s, dtype=np.float64)
    return {
        "p50_ms": percentile_ms(lat, 50),
        "p90_ms": percentile_ms(lat, 90),
        "p99_ms": percentile_ms(lat, 99),
        "p999_ms": percentile_ms(lat, 99.9),
        "mean_ms": round(float(lat.mean()) * 1e3, 3) if lat.size else None,
        "max_ms": round(float(lat.max()) * 1e3, 3) if lat.size else None,
    }


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def model_inputs(stub: pbg.GRPCInferenceServiceStub, model: str,
                       timeout: float = 10.0) -> list[tuple[str, str, list[int]]]:
    """(name, V2 datatype, shape with -1 for dynamic axes) of every input, from ModelMetadata."""
    md = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=timeout)
    return [(t.name, t.datatype, list(t.shape)) for t in md.inputs]


def make_inputs(specs: list[tuple[str, str, list[int]]], batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs fitting the specs: the first axis = batch, other dynamic axes = 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, datatype, shape in specs:
        if datatype not in NUMPY_OF_V2:
            raise ValueError(f"input {name!r}: datatype {datatype} is not supported by the load generator")
        dims = [batch if i == 0 else (1 if d < 0 else d) for i, d in enumerate(shape)]
        dtype = np.dtype(NUMPY_OF_V2[datatype])
        if dtype.kind == "f":
            out[name] = rng.standard_normal(dims).astype(dtype)
        else:
            out[name] = np.zeros(dims, dtype=dtype)
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
        dtype = np.dtype(NUMPY_OF_V2[o.datatype])
        if resp.raw_output_contents:
            y = np.frombuffer(resp.raw_output_contents[i], dtype=dtype)
        else:
            field = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
                     "INT32": "int_contents", "BOOL": "bool_contents"}[o.datatype]
            y = np.asarray(getattr(o.contents, field), dtype=dtype)
        out[o.name] = y.reshape(list(o.shape))
    return out


async def infer_once(target: str, model: str, inputs: dict[str, np.ndarray],
                     timeout: float = 30.0) -> tuple[dict[str, np.ndarray], str]:
    """One ModelInfer on a fresh channel: (outputs by name, model_version of the answer)."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        specs = await model_inputs(stub, model, timeout)
        req = build_request(model, inputs, {n: dt for n, dt, _ in specs})
        resp = await stub.ModelInfer(req, timeout=timeout)
        return decode_response(resp), resp.model_version


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
    if concurrency < 1 or channels < 1 or batch < 1 or duration <= 0 or warmup < 0:
        raise ValueError("concurrency, channels and batch must be >= 1, duration > 0, warmup >= 0")
    chans = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(channels)]
    try:
        stubs = [pbg.GRPCInferenceServiceStub(ch) for ch in chans]
        specs = await model_inputs(stubs[0], model, timeout=max(timeout, 10.0))
        inputs = make_inputs(specs, batch, seed)
        req = build_request(model, inputs, {n: dt for n, dt, _ in specs})
        # One checked call outside the timing: every output has the batch axis first.
        resp = await stubs[0].ModelInfer(req, timeout=max(timeout, 30.0))
        for name, y in decode_response(resp).items():
            if y.ndim == 0 or y.shape[0] != batch:
                raise RuntimeError(f"output {name!r} has shape {list(y.shape)}, expected {batch} rows first")

        lat: list[float] = []
        errors: collections.Counter[str] = collections.Counter()
        warm_errors: collections.Counter[str] = collections.Counter()
        versions: collections.Counter[str] = collections.Counter()
        first_seen: dict[str, float] = {}
        t0 = time.perf_counter()
        t_start = t0 + warmup
        t_end = t_start + duration
        cpu: dict[str, float] = {}

        async def worker(stub: pbg.GRPCInferenceServiceStub) -> None:
            pc = time.perf_counter
            call = stub.ModelInfer
            while True:
                s = pc()
                if s >= t_end:
                    return
                try:
                    r = await call(req, timeout=timeout)
                except grpc.aio.AioRpcError as e:
                    (errors if s >= t_start else warm_errors)[e.code().name] += 1
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        await asyncio.sleep(0.01)  # do not spin on a server that is gone
                    continue
                e = pc()
                if s >= t_start and e <= t_end:
                    lat.append(e - s)
                    v = r.model_version
                    versions[v] += 1
                    if v not in first_seen:
                        first_seen[v] = e - t_start

        lag = [0.0]

        async def clock() -> Any:
            await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
            cpu["a"] = self_cpu_s()
            task = asyncio.ensure_future(window(t_start, t_end)) if window is not None else None
            # Event-loop lag probe: how late a 5 ms sleep wakes up. A long stall of this process
            # (starved of CPU by other load) inflates every latency measured meanwhile.
            while (now := time.perf_counter()) < t_end:
                await asyncio.sleep(min(0.005, t_end - now))
                lag[0] = max(lag[0], time.perf_counter() - now - 0.005)
            cpu["b"] = self_cpu_s()
            return await task if task is not None else None

        results = await asyncio.gather(clock(), *(worker(stubs[i % channels]) for i in range(concurrency)))
    finally:
        for ch in chans:
            await ch.close()

    n = len(lat)
    client_cpu = cpu["b"] - cpu["a"]
    out: dict[str, Any] = {
        "target": target,
        "model": model,
        "concurrency": concurrency,
        "channels": channels,
        "batch": batch,
        "warmup_s": warmup,
        "duration_s": duration,
        "ok": n,
        "errors": sum(errors.values()),
        "errors_by_code": dict(errors),
        "rps": round(n / duration, 1),
        **latency_summary(lat),
        "versions": dict(sorted(versions.items(), key=lambda kv: _version_key(kv[0]))),
        "version_first_seen_s": {v: round(t, 4) for v, t in sorted(first_seen.items(), key=lambda kv: kv[1])},
        "client_cpu_us_per_req": round(client_cpu / n * 1e6, 1) if n else None,
        "client_cpu_pct": round(100 * client_cpu / duration, 1),
        "client_loop_lag_max_ms": round(max(0.0, lag[0]) * 1e3, 1),
        "warmup_errors": dict(warm_errors),
    }
    if window is not None:
        out["window"] = results[0]
    return out


def _version_key(v: str) -> tuple[int, float, str]:
    return (0, float(v), "") if v.isdigit() else (1, math.inf, v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Closed-loop KServe V2 ModelInfer load (grpc.aio); prints JSON.")
    ap.add_argument("--target", required=True, help="HOST:PORT of the V2 gRPC server")
    ap.add_argument("--model", default="mlp", help="V2 model name")
    ap.add_argument("-c", "--concurrency", type=int, default=1, help="requests in flight (closed loop)")
    ap.add_argument("-d", "--duration", type=float, default=10.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    ap.add_argument("--channels", type=int, default=1, help="gRPC channels the workers share")
    ap.add_argument("--batch", type=int, default=1, help="rows per request")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, seconds")
    a = ap.parse_args(argv)
    try:
        res = asyncio.run(run_load(a.target, a.model, concurrency=a.concurrency, duration=a.duration,
                                   warmup=a.warmup, channels=a.channels, batch=a.batch, timeout=a.timeout))
    except grpc.aio.AioRpcError as e:
        print(f"{a.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    print(json.dumps(res), flush=True)
    print(f"{a.model} @ {a.target} c={a.concurrency}: {res['rps']} req/s, p50 {res['p50_ms']} ms, "
          f"p99 {res['p99_ms']} ms, errors {res['errors_by_code'] or 0}, versions {res['versions']}",
          file=sys.stderr)
    return 1 if res["ok"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
