"""Read an ONNX file's input/output signature in registry terms (V2 datatypes, -1 = dynamic)."""
from __future__ import annotations

import os

import onnx

from shared.registry import Signature, TensorSpec
from shared.runtime.dtypes import V2_OF_ONNX

# onnxruntime's NodeArg.type strings -> V2 datatypes
_V2_OF_ORT = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
}


def _spec(value_info: onnx.ValueInfoProto) -> TensorSpec:
    ttype = value_info.type.tensor_type
    if ttype.elem_type not in V2_OF_ONNX:
        raise ValueError(f"tensor {value_info.name!r} has unsupported element type {ttype.elem_type}")
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in ttype.shape.dim)
    return TensorSpec(value_info.name, V2_OF_ONNX[ttype.elem_type], dims)


def signature_of_model(model: onnx.ModelProto) -> Signature:
    initializers = {i.name for i in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v) for v in model.graph.output)
    return Signature(inputs, outputs)


def signature_of_onnx(path: str | os.PathLike[str]) -> Signature:
    # load_external_data=False: the signature lives in the graph, weights are not needed.
    return signature_of_model(onnx.load(os.fspath(path), load_external_data=False))


def _session_spec(arg) -> TensorSpec:
    if arg.type not in _V2_OF_ORT:
        raise ValueError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, _V2_OF_ORT[arg.type], dims)


def signature_of_session(session) -> Signature:
    """The signature of a created onnxruntime.InferenceSession (cheap: no file parsing)."""
    return Signature(tuple(_session_spec(a) for a in session.get_inputs()),
                     tuple(_session_spec(a) for a in session.get_outputs()))
