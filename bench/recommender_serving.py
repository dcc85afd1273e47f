"""Recommend latency and throughput over a 100k-item catalog, batched vs unbatched, same run.

    python -m bench.recommender_serving [--registry-dir var/registry] [--catalog-size 100000]
                                        [--duration 8] [--warmup 2] [--rounds 2]

Needs a registry with the bootstrapped `recommender` and `text-encoder` models
(`python -m trainer bootstrap`). Starts two recommender service processes on that registry,
each with its own catalog journal: one with the micro-batcher (max_batch_size 64) and one
without (max_batch_size 1). Both get the version's real Ta Feng catalog, grown to
--catalog-size through UpsertItems with synthetic-but-realistic items: each copies the
title and category of a random real Ta Feng product (Ta Feng has no titles; the catalog's
title is its product subclass) with a price drawn around that product's real unit price;
their ids are new to the model, so their vectors come from the text/category/price path,
like any new item. Then, alternating the two services round by round, a closed loop
(ops/loadgen.py) of Recommend requests from the load-test scenario (real Ta Feng customers,
storefront page/device/hour mix, k = 10, a quarter with exclude_purchased; no outcomes
reported, so only Recommend runs) at each concurrency. Prints a table and writes
bench/results/recommender_serving.json (medians over rounds, every round's figures, the
machine). Target (issue 5): batching >= 3x throughput at c=32 with p99 <= 10 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.machine import machine_info, process_cpu_s
from ops.loadgen import generate, summary
from ops.procs import Proc, free_port, wait_serving
from ops.scenario_recommend import scenario
from protos.recommender.v1 import recommender_pb2 as pb
from protos.recommender.v1 import recommender_pb2_grpc as pb_grpc

CONFIGS = {"batched": 64, "unbatched": 1}  # max_batch_size
UPSERT_CHUNK = 1_000  # the service's default upsert_max_items


def synthetic_items(catalog_jsonl: Path, total: int, seed: int = 0) -> list[pb.Item]:
    """Items that bring the version's catalog to `total`: title and category of a random real
    product, price around its real price (x0.8..1.25)."""
    real = [json.loads(line) for line in catalog_jsonl.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    out = []
    for n in range(max(0, total - len(real))):
        t = rng.choice(real)
        out.append(pb.Item(item_id=f"syn-{n:06d}", title=t["title"], category=t.get("category", ""),
                           price=round(float(t.get("price", 0.0)) * rng.uniform(0.8, 1.25), 2)))
    return out


async def upsert_all(address: str, items: list[pb.Item]) -> dict:
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        started = time.perf_counter()
        size = 0
        for i in range(0, len(items), UPSERT_CHUNK):
            resp = await stub.UpsertItems(pb.UpsertItemsRequest(items=items[i:i + UPSERT_CHUNK]), timeout=600)
            size = resp.catalog_size
        took = time.perf_counter() - started
    return {"items": len(items), "seconds": round(took, 2), "items_per_s": round(len(items) / took, 1) if took else None,
            "catalog_size": size}


async def measure(address: str, pid: int, concurrency: int, duration: float, warmup: float, scenario_args) -> dict:
    """Closed loop (ops/loadgen.py) on Recommend; also the server's CPU per request over the
    measured window (robust to a busy machine, unlike req/s: what one request costs the server)."""
    async with grpc.aio.insecure_channel(address) as ch:
        call, drain = await scenario(ch, scenario_args)
        await call(0)

        async def server_cpu_s(t_start: float, t_end: float) -> float:
            cpu_a = process_cpu_s(pid)
            await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
            return process_cpu_s(pid) - cpu_a

        rec = await generate(call, duration=duration, warmup=warmup, concurrency=concurrency, window=server_cpu_s)
        await drain()
        out = summary(rec)
        cpu = rec.window_result
        out["server_cpu_us_per_req"] = round(cpu / out["ok"] * 1e6, 1) if out["ok"] else None
        out["server_cpu_cores"] = round(cpu / duration, 2)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry-dir", default="var/registry")
    ap.add_argument("--workdir", default="var/trainer", help="trainer workdir for the bootstrap when the registry has none")
    ap.add_argument("--catalog-size", type=int, default=100_000)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--customers", type=int, default=5000, help="distinct real customers the requests cycle through")
    ap.add_argument("--intra-op-threads", type=int, default=1, help="ONNX Runtime threads per run (both configs)")
    ap.add_argument("--batch-workers", type=int, default=1, help="session runs in flight at once (both configs)")
    ap.add_argument("--max-queue-delay-us", type=int, default=0,
                    help="batched config: how long a short queue waits for more rows (unbatched never waits)")
    ap.add_argument("--out", default="bench/results/recommender_serving.json")
    args = ap.parse_args(argv)
    from shared.registry import ModelRegistry

    registry = ModelRegistry(args.registry_dir)
    version = registry.current_version("recommender")
    if version is None or registry.current_version("text-encoder") is None:
        # what `make up` would do on a first start (about 2 minutes, progress bar on stderr)
        from trainer.bootstrap import bootstrap

        print(f"{args.registry_dir} has no recommender yet: bootstrapping it from Ta Feng into {args.workdir}",
              file=sys.stderr)
        bootstrap(registry, Path(args.workdir), ["recommender"])
        version = registry.current_version("recommender")
    levels = [int(c) for c in args.concurrency.split(",")]
    items = synthetic_items(registry.version_dir("recommender", version) / "catalog.jsonl", args.catalog_size)
    scenario_args = argparse.Namespace(rows=args.customers, seed=0, k=10, outcome_rate=0.0, timeout=10.0)
    results, upserts = [], {}
    with tempfile.TemporaryDirectory(prefix="reco-serving-") as tmp:
        procs, addresses = {}, {}
        try:
            for name, max_batch in CONFIGS.items():
                port = free_port()
                procs[name] = Proc(name, ["-m", "services.recommender.main", "--port", str(port), "--metrics-port", "0",
                                          "--registry-dir", args.registry_dir, "--trainer-target", "",
                                          "--catalog-path", f"{tmp}/{name}/items.jsonl", "--max-batch-size", str(max_batch),
                                          "--intra-op-threads", str(args.intra_op_threads),
                                          "--batch-workers", str(args.batch_workers),
                                          "--max-queue-delay-us", str(args.max_queue_delay_us),
                                          "--log-format", "text", "--log-level", "WARNING"],
                                   Path(tmp) / f"{name}.log").start()
                addresses[name] = f"127.0.0.1:{port}"
            for name, proc in procs.items():
                wait_serving(addresses[name], 600, proc)
                upserts[name] = asyncio.run(upsert_all(addresses[name], items))
                print(f"[reco-serving] {name}: catalog {upserts[name]['catalog_size']} items "
                      f"({upserts[name]['items']} upserted in {upserts[name]['seconds']} s)", file=sys.stderr)
            for rnd in range(args.rounds):
                for c in levels:
                    for name in (CONFIGS if rnd % 2 == 0 else reversed(CONFIGS)):
                        r = asyncio.run(measure(addresses[name], procs[name].pid, c, args.duration, args.warmup,
                                                scenario_args))
                        r.update(config=name, max_batch_size=CONFIGS[name], concurrency=c, round=rnd + 1)
                        print(f"[reco-serving] round {rnd + 1} {name} c={c}: {r['rps']} req/s p50 {r['p50_ms']} "
                              f"p99 {r['p99_ms']} server CPU {r['server_cpu_us_per_req']} us/req "
                              f"errors {r['errors'] or 0}", file=sys.stderr)
                        results.append(r)
        finally:
            for proc in procs.values():
                proc.stop()

    def med(name, c, key):
        vals = [r[key] for r in results if r["config"] == name and r["concurrency"] == c and r[key] is not None]
        return float(np.median(vals)) if vals else None

    table = {name: {c: {k: med(name, c, k) for k in ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req")}
                    for c in levels} for name in CONFIGS}
    top = max(levels)
    speedup = (table["batched"][top]["rps"] / table["unbatched"][top]["rps"]) if table["unbatched"][top]["rps"] else None
    print(f"Recommend over a {upserts['batched']['catalog_size']:,}-item catalog (medians of {args.rounds} rounds)")
    print("| config | c | req/s | p50 ms | p99 ms | server CPU us/req |")
    print("|---|---|---|---|---|---|")
    for name in CONFIGS:
        for c in levels:
            t = table[name][c]
            print(f"| {name} (max batch {CONFIGS[name]}) | {c} | {t['rps']:,.0f} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} "
                  f"| {t['server_cpu_us_per_req']:,.0f} |")
    p99_top = table["batched"][top]["p99_ms"]
    cpu_ratio = table["unbatched"][top]["server_cpu_us_per_req"] / table["batched"][top]["server_cpu_us_per_req"]
    print(f"\nbatched / unbatched throughput at c={top}: {speedup:.2f}x (target >= 3x); batched p99 {p99_top:.2f} ms "
          f"(target <= 10 ms); server CPU per request unbatched / batched at c={top}: {cpu_ratio:.2f}x")
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": "python -m bench.recommender_serving "
           + " ".join(argv if argv is not None else sys.argv[1:]), "model_version": version,
           "catalog_size": upserts["batched"]["catalog_size"], "upserts": upserts,
           "medians": {n: {str(c): v for c, v in t.items()} for n, t in table.items()},
           "speedup_at_max_concurrency": round(speedup, 3) if speedup else None,
           "server_cpu_ratio_at_max_concurrency": round(cpu_ratio, 3), "results": results,
           "machine": machine_info()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
