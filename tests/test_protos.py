"""The committed generated code must be what `make proto` would write now."""
import importlib

from protos import codegen


def test_generated_code_is_fresh():
    stale = codegen.stale_files()
    assert stale == [], f"stale generated code, run `make proto`: {stale}"


def test_every_proto_has_importable_stubs():
    for proto in codegen.proto_files():
        module = ".".join(proto.relative_to(codegen.ROOT).with_suffix("").parts)
        pb2 = importlib.import_module(module + "_pb2")
        assert pb2.DESCRIPTOR.name == str(proto.relative_to(codegen.ROOT))
        if pb2.DESCRIPTOR.services_by_name:
            importlib.import_module(module + "_pb2_grpc")


# tritonclient's stubs register the same "inference.*" symbols in protobuf's default pool,
# so they cannot be imported beside ours: read their field table in a child process.
_DUMP_TRITON = """
import json
from tritonclient.grpc import service_pb2 as triton
def dump(d, out):
    if d.full_name in out:
        return
    out[d.full_name] = {f.number: [f.name, f.type, f.is_repeated] for f in d.fields}
    for f in d.fields:
        if f.message_type is not None:
            dump(f.message_type, out)
svc = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
out, methods = {}, {}
for m in svc.methods:
    methods[m.name] = [m.input_type.full_name, m.output_type.full_name]
    dump(m.input_type, out); dump(m.output_type, out)
print(json.dumps({"service": svc.full_name, "methods": methods, "messages": out}))
"""


def test_v2_is_wire_compatible_with_tritonclient():
    """Same package, service, methods and field numbers/types as Triton's client stubs."""
    import json
    import subprocess
    import sys

    from protos.inference import grpc_service_pb2 as ours

    theirs = json.loads(subprocess.run([sys.executable, "-c", _DUMP_TRITON], check=True,
                                       capture_output=True, text=True).stdout)
    svc = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert svc.full_name == theirs["service"] == "inference.GRPCInferenceService"
    seen: set[str] = set()
    for method in svc.methods:
        assert [method.input_type.full_name, method.output_type.full_name] == theirs["methods"][method.name]
        for message in (method.input_type, method.output_type):
            _same_fields(message, theirs["messages"], seen)


def _same_fields(message, theirs, seen):
    if message.full_name in seen:
        return
    seen.add(message.full_name)
    table = theirs[message.full_name]
    for field in message.fields:
        assert [field.name, field.type, field.is_repeated] == table[str(field.number)], field.full_name
        if field.message_type is not None:
            _same_fields(field.message_type, theirs, seen)
