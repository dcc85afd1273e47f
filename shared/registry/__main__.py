"""Registry command line.

    python -m shared.registry [--root DIR] list [NAME]
    python -m shared.registry [--root DIR] show NAME [VERSION]
    python -m shared.registry [--root DIR] verify NAME [VERSION]
    python -m shared.registry [--root DIR] publish NAME MODEL.onnx [--metrics JSON]
    python -m shared.registry [--root DIR] rollback NAME [--to VERSION]

--root defaults to $STOREFRONT_REGISTRY_DIR, else ./var/registry.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from shared.registry.registry import ModelRegistry, RegistryError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shared.registry", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.environ.get("STOREFRONT_REGISTRY_DIR", "var/registry"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="models, or the versions of one model")
    p.add_argument("name", nargs="?")
    p = sub.add_parser("show", help="a version's manifest (default: the current one)")
    p.add_argument("name")
    p.add_argument("version", nargs="?")
    p = sub.add_parser("verify", help="check every file's sha256 against the manifest")
    p.add_argument("name")
    p.add_argument("version", nargs="?")
    p = sub.add_parser("publish", help="publish an ONNX file as the next version and make it current")
    p.add_argument("name")
    p.add_argument("model")
    p.add_argument("--metrics", default="{}", help="JSON object stored in the manifest")
    p = sub.add_parser("rollback", help="point CURRENT at the parent (or --to VERSION)")
    p.add_argument("name")
    p.add_argument("--to")
    args = ap.parse_args(argv)
    reg = ModelRegistry(args.root)
    try:
        if args.cmd == "list":
            # One unreadable pointer or version (a link, a corrupt manifest) is shown as such and the
            # listing goes on: it is what an operator runs to find out what is wrong.
            failed = False
            if args.name is None:
                for name in reg.models():
                    try:
                        current = reg.current_version(name)
                    except RegistryError as e:
                        current, failed = f"unreadable ({e.reason})", True
                    print(f"{name}\tcurrent={current}\tversions={len(reg.versions(name))}")
            else:
                try:
                    current = reg.current_version(args.name)
                except RegistryError as e:
                    current, failed = None, True
                    print(f"error: {e}", file=sys.stderr)
                for v in reg.versions(args.name):
                    mark = "*" if v == current else " "
                    try:
                        m = reg.manifest(args.name, v)
                    except RegistryError as e:
                        failed = True
                        print(f"{mark} {v}\tunreadable ({e.reason}): {e}")
                        continue
                    print(f"{mark} {v}\tcreated={m.created}\tparent={m.parent}\tmetrics={json.dumps(m.metrics)}")
            return 2 if failed else 0
        elif args.cmd in ("show", "verify"):
            version = args.version or reg.current_version(args.name)
            if version is None:
                raise RegistryError(f"model {args.name!r} has no current version")
            m = reg.verify(args.name, version) if args.cmd == "verify" else reg.manifest(args.name, version)
            if args.cmd == "verify":
                print(f"{args.name}/{version}: {len(m.files)} file(s) match their checksums")
            else:
                print(json.dumps(m.to_json(), indent=2))
        elif args.cmd == "publish":
            from shared.runtime.signature import signature_of_onnx

            m = reg.publish(args.name, args.model, signature_of_onnx(args.model), metrics=json.loads(args.metrics))
            print(f"published {m.name}/{m.version} (parent {m.parent})")
        elif args.cmd == "rollback":
            v = reg.rollback(args.name, args.to)
            print(f"{args.name}: CURRENT -> {v}")
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
