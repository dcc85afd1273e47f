"""Hostile traffic against the whole suite: status codes by service and RPC, memory growth.

    python -m bench.fuzz [--var DIR] [--requests 3000] [--concurrency 16] [--seed 0]

Brings the suite up the way `make up` does (trainer + every service on embedded defaults;
a fresh --var bootstraps every domain from the bundled real data first; an existing one is
reused), then sends each service at least --requests hostile requests, concurrently so that
bad requests share micro-batches with good ones:

- its domain API with every field pushed out of shape: huge, empty and non-UTF-8-looking
  strings, Unicode line separators, NaN / inf / 1e39 / negative numbers, out-of-range enum
  values and hours, tens of thousands of map keys or list entries, unknown ids;
- outcomes for guessed, empty, foreign and oversized prediction ids, bad times and units;
- KServe V2 ModelInfer built from the model's own metadata, then mutated: out-of-range
  indices, wrong datatypes and shapes, raw contents of the wrong length, duplicate and
  unknown inputs, unknown models and versions;
- the recommender's UpsertItems with oversized, separator-laden and malformed items;
- calls to thousands of method names that do not exist, and undecodable request bytes.

Interleaved with the hostile calls, well-formed requests check that the service still
answers them (their failures are counted separately: a bad request may fail only itself).
Writes bench/results/fuzz.json: status-code counts per service and RPC as the client saw them
and as each service counted them (storefront_requests_total), INTERNAL / UNKNOWN counts
(target 0 on both sides; grpc's asyncio client turns the status of a client stream the server
ended early into INTERNAL "Internal error from Core", grpc/grpc#36066: those are listed apart), good requests that failed (target 0), and each process's resident memory
before and after (growth in MiB). Exit status 1 when a target is missed or a process died.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc
import numpy as np

from bench.machine import machine_info
from protos.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.pricing.v1 import pricing_pb2, pricing_pb2_grpc
from protos.recommender.v1 import recommender_pb2, recommender_pb2_grpc

BAD_CODES = ("INTERNAL", "UNKNOWN")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
# Values that break naive validation: non-finite, beyond float32, negative, huge, tiny.
NASTY_FLOATS = [math.nan, math.inf, -math.inf, 1e39, -1e39, 1e308, -1.0, 0.0, 5e-324, 3.5e38, 1e15, -0.0]
NASTY_UINTS = [0, 1, 23, 24, 25, 255, 1000, 2**31 - 1, 2**32 - 1]
SEPARATORS = ["\u2028", "\u2029", "\u0085", "\n", "\r", "\x00", "\ufeff", "\udcff".encode("utf-8", "surrogatepass")
              .decode("utf-8", "replace")]


def nasty_string(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return ""
    if kind == 1:
        return "x" * rng.choice([129, 1000, 10_000, 200_000])
    if kind == 2:
        return "x" + rng.choice(SEPARATORS) + " 5 " + rng.choice(SEPARATORS) + "y"
    if kind == 3:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 64)))
    if kind == 4:
        return "../../etc/passwd"
    if kind == 5:
        return '{"item_id": "evil"}\n{"broken'
    if kind == 6:
        return "%s%n%x" * 20
    return f"id-{rng.getrandbits(64):x}"


def guessed_prediction_id(rng: random.Random, real: list[str]) -> str:
    """Ids a caller could guess: a real one with its tail changed, counters, random hex."""
    kind = rng.randrange(4)
    if kind == 0 and real:
        pid = rng.choice(real)
        return pid[:-1] + ("0" if pid[-1] != "0" else "1")
    if kind == 1 and real:
        pid = rng.choice(real)
        head = pid.rsplit("-", 1)[0]
        return f"{head}-{rng.randrange(1, 10_000):x}"
    if kind == 2:
        return f"{rng.getrandbits(64):016x}-{rng.randrange(1, 100):x}"
    return nasty_string(rng)


class Tally:
    def __init__(self) -> None:
        self.codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.good_failed: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.examples: dict[str, str] = {}
        self.hostile = 0

    def add(self, rpc: str, code: str, detail: str = "") -> None:
        if code == "INTERNAL" and detail == CLIENT_STREAM_ARTIFACT and rpc == "StreamOutcomes":
            code = "INTERNAL (client-side, grpc/grpc#36066)"
        self.codes[rpc][code] += 1
        self.hostile += 1
        if code in BAD_CODES and f"{rpc}:{code}" not in self.examples:
            self.examples[f"{rpc}:{code}"] = detail[:300]

    def good(self, rpc: str, code: str, detail: str = "") -> None:
        if code != "OK":
            self.good_failed[rpc][code] += 1
            self.examples.setdefault(f"good {rpc}:{code}", detail[:300])


async def call(tally: Tally, rpc: str, coro: Awaitable[Any], good: bool = False) -> Any:
    try:
        resp = await coro
    except grpc.aio.AioRpcError as e:
        (tally.good if good else tally.add)(rpc, e.code().name, e.details() or "")
        return None
    (tally.good if good else tally.add)(rpc, "OK")
    return resp


# ---- per-service hostile request makers: each returns (rpc name, awaitable) ----

def fraud_makers(stub: fraud_pb2_grpc.FraudStub, real_ids: list[str], feature_names: list[str]):
    def score(rng: random.Random):
        req = fraud_pb2.ScoreTransactionRequest(transaction_id=nasty_string(rng) if rng.random() < 0.3 else "tx",
                                                amount=rng.choice(NASTY_FLOATS + [12.5]),
                                                timestamp=rng.choice(NASTY_FLOATS + [0.0]))
        kind = rng.randrange(5)
        if kind == 0:  # every feature, one of them nasty
            for name in feature_names:
                req.features[name] = rng.gauss(0, 1)
            req.features[rng.choice(feature_names)] = rng.choice(NASTY_FLOATS)
        elif kind == 1:  # thousands of unknown features
            for i in range(rng.choice([10, 1000, 10_000])):
                req.features[f"unknown_{i}_{'z' * rng.randrange(0, 50)}"] = 1.0
        elif kind == 2:
            req.features[nasty_string(rng)] = rng.choice(NASTY_FLOATS)
        elif kind == 3:
            req.customer_ref = nasty_string(rng)
            req.card_ref = nasty_string(rng)
        return "ScoreTransaction", stub.ScoreTransaction(req, timeout=10)

    def outcome(rng: random.Random):
        o = fraud_pb2.FraudOutcome(prediction_id=guessed_prediction_id(rng, real_ids), is_fraud=rng.random() < 0.5,
                                   occurred_at=rng.choice(NASTY_FLOATS + [0.0]), source=nasty_string(rng))
        return "ReportOutcome", stub.ReportOutcome(o, timeout=10)

    def stream(rng: random.Random):
        items = [fraud_pb2.FraudOutcome(prediction_id=guessed_prediction_id(rng, real_ids),
                                        occurred_at=rng.choice(NASTY_FLOATS)) for _ in range(rng.randrange(1, 50))]
        return "StreamOutcomes", stub.StreamOutcomes(iter(items), timeout=10)

    return [score, score, score, outcome, stream]


def recommender_makers(stub: recommender_pb2_grpc.RecommenderStub, real_ids: list[str], item_ids: list[str]):
    def recommend(rng: random.Random):
        req = recommender_pb2.RecommendRequest(user_id=nasty_string(rng) if rng.random() < 0.5 else "u1",
                                               k=rng.choice(NASTY_UINTS), exclude_purchased=rng.random() < 0.5)
        if rng.random() < 0.5:
            req.context.page = nasty_string(rng)
            req.context.device = nasty_string(rng)
            req.context.hour_of_day = rng.choice(NASTY_UINTS)
        if rng.random() < 0.4:
            n = rng.choice([1, 100, 10_000, 100_000])
            pool = item_ids or ["x"]
            req.candidate_item_ids.extend(rng.choice(pool) if rng.random() < 0.5 else nasty_string(rng)[:64]
                                          for _ in range(n))
        return "Recommend", stub.Recommend(req, timeout=10)

    def outcome(rng: random.Random):
        o = recommender_pb2.RecommendationOutcome(prediction_id=guessed_prediction_id(rng, real_ids),
                                                  item_id=rng.choice(item_ids) if item_ids and rng.random() < 0.5
                                                  else nasty_string(rng),
                                                  event=rng.choice([0, 1, 2, 3, 4, 99, 2**31 - 1]),
                                                  occurred_at=rng.choice(NASTY_FLOATS + [0.0]))
        return "ReportOutcome", stub.ReportOutcome(o, timeout=10)

    def upsert(rng: random.Random):
        req = recommender_pb2.UpsertItemsRequest()
        for _ in range(rng.choice([0, 1, 5, 100, 5000])):
            req.items.add(item_id=f"fuzz-{rng.getrandbits(32):x}" if rng.random() < 0.7 else nasty_string(rng),
                          title=nasty_string(rng), category=nasty_string(rng),
                          price=rng.choice(NASTY_FLOATS + [9.99]))
        return "UpsertItems", stub.UpsertItems(req, timeout=10)

    return [recommend, recommend, recommend, outcome, upsert]


def pricing_makers(stub: pricing_pb2_grpc.PricingStub, real_ids: list[str], products: list[str]):
    def quote(rng: random.Random):
        req = pricing_pb2.QuoteRequest(product_id=rng.choice(products) if products and rng.random() < 0.5
                                       else nasty_string(rng),
                                       reference_price=rng.choice(NASTY_FLOATS + [100.0]),
                                       objective=rng.choice([0, 1, 2, 7, 2**31 - 1]))
        if rng.random() < 0.5:
            req.unit_cost = rng.choice(NASTY_FLOATS + [50.0])
        req.guardrails.min_price = rng.choice(NASTY_FLOATS + [80.0])
        req.guardrails.max_price = rng.choice(NASTY_FLOATS + [120.0])
        if rng.random() < 0.5:
            req.guardrails.max_change_pct = rng.choice(NASTY_FLOATS + [10.0])
        req.context.segment = nasty_string(rng)
        if rng.random() < 0.5:
            req.context.hour_of_day = rng.choice(NASTY_UINTS)
        return "Quote", stub.Quote(req, timeout=10)

    def outcome(rng: random.Random):
        o = pricing_pb2.PricingOutcome(prediction_id=guessed_prediction_id(rng, real_ids), sold=rng.random() < 0.5,
                                       units=rng.choice(NASTY_UINTS), price=rng.choice(NASTY_FLOATS),
                                       occurred_at=rng.choice(NASTY_FLOATS + [0.0]))
        return "ReportOutcome", stub.ReportOutcome(o, timeout=10)

    return [quote, quote, quote, outcome]


def v2_makers(stub: v2_grpc.GRPCInferenceServiceStub, model: str, meta: v2.ModelMetadataResponse):
    np_of = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_,
             "UINT8": np.uint8, "FP16": np.float16, "INT8": np.int8, "INT16": np.int16}

    def tensor(spec, rows: int, rng: random.Random):
        shape = [rows if i == 0 and d == -1 else (d if d != -1 else rng.choice([1, 2, 8])) for i, d in
                 enumerate(spec.shape)]
        dtype = np_of.get(spec.datatype, np.float32)
        if np.issubdtype(dtype, np.integer):
            x = np.asarray(rng.choice([0, 1, -1, 10**9, -(10**9), 2**31 - 1, np.iinfo(dtype).max, np.iinfo(dtype).min]),
                           dtype=dtype)
            x = np.full(shape, x, dtype=dtype)
        else:
            with np.errstate(over="ignore"):  # 1e39 as float32 is inf: that is the point
                x = np.full(shape, rng.choice(NASTY_FLOATS + [0.5]), dtype=np.float64).astype(dtype)
        return shape, x

    def infer(rng: random.Random):
        req = v2.ModelInferRequest(model_name=model)
        rows = rng.choice([1, 1, 2, 64, 5000])
        kind = rng.randrange(8)
        for spec in meta.inputs:
            shape, x = tensor(spec, rows, rng)
            t = req.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
            req.raw_input_contents.append(x.tobytes())
        if kind == 0 and req.inputs:  # wrong datatype
            req.inputs[0].datatype = rng.choice(["FP64", "INT8", "BYTES", "nonsense", ""])
        elif kind == 1 and req.inputs:  # wrong length of raw contents
            req.raw_input_contents[0] = req.raw_input_contents[0][: max(0, len(req.raw_input_contents[0]) - 3)]
        elif kind == 2 and req.inputs:  # wrong shape
            req.inputs[0].shape[:] = rng.choice([[], [0], [-1], [2**40], [1, 2, 3, 4, 5], [1, 0]])
        elif kind == 3 and req.inputs:  # duplicate / unknown input
            dup = req.inputs.add()
            dup.CopyFrom(req.inputs[0])
            if rng.random() < 0.5:
                dup.name = nasty_string(rng)
            req.raw_input_contents.append(req.raw_input_contents[0])
        elif kind == 4:
            req.model_name = rng.choice(["", "nope", nasty_string(rng)])
        elif kind == 5:
            req.model_version = nasty_string(rng)
        elif kind == 6:  # a requested output that does not exist
            req.outputs.add(name=nasty_string(rng))
        return "ModelInfer", stub.ModelInfer(req, timeout=10)

    return [infer, infer]


def junk_makers(channel: grpc.aio.Channel, real_methods: list[str]):
    def unknown_method(rng: random.Random):
        name = f"/fuzz.v{rng.getrandbits(32):x}.Service/Method{rng.getrandbits(32):x}"
        fn = channel.unary_unary(name, request_serializer=None, response_deserializer=None)
        return "unknown method", fn(b"\x08\x01", timeout=10)

    def undecodable(rng: random.Random):
        fn = channel.unary_unary(rng.choice(real_methods), request_serializer=None, response_deserializer=None)
        body = rng.choice([b"\xff" * 7, b"\x0a\xff\xff\xff\xff\x0f", bytes(rng.getrandbits(8) for _ in range(64))])
        return "undecodable request", fn(body, timeout=10)

    return [unknown_method, undecodable]


# ---- the run ----

# grpc's asyncio client reports INTERNAL "Internal error from Core" instead of the server's status
# when the server ends a client stream (an invalid outcome) while the client is still writing
# (grpc/grpc#36066): the server's own count of that call's code is what the service answered.
CLIENT_STREAM_ARTIFACT = "Internal error from Core"


def server_codes(metrics_port: int) -> dict[str, dict[str, int]]:
    """storefront_requests_total by method and code, as the service itself counted them."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for family in text_string_to_metric_families(text):
        if family.name != "storefront_requests":
            continue
        for sample in family.samples:
            if sample.name == "storefront_requests_total":
                out[sample.labels["method"]][sample.labels["code"]] = int(sample.value)
    return {m: dict(sorted(c.items())) for m, c in sorted(out.items())}


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def fuzz_service(name: str, address: str, requests: int, concurrency: int, seed: int,
                       good: Callable[[], Awaitable[Any]], makers: list, tally: Tally) -> None:
    rng = random.Random(seed)
    counter = iter(range(requests))

    async def worker(wid: int) -> None:
        wrng = random.Random(rng.getrandbits(64) + wid)
        for i in counter:
            rpc, coro = wrng.choice(makers)(wrng)
            await call(tally, rpc, coro)
            if i % 10 == 0:  # a well-formed request among the hostile ones must still succeed
                await call(tally, "good request", good(), good=True)

    started = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    print(f"  {name}: {requests} hostile requests in {time.monotonic() - started:.1f} s", flush=True)


