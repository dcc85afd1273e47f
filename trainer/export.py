"""Export a PyTorch module to ONNX (dynamic batch axis), check it, and compare it with PyTorch.

When the `tensorrt` package imports (the GPU image), a TensorRT engine is also built
beside the ONNX file; otherwise one clear line says it was skipped. Services on a GPU
build their own engines through ONNX Runtime's TensorRT provider (with a per-version
engine cache), so the ONNX file is always the artifact that is published.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch

log = logging.getLogger(__name__)
OPSET = 18
# The exporter warns once per torchvision operator it cannot register (torchvision is not a
# dependency here); those lines say nothing about our models.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def declare_input_ranges(path: str | os.PathLike[str], ranges: Mapping[str, tuple[int, int]]) -> Path:
    """Record in the ONNX file's metadata the inclusive [min, max] each index input accepts.

    An id outside an embedding table makes ONNX Runtime's Gather fail (and a negative one
    silently wraps around to the end of the table), so every exported model says which ids
    its tables hold. shared.runtime.signature reads this back: the manifest's signature
    carries it ("range"), and servers refuse out-of-range values with INVALID_ARGUMENT
    before a request can join a batch. The file is rewritten in place (before it is
    hashed and published)."""
    from shared.runtime.signature import INPUT_RANGES_KEY

    path = Path(path)
    model = onnx.load(str(path))
    names = {i.name for i in model.graph.input}
    unknown = sorted(set(ranges) - names)
    if unknown:
        raise ValueError(f"ranges declared for inputs the graph lacks: {unknown}")
    for name, (lo, hi) in ranges.items():
        if not int(lo) <= int(hi):
            raise ValueError(f"input {name!r}: empty range [{lo}, {hi}]")
    value = json.dumps({name: [int(lo), int(hi)] for name, (lo, hi) in ranges.items()}, sort_keys=True)
    kept = [p for p in model.metadata_props if p.key != INPUT_RANGES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=INPUT_RANGES_KEY, value=value)
    onnx.save(model, str(path))
    return path


def export_onnx(module: torch.nn.Module, inputs: Mapping[str, tuple[int, ...]], output_names: Sequence[str],
                path: str | os.PathLike[str], *, example: Sequence[torch.Tensor] | None = None,
                dynamic: Mapping[str, Mapping[int, str]] | None = None,
                ranges: Mapping[str, tuple[int, int]] | None = None) -> Path:
    """Export with axis 0 of every input and output dynamic; run the ONNX checker.

    example: the example inputs (default: standard normal FP32 of the given shapes; pass them
    for integer inputs). dynamic: more dynamic axes, input name -> {axis: dimension name}.
    ranges: the valid [min, max] of integer index inputs (see declare_input_ranges)."""
    path = Path(path)
    module = module.eval()
    if example is None:
        example = tuple(torch.randn(*shape) for shape in inputs.values())
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    shapes: dict[str, dict[int, object]] = {name: {0: batch} for name in inputs}
    for name, axes in (dynamic or {}).items():
        for axis, dim_name in axes.items():
            shapes[name][axis] = torch.export.Dim(dim_name, min=1, max=1 << 16)
    with torch.no_grad():
        torch.onnx.export(module, tuple(example), str(path), input_names=list(inputs), output_names=list(output_names),
                          dynamic_shapes=shapes, dynamo=True, opset_version=OPSET,
                          external_data=False, verbose=False)
    if ranges:
        declare_input_ranges(path, ranges)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def parity(module: torch.nn.Module, path: str | os.PathLike[str], feeds: Mapping[str, np.ndarray]) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's outputs on feeds."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, dict(feeds))
    with torch.no_grad():
        want = module.eval()(*(torch.from_numpy(np.asarray(v)) for v in feeds.values()))
    if isinstance(want, torch.Tensor):
        want = (want,)
    return max(float(np.max(np.abs(g - w.numpy()))) if g.size else 0.0 for g, w in zip(got, want))


def batch1_latency_ms(path: str | os.PathLike[str], feeds: Mapping[str, np.ndarray], runs: int = 200,
                      unbatched: Sequence[str] = ()) -> float:
    """Median batch-1 latency of one ORT CPU thread, in milliseconds. `unbatched`: inputs fed
    whole (no batch axis, e.g. the recommender's catalog matrix)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    one = {k: (np.asarray(v) if k in unbatched else np.asarray(v)[:1]) for k, v in feeds.items()}
    for _ in range(10):
        session.run(None, one)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, one)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def build_tensorrt_engine(path: str | os.PathLike[str], fp16: bool = False) -> Path | None:
    """Build `<model>.plan` next to the ONNX file when TensorRT is installed; None otherwise."""
    try:
        import tensorrt as trt  # only in the GPU image
    except ImportError:
        log.info("TensorRT engine skipped: the tensorrt package is not installed (CPU machine)")
        return None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        rest = [d if d > 0 else 1 for d in dims[1:]]
        profile.set_shape(tensor.name, [1, *rest], [8, *rest], [64, *rest])
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {path}")
    out = Path(path).with_suffix(".plan")
    out.write_bytes(bytes(engine))
    log.info("TensorRT engine built: %s", out)
    return out
