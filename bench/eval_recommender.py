"""Prequential evaluation of the recommender on the real Ta Feng transactions, day by day.

    python -m bench.eval_recommender [--days 30] [--max-customers 0] [--retrain-every 7] [--quick]

Protocol (test, then train):
- the purchase lines in day order (trainer.tafeng.load_tafeng); the evaluation window is the last
  `--days` days (30), everything before is the warm-up every model starts from;
- for each day of the window, the customers who buy that day and bought on an earlier day are
  evaluated (all of them, or `--max-customers` drawn with a fixed seed): the catalog is every
  product sold on or before that day (a product sold for the first time that day was put on
  sale that day); each method ranks it for the customer as of the start of the day;
  HR@10 = share of (customer, day) whose top-10 holds at least one item they bought that day;
  NDCG@10 with binary relevance (ideal DCG over min(items bought, 10));
- exclude-bought variant: the items the customer bought before are left out of the ranking and
  of the targets ((customer, day) with at least one item never bought before);
- after a day is evaluated, its purchases become known: histories, popularity, and training.

Methods:
- incremental: the project's model (trainer.domains.recommender.RecommenderModel), bootstrapped
  on the warm-up (2 epochs), then updated once a day through the same DomainModel training code
  as the trainer's rounds: the day's lines plus as many replayed older lines (the learner's
  replay buffer, 20,000 rows), `--epochs` passes (the trainer's default, 3);
- full-retrain: the same model trained from scratch (same epochs as the bootstrap) on every
  line before the day, at the start of the window and every `--retrain-every` days (7; a daily
  retrain costs ~1 min a day here), frozen in between;
- popularity: most sold items of the last 7 days;
- buy-again: the customer's own past items by purchase count (ties: most recent first), then
  popularity to fill the 10.
Cold start: purchases (by evaluated customers) of products first sold inside the window, on the
day they are first sold (no model has trained on them): how often the product is in the
customer's top-10 and its mean rank percentile, with the incremental model's item vectors from
the full item tower (text path on), with the title embedding zeroed (text off), and with no
content at all (no text, no category). Ta Feng has no titles: the text is the product subclass
("product subclass 100205"), so on this data text and category carry the same information.

Prints a table; writes bench/results/recommender.json and bench/results/recommender_hr.png
(--quick: 6 days, 300 customers a day, 1 epoch, under var/eval-recommender-quick/).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.machine import machine_info as _machine_info

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("incremental", "full-retrain", "popularity", "buy-again")
K = 10


def progress(msg: str) -> None:
    print(f"[eval-recommender {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dcg_at_k(ranked: list[int], targets: set[int], k: int = K) -> float:
    gains = sum(1.0 / math.log2(i + 2) for i, x in enumerate(ranked[:k]) if x in targets)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(targets), k)))
    return gains / ideal if ideal else 0.0


class Tally:
    def __init__(self) -> None:
        self.hits: list[float] = []
        self.ndcg: list[float] = []
        self.by_day: dict[int, list[float]] = collections.defaultdict(list)

    def add(self, day: int, ranked: list[int], targets: set[int]) -> None:
        hit = float(bool(set(ranked[:K]) & targets))
        self.hits.append(hit)
        self.ndcg.append(dcg_at_k(ranked, targets))
        self.by_day[day].append(hit)

    def summary(self) -> dict[str, Any]:
        return {"hr@10": float(np.mean(self.hits)) if self.hits else float("nan"),
                "ndcg@10": float(np.mean(self.ndcg)) if self.ndcg else float("nan"), "n": len(self.hits),
                "hr@10_by_day": {str(d): float(np.mean(v)) for d, v in sorted(self.by_day.items())}}


def model_topk(model, net, catalog: torch.Tensor, users: np.ndarray, hists: np.ndarray, allowed: torch.Tensor,
               exclude: list[np.ndarray] | None, k: int = K) -> np.ndarray:
    """Top-k item codes for each user: the exported graph's scoring (c + r + repeat term) over
    the catalog rows `allowed` (bool per item code - 1), optionally excluding item codes."""
    out = np.zeros((len(users), k), np.int64)
    with torch.no_grad():
        for a in range(0, len(users), 256):
            u = torch.from_numpy(users[a:a + 256])
            h = torch.from_numpy(hists[a:a + 256])
            h = torch.where(h > 0, h - 1, -1)
            ctx = torch.zeros(len(u), 3, dtype=torch.int64)
            ctx[:, 2] = 12
            scores, _, _ = model.score_all(net, u, ctx, h, catalog)
            scores = scores.masked_fill(~allowed, float("-inf"))
            if exclude is not None:
                for i, ex in enumerate(exclude[a:a + 256]):
                    if len(ex):
                        scores[i, torch.from_numpy(ex - 1)] = float("-inf")
            out[a:a + 256] = torch.topk(scores, k, dim=1).indices.numpy() + 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.eval_recommender", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=30, help="evaluation window: the last N days")
    ap.add_argument("--max-customers", type=int, default=0, help="customers evaluated per day (0 = all)")
    ap.add_argument("--retrain-every", type=int, default=7, help="full retrain every N days of the window")
    ap.add_argument("--epochs", type=int, default=3, help="passes over each day's update (trainer default)")
    ap.add_argument("--bootstrap-epochs", type=int, default=2)
    ap.add_argument("--replay-size", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="6 days, 300 customers a day, 1 epoch (smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (bench/results/recommender.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.days, args.max_customers, args.bootstrap_epochs, args.epochs = 6, 300, 1, 1
        args.retrain_every = 3
    out = args.out or (Path("var/eval-recommender-quick/recommender.json") if args.quick
                       else RESULTS / "recommender.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.parent / "recommender_hr.png"
    logging.basicConfig(level=logging.WARNING)
    started = time.time()

    from shared.registry import ModelRegistry
    from shared.text import TextEncoder
    from trainer.domains.recommender import RecommenderModel, torch_threads
    from trainer.domains.recommender_data import TafengRows, tafeng_catalog
    from trainer.learner import Examples, Learner, LearnerConfig
    from trainer.tafeng import load_tafeng

    from trainer.text_encoder import export_text_encoder

    torch.set_num_threads(1)
    progress("exporting the text encoder")
    tmp = Path(tempfile.mkdtemp(prefix="eval-reco-"))
    encoder = TextEncoder(export_text_encoder(tmp / "text-encoder.onnx")[0])
    df = load_tafeng()
    model = RecommenderModel(encoder=encoder.encode, seed=args.seed)
    model.add_catalog(tafeng_catalog(df))
    state = model.state
    rows = TafengRows(df, state, seed=args.seed)
    n_days = len(rows.days)
    w0 = n_days - args.days
    first_day = {}  # item code -> first day index sold
    for d in range(n_days):
        for i in np.unique(rows.items[rows.day_rows(d)]).tolist():
            first_day.setdefault(i, d)
    first_sold = np.full(state.n_items + 1, n_days, np.int64)
    for i, d in first_day.items():
        first_sold[i] = d
    progress(f"{len(df)} lines, {n_days} days; window = days {w0}..{n_days - 1} "
             f"({rows.days[w0]} .. {rows.days[-1]})")

    # rows of every day (histories as of the start of each day), then reset the history state
    day_X, day_y = [], []
    for d in range(n_days):
        X, y = rows.rows_for_day(d)
        day_X.append(X)
        day_y.append(y)
        rows.advance(d) if d < w0 else None
        if d == w0 - 1:
            break
    # warm-up
    X_warm, y_warm = np.concatenate(day_X[:w0]), np.concatenate(day_y[:w0])
    learner = Learner(model, ModelRegistry(tmp / "registry"), tmp / "work",
                      LearnerConfig(epochs=args.epochs, replay_size=args.replay_size))
    t = time.time()
    net = model.new_network(X_warm)
    opt = model.optimizer(net)
    for e in range(args.bootstrap_epochs):
        model.train(net, opt, X_warm, y_warm, 1, e)
    bootstrap_s = time.time() - t
    progress(f"bootstrap on {len(X_warm)} warm-up lines: {bootstrap_s:.0f} s")
    keep = np.random.default_rng(args.seed).choice(len(X_warm), min(len(X_warm), args.replay_size), replace=False)
    learner.replay = Examples(X_warm[keep], y_warm[keep], np.full(len(keep), np.nan, np.float32),
                              np.zeros(len(keep), np.int64))
    retrain_net, retrain_s = net, []
    # per-customer purchase counts and last day (buy-again), daily sales (popularity)
    counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    last: dict[int, dict[int, int]] = collections.defaultdict(dict)
    daily_sales: list[collections.Counter] = []
    for d in range(n_days):
        sl = rows.day_rows(d)
        daily_sales.append(collections.Counter(rows.items[sl].tolist()))
        if d < w0:
            for u, i in zip(rows.users[sl].tolist(), rows.items[sl].tolist()):
                counts[u][i] += 1
                last[u][i] = d
    tallies = {(m, v): Tally() for m in METHODS for v in ("all", "exclude-bought")}
    cold = {v: {"hits": 0, "pct": []} for v in ("text-on", "text-off", "no-content")}
    rng = np.random.default_rng(args.seed)
    update_s, evaluated = [], []
    for d in range(w0, n_days):
        if d > w0 and (d - w0) % args.retrain_every == 0:
            t = time.time()
            X_all, y_all = np.concatenate(day_X[:d]), np.concatenate(day_y[:d])
            retrain_net = model.new_network(X_all)
            ropt = model.optimizer(retrain_net)
            for e in range(args.bootstrap_epochs):
                model.train(retrain_net, ropt, X_all, y_all, 1, 100 + e)
            retrain_s.append(time.time() - t)
            progress(f"day {d}: full retrain on {len(X_all)} lines in {retrain_s[-1]:.0f} s")
        sl = rows.day_rows(d)
        day_users, day_items = rows.users[sl], rows.items[sl]
        baskets: dict[int, set[int]] = collections.defaultdict(set)
        for u, i in zip(day_users.tolist(), day_items.tolist()):
            baskets[u].add(i)
        returning = sorted(u for u in baskets if counts.get(u))
        if args.max_customers and len(returning) > args.max_customers:
            returning = sorted(rng.choice(returning, args.max_customers, replace=False).tolist())
        evaluated.append(len(returning))
        allowed = torch.from_numpy(first_sold[1:] <= d)
        pop_counter = collections.Counter()
        for dd in range(max(0, d - 7), d):
            pop_counter.update(daily_sales[dd])
        pop = [i for i, _ in pop_counter.most_common()]
        users = np.asarray(returning, np.int64)
        hists = np.stack([rows.history_of(u) for u in returning]) if returning else np.zeros((0, 64), np.int64)
        bought_before = [np.asarray(sorted(counts[u]), np.int64) for u in returning]
        with torch_threads(1):
            inc_catalog = model.all_item_vectors(net, int(rows.day_numbers[d]))  # popularity as of the day
            ret_catalog = model.all_item_vectors(retrain_net, int(rows.day_numbers[d]))
            ranked = {("incremental", "all"): model_topk(model, net, inc_catalog, users, hists, allowed, None),
                      ("incremental", "exclude-bought"): model_topk(model, net, inc_catalog, users, hists, allowed,
                                                                    bought_before),
                      ("full-retrain", "all"): model_topk(model, retrain_net, ret_catalog, users, hists, allowed, None),
                      ("full-retrain", "exclude-bought"): model_topk(model, retrain_net, ret_catalog, users, hists,
                                                                     allowed, bought_before)}
        for n, u in enumerate(returning):
            targets = baskets[u]
            new_targets = targets - set(counts[u])
            own = sorted(counts[u], key=lambda i: (-counts[u][i], -last[u][i]))
            ba = own[:K] + [i for i in pop[:2 * K] if i not in set(own[:K])][:max(0, K - len(own))]
            seen = set(counts[u])
            lists = {("popularity", "all"): pop[:K], ("buy-again", "all"): ba,
                     ("popularity", "exclude-bought"): [i for i in pop[:K + len(seen)] if i not in seen][:K]}
            lists[("buy-again", "exclude-bought")] = lists[("popularity", "exclude-bought")]  # nothing of its own left
            for key in (("incremental", "all"), ("full-retrain", "all"), ("incremental", "exclude-bought"),
                        ("full-retrain", "exclude-bought")):
                lists[key] = ranked[key][n].tolist()
            for (m, v), ranking in lists.items():
                if v == "all":
                    tallies[(m, v)].add(d, ranking, targets)
                elif new_targets:
                    tallies[(m, v)].add(d, ranking, new_targets)
        # cold start: products first sold today, bought today by an evaluated customer
        cold_lines = [(n, i) for n, u in enumerate(returning) for i in baskets[u] if first_sold[i] == d and d >= w0]
        if cold_lines:
            codes = torch.tensor(sorted({i for _, i in cold_lines}))
            with torch.no_grad(), torch_threads(1):
                f = model._feature_tensors()
                text = f["text_emb"][f["text"][codes]]
                no_sales = torch.zeros(len(codes), 2)  # first sold today: no sales before today
                variants = {
                    "text-on": net.item_vectors(codes, text, f["category"][codes], f["price"][codes], sales=no_sales),
                    "text-off": net.item_vectors(codes, torch.zeros_like(text), f["category"][codes], f["price"][codes],
                                                 sales=no_sales),
                    "no-content": net.item_vectors(codes, torch.zeros_like(text), torch.zeros_like(codes),
                                                   f["price"][codes], sales=no_sales)}
                for name, vecs in variants.items():
                    catalog = inc_catalog.clone()
                    catalog[codes - 1] = vecs
                    idx = np.asarray([n for n, _ in cold_lines])
                    u = torch.from_numpy(users[idx])
                    h = torch.from_numpy(hists[idx])
                    h = torch.where(h > 0, h - 1, -1)
                    ctx = torch.zeros(len(u), 3, dtype=torch.int64)
                    ctx[:, 2] = 12
                    scores, _, _ = model.score_all(net, u, ctx, h, catalog)
                    scores = scores.masked_fill(~allowed, float("-inf"))
                    target = torch.tensor([i - 1 for _, i in cold_lines])
                    ts = scores.gather(1, target.unsqueeze(1))
                    rank = (scores > ts).sum(1).numpy()
                    cold[name]["hits"] += int((rank < K).sum())
                    cold[name]["pct"].extend((1.0 - rank / allowed.sum().item()).tolist())
            cold.setdefault("lines", 0)
            cold["lines"] += len(cold_lines)
        # the day's purchases become known: update the incremental model like a trainer round
        t = time.time()
        X, y = rows.rows_for_day(d)
        new = Examples(X, y, np.full(len(y), np.nan, np.float32), np.zeros(len(y), np.int64))
        Xt, yt = X, y
        if len(learner.replay):
            k = min(len(learner.replay), len(X))
            idx = learner._rng.choice(len(learner.replay), size=k, replace=False)
            Xt, yt = np.concatenate([X, learner.replay.X[idx]]), np.concatenate([y, learner.replay.y[idx]])
        model.train(net, opt, Xt, yt, args.epochs, seed=1000 + d)
        learner._remember(new)
        update_s.append(time.time() - t)
        day_X.append(X)
        day_y.append(y)
        rows.advance(d)
        for u, i in zip(day_users.tolist(), day_items.tolist()):
            counts[u][i] += 1
            last[u][i] = d
        inc = tallies[("incremental", "all")].by_day[d]
        ba_day = tallies[("buy-again", "all")].by_day[d]
        progress(f"day {d} ({str(rows.days[d])[:10]}): {len(returning)} customers, HR@10 incremental "
                 f"{np.mean(inc) if inc else float('nan'):.3f} buy-again {np.mean(ba_day) if ba_day else float('nan'):.3f}; "
                 f"update {update_s[-1]:.1f} s")

    summary = {f"{m}/{v}": tallies[(m, v)].summary() for m in METHODS for v in ("all", "exclude-bought")}
    cold_summary = {"lines": int(cold.get("lines", 0))}
    for name in ("text-on", "text-off", "no-content"):
        pct = cold[name]["pct"]
        cold_summary[name] = {"hr@10": cold[name]["hits"] / max(1, len(pct)),
                              "mean_rank_percentile": float(np.mean(pct)) if pct else float("nan")}
    hr = {k: v["hr@10"] for k, v in summary.items()}
    targets = {
        "hr@10 >= 1.1 x buy-again": {"incremental": hr["incremental/all"], "buy-again": hr["buy-again/all"],
                                     "ratio": hr["incremental/all"] / hr["buy-again/all"],
                                     "met": hr["incremental/all"] >= 1.1 * hr["buy-again/all"]},
        "exclude-bought: above popularity": {"incremental": hr["incremental/exclude-bought"],
                                             "popularity": hr["popularity/exclude-bought"],
                                             "met": hr["incremental/exclude-bought"] > hr["popularity/exclude-bought"]},
        "within 5% of the full retrain": {"incremental": hr["incremental/all"], "full-retrain": hr["full-retrain/all"],
                                          "ratio": hr["incremental/all"] / hr["full-retrain/all"],
                                          "met": hr["incremental/all"] >= 0.95 * hr["full-retrain/all"]},
    }
    # table
    lines = ["| method | HR@10 | NDCG@10 | HR@10 excl. bought | NDCG@10 excl. bought |", "|---|---|---|---|---|"]
    for m in METHODS:
        a, e = summary[f"{m}/all"], summary[f"{m}/exclude-bought"]
        lines.append(f"| {m} | {a['hr@10']:.4f} | {a['ndcg@10']:.4f} | {e['hr@10']:.4f} | {e['ndcg@10']:.4f} |")
    lines.append("")
    lines.append(f"(customer, day) pairs: {summary['incremental/all']['n']} (all), "
                 f"{summary['incremental/exclude-bought']['n']} (with an item never bought before)")
    lines.append(f"cold start ({cold_summary['lines']} purchases of products on their first day of sale): " + ", ".join(
        f"{n}: HR@10 {cold_summary[n]['hr@10']:.4f}, mean rank percentile {cold_summary[n]['mean_rank_percentile']:.3f}"
        for n in ("text-on", "text-off", "no-content")))
    for name, t in targets.items():
        lines.append(f"target {name}: {'MET' if t['met'] else 'MISSED'} "
                     + ", ".join(f"{k} {v:.4f}" for k, v in t.items() if k != "met"))
    table = "\n".join(lines)
    print(table)
    elapsed = time.time() - started
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine_info(torch=torch.__version__),
        "protocol": {"window_days": args.days, "window": [str(rows.days[w0])[:10], str(rows.days[-1])[:10]],
                     "max_customers_per_day": args.max_customers or "all", "customers_per_day": evaluated,
                     "seed": args.seed, "k": K, "update_epochs": args.epochs, "bootstrap_epochs": args.bootstrap_epochs,
                     "replay_size": args.replay_size, "full_retrain_every_days": args.retrain_every,
                     "quick": args.quick},
        "results": summary, "cold_start": cold_summary, "targets": targets,
        "timing_s": {"total": elapsed, "bootstrap": bootstrap_s, "full_retrains": retrain_s,
                     "daily_update_median": float(np.median(update_s)) if update_s else None},
        "table": table, "plot": str(png)}
    out.write_text(json.dumps(result, indent=2))
    plot(png, summary, rows, w0)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nwrote {out} and {png} in {elapsed:.0f} s")
    return 0


def plot(path: Path, summary: dict[str, Any], rows, w0: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharex=True)
    for ax, variant in zip(axes, ("all", "exclude-bought")):
        for m in METHODS:
            by_day = summary[f"{m}/{variant}"]["hr@10_by_day"]
            days = sorted(int(d) for d in by_day)
            ax.plot([d - w0 + 1 for d in days], [by_day[str(d)] for d in days], label=f"{m} ({summary[f'{m}/{variant}']['hr@10']:.3f})")
        ax.set_title(f"Ta Feng, HR@10 per day ({variant})")
        ax.set_xlabel("day of the evaluation window")
        ax.set_ylabel("HR@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
