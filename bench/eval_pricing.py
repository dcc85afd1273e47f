"""Pricing against the best fixed price per product, on a market calibrated on Ta Feng (`make eval-pricing`).

    python -m bench.eval_pricing [--arrivals 60000] [--rate 200] [--products 40] [--quick]

One run, three policies facing the same customers (bench.pricing_sim: same arrivals, same
uniform draw per customer, so differences are the policies'):
- service: the LIVE pricing service and trainer as processes (ops.procs): the trainer
  bootstraps the model from Ta Feng Nov-Dec 2000, the service quotes every arrival over gRPC
  (Quote), the simulated customer buys or not at the quoted price, and the outcome goes back
  through ReportOutcome after a random delay (exponential, mean `--delay-s`); the trainer
  joins it to the served quote, learns, gates, publishes, and the service hot-reloads;
- reference: the reference price, unchanged;
- epsilon-greedy: per product, on the service's candidate grid (ε = 0.1), learning each
  outcome at once;
- bootstrap-frozen (for reference, not a baseline): the greedy price of the bootstrap version
  (v1, never updated, no exploration), to show what learning through the loop adds to what the
  model knew from Ta Feng.
Regret = the oracle's expected value minus the policy's, per arrival, summed (expected values
under the true demand curves, given the arrival's segment and units; the realized values are
reported too). The oracle quotes each product's best fixed price (pricing_sim.Market.oracle_prices).
Every quote is checked against the guardrails the request carried (violations counted).

Prints a markdown table; writes bench/results/pricing.json and bench/results/pricing_regret.png
(--quick: var/eval-pricing-quick/).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.machine import machine_info
from bench.pricing_sim import Arrivals, EpsilonGreedy, Market, arrivals, calibrate

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_DIR = Path(__file__).resolve().parent.parent / "var" / "eval-pricing-quick"
POLICIES = ("service", "reference", "epsilon_greedy", "bootstrap_frozen")


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class PricingLoop:
    """The trainer (learning pricing only) and the pricing service, each its own process."""

    def __init__(self, root: Path, trainer_args: list[str], service_args: list[str]) -> None:
        from ops.procs import Proc, free_port

        self.root = Path(root)
        self.registry, self.workdir = self.root / "registry", self.root / "trainer"
        self.trainer_port, self.port = free_port(), free_port()
        self.trainer = Proc("trainer", ["-m", "trainer", "serve", "--domains", "pricing", "--port", str(self.trainer_port),
                                        "--metrics-port", "0", "--workdir", str(self.workdir), "--registry-dir",
                                        str(self.registry), "--log-format", "text", *trainer_args], self.root / "trainer.log")
        self.service = Proc("pricing", ["-m", "services.pricing.main", "--port", str(self.port), "--metrics-port", "0",
                                        "--registry-dir", str(self.registry), "--trainer-target",
                                        f"127.0.0.1:{self.trainer_port}", "--spool-dir", str(self.root / "spool"),
                                        "--log-format", "text", *service_args], self.root / "pricing.log")

    def start(self, timeout: float = 400.0) -> "PricingLoop":
        from ops.procs import wait_serving

        self.trainer.start()
        wait_serving(f"127.0.0.1:{self.trainer_port}", timeout, self.trainer)  # after its bootstrap
        self.service.start()
        wait_serving(f"127.0.0.1:{self.port}", timeout, self.service)
        return self

    def stop(self) -> tuple[int, int]:
        return self.service.stop(), self.trainer.stop()

    def decisions(self) -> list[dict]:
        path = self.workdir / "decisions" / "pricing.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def quote_request(market: Market, arr: Arrivals, i: int):
    from protos.pricing.v1 import pricing_pb2

    k = int(arr.product[i])
    ref = float(market.reference[k])
    req = pricing_pb2.QuoteRequest(
        product_id=market.products[k], reference_price=ref,
        guardrails=pricing_pb2.Guardrails(min_price=float(market.min_price[k]), max_price=float(market.max_price[k]),
                                          max_change_pct=market.max_change_pct),
        objective=pricing_pb2.OBJECTIVE_MARGIN if market.margin[k] else pricing_pb2.OBJECTIVE_REVENUE,
        context=pricing_pb2.Context(segment=market.segments[int(arr.segment[i])], hour_of_day=int(arr.hour[i])))
    if market.margin[k]:
        req.unit_cost = float(market.cost[k])
    return req


def guardrail_range(req) -> tuple[float, float]:
    """The range the proto promises, computed from the request as a client would."""
    g, ref = req.guardrails, req.reference_price
    return max(g.min_price, ref * (1 - g.max_change_pct / 100)), min(g.max_price, ref * (1 + g.max_change_pct / 100))


async def drive_service(address: str, market: Market, arr: Arrivals, rate: float, delay_s: float, in_flight: int,
                        seed: int) -> dict:
    """Quote every arrival at `rate` per second; report each outcome after its delay."""
    import grpc

    from protos.pricing.v1 import pricing_pb2, pricing_pb2_grpc

    n = len(arr)
    price = np.full(n, np.nan)
    exploratory = np.zeros(n, bool)
    versions = np.zeros(n, np.int64)
    violations: list[dict] = []
    errors: dict[str, int] = {}
    rng = np.random.default_rng(seed)
    delays = rng.exponential(delay_s, n)
    channel = grpc.aio.insecure_channel(address)
    stub = pricing_pb2_grpc.PricingStub(channel)
    slots = asyncio.Semaphore(in_flight)
    reports: set[asyncio.Task] = set()
    reported = [0]

    async def report(pid: str, sold: bool, units: int, p: float, delay: float) -> None:
        await asyncio.sleep(delay)
        out = pricing_pb2.PricingOutcome(prediction_id=pid, sold=sold, units=units if sold else 0,
                                         price=p if sold else 0.0, occurred_at=time.time())
        for attempt in range(5):
            try:
                await stub.ReportOutcome(out, timeout=10)
                reported[0] += 1
                return
            except grpc.aio.AioRpcError as e:
                errors[f"ReportOutcome {e.code().name}"] = errors.get(f"ReportOutcome {e.code().name}", 0) + 1
                await asyncio.sleep(0.2 * (attempt + 1))

    async def one(i: int) -> None:
        req = quote_request(market, arr, i)
        try:
            resp = await stub.Quote(req, timeout=10)
        except grpc.aio.AioRpcError as e:
            errors[f"Quote {e.code().name}"] = errors.get(f"Quote {e.code().name}", 0) + 1
            return
        finally:
            slots.release()
        lo, hi = guardrail_range(req)
        if not lo <= resp.price <= hi:
            violations.append({"arrival": i, "price": resp.price, "lo": lo, "hi": hi})
        price[i], exploratory[i], versions[i] = resp.price, resp.exploratory, int(resp.model.version)
        k = int(arr.product[i])
        sold = bool(arr.u[i] < market.conversion(np.array([k]), arr.segment[i:i + 1], np.array([resp.price]))[0])
        t = asyncio.ensure_future(report(resp.prediction_id, sold, int(arr.units[i]), resp.price, float(delays[i])))
        reports.add(t)
        t.add_done_callback(reports.discard)

    start = time.perf_counter()
    tasks: set[asyncio.Task] = set()
    for i in range(n):
        wait = start + i / rate - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        await slots.acquire()
        t = asyncio.ensure_future(one(i))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        if i and i % 5000 == 0:
            v = versions[:i][versions[:i] > 0]
            progress(f"service: {i}/{n} quotes, serving version {v[-1] if len(v) else '?'}, "
                     f"{reported[0]} outcomes reported, {len(violations)} violations, errors {errors or 0}")
    await asyncio.gather(*tasks)
    await asyncio.gather(*list(reports))
    await channel.close()
    return {"price": price, "exploratory": exploratory, "versions": versions, "violations": violations,
            "errors": errors, "seconds": time.perf_counter() - start, "reported": reported[0]}


def baselines(market: Market, arr: Arrivals, grid_size: int, epsilon: float, seed: int) -> dict[str, np.ndarray]:
    from services.pricing.adapter import candidate_grid

    grids = [candidate_grid(market.reference[k], market.lo[k], market.hi[k], grid_size)
             for k in range(len(market.products))]
    eps = EpsilonGreedy(grids, epsilon, seed)
    eps_price = np.empty(len(arr))
    for i in range(len(arr)):
        k = int(arr.product[i])
        arm = eps.choose(k)
        p = grids[k][arm]
        eps_price[i] = p
        sold = arr.u[i] < market.conversion(np.array([k]), arr.segment[i:i + 1], np.array([p]))[0]
        eps.learn(k, arm, float(market.unit_value(k, p) * arr.units[i] * sold))
    return {"reference": market.reference[arr.product].copy(), "epsilon_greedy": eps_price}


def frozen_greedy_prices(registry_dir: Path, market: Market, arr: Arrivals, grid_size: int) -> np.ndarray:
    """The greedy price of the registry's version 1 for every arrival (one ORT run per 4096)."""
    import onnxruntime as ort

    from services.pricing.adapter import PricingService, Vocab
    from shared.registry import ModelRegistry

    registry = ModelRegistry(registry_dir)
    vocab = Vocab(registry.manifest("pricing", "1").extra)
    session = ort.InferenceSession(str(registry.model_path("pricing", "1")), providers=["CPUExecutionProvider"])
    service = PricingService(None, exploration_share=0.0, grid_size=grid_size)
    prepared = [service.prepare(quote_request(market, arr, i), vocab) for i in range(len(arr))]
    out = np.empty(len(arr))
    for start in range(0, len(arr), 4096):
        chunk = prepared[start:start + 4096]
        feeds = {name: np.concatenate([p.feeds[name] for p in chunk]) for name in chunk[0].feeds}
        conversion = session.run(["conversion"], feeds)[0]
        for j, p in enumerate(chunk):
            grid, _, _, _, cost = p.extra
            unit = grid - cost if cost is not None else grid
            out[start + j] = grid[int(np.argmax(unit * conversion[j]))]
    return out


