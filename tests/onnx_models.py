"""Small real ONNX models for tests, built with onnx.helper (no torch needed).

`linear_model(path, seed)` is a logistic model x[B,4] -> y[B,1]; different seeds give
different weights (a "new version" with the same signature). The others are the bad
versions a registry must refuse: a wrong signature, non-finite outputs, a corrupt file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IN_DIM = 4


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def linear_weights(seed: int, in_dim: int = IN_DIM) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((in_dim, 1)).astype(np.float32), rng.standard_normal(1).astype(np.float32)


def linear_model(path: Path, seed: int = 0, in_dim: int = IN_DIM) -> Path:
    w, b = linear_weights(seed, in_dim)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z0"]),
         helper.make_node("Add", ["z0", "b"], ["z"]),
         helper.make_node("Sigmoid", ["z"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return _save(graph, path)


def linear_reference(x: np.ndarray, seed: int = 0) -> np.ndarray:
    w, b = linear_weights(seed, x.shape[1])
    return 1.0 / (1.0 + np.exp(-(x @ w + b)))


def nan_model(path: Path) -> Path:
    """Right signature, but outputs NaN for any input (sqrt of -1 - x*x)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["sq"]),
         helper.make_node("Neg", ["sq"], ["neg"]),
         helper.make_node("Sub", ["neg", "one"], ["negm1"]),
         helper.make_node("Sqrt", ["negm1"], ["r"]),
         helper.make_node("ReduceSum", ["r", "axes"], ["y"], keepdims=1)],
        "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN_DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array([1.0], np.float32), "one"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    return _save(graph, path)


def corrupt_file(path: Path) -> Path:
    path.write_bytes(b"this is not an onnx model\x00\x01\x02")
    return path