async def run(ports: dict[str, int], requests: int, concurrency: int, seed: int) -> dict[str, Tally]:
    from ops.scenario_quote import quotes as make_quotes
    from ops.storefront_data import fraud_requests

    tallies = {name: Tally() for name in ports}
    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
                for name, port in ports.items()}
    try:
        # What a well-formed caller sends: real rows, then their prediction ids to guess from.
        fraud = fraud_pb2_grpc.FraudStub(channels["fraud"])
        rec = recommender_pb2_grpc.RecommenderStub(channels["recommender"])
        pricing = pricing_pb2_grpc.PricingStub(channels["pricing"])
        good_fraud = fraud_requests(1)[0][0]
        feature_names = [k for k in good_fraud.features]
        _, _, quotes = make_quotes(50, 500)
        good_quote = quotes[0]
        products = sorted({q.product_id for q in quotes})
        good_rec = recommender_pb2.RecommendRequest(user_id="fuzz-user", k=10)
        ids = {"fraud": [], "recommender": [], "pricing": []}
        item_ids: list[str] = []
        for _ in range(20):
            ids["fraud"].append((await fraud.ScoreTransaction(good_fraud, timeout=10)).prediction_id)
            r = await rec.Recommend(good_rec, timeout=10)
            ids["recommender"].append(r.prediction_id)
            item_ids += [i.item_id for i in r.items]
            ids["pricing"].append((await pricing.Quote(good_quote, timeout=10)).prediction_id)
        goods = {"fraud": lambda: fraud.ScoreTransaction(good_fraud, timeout=10),
                 "recommender": lambda: rec.Recommend(good_rec, timeout=10),
                 "pricing": lambda: pricing.Quote(good_quote, timeout=10)}
        domain_makers = {"fraud": fraud_makers(fraud, ids["fraud"], feature_names),
                         "recommender": recommender_makers(rec, ids["recommender"], sorted(set(item_ids))),
                         "pricing": pricing_makers(pricing, ids["pricing"], products)}
        methods = {"fraud": "/storefront.fraud.v1.Fraud/ScoreTransaction",
                   "recommender": "/storefront.recommender.v1.Recommender/Recommend",
                   "pricing": "/storefront.pricing.v1.Pricing/Quote"}
        for name in ports:
            v2stub = v2_grpc.GRPCInferenceServiceStub(channels[name])
            model = name  # every service serves its model under its domain's name (the default model_name)
            try:
                meta = await v2stub.ModelMetadata(v2.ModelMetadataRequest(name=model), timeout=10)
                v2_calls = v2_makers(v2stub, model, meta)
            except grpc.aio.AioRpcError as e:  # a service without KServe V2 (the recommender)
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                v2_calls = []
            makers = [*domain_makers[name], *v2_calls,
                      *junk_makers(channels[name], [methods[name], "/inference.GRPCInferenceService/ModelInfer"])]
            await fuzz_service(name, f"127.0.0.1:{ports[name]}", requests, concurrency, seed, goods[name], makers,
                               tallies[name])
    finally:
        for ch in channels.values():
            await ch.close()
    return tallies


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--var", default="", help="suite folder (default: a fresh temporary one, bootstrapped)")
    ap.add_argument("--requests", type=int, default=3000, help="hostile requests per service")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port-offset", type=int, default=400)
    ap.add_argument("--out", default="bench/results/fuzz.json")
    args = ap.parse_args(argv)
    from ops.procs import wait_serving
    from ops.up import SERVICES, TRAINER, Suite

    tmp = None if args.var else tempfile.TemporaryDirectory(prefix="fuzz-")
    var = Path(args.var or tmp.name)
    log_path = Path(args.out).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    suite = Suite(var, "127.0.0.1", args.port_offset)
    ports = {s.name: suite.port(s) for s in SERVICES}
    report: dict[str, Any] = {"requests_per_service": args.requests, "concurrency": args.concurrency,
                              "seed": args.seed, "services": {}}
    failed = False
    with open(log_path, "w") as log:
        try:
            print(f"starting the suite in {var} (a fresh folder bootstraps every domain first; "
                  f"process output in {log_path})", flush=True)
            suite.start(TRAINER, out=log)
            for s in SERVICES:
                suite.start(s, out=log)
            for c in [TRAINER, *SERVICES]:
                wait_serving(f"127.0.0.1:{suite.port(c)}", timeout=1800)
            pids = {name: p.pid for name, p in suite.procs.items()}
            before = {name: rss_mib(pid) for name, pid in pids.items()}
            tallies = asyncio.run(run(ports, args.requests, args.concurrency, args.seed))
            after = {name: rss_mib(pid) for name, pid in pids.items()}
            counted = {s.name: server_codes(suite.port(s) + 1000) for s in SERVICES}
            for c in [TRAINER, *SERVICES]:  # still healthy after the storm
                wait_serving(f"127.0.0.1:{suite.port(c)}", timeout=30)
            for name, t in tallies.items():
                bad = sum(t.codes[rpc][code] for rpc in t.codes for code in BAD_CODES)
                server_bad = sum(c.get(code, 0) for c in counted[name].values() for code in BAD_CODES)
                good_failed = sum(sum(c.values()) for c in t.good_failed.values())
                failed |= bad > 0 or server_bad > 0 or good_failed > 0
                report["services"][name] = {
                    "hostile_requests": t.hostile,
                    "codes_by_rpc": {rpc: dict(sorted(c.items())) for rpc, c in sorted(t.codes.items())},
                    "internal_or_unknown": bad,
                    "server_counted_codes": counted[name],
                    "server_internal_or_unknown": server_bad,
                    "good_requests_failed": {rpc: dict(c) for rpc, c in t.good_failed.items()},
                    "examples": t.examples,
                    "rss_mib_before": before.get(name), "rss_mib_after": after.get(name),
                    "rss_growth_mib": None if before.get(name) is None or after.get(name) is None
                    else round(after[name] - before[name], 1),
                }
            report["trainer_rss_mib"] = {"before": before.get("trainer"), "after": after.get("trainer")}
        finally:
            rc = suite.stop()
            failed |= rc != 0
            if tmp is not None:
                tmp.cleanup()
    report["passed"] = not failed
    report["machine"] = machine_info()
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("\n| service | hostile requests | INTERNAL/UNKNOWN seen by the client | counted by the server | "
          "good requests failed | RSS before -> after (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, r in report["services"].items():
        print(f"| {name} | {r['hostile_requests']} | {r['internal_or_unknown']} | {r['server_internal_or_unknown']} | "
              f"{sum(sum(c.values()) for c in r['good_requests_failed'].values())} | "
              f"{r['rss_mib_before']} -> {r['rss_mib_after']} ({r['rss_growth_mib']:+}) |")
    print("\nStatus codes by RPC:\n")
    for name, r in report["services"].items():
        for rpc, codes in r["codes_by_rpc"].items():
            print(f"- {name} {rpc}: " + ", ".join(f"{k} {v}" for k, v in codes.items()))
    print(f"\nwrote {args.out}: {'passed' if not failed else 'FAILED'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
