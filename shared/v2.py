"""KServe V2 (Open Inference Protocol) over gRPC for every ServedModel of a process.

Thin by design: turn a ModelInferRequest into validated numpy inputs, call the model's
batcher, turn the outputs into a ModelInferResponse (always raw contents). Every check
failure is an InvalidArgument/NotFound naming the tensor, never an INTERNAL. Names a client
sent are echoed shortened (shared.errors.shorten): a status message travels in trailing
metadata, which gRPC bounds.

Float inputs are checked finite after conversion to the model's dtype (the declared
datatype must match the model's, so FP32 inputs arrive as FP32 and FP64 as FP64: no value
finite in the request can become inf on the way to the model). Value ranges and the output
checks are done by ServedModel.infer, for this API and the domain APIs alike.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import grpc
import numpy as np

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from shared.errors import InvalidArgument, NotFound, echo_names, shorten
from shared.registry import Signature
from shared.runtime.dtypes import CONTENTS_FIELD_OF_V2, FLOAT_V2, NUMPY_OF_V2, V2_OF_NUMPY
from shared.serving import ServedModel

SERVER_NAME = "storefront"
SERVER_VERSION = "0.1.0"
PLATFORM = "onnxruntime_onnx"


def decode_inputs(request: pb.ModelInferRequest, signature: Signature,
                  max_rows: int) -> tuple[dict[str, np.ndarray], int]:
    """Validated inputs (name -> array) and the number of rows they carry."""
    tensors = request.inputs
    if not tensors:
        raise InvalidArgument("request has no inputs; expected " + ", ".join(repr(s.name) for s in signature.inputs))
    specs = {s.name: s for s in signature.inputs}
    if len(tensors) != len(specs):
        raise InvalidArgument(f"request has {len(tensors)} inputs, the model takes {len(specs)}: "
                              + ", ".join(repr(n) for n in specs))
    raw = request.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs")
    feeds: dict[str, np.ndarray] = {}
    rows = -1
    for i, t in enumerate(tensors):
        spec = specs.get(t.name)
        if spec is None:
            raise InvalidArgument(f"unknown input {shorten(t.name, 64)!r}; the model takes "
                                  + ", ".join(repr(n) for n in specs))
        if t.name in feeds:
            raise InvalidArgument(f"input {t.name!r} appears twice")
        if t.datatype != spec.datatype:
            raise InvalidArgument(f"input {t.name!r} has datatype {shorten(t.datatype, 32)!r}, "
                                  f"expected {spec.datatype}")
        shape = list(t.shape)
        if len(shape) != len(spec.shape):
            raise InvalidArgument(f"input {t.name!r} has shape {shorten(shape, 100)}, "
                                  f"expected {list(spec.shape)} (-1 = any)")
        for got, want in zip(shape, spec.shape):
            if got < 1 or (want != -1 and got != want):
                raise InvalidArgument(f"input {t.name!r} has shape {shape}, expected {list(spec.shape)} (-1 = any, >= 1)")
        if rows == -1:
            rows = shape[0]
        elif shape[0] != rows:
            raise InvalidArgument(f"input {t.name!r} has {shape[0]} rows, other inputs have {rows}")
        if rows > max_rows:
            raise InvalidArgument(f"input {t.name!r} has {rows} rows; at most {max_rows} per request")
        dtype = NUMPY_OF_V2[spec.datatype]
        count = math.prod(shape)
        if raw:
            if t.HasField("contents"):
                raise InvalidArgument(f"input {t.name!r} has typed contents and raw_input_contents; use one")
            if len(raw[i]) != count * dtype.itemsize:
                raise InvalidArgument(f"input {t.name!r}: {len(raw[i])} bytes for shape {shape} of {spec.datatype}, "
                                      f"expected {count * dtype.itemsize}")
            x = np.frombuffer(raw[i], dtype=dtype).reshape(shape)
        else:
            field = CONTENTS_FIELD_OF_V2[spec.datatype]
            if field is None:
                raise InvalidArgument(f"input {t.name!r}: {spec.datatype} must be sent as raw_input_contents")
            values = getattr(t.contents, field)
            if len(values) != count:
                raise InvalidArgument(f"input {t.name!r}: {len(values)} values for shape {shape}, expected {count}")
            try:
                x = np.asarray(values, dtype=dtype).reshape(shape)
            except OverflowError as e:
                raise InvalidArgument(f"input {t.name!r}: value out of range for {spec.datatype}: "
                                      f"{shorten(e, 100)}") from None
        if spec.datatype in FLOAT_V2 and not np.isfinite(x).all():
            raise InvalidArgument(f"input {t.name!r} contains NaN or infinite values")
        feeds[t.name] = x
    return feeds, rows


def encode_response(request: pb.ModelInferRequest, version: str, names: Iterable[str],
                    outputs: Mapping[str, np.ndarray]) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    for name in names:
        y = outputs[name]
        o = resp.outputs.add()
        o.name = name
        o.datatype = V2_OF_NUMPY[y.dtype]
        o.shape.extend(y.shape)
        resp.raw_output_contents.append(y.tobytes())
    return resp


class V2Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: Mapping[str, ServedModel]) -> None:
        self.models = dict(models)

    def _model(self, name: str) -> ServedModel:
        if not name:
            raise InvalidArgument("model name is required")
        served = self.models.get(name)
        if served is None:
            raise NotFound(f"unknown model {shorten(name, 64)!r}; this server serves "
                           + ", ".join(repr(n) for n in self.models))
        return served

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=all(m.ready for m in self.models.values()))

    async def ModelReady(self, request, context):
        served = self._model(request.name)
        model = served.current
        ready = model is not None and (not request.version or request.version == model.version)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    async def ModelMetadata(self, request, context):
        served = self._model(request.name)
        model = served.current
        if request.version and (model is None or request.version != model.version):
            raise NotFound(f"model {request.name!r} version {shorten(request.version, 32)!r} is not served")
        signature = served.signature()
        resp = pb.ModelMetadataResponse(name=request.name, platform=PLATFORM,
                                        versions=[model.version] if model else [])
        for spec in signature.inputs:
            resp.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        for spec in signature.outputs:
            resp.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        return resp

    async def ModelInfer(self, request, context):
        served = self._model(request.model_name)
        signature = served.signature()
        feeds, rows = decode_inputs(request, signature, served.max_request_rows)
        all_names = [s.name for s in signature.outputs]
        if request.outputs:
            names = [o.name for o in request.outputs]
            unknown = [n for n in names if n not in all_names]
            if unknown:
                raise InvalidArgument(f"unknown output(s) {echo_names(unknown)}; the model has {all_names}")
        else:
            names = all_names
        outputs, model = await served.infer(feeds, rows, ServedModel.deadline_of(context), request.model_version)
        return encode_response(request, model.version, names, dict(zip(model.output_names, outputs)))


def add_to_server(servicer: V2Servicer, server: grpc.aio.Server) -> str:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
