"""Export a PyTorch module to ONNX (dynamic batch axis), check it, and compare it with PyTorch.

Every export goes through torch_to_onnx: the first of a network traces it (torch.onnx, dynamo);
the learner's later rounds reuse that translation with their own weights (GraphReuse).

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
from typing import Callable, Mapping, Sequence

import threading
from collections import OrderedDict

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

log = logging.getLogger(__name__)
OPSET = 18
# The exporter warns once per torchvision operator it cannot register (torchvision is not a
# dependency here); those lines say nothing about our models.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
# The graph optimizer (ONNXProgram.optimize, run on every export, reused graphs included) logs
# each pass and each folded constant at INFO: ~30 lines per round in the trainer's log.
for _name in ("onnxscript", "onnx_ir"):
    logging.getLogger(_name).setLevel(logging.WARNING)


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


# compare(ONNX Runtime's outputs, PyTorch's) -> a difference (0 = the same)
Compare = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], float]


class GraphReuse:
    """Translated graphs kept in this process, optimized again with a module's current weights.

    A learner exports the same network every round; only its weights change. torch.onnx's
    dynamo exporter traces and translates the whole module each time (2-6 s of CPU per graph on
    two cores, the largest cost of a round). So the translated graph is kept *before* the
    exporter's optimizer runs, keyed by everything that decides it (the module's class, the
    names, shapes and dtypes of its parameters and buffers, the example inputs' shapes and
    dtypes, the dynamic axes, the input and output names, the opset); a later export with the
    same key copies it, puts the current weights into its initializers (named like the
    state_dict) and runs the same optimizer. The optimizer folds whatever depends on weights
    only (pricing's posterior tables, the recommender's pooling weights), so it has to run
    after the weights are in, never before.

    The translated graph holds each parameter and buffer the forward uses as an initializer of
    its own (one it does not use is absent). A reused graph must match the module on the
    example inputs (compare, within REUSE_TOL) before it is written: a forward that bakes in a
    plain Python attribute that has changed would not; then it is exported afresh and its key
    is never reused again. The learner's gate checks parity on real rows as for any export."""

    REUSE_TOL = 1e-5

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._graphs: OrderedDict[tuple, bytes] = OrderedDict()  # key -> the translated ModelProto
        self._refused: set[tuple] = set()
        self._lock = threading.Lock()
        self.reused = 0
        self.exported = 0

    @staticmethod
    def key(module: torch.nn.Module, example: Sequence[torch.Tensor], input_names: Sequence[str],
            output_names: Sequence[str], dynamic_shapes: Mapping[str, Mapping[int, object]]) -> tuple:
        def dim(d: object) -> tuple:
            return (getattr(d, "__name__", str(d)), getattr(d, "min", None), getattr(d, "max", None))

        return (type(module).__module__, type(module).__qualname__,
                tuple((k, tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else (k, repr(v))
                      for k, v in module.state_dict().items()),
                tuple((tuple(t.shape), str(t.dtype)) for t in example), tuple(input_names), tuple(output_names),
                tuple(sorted((name, tuple(sorted((a, dim(d)) for a, d in axes.items())))
                             for name, axes in dynamic_shapes.items())), OPSET)

    def write(self, key: tuple, module: torch.nn.Module, example: Sequence[torch.Tensor],
              input_names: Sequence[str], path: Path, compare: Compare | None = None) -> bool:
        """Write the kept graph of key, with module's weights and optimized, to path; False when
        there is none (or the result does not match the module: then the key is never reused)."""
        import onnx_ir as ir

        with self._lock:
            kept = self._graphs.get(key)
            if kept is not None:
                self._graphs.move_to_end(key)
        if kept is None:
            return False
        proto = onnx.ModelProto.FromString(kept)
        state = _tensors(module)
        for init in proto.graph.initializer:
            if init.name in state:
                init.CopyFrom(numpy_helper.from_array(state[init.name].reshape(tuple(init.dims)), init.name))
        _optimize_and_save(torch.onnx.ONNXProgram(ir.serde.deserialize_model(proto), None), path)
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(input_names, example)}
        diff = parity(module, path, feeds, threads=1, compare=compare)
        if diff <= self.REUSE_TOL:
            self.reused += 1
            return True
        log.warning("export: the kept graph of %s differs from the module by %.2e with its new weights; "
                    "exported afresh, and not reused again", type(module).__qualname__, diff)
        with self._lock:
            self._graphs.pop(key, None)
            self._refused.add(key)
        return False

    def keep(self, key: tuple, module: torch.nn.Module, translated: onnx.ModelProto) -> None:
        """Keep a translated (not yet optimized) graph, unless one of its initializers named like a
        parameter or buffer does not have that tensor's size and dtype."""
        self.exported += 1
        with self._lock:
            if key in self._refused:
                return
        inits = {i.name: (int(np.prod(i.dims)), i.data_type) for i in translated.graph.initializer}
        for name, value in _tensors(module).items():
            # absent: a tensor the forward does not use (the pricing prior, used in training only);
            # a one-element tensor may be a scalar initializer: same values, written in its shape
            if name in inits and inits[name] != (value.size, onnx.helper.np_dtype_to_tensor_dtype(value.dtype)):
                log.info("export: %s's graph is not reused (its initializer %s is not that tensor)",
                         type(module).__qualname__, name)
                with self._lock:
                    self._refused.add(key)
                return
        with self._lock:
            self._graphs[key] = translated.SerializeToString()
            self._graphs.move_to_end(key)
            while len(self._graphs) > self.capacity:
                self._graphs.popitem(last=False)


