"""Registry command line.

    python -m shared.registry [--root DIR] list [NAME]
    python -m shared.registry [--root DIR] show NAME [VERSION]
    python -m shared.registry [--root DIR] verify NAME [VERSION]
    python -m shared.registry [--root DIR] publish NAME MODEL.onnx [--metrics JSON]
    python -m shared.registry [--root DIR] rollback NAME [--to VERSION]
    python -m shared.registry [--root DIR] gc NAME [--keep-last N] [--min-age-s S] [--dry-run]
    python -m shared.registry [--root DIR] pin NAME VERSION [--note TEXT]
    python -m shared.registry [--root DIR] unpin NAME VERSION
    python -m shared.registry [--root DIR] canary NAME
    python -m shared.registry [--root DIR] start-canary NAME VERSION [--mode canary|shadow] [--share S] [--replace]
    python -m shared.registry [--root DIR] promote NAME [VERSION]
    python -m shared.registry [--root DIR] abort-canary NAME [VERSION]

--root defaults to $STOREFRONT_REGISTRY_DIR, else ./var/registry.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from shared.registry.canary import CANARY_MODES
from shared.registry.manifest import RegistryError
from shared.registry.registry import GC_KEEP_LAST, GC_MIN_AGE_S, GC_ROLLBACK_DEPTH, LEASE_TTL_S, GcReport, ModelRegistry


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def print_gc(report: GcReport) -> None:
    """What gc kept (and why) and removed: what an operator reads before trusting a dry run."""
    verb = "would remove" if report.dry_run else "removed"
    print(f"{report.name}: keep {len(report.kept)} version(s), {verb} {len(report.removed)}, "
          f"{human_bytes(report.bytes_freed)} {'would be ' if report.dry_run else ''}freed, "
          f"{human_bytes(report.bytes_after)} in the model folder"
          f"{' (dry run: nothing removed)' if report.dry_run else ''}")
    for v in sorted(report.kept, key=int):
        print(f"  keep   {v}\t{'; '.join(report.kept[v])}")
    for v in report.removed:
        print(f"  {'remove' if report.dry_run else 'removed'} {v}")
    for lease in report.leases:
        state = "fresh" if lease.fresh else "stale (ignored)"
        held = ", ".join(f"{k}={v}" for k, v in sorted(lease.versions.items())) or "nothing readable"
        print(f"  lease  {lease.instance}\t{state}: {held}")
    for name in report.pruned_leases:
        print(f"  pruned stale lease {name}")
    for name in report.leftovers:
        print(f"  cleaned leftover {name}")


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
    p = sub.add_parser("gc", help="delete versions nothing needs: keeps CURRENT, its rollback target, other "
                                  "pointers' versions, pinned, leased by a serving process, the last N and recent")
    p.add_argument("name")
    p.add_argument("--keep-last", type=int, default=GC_KEEP_LAST, help="newest versions kept (>= 1)")
    p.add_argument("--min-age-s", type=float, default=GC_MIN_AGE_S, help="versions younger than this are kept")
    p.add_argument("--rollback-depth", type=int, default=GC_ROLLBACK_DEPTH,
                   help="parents of CURRENT kept (what rollback goes back to)")
    p.add_argument("--lease-ttl-s", type=float, default=LEASE_TTL_S,
                   help="serving leases older than this are from dead processes and ignored")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    p = sub.add_parser("pin", help="keep a version out of gc until unpinned")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--note", default="", help="why (gc shows it)")
    p = sub.add_parser("unpin", help="let gc collect a pinned version again")
    p.add_argument("name")
    p.add_argument("version")
    p = sub.add_parser("canary", help="the running canary of a model (version, mode, share, since when)")
    p.add_argument("name")
    p = sub.add_parser("start-canary", help="serve VERSION beside CURRENT: a share of request keys (canary) or "
                                            "scoring every request without answering (shadow)")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--mode", choices=CANARY_MODES, default="canary")
    p.add_argument("--share", type=float, default=0.1, help="canary mode: share of request keys it answers, (0, 1]")
    p.add_argument("--replace", action="store_true", help="abort a running canary and start this one instead")
    p.add_argument("--note", default="", help="why (shown by `canary`)")
    p = sub.add_parser("promote", help="make the running canary CURRENT and end the canary")
    p.add_argument("name")
    p.add_argument("version", nargs="?", help="refuse unless this is the running canary")
    p = sub.add_parser("abort-canary", help="end the running canary without promoting it (rollback; CURRENT stays)")
    p.add_argument("name")
    p.add_argument("version", nargs="?", help="refuse unless this is the running canary")
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
                try:
                    canary = reg.canary(args.name)
                except RegistryError as e:
                    canary, failed = None, True
                    print(f"error: {e}", file=sys.stderr)
                try:
                    pins = reg.pins(args.name)
                except RegistryError as e:
                    pins, failed = {}, True
                    print(f"error: {e}", file=sys.stderr)
                for v in reg.versions(args.name):
                    mark = "*" if v == current else " "
                    try:
                        m = reg.manifest(args.name, v)
                    except RegistryError as e:
                        failed = True
                        print(f"{mark} {v}\tunreadable ({e.reason}): {e}")
                        continue
                    pinned = "\tpinned" if v in pins else ""
                    role = f"\t{canary.mode} ({canary.share:g})" if canary is not None and v == canary.version else ""
                    print(f"{mark} {v}\tcreated={m.created}\tparent={m.parent}\tmetrics={json.dumps(m.metrics)}"
                          f"{pinned}{role}")
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
        elif args.cmd == "gc":
            print_gc(reg.gc(args.name, args.keep_last, min_age_s=args.min_age_s, rollback_depth=args.rollback_depth,
                            lease_ttl_s=args.lease_ttl_s, dry_run=args.dry_run))
        elif args.cmd == "pin":
            reg.pin(args.name, args.version, args.note)
            print(f"{args.name}/{args.version}: pinned (gc keeps it until `unpin`)")
        elif args.cmd == "unpin":
            if not reg.unpin(args.name, args.version):
                print(f"{args.name}/{args.version} was not pinned", file=sys.stderr)
                return 1
            print(f"{args.name}/{args.version}: unpinned")
        elif args.cmd == "canary":
            state = reg.canary(args.name)
            if state is None:
                print(f"{args.name}: no canary (CURRENT {reg.current_version(args.name)})")
            else:
                print(json.dumps(state.to_json(), indent=2))
        elif args.cmd == "start-canary":
            state = reg.start_canary(args.name, args.version, args.mode, args.share, replace=args.replace,
                                     note=args.note)
            print(f"{args.name}/{state.version}: {state.mode} started beside CURRENT {state.champion}"
                  + (f", share {state.share:g}" if state.mode == "canary" else ""))
        elif args.cmd == "promote":
            v = reg.promote(args.name, args.version)
            print(f"{args.name}: canary {v} promoted, CURRENT -> {v}")
        elif args.cmd == "abort-canary":
            v = reg.abort_canary(args.name, args.version)
            print(f"{args.name}: canary {v} aborted, CURRENT stays {reg.current_version(args.name)}")
    except (RegistryError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
