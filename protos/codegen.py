"""Generate the Python code for every .proto under protos/, in place.

    python -m protos.codegen          # regenerate (what `make proto` runs)
    python -m protos.codegen --check  # exit 1 and name the stale files

Protos are compiled with the repository root as the only include path, so a file at
protos/fraud/v1/fraud.proto becomes the module protos.fraud.v1.fraud_pb2 and the
generated imports resolve without any sys.path tricks.
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc
import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Compile every proto into out_dir (mirroring the repository layout)."""
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    # protoc resolves relative file names against the include path, so run from ROOT.
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    # Packages need an __init__.py so tools (pytest, mypy, setuptools) see them.
    for proto in proto_files():
        pkg = out_dir / proto.relative_to(ROOT).parent
        while pkg != out_dir / "protos" and pkg != out_dir:
            init = pkg / "__init__.py"
            if not init.exists():
                init.write_text("")
            pkg = pkg.parent


def generated_files(base: Path) -> list[Path]:
    base = base / "protos"
    return sorted(p.relative_to(base) for p in base.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        generate(tmp_path)
        fresh = set(generated_files(tmp_path))
        committed = set(generated_files(ROOT))
        stale = sorted(str(p) for p in fresh ^ committed)
        for rel in sorted(fresh & committed):
            if not filecmp.cmp(tmp_path / "protos" / rel, PROTO_DIR / rel, shallow=False):
                stale.append(str(rel))
        return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only report stale generated files")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code (run `make proto`):", *stale, sep="\n  ", file=sys.stderr)
            return 1
        print("generated code is fresh")
        return 0
    for old in generated_files(ROOT):
        (PROTO_DIR / old).unlink()
    generate(ROOT)
    print(f"generated code for {len(proto_files())} proto files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
