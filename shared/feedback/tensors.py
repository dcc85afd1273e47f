"""Tensors in feedback records (V2 raw layout, little endian): what every trainer domain reads back."""
from __future__ import annotations

import struct

import numpy as np

from protos.feedback.v1 import feedback_pb2

# V2 datatype names of numpy dtypes (native byte order); strings and bytes are BYTES.
_V2_OF_NUMPY = {np.dtype(k): v for k, v in {
    np.bool_: "BOOL", np.uint8: "UINT8", np.uint16: "UINT16", np.uint32: "UINT32", np.uint64: "UINT64",
    np.int8: "INT8", np.int16: "INT16", np.int32: "INT32", np.int64: "INT64",
    np.float16: "FP16", np.float32: "FP32", np.float64: "FP64"}.items()}

_NUMPY_OF_V2 = {v: k for k, v in _V2_OF_NUMPY.items()}


def fill_tensor(t: feedback_pb2.Tensor, name: str, value) -> None:
    """One tensor as it was fed to / returned by the model (V2 raw layout, little endian)."""
    a = np.asarray(value)
    t.name = name
    t.shape.extend(a.shape)
    if a.dtype.kind in "OSU":  # BYTES: 4-byte little-endian length, then the bytes, per element
        parts = []
        for v in a.reshape(-1).tolist():
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        t.datatype = "BYTES"
        t.raw_data = b"".join(parts)
        return
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    t.datatype = _V2_OF_NUMPY[a.dtype]  # KeyError (-> record refused) for dtypes V2 has no name for
    t.raw_data = a.tobytes()


def tensor_to_numpy(t: feedback_pb2.Tensor) -> np.ndarray:
    """The inverse of fill_tensor, for numeric tensors (what the trainer and tests need)."""
    dtype = _NUMPY_OF_V2[t.datatype].newbyteorder("<")
    return np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.shape))
