"""One table between V2 datatype names, numpy dtypes and ONNX tensor element types."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

# V2 name -> (numpy dtype, ONNX element type, InferTensorContents field for typed contents)
_TABLE = {
    "BOOL": (np.dtype(np.bool_), TensorProto.BOOL, "bool_contents"),
    "UINT8": (np.dtype(np.uint8), TensorProto.UINT8, "uint_contents"),
    "UINT16": (np.dtype(np.uint16), TensorProto.UINT16, "uint_contents"),
    "UINT32": (np.dtype(np.uint32), TensorProto.UINT32, "uint_contents"),
    "UINT64": (np.dtype(np.uint64), TensorProto.UINT64, "uint64_contents"),
    "INT8": (np.dtype(np.int8), TensorProto.INT8, "int_contents"),
    "INT16": (np.dtype(np.int16), TensorProto.INT16, "int_contents"),
    "INT32": (np.dtype(np.int32), TensorProto.INT32, "int_contents"),
    "INT64": (np.dtype(np.int64), TensorProto.INT64, "int64_contents"),
    "FP16": (np.dtype(np.float16), TensorProto.FLOAT16, None),  # raw only, per the spec
    "FP32": (np.dtype(np.float32), TensorProto.FLOAT, "fp32_contents"),
    "FP64": (np.dtype(np.float64), TensorProto.DOUBLE, "fp64_contents"),
}

NUMPY_OF_V2 = {k: v[0] for k, v in _TABLE.items()}
V2_OF_NUMPY = {v[0]: k for k, v in _TABLE.items()}
V2_OF_ONNX = {v[1]: k for k, v in _TABLE.items()}
CONTENTS_FIELD_OF_V2 = {k: v[2] for k, v in _TABLE.items()}
FLOAT_V2 = frozenset({"FP16", "FP32", "FP64"})