def _tensors(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """The module's parameters and buffers by state_dict name (extra state, not a tensor, is
    part of GraphReuse's key instead)."""
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor)}


GRAPHS = GraphReuse()


def torch_to_onnx(module: torch.nn.Module, example: Sequence[torch.Tensor], input_names: Sequence[str],
                  output_names: Sequence[str], path: str | os.PathLike[str],
                  dynamic_shapes: Mapping[str, Mapping[int, object]], reuse: GraphReuse | None = GRAPHS,
                  compare: Compare | None = None) -> Path:
    """torch.onnx.export (dynamo, OPSET, optimized, weights inside the file), or the kept graph
    of an earlier export of the same network with this module's weights (GraphReuse; compare:
    how its outputs are checked against the module's, default the largest absolute difference)."""
    path = Path(path)
    module = module.eval()
    key = reuse.key(module, example, input_names, output_names, dynamic_shapes) if reuse is not None else None
    if reuse is not None and reuse.write(key, module, example, input_names, path, compare):
        return path
    with torch.no_grad():
        program = torch.onnx.export(module, tuple(example), None, input_names=list(input_names),
                                    output_names=list(output_names), dynamic_shapes=dict(dynamic_shapes),
                                    dynamo=True, opset_version=OPSET, optimize=False, verbose=False)
    if reuse is not None:
        reuse.keep(key, module, program.model_proto)
    _optimize_and_save(program, path)
    return path


def _optimize_and_save(program: "torch.onnx.ONNXProgram", path: Path) -> None:
    """What torch.onnx.export(optimize=True, f=path, external_data=False) does after translating."""
    program.optimize()
    program.save(str(path), external_data=False)


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
    torch_to_onnx(module, tuple(example), list(inputs), list(output_names), path, shapes)
    if ranges:
        declare_input_ranges(path, ranges)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def max_abs_difference(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    return max((float(np.max(np.abs(g - w))) if g.size else 0.0 for g, w in zip(got, want)), default=0.0)


def parity(module: torch.nn.Module, path: str | os.PathLike[str], feeds: Mapping[str, np.ndarray],
           threads: int = 0, compare: Compare | None = None) -> float:
    """How far ONNX Runtime's outputs on feeds are from PyTorch's: compare(got, want), by default
    the largest absolute difference (threads: ONNX Runtime's intra-op threads, 0 = its default)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = session.run(None, dict(feeds))
    with torch.no_grad():
        want = module.eval()(*(torch.from_numpy(np.asarray(v)) for v in feeds.values()))
    if isinstance(want, torch.Tensor):
        want = (want,)
    return (compare or max_abs_difference)(got, [w.numpy() for w in want])


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
