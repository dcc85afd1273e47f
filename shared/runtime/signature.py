"""Read an ONNX file's input/output signature in registry terms (V2 datatypes, -1 = dynamic).

Value ranges of inputs (TensorSpec.value_range) are not part of ONNX's type system; the
trainer writes them into the model's metadata (metadata_props, key INPUT_RANGES_KEY, a JSON
object input name -> [min, max]) when it exports, so that the file itself says which ids
its embedding tables hold. Both readers here pick them up, so a published manifest carries
them and a model served straight from a file is range-checked too.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import onnx

from shared.registry import RegistryError, Signature, TensorSpec
from shared.registry.manifest import parse_range
from shared.runtime.dtypes import V2_OF_ONNX

INPUT_RANGES_KEY = "storefront.input_ranges"

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


def declared_ranges(metadata: Mapping[str, str]) -> dict[str, tuple[int | float, int | float]]:
    """Input ranges from a model's metadata (empty without the key). Malformed metadata is a
    ValueError: a model whose declared safety bounds cannot be read must not serve unchecked."""
    text = metadata.get(INPUT_RANGES_KEY)
    if text is None:
        return {}
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return {str(name): parse_range(r, str(name)) for name, r in raw.items()}
    except (ValueError, RegistryError) as e:
        raise ValueError(f"model metadata {INPUT_RANGES_KEY!r} is malformed: {e}") from None


def _with_ranges(signature: Signature, ranges: Mapping[str, tuple[int | float, int | float]]) -> Signature:
    unknown = sorted(set(ranges) - {t.name for t in signature.inputs})
    if unknown:
        raise ValueError(f"model metadata {INPUT_RANGES_KEY!r} names inputs the graph lacks: {unknown}")
    return signature.with_input_ranges(ranges)


def signature_of_model(model: onnx.ModelProto) -> Signature:
    initializers = {i.name for i in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v) for v in model.graph.output)
    return _with_ranges(Signature(inputs, outputs), declared_ranges({p.key: p.value for p in model.metadata_props}))


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
    signature = Signature(tuple(_session_spec(a) for a in session.get_inputs()),
                          tuple(_session_spec(a) for a in session.get_outputs()))
    return _with_ranges(signature, declared_ranges(session.get_modelmeta().custom_metadata_map))
