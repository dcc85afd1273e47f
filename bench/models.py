"""The benchmark models, built as real ONNX files from seeded numpy weights (no torch needed).

- mlp:      MLP 64 -> 256 -> 256 -> 1, ReLU between, sigmoid at the end.
            Input `input` [B,64] FP32, output `output` [B,1] FP32. Tiny: measures the serving stack.
- twotower: user tower 32 -> 128 -> 64 (ReLU between), scored against a fixed 100,000 x 64 FP32
            item-embedding initializer (u @ items.T), TopK k=100 in the graph.
            Input `input` [B,32] FP32, outputs `scores` [B,100] FP32 and `indices` [B,100] INT64.
            About 26 MB; every call streams the whole item table, so batching pays.

The batch axis is dynamic (`batch`). Dense weights are drawn from `seed` (torch's default
uniform(+-1/sqrt(fan_in)) init, so the outputs look like an untrained torch model's); the item
table comes from its own fixed seed, the same in every version, like a catalog that did not
change while the user tower was retrained. Files are cached under var/bench-models/ by kind,
seed and builder revision, written atomically, and rebuilt only when missing.

    ensure_model("mlp")                 # -> var/bench-models/mlp-seed0-r1.onnx
    ensure_model("twotower", seed=1)    # another version: same signature, other weights
    second_version("mlp")               # the version bench.serving swaps to

`python -m bench.models [--cache-dir DIR]` builds both models and prints their paths.
"""
from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

KINDS = ("mlp", "twotower")
DEFAULT_CACHE_DIR = Path("var/bench-models")
REVISION = 1  # bump when a builder changes: cached files of older revisions are ignored
FIRST_SEED = 0
SECOND_SEED = 1  # the other weight set hot swaps alternate with
ITEM_SEED = 1  # the fixed item table of twotower (every version shares it)
N_ITEMS, ITEM_DIM, TOP_K = 100_000, 64, 100
OPSET = 17

# kind -> (input name, input width, {output name: (width, numpy dtype)})
SPECS = {
    "mlp": ("input", 64, {"output": (1, np.float32)}),
    "twotower": ("input", 32, {"scores": (TOP_K, np.float32), "indices": (TOP_K, np.int64)}),
}


def _dense(rng: np.random.Generator, n_in: int, n_out: int, prefix: str) -> tuple[list, str, str]:
    bound = 1.0 / np.sqrt(n_in)
    w = rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32)
    b = rng.uniform(-bound, bound, (n_out,)).astype(np.float32)
    return [numpy_helper.from_array(w, prefix + "_w"), numpy_helper.from_array(b, prefix + "_b")], \
        prefix + "_w", prefix + "_b"


def _linear(x: str, out: str, w: str, b: str) -> list[onnx.NodeProto]:
    return [helper.make_node("MatMul", [x, w], [out + "_mm"]), helper.make_node("Add", [out + "_mm", b], [out])]


def mlp_graph(seed: int) -> onnx.GraphProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    x = "input"
    for i, (n_in, n_out) in enumerate(((64, 256), (256, 256), (256, 1))):
        params, w, b = _dense(rng, n_in, n_out, f"fc{i}")
        inits += params
        nodes += _linear(x, f"z{i}", w, b)
        x = f"z{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [x], [f"h{i}"]))
            x = f"h{i}"
    nodes.append(helper.make_node("Sigmoid", [x], ["output"]))
    return helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1])],
        inits)


def item_table() -> np.ndarray:
    return np.random.default_rng(ITEM_SEED).standard_normal((N_ITEMS, ITEM_DIM), dtype=np.float32)


def twotower_graph(seed: int) -> onnx.GraphProto:
    rng = np.random.default_rng(seed)
    p0, w0, b0 = _dense(rng, 32, 128, "user0")
    p1, w1, b1 = _dense(rng, 128, ITEM_DIM, "user1")
    inits = p0 + p1 + [numpy_helper.from_array(item_table(), "items"),
                       numpy_helper.from_array(np.array([TOP_K], np.int64), "k")]
    nodes = (_linear("input", "u0", w0, b0) + [helper.make_node("Relu", ["u0"], ["u0r"])]
             + _linear("u0r", "user", w1, b1)
             # [B,64] x [100000,64]^T -> [B,100000]: one dot product per item
             + [helper.make_node("Gemm", ["user", "items"], ["all_scores"], transB=1),
                helper.make_node("TopK", ["all_scores", "k"], ["scores", "indices"], axis=1, largest=1, sorted=1)])
    return helper.make_graph(
        nodes, "twotower",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", TOP_K]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", TOP_K])],
        inits)


BUILDERS = {"mlp": mlp_graph, "twotower": twotower_graph}


def build_model(kind: str, path: str | os.PathLike[str], seed: int = FIRST_SEED) -> Path:
    """Write the model `kind` with weights from `seed` to path (atomically). Returns the path."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown benchmark model {kind!r}; choose from {', '.join(KINDS)}")
    path = Path(path)
    model = helper.make_model(BUILDERS[kind](seed), opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="bench.models", producer_version=str(REVISION))
    model.ir_version = 8
    helper.set_model_props(model, {"kind": kind, "seed": str(seed), "revision": str(REVISION)})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def model_path(kind: str, seed: int = FIRST_SEED, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR) -> Path:
    return Path(cache_dir) / f"{kind}-seed{seed}-r{REVISION}.onnx"


def ensure_model(kind: str, seed: int = FIRST_SEED, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR) -> Path:
    """The cached file of `kind` built from `seed`, built first if it is not there yet."""
    path = model_path(kind, seed, cache_dir)
    return path if path.is_file() else build_model(kind, path, seed)


def second_version(kind: str, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR) -> Path:
    """Another version of `kind`: same signature, other weights (seed SECOND_SEED)."""
    return ensure_model(kind, SECOND_SEED, cache_dir)


def sample_input(kind: str, batch: int = 1, seed: int = 0) -> np.ndarray:
    """A fixed FP32 input [batch, width] for `kind`."""
    width = SPECS[kind][1]
    return np.random.default_rng(seed).standard_normal((batch, width), dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the benchmark ONNX models (cached).")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    ap.add_argument("--models", default=",".join(KINDS))
    ap.add_argument("--seeds", default=f"{FIRST_SEED},{SECOND_SEED}")
    a = ap.parse_args(argv)
    for kind in a.models.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            p = ensure_model(kind.strip(), seed, a.cache_dir)
            print(f"{kind} seed {seed}: {p} ({p.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