def values(market: Market, arr: Arrivals, price: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per arrival: expected value, realized value, realized revenue (nan prices count 0)."""
    ok = ~np.isnan(price)
    p = np.where(ok, price, market.reference[arr.product])
    conv = market.conversion(arr.product, arr.segment, p)
    unit = market.unit_value(arr.product, p)
    sold = arr.u < conv
    return (np.where(ok, unit * conv * arr.units, 0.0), np.where(ok, unit * arr.units * sold, 0.0),
            np.where(ok, p * arr.units * sold, 0.0))


def summarize(market: Market, arr: Arrivals, prices: dict[str, np.ndarray]) -> dict:
    oracle = market.oracle_prices()[arr.product]
    o_exp, o_real, o_rev = values(market, arr, oracle)
    out: dict = {}
    for objective, mask in (("revenue", ~market.margin[arr.product]), ("margin", market.margin[arr.product]),
                            ("all", np.ones(len(arr), bool))):
        if not mask.any():
            continue
        row = {"arrivals": int(mask.sum()), "oracle_expected_value": float(o_exp[mask].sum()),
               "oracle_realized_value": float(o_real[mask].sum()), "oracle_realized_revenue": float(o_rev[mask].sum())}
        for name, price in prices.items():
            e, r, rev = values(market, arr, price)
            regret = float(o_exp[mask].sum() - e[mask].sum())
            row[name] = {"expected_value": float(e[mask].sum()), "realized_value": float(r[mask].sum()),
                         "realized_revenue": float(rev[mask].sum()), "regret": regret,
                         "regret_pct_of_oracle": 100.0 * regret / float(o_exp[mask].sum()),
                         "realized_regret_pct_of_oracle": 100.0 * float(o_real[mask].sum() - r[mask].sum())
                         / float(o_real[mask].sum())}
        out[objective] = row
    return out


def plot(market: Market, arr: Arrivals, prices: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    oracle = market.oracle_prices()[arr.product]
    o_exp = values(market, arr, oracle)[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (objective, mask) in zip(axes, (("revenue", ~market.margin[arr.product]),
                                            ("margin", market.margin[arr.product]))):
        x = np.arange(1, int(mask.sum()) + 1)
        for name, price in prices.items():
            e = values(market, arr, price)[0]
            ax.plot(x, np.cumsum(o_exp[mask] - e[mask]) / np.cumsum(o_exp[mask]) * 100, label=name.replace("_", "-"),
                    ls="--" if name == "bootstrap_frozen" else "-")
        ax.axhline(10, color="gray", ls=":", lw=1)
        ax.set_title(f"{objective} products: cumulative regret")
        ax.set_xlabel("quotes")
        ax.set_ylabel("% of the oracle's expected value")
        ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arrivals", type=int, default=60_000)
    ap.add_argument("--rate", type=float, default=200.0, help="quotes per second sent to the service")
    ap.add_argument("--products", type=int, default=40)
    ap.add_argument("--max-change-pct", type=float, default=20.0)
    ap.add_argument("--delay-s", type=float, default=2.0, help="mean outcome delay, seconds")
    ap.add_argument("--in-flight", type=int, default=16, help="quotes outstanding at most")
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--exploration-share", type=float, default=0.2)
    ap.add_argument("--max-step-pct", type=float, default=10.0)
    ap.add_argument("--grid-size", type=int, default=21)
    ap.add_argument("--min-events", type=int, default=1500, help="trainer: labels per learning round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="12,000 arrivals; results under var/eval-pricing-quick/")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.arrivals = min(args.arrivals, 12_000)
    out_dir = args.out or (QUICK_DIR if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    progress("calibrating the market on Ta Feng Jan-Feb 2001")
    market = calibrate(args.products, args.max_change_pct, seed=args.seed)
    arr = arrivals(market, args.arrivals, seed=args.seed + 1)
    progress(f"{len(market.products)} products ({int(market.margin.sum())} quoted for margin), {len(arr)} arrivals")
    prices = baselines(market, arr, args.grid_size, args.epsilon, args.seed + 2)
    with tempfile.TemporaryDirectory(prefix="eval-pricing-") as tmp:
        loop = PricingLoop(Path(tmp), ["--min-events", str(args.min_events), "--max-interval-s", "20", "--epochs", "1",
                                       "--poll-interval-s", "0.5"],
                           ["--exploration-share", str(args.exploration_share), "--max-step-pct", str(args.max_step_pct),
                            "--grid-size", str(args.grid_size), "--exploration-seed", str(args.seed)])
        progress("starting the trainer (bootstraps pricing from Ta Feng) and the pricing service")
        t_start = time.time()
        loop.start()
        startup_s = time.time() - t_start
        progress(f"live loop serving after {startup_s:.0f} s; driving {len(arr)} quotes at {args.rate:g}/s")
        try:
            prices["bootstrap_frozen"] = frozen_greedy_prices(loop.registry, market, arr, args.grid_size)
            served = asyncio.run(drive_service(f"127.0.0.1:{loop.port}", market, arr, args.rate, args.delay_s,
                                               args.in_flight, args.seed + 3))
            time.sleep(3)
        finally:
            codes = loop.stop()
        decisions = loop.decisions()
        trainer_tail = loop.trainer.tail(3000) if codes[1] else ""
    prices = {"service": served["price"], "reference": prices["reference"],
              "epsilon_greedy": prices["epsilon_greedy"], "bootstrap_frozen": prices["bootstrap_frozen"]}
    summary = summarize(market, arr, prices)
    plot(market, arr, prices, out_dir / "pricing_regret.png")
    rounds = [d for d in decisions if d["decision"] != "bootstrap"]
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "market": {"products": market.products, "margin_products": int(market.margin.sum()),
                   "reference_price": market.reference.tolist(), "true_slope": market.slope.round(4).tolist(),
                   "oracle_price_over_reference": (market.oracle_prices() / market.reference).round(4).tolist()},
        "summary": summary,
        "guardrail_violations": len(served["violations"]), "violation_examples": served["violations"][:5],
        "errors": served["errors"], "quotes_answered": int((~np.isnan(served["price"])).sum()),
        "outcomes_reported": served["reported"],
        "exploratory_share": float(served["exploratory"][~np.isnan(served["price"])].mean()),
        "service_seconds": round(served["seconds"], 1), "startup_seconds": round(startup_s, 1),
        "versions_served": sorted({int(v) for v in served["versions"] if v > 0}),
        "rounds": {"published": sum(d["decision"] == "published" for d in rounds),
                   "refused": sum(d["decision"] == "refused" for d in rounds)},
        "exit_codes": {"service": codes[0], "trainer": codes[1]},
        "wall_seconds": round(time.time() - t0, 1),
    }
    if trainer_tail:
        result["trainer_log_tail"] = trainer_tail
    (out_dir / "pricing.json").write_text(json.dumps(result, indent=2))
    print("| products | policy | expected value | regret, % of oracle | realized value | realized revenue |")
    print("|---|---|---|---|---|---|")
    for objective in ("revenue", "margin", "all"):
        if objective not in summary:
            continue
        row = summary[objective]
        print(f"| {objective} | oracle (best fixed price) | {row['oracle_expected_value']:,.0f} | 0 | "
              f"{row['oracle_realized_value']:,.0f} | {row['oracle_realized_revenue']:,.0f} |")
        for name in POLICIES:
            r = row[name]
            print(f"| {objective} | {name.replace('_', '-')} | {r['expected_value']:,.0f} | "
                  f"{r['regret_pct_of_oracle']:.2f} | {r['realized_value']:,.0f} | {r['realized_revenue']:,.0f} |")
    allrow = summary["all"]
    print(f"\nguardrail violations: {result['guardrail_violations']}; exploratory quotes: "
          f"{100 * result['exploratory_share']:.1f} %; versions served: {result['versions_served']}; rounds "
          f"{result['rounds']}; errors: {result['errors'] or 0}")
    ok = (allrow["service"]["regret_pct_of_oracle"] <= 10.0
          and allrow["service"]["regret"] < allrow["epsilon_greedy"]["regret"] and result["guardrail_violations"] == 0)
    print(f"targets (regret <= 10 % of the oracle, below epsilon-greedy, zero violations): {'met' if ok else 'MISSED'}")
    print(f"wrote {out_dir / 'pricing.json'} and {out_dir / 'pricing_regret.png'} in {result['wall_seconds']:.0f} s")
    return 0 if ok and not served["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
