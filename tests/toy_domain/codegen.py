"""Generate toy_pb2.py / toy_pb2.pyi / toy_pb2_grpc.py next to toy.proto (committed, like protos/).

    python -m tests.toy_domain.codegen          # regenerate
    python -m tests.toy_domain.codegen --check  # exit 1 when the committed code is stale

The repository root is the include path (as protos/codegen.py does), so the module is
tests.toy_domain.toy_pb2 and its import of protos/common/v1/common.proto resolves as usual.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTO = HERE / "toy.proto"
GENERATED = ("toy_pb2.py", "toy_pb2.pyi", "toy_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(PROTO.relative_to(ROOT))]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on tests/toy_domain/toy.proto")
    finally:
        os.chdir(cwd)


def stale() -> list[str]:
    """The generated files that differ from what toy.proto generates now."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / PROTO.parent.relative_to(ROOT)
        return [name for name in GENERATED
                if not (HERE / name).exists() or not filecmp.cmp(fresh / name, HERE / name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    if args.check:
        names = stale()
        for name in names:
            print(f"stale: tests/toy_domain/{name}", file=sys.stderr)
        return 1 if names else 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
