"""Prequential evaluation of the recommender on the real Ta Feng transactions, through the
production path, against the strongest honest baselines on the same (customer, day)s.

    python -m bench.eval_recommender [--days 30] [--max-customers 0] [--quick]

Protocol (test, then train), the last `--days` days (30) of Ta Feng:
- everything before the window is the warm-up. The model's first version is the production
  bootstrap (trainer.domains.recommender_bootstrap.bootstrap_recommender on the warm-up
  lines only: its catalog prices are medians over the warm-up, its last `--holdout-days`
  (1) are the gate's first window);
- each day of the window: (1) the catalog learns the day's items as a storefront would tell
  the service (the service's catalog journal, which the trainer reads): products sold for
  the first time that day are put on sale with that day's price, and every product's price
  is the median of its unit prices up to the day before (no future prices); (2) every
  customer who buys that day is served a top-10 by the version the registry serves, scored
  by its published ONNX graphs in ONNX Runtime (item_tower.onnx over the catalog, model.onnx
  with the user code from its vocab.json and the history the service keeps:
  services.recommender.history.UserHistory seeded from its users.npz, plus every purchase
  reported since) - never by PyTorch; (3) the day's purchases come back as the service
  records them (a served prediction per customer, a purchase outcome per distinct item),
  are turned into training rows by the domain's `examples` (joined examples), and one
  learning round of the production Learner runs on them (trainer defaults: the recommender's
  one pass over the rows at a tenth of the bootstrap's step size, --round-epochs and
  --round-lr-factor to change them; replay,
  the gate's evaluation window and paired bootstrap, ONNX export with parity and latency
  checks, publish to the registry); the next day is served by whatever it published;
- evaluated: the customers who buy that day and bought on an earlier day (all of them, or
  `--max-customers` a day drawn with a fixed seed); the catalog is every product sold on or
  before that day. HR@10 = share of (customer, day) whose top-10 holds an item bought that
  day; NDCG@10 with binary relevance (bench.stats). Exclude-bought variant: the customer's
  earlier purchases are left out of the ranking (the service's exclude_purchased) and of the
  targets; (customer, day)s with at least one item never bought before.

Baselines, on the same (customer, day)s and the same catalog, from the purchases before the day:
- popularity: most purchase lines over the last 7 days;
- buy-again (days): the customer's own items by the number of distinct days they bought
  them, ties by 7-day popularity then recency, then popularity fills the 10;
- buy-again (recency): each distinct purchase day of an item counts exp(-age / tau) (tau
  chosen among --tau-grid on the `--days` days before the window, never on the window);
- TIFU-KNN (Hu et al., SIGIR 2020), as in the authors' code: a basket is a multi-hot vector
  decayed by r_b^(baskets after it); the history is split into `group_count` consecutive
  groups (their mean), decayed by r_g^(group_count - 1 - group index), summed and divided by
  the number of groups; the prediction is alpha x own vector + (1 - alpha) x mean of the
  k nearest users' vectors (Euclidean, the user among them); Ta Feng settings of the
  authors' repository: k = 300, r_b = 0.9, r_g = 0.7, alpha = 0.7, group_count = 7.
  In the exclude-bought variant TIFU-KNN ranks the items the customer never bought.
The buy-again baselines have nothing of their own to rank in the exclude-bought variant: they
are popularity there (not listed twice).

Bootstrap-frozen: the bootstrap's version (the first the registry served) ranks the same
customers with the same histories and catalog through its own ONNX graphs every day, never
replaced: the model's ratio to it (paired bootstrap) is what the daily rounds add.
Bootstrap-fresh-sales: the same graphs, with the recent-sales columns of its item vectors (the
last ones: log1p of each item's decayed sales, trainer.domains.recommender_net) replaced by the
sales before the day, as a version exported that day holds them: what the rounds add beyond
refreshing the sales is the model's ratio to it.

The result (bench/results/eval_recommender.json) holds every method's HR@10 / NDCG@10, the
ratio of the model to the strongest baseline with a paired bootstrap interval over
(customer, day)s, the learner's decision per round, and timing.
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

from bench.machine import machine_info as _machine_info
from bench.stats import hit_at_k, ndcg_at_k, paired_bootstrap

RESULTS = Path(__file__).resolve().parent / "results"
K = 10
VARIANTS = ("all", "exclude-bought")
BASELINES = ("popularity", "buy-again-days", "buy-again-recency", "tifu-knn")
MODEL = "model"
# the bootstrap's version (the first the registry served), never replaced: what the rounds add
FROZEN = "bootstrap-frozen"
# the same bootstrap weights with the recent sales of each day (what a version exported that day
# holds): how much of what the rounds add is the refreshed sales alone
FRESH = "bootstrap-fresh-sales"
ABLATIONS = (FROZEN, FRESH)
METHODS = (MODEL,) + ABLATIONS + BASELINES
TIFU_TAFENG = {"k": 300, "within_decay": 0.9, "group_decay": 0.7, "alpha": 0.7, "group_count": 7}
SERVE_HOUR = 12  # Ta Feng has no time of day; the model was trained with uniform random hours
TARGET_RATIO = 1.1
TIFU_CHUNK = 256


def progress(msg: str) -> None:
    print(f"[eval-recommender {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the purchases
class Purchases:
    """What the baselines know: each customer's purchase days per item and baskets, the daily
    purchase lines per item, all strictly before the day being ranked (add_day after it)."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self.days: dict[int, dict[int, list[int]]] = collections.defaultdict(dict)  # customer -> item -> distinct days
        self.baskets: dict[int, list[tuple[int, list[int]]]] = collections.defaultdict(list)  # (day, items)
        self.daily_lines: list[np.ndarray] = []  # per day index: purchase lines per item

    def add_day(self, day: int, customers: np.ndarray, items: np.ndarray) -> None:
        while len(self.daily_lines) <= day:
            self.daily_lines.append(np.zeros(self.n_items, np.int64))
        np.add.at(self.daily_lines[day], items, 1)
        per_customer: dict[int, list[int]] = {}
        for c, i in zip(customers.tolist(), items.tolist()):
            per_customer.setdefault(c, [])
            if i not in per_customer[c]:
                per_customer[c].append(i)
        for c, basket in per_customer.items():
            own = self.days[c]
            for i in basket:
                own.setdefault(i, []).append(day)
            self.baskets[c].append((day, basket))

    def popularity(self, day: int, window: int = 7) -> np.ndarray:
        """Purchase lines per item over the `window` days before `day`."""
        lo = max(0, day - window)
        if lo >= min(day, len(self.daily_lines)):
            return np.zeros(self.n_items, np.int64)
        return np.sum(self.daily_lines[lo:min(day, len(self.daily_lines))], axis=0)


def popularity_order(pop: np.ndarray) -> np.ndarray:
    """Items by popularity (most first; ties by item index), only items with any sale."""
    order = np.lexsort((np.arange(len(pop)), -pop))
    return order[pop[order] > 0]


def fill(own: list[int], pop_order: np.ndarray, exclude: set[int] | frozenset = frozenset(), k: int = K) -> list[int]:
    out = [i for i in own if i not in exclude][:k]
    if len(out) < k:
        taken = set(out) | set(exclude)
        for i in pop_order.tolist():
            if i not in taken:
                out.append(i)
                if len(out) == k:
                    break
    return out


def buy_again_days(own: dict[int, list[int]], pop: np.ndarray) -> list[int]:
    """The customer's items by distinct purchase days, ties by 7-day popularity, then recency."""
    return sorted(own, key=lambda i: (-len(own[i]), -pop[i], -own[i][-1], i))


def buy_again_recency(own: dict[int, list[int]], pop: np.ndarray, day: int, tau: float) -> list[int]:
    score = {i: sum(math.exp(-(day - d) / tau) for d in ds) for i, ds in own.items()}
    return sorted(own, key=lambda i: (-score[i], -pop[i], i))


# ------------------------------------------------------------------------------ TIFU-KNN
def tifu_vector(baskets: list[list[int]], within_decay: float, group_decay: float, group_count: int
                ) -> dict[int, float]:
    """A user's TIFU vector (sparse) from their baskets, oldest first, as the authors' code
    computes it (TIFUKNN.py: temporal_decay_sum_history / group_history_list)."""
    n = len(baskets)
    if n == 0:
        return {}
    weights = [within_decay ** (n - 1 - j) for j in range(n)]  # the newest basket weighs 1
    groups = np.array_split(np.arange(n), group_count) if n >= group_count else [np.array([j]) for j in range(n)]
    real = len(groups)
    out: dict[int, float] = collections.defaultdict(float)
    for g, members in enumerate(groups):
        gw = group_decay ** (group_count - 1 - g) / len(members) / real
        for j in members.tolist():
            for i in baskets[j]:
                out[i] += weights[j] * gw
    return dict(out)


class TifuKnn:
    """TIFU-KNN over every customer with a purchase so far; vectors refreshed for the
    customers whose history changed."""

    def __init__(self, n_items: int, k: int, within_decay: float, group_decay: float, alpha: float,
                 group_count: int) -> None:
        self.n_items, self.k, self.within_decay, self.group_decay = n_items, k, within_decay, group_decay
        self.alpha, self.group_count = alpha, group_count
        self.vectors: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # customer -> (items, values)
        self._matrix = None
        self._row_of: dict[int, int] = {}

    def update(self, purchases: Purchases, customers) -> None:
        for c in customers:
            v = tifu_vector([b for _, b in purchases.baskets[c]], self.within_decay, self.group_decay,
                            self.group_count)
            items = np.fromiter(v.keys(), np.int64, len(v))
            self.vectors[c] = (items, np.fromiter(v.values(), np.float64, len(v)))
        self._matrix = None

    def _build(self):
        import scipy.sparse as sp

        users = sorted(self.vectors)
        self._row_of = {c: n for n, c in enumerate(users)}
        lengths = np.asarray([len(self.vectors[c][0]) for c in users], np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.concatenate([self.vectors[c][0] for c in users]) if users else np.zeros(0, np.int64)
        data = np.concatenate([self.vectors[c][1] for c in users]) if users else np.zeros(0)
        self._matrix = sp.csr_matrix((data, indices, indptr), shape=(len(users), self.n_items))
        self._sq = np.asarray(self._matrix.multiply(self._matrix).sum(1)).ravel()

    def scores(self, customers: list[int], chunk: int = 256) -> np.ndarray:
        """[len(customers), n_items] prediction scores (customers must have a vector)."""
        import scipy.sparse as sp

        if self._matrix is None:
            self._build()
        V, sq = self._matrix, self._sq
        out = np.zeros((len(customers), self.n_items), np.float64)
        k = min(self.k, V.shape[0])
        for a in range(0, len(customers), chunk):
            rows = np.asarray([self._row_of[c] for c in customers[a:a + chunk]], np.int64)
            Q = V[rows]
            d2 = sq[rows, None] + sq[None, :] - 2.0 * (Q @ V.T).toarray()
            nn = np.argpartition(d2, k - 1, axis=1)[:, :k]
            M = sp.csr_matrix((np.full(nn.size, 1.0 / k), nn.ravel(), np.arange(0, nn.size + 1, k)),
                              shape=(len(rows), V.shape[0]))
            out[a:a + len(rows)] = self.alpha * Q.toarray() + (1.0 - self.alpha) * (M @ V).toarray()
        return out


def top_from_scores(scores: np.ndarray, pop: np.ndarray, pop_order: np.ndarray, exclude: set[int] | frozenset,
                    allowed: np.ndarray, k: int = K) -> list[int]:
    """Top-k items by score (> 0, on sale, not excluded), ties by popularity; popularity fills."""
    s = np.where(allowed, scores, 0.0)
    if exclude:
        s[np.fromiter(exclude, np.int64, len(exclude))] = 0.0
    cand = np.flatnonzero(s > 0)
    if len(cand) > 4 * k:
        cand = cand[np.argpartition(-s[cand], 4 * k)[:4 * k]]
    own = sorted(cand.tolist(), key=lambda i: (-s[i], -pop[i], i))[:k]
    return fill(own, pop_order, exclude, k)


# ------------------------------------------------------------------------------ the served model
class ServedModel:
    """The version the registry serves, scored as the service scores it: item_tower.onnx over
    the catalog's features, model.onnx with the version's vocabulary, in ONNX Runtime."""

    def __init__(self, registry, encoder) -> None:
        self.registry, self.encoder = registry, encoder
        self.version: str | None = None

    def load(self, version: str | None = None) -> str:
        """The registry's CURRENT version (or `version`), if it is not the one loaded already."""
        import onnxruntime as ort

        version = version or self.registry.current_version("recommender")
        if version == self.version:
            return version
        folder = self.registry.version_dir("recommender", version)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        self.scoring = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.tower = ort.InferenceSession(str(folder / "item_tower.onnx"), so, providers=["CPUExecutionProvider"])
        vocab = json.loads((folder / "vocab.json").read_text())
        self.user_code = {u: n for n, u in enumerate(vocab["users"], start=1)}
        self.item_code = {i: n for n, i in enumerate(vocab["items"], start=1)}
        self.category_code = {c: n for n, c in enumerate(vocab["categories"], start=1)}
        manifest = json.loads((folder / "manifest.json").read_text())
        self.history_len = int(manifest["extra"]["history_len"])
        self.users_npz = folder / "users.npz"
        self.version = version
        return version

    def item_vectors(self, ids: list[str], titles: list[str], categories: list[str], prices: np.ndarray) -> np.ndarray:
        out = []
        for a in range(0, len(ids), 4096):
            sl = slice(a, a + 4096)
            feeds = {"item": np.asarray([self.item_code.get(i, 0) for i in ids[sl]], np.int64).reshape(-1, 1),
                     "text": self.encoder.encode(titles[sl]),
                     "category": np.asarray([self.category_code.get(c, 0) for c in categories[sl]], np.int64).reshape(-1, 1),
                     "price": np.asarray(prices[sl], np.float32).reshape(-1, 1)}
            out.append(self.tower.run(["item_vector"], feeds)[0])
        return np.concatenate(out)

    def rank(self, vectors: np.ndarray, users: list[str], histories: list[list[int]], excludes: list[list[int]],
             batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Top-K catalog rows and click probabilities per user (rows -1 where filtered)."""
        n = len(users)
        items = np.full((n, K), -1, np.int64)
        clicks = np.zeros((n, K), np.float32)
        for a in range(0, n, batch):
            b = min(n, a + batch) - a
            hist = np.full((b, self.history_len), -1, np.int64)
            for j, h in enumerate(histories[a:a + b]):
                hist[j, :len(h)] = h[:self.history_len]
            width = max(1, max(len(e) for e in excludes[a:a + b]))
            ex = np.full((b, width), -1, np.int64)
            for j, e in enumerate(excludes[a:a + b]):
                ex[j, :len(e)] = e
            feeds = {"user": np.asarray([[self.user_code.get(u, 0)] for u in users[a:a + b]], np.int64),
                     "history": hist, "context": np.tile(np.asarray([[0, 0, SERVE_HOUR]], np.int64), (b, 1)),
                     "k": np.full((b, 1), K, np.int64), "restrict": np.full((b, 1), -1, np.int64), "exclude": ex,
                     "item_vectors": vectors}
            rows, score, click, _ = self.scoring.run(None, feeds)
            rows = np.where(np.isfinite(score), rows, -1)
            items[a:a + b, :rows.shape[1]] = rows[:, :K]
            clicks[a:a + b, :rows.shape[1]] = click[:, :K]
        return items, clicks


def joined_day(day_number: int, customers: list[str], baskets: list[list[str]], histories: list[list[str]],
               served: list[tuple[list[str], list[float]]], versions: str, first_offset: int):
    """The day as the service and the joiner hand it to the trainer: one served prediction
    per customer (user code, history ids, context as fed; the items served with their click
    probabilities; the request), one purchase outcome per distinct item bought."""
    from protos.feedback.v1 import feedback_pb2 as fb
    from protos.recommender.v1 import recommender_pb2 as rec
    from shared.feedback import fill_tensor
    from shared.feedback.records import feedback_outcome
    from trainer.joiner import JoinedExample

    out, offset = [], first_offset
    served_at = day_number * 86400.0 + 9 * 3600.0
    for c, basket, hist, (ids, click) in zip(customers, baskets, histories, served):
        pid = f"tafeng-{day_number}-{c}"
        s = fb.ServedPrediction(prediction_id=pid, served_at=served_at)
        s.model.name, s.model.version = "recommender", versions
        fill_tensor(s.inputs.add(), "user", np.zeros((1, 1), np.int64))
        fill_tensor(s.inputs.add(), "history_ids", np.array(hist, dtype=object).reshape(1, -1))
        fill_tensor(s.inputs.add(), "context", np.asarray([[0, 0, SERVE_HOUR]], np.int64))
        fill_tensor(s.outputs.add(), "item_ids", np.array(ids, dtype=object).reshape(1, -1))
        fill_tensor(s.outputs.add(), "click", np.asarray(click, np.float32).reshape(1, -1))
        s.request.Pack(rec.RecommendRequest(user_id=c, k=K))
        served_offset = offset
        offset += 1
        for item in basket:
            label = rec.RecommendationOutcome(prediction_id=pid, item_id=item, event=rec.EVENT_PURCHASE,
                                              occurred_at=served_at + 3600.0)
            o = feedback_outcome(label, served_at + 3600.0, served_at + 3600.0)
            out.append(JoinedExample("recommender", pid, offset, served_offset, s, o, "recommender", versions, 3600.0,
                                     label))
            offset += 1
    return out, offset


# ------------------------------------------------------------------------------ tallies
class Tally:
    def __init__(self) -> None:
        self.hit: list[float] = []
        self.ndcg: list[float] = []
        self.day: list[int] = []

    def add(self, day: int, ranked: list[int], targets: set[int]) -> None:
        self.hit.append(hit_at_k(ranked, targets, K))
        self.ndcg.append(ndcg_at_k(ranked, targets, K))
        self.day.append(day)

    def summary(self) -> dict[str, Any]:
        days = np.asarray(self.day)
        hits = np.asarray(self.hit)
        return {"hr@10": float(hits.mean()) if len(hits) else math.nan,
                "ndcg@10": float(np.mean(self.ndcg)) if self.ndcg else math.nan, "n": len(hits),
                "hr@10_by_day": {str(d): float(hits[days == d].mean()) for d in np.unique(days)}}


def choose_tau(purchases_by_day, n_items: int, lo: int, hi: int, grid: list[float]) -> dict[str, Any]:
    """Recency-weighted buy-again's tau: the best HR@10 over days lo..hi-1 (before the window)."""
    cust_of_day, item_of_day = purchases_by_day
    p = Purchases(n_items)
    for d in range(lo):
        p.add_day(d, cust_of_day[d], item_of_day[d])
    hits = {tau: [] for tau in grid}
    for d in range(lo, hi):
        pop = p.popularity(d)
        order = popularity_order(pop)
        basket: dict[int, set[int]] = collections.defaultdict(set)
        for c, i in zip(cust_of_day[d].tolist(), item_of_day[d].tolist()):
            basket[c].add(i)
        for c, targets in basket.items():
            if c not in p.days:
                continue
            for tau in grid:
                hits[tau].append(hit_at_k(fill(buy_again_recency(p.days[c], pop, d, tau), order), targets))
        p.add_day(d, cust_of_day[d], item_of_day[d])
    hr = {tau: float(np.mean(v)) for tau, v in hits.items()}
    best = max(grid, key=lambda t: hr[t])
    return {"tau_days": best, "validation_days": [lo, hi - 1], "hr@10_by_tau": {str(t): v for t, v in hr.items()}}


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None, text_encoder: tuple[Path, float] | None = None) -> int:
    """text_encoder: (path, parity) of an encoder export_text_encoder already wrote (tests share
    one export per session), instead of exporting it again (~20 s of CPU)."""
    ap = argparse.ArgumentParser(prog="python -m bench.eval_recommender", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=30, help="evaluation window: the last N days")
    ap.add_argument("--max-customers", type=int, default=0, help="customers evaluated per day (0 = all)")
    ap.add_argument("--bootstrap-epochs", type=int, default=2, help="the production bootstrap's default")
    ap.add_argument("--holdout-days", type=int, default=1,
                    help="last warm-up days the bootstrap holds out of training (the gate's first window)")
    ap.add_argument("--latency-budget-ms", type=float, default=None,
                    help="the gate's batch-1 latency budget (default: the trainer's setting); on a shared, busy "
                         "machine the measured latency is the machine's load, not the model's (the serving "
                         "benches judge latency), and a round refused for it is a day the model does not learn")
    ap.add_argument("--tau-grid", default="3,7,14,30,60,120,240,480", help="recency buy-again: tau candidates (days)")
    ap.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lines", type=int, default=None,
                    help="only the first N purchase lines of Ta Feng (tests; default: all)")
    ap.add_argument("--end-offset-days", type=int, default=0,
                    help="leave out the data's last N days: a validation window that ends where the scored one "
                         "begins (--end-offset-days 30 --days 30), to choose settings without looking at it")
    ap.add_argument("--round-epochs", type=int, default=None, help="passes over each round's rows (trainer default)")
    ap.add_argument("--round-lr-factor", type=float, default=None,
                    help="step size multiplier of a round (the learner's default)")
    ap.add_argument("--replay-ratio", type=float, default=None,
                    help="replayed rows per new row in a round (the learner's default)")
    ap.add_argument("--quick", action="store_true", help="3 days, 200 customers a day, 1 bootstrap epoch (smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (bench/results/eval_recommender.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.days, args.max_customers, args.bootstrap_epochs, args.resamples = 3, 200, 1, 200
    out = args.out or (Path("var/eval-recommender-quick/eval_recommender.json") if args.quick
                       else RESULTS / "eval_recommender.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    started = time.time()

    import torch

    from services.recommender.history import UserHistory
    from shared.registry import ModelRegistry
    from shared.text import TextEncoder
    from trainer.domains.recommender import RecommenderModel
    from trainer.domains.recommender_bootstrap import bootstrap_recommender
    from trainer.domains.recommender_data import tafeng_title
    from trainer.learner import Learner
    from trainer.service import TrainerSettings
    from trainer.tafeng import load_tafeng
    from trainer.text_encoder import export_text_encoder

    torch.set_num_threads(1)
    df = load_tafeng(args.lines)
    if args.end_offset_days:
        last_days = np.sort(df["day"].unique())[-args.end_offset_days:]
        df = df[df["day"] < last_days[0]].reset_index(drop=True)
    day_values = np.asarray(sorted(df["day"].unique()))
    n_days = len(day_values)
    w0 = n_days - args.days
    day_idx = np.searchsorted(day_values, df["day"].to_numpy())
    day_numbers = day_values.astype("datetime64[D]").astype(np.int64)
    cust_codes, cust_names = np.unique(df["customer_id"].astype(str).to_numpy(), return_inverse=True)[::-1]
    item_codes, item_names = np.unique(df["product_id"].astype(str).to_numpy(), return_inverse=True)[::-1]
    cust_names, item_names = list(cust_names), list(item_names)
    item_index = {name: n for n, name in enumerate(item_names)}
    n_items = len(item_names)
    subclass = df.groupby(item_codes)["product_subclass"].first().reindex(range(n_items)).to_numpy()
    unit_price = df["unit_price"].to_numpy(np.float64)
    bounds = np.searchsorted(day_idx, np.arange(n_days + 1))
    cust_of_day = [cust_codes[bounds[d]:bounds[d + 1]] for d in range(n_days)]
    item_of_day = [item_codes[bounds[d]:bounds[d + 1]] for d in range(n_days)]
    first_sold = np.full(n_items, n_days, np.int64)
    np.minimum.at(first_sold, item_codes, day_idx)
    progress(f"{len(df)} lines, {n_days} days, {len(cust_names)} customers, {n_items} products; window = days "
             f"{w0}..{n_days - 1} ({str(day_values[w0])[:10]} .. {str(day_values[-1])[:10]})")

    tau_grid = [float(x) for x in args.tau_grid.split(",")]
    tau = choose_tau((cust_of_day, item_of_day), n_items, max(1, w0 - args.days), w0, tau_grid)
    progress(f"recency buy-again: tau {tau['tau_days']:g} days (validation HR@10 {tau['hr@10_by_tau']})")

    # ---- the production bootstrap on the warm-up lines
    tmp = Path(tempfile.mkdtemp(prefix="eval-reco-"))
    registry = ModelRegistry(tmp / "registry")
    journal = tmp / "catalog" / "items.jsonl"
    journal.parent.mkdir(parents=True)
    settings = TrainerSettings()
    config = settings.learner_config("recommender")
    config.delivery = "direct"  # no canary decider runs here: a passing candidate serves the next day
    if args.latency_budget_ms is not None:
        config.latency_budget_ms = args.latency_budget_ms
    args.latency_budget_ms = config.latency_budget_ms  # recorded in the protocol
    for flag, field in (("round_epochs", "epochs"), ("replay_ratio", "replay_ratio"), ("round_lr_factor", "lr_factor")):
        if getattr(args, flag) is not None:
            setattr(config, field, getattr(args, flag))
        setattr(args, flag, getattr(config, field))  # recorded in the protocol
    model = RecommenderModel(registry_dir=registry.root, catalog_path=journal, seed=args.seed)
    t = time.time()
    progress(f"bootstrap: {int(bounds[w0])} warm-up lines, {args.bootstrap_epochs} epochs, last {args.holdout_days} "
             f"day(s) held out")
    entry = bootstrap_recommender(registry, tmp / "trainer", epochs=args.bootstrap_epochs, limit=int(bounds[w0]),
                                  show_progress=False, model=model, holdout_days=args.holdout_days,
                                  text_encoder=text_encoder or export_text_encoder(tmp / "text-encoder.onnx"),
                                  config=config)
    bootstrap_s = time.time() - t
    progress(f"bootstrap: version {entry['version']} in {bootstrap_s:.0f} s; gate window {entry.get('window_rows')}")
    learner = Learner(model, registry, tmp / "trainer", config)
    if not learner.restore():
        raise RuntimeError("the bootstrap wrote no checkpoint")
    encoder = TextEncoder.from_registry(registry)
    served = ServedModel(registry, encoder)
    frozen = ServedModel(registry, encoder)
    frozen.load(served.load())
    history = UserHistory()
    history.seed_npz(served.users_npz)

    # ---- baselines' state: the warm-up
    purchases = Purchases(n_items)
    for d in range(w0):
        purchases.add_day(d, cust_of_day[d], item_of_day[d])
    tifu = TifuKnn(n_items, **{k: TIFU_TAFENG[k] for k in ("k", "within_decay", "group_decay", "alpha", "group_count")})
    tifu.update(purchases, list(purchases.baskets))

    # ---- the catalog as the service knows it: bootstrap items, then journal upserts
    journaled: dict[int, float] = {}  # item -> price last told to the catalog
    warm = np.arange(bounds[w0])
    med = df.iloc[warm].groupby(item_codes[warm])["unit_price"].median()
    for i, p in zip(med.index.to_numpy(), med.to_numpy()):
        journaled[int(i)] = float(p)
    catalog_items = sorted(journaled, key=lambda i: item_names[i])  # the bootstrap's catalog order (by id)
    titles = {i: tafeng_title(subclass[i]) for i in range(n_items)}

    tallies = {(m, v): Tally() for m in METHODS for v in VARIANTS}
    rounds: list[dict[str, Any]] = []
    rng = np.random.default_rng(args.seed)
    offset, evaluated, day_s, round_s, serve_s = 1, [], [], [], []
    for d in range(w0, n_days):
        t_day = time.time()
        # (1) the catalog: new products on sale today at today's price, every price as of yesterday
        upto = np.arange(bounds[d])
        med = df.iloc[upto].groupby(item_codes[upto])["unit_price"].median()
        price = np.zeros(n_items)
        price[med.index.to_numpy()] = med.to_numpy()
        today = np.arange(bounds[d], bounds[d + 1])
        new_today = np.flatnonzero(first_sold == d)
        if len(new_today):
            med_today = df.iloc[today].groupby(item_codes[today])["unit_price"].median()
            price[new_today] = med_today.reindex(new_today).to_numpy()
        upserts = []
        for i in np.flatnonzero(first_sold <= d).tolist():
            if journaled.get(i) != float(price[i]):
                if i not in journaled:
                    catalog_items.append(i)
                journaled[i] = float(price[i])
                upserts.append({"item_id": item_names[i], "title": titles[i], "category": str(subclass[i]),
                                "price": float(price[i])})
        with open(journal, "a") as f:
            for r in upserts:
                f.write(json.dumps(r) + "\n")
        # (2) serve every customer who buys today with the registry's version
        t = time.time()
        version = served.load()
        history.seed_npz(served.users_npz)
        row_of = {i: n for n, i in enumerate(catalog_items)}
        vectors = served.item_vectors([item_names[i] for i in catalog_items], [titles[i] for i in catalog_items],
                                      [str(subclass[i]) for i in catalog_items],
                                      np.asarray([journaled[i] for i in catalog_items]))
        baskets: dict[int, list[int]] = {}
        for c, i in zip(cust_of_day[d].tolist(), item_of_day[d].tolist()):
            b = baskets.setdefault(c, [])
            if i not in b:
                b.append(i)
        customers = sorted(baskets)
        hist_rows, hist_names, purchased_rows = [], [], []
        for c in customers:
            rows_, names_ = [], []
            for h in history.recent(cust_names[c], 2 * served.history_len):
                r = row_of.get(item_index.get(h, -1))
                if r is not None:
                    rows_.append(r)
                    names_.append(h)
                    if len(rows_) == served.history_len:
                        break
            hist_rows.append(rows_)
            hist_names.append(names_)
            purchased_rows.append([r for r in (row_of.get(item_index.get(h, -1)) for h in history.purchased(cust_names[c]))
                                   if r is not None])
        users = [cust_names[c] for c in customers]
        top_all, click_all = served.rank(vectors, users, hist_rows, [[] for _ in customers])
        returning = [n for n, c in enumerate(customers) if c in purchases.days]
        if args.max_customers and len(returning) > args.max_customers:
            returning = sorted(rng.choice(returning, args.max_customers, replace=False).tolist())
        ret_users, ret_hist = [users[n] for n in returning], [hist_rows[n] for n in returning]
        ret_bought, ret_none = [purchased_rows[n] for n in returning], [[] for _ in returning]
        top_ex, _ = served.rank(vectors, ret_users, ret_hist, ret_bought)
        # the bootstrap's version on the same customers, histories and catalog (its own vocabulary
        # and item tower: an item or customer it never saw is code 0 there, as in the service)
        frozen_vectors = vectors if frozen.version == version else frozen.item_vectors(
            [item_names[i] for i in catalog_items], [titles[i] for i in catalog_items],
            [str(subclass[i]) for i in catalog_items], np.asarray([journaled[i] for i in catalog_items]))
        frozen_all, _ = frozen.rank(frozen_vectors, ret_users, ret_hist, ret_none)
        frozen_ex, _ = frozen.rank(frozen_vectors, ret_users, ret_hist, ret_bought)
        sales = model.state.popularity([int(day_numbers[d])])[int(day_numbers[d])]  # sales before the day
        fresh_vectors = frozen_vectors.copy()
        fresh_vectors[:, -sales.shape[1]:] = np.log1p(sales[[model.state.item_index.get(item_names[i], 0)
                                                             for i in catalog_items]])
        fresh_all, _ = frozen.rank(fresh_vectors, ret_users, ret_hist, ret_none)
        fresh_ex, _ = frozen.rank(fresh_vectors, ret_users, ret_hist, ret_bought)
        serve_s.append(time.time() - t)
        evaluated.append(len(returning))
        # baselines and the tallies
        pop = purchases.popularity(d)
        order = popularity_order(pop)
        on_sale = first_sold <= d
        for j, n in enumerate(returning):
            c = customers[n]
            if j % TIFU_CHUNK == 0:  # a chunk of customers' score rows at a time (n_items wide each)
                tifu_scores = tifu.scores([customers[m] for m in returning[j:j + TIFU_CHUNK]])
            targets = set(baskets[c])
            own = purchases.days[c]
            seen = set(own)
            new_targets = targets - seen
            lists = {
                (MODEL, "all"): [catalog_items[r] for r in top_all[n] if r >= 0],
                (MODEL, "exclude-bought"): [catalog_items[r] for r in top_ex[j] if r >= 0],
                (FROZEN, "all"): [catalog_items[r] for r in frozen_all[j] if r >= 0],
                (FROZEN, "exclude-bought"): [catalog_items[r] for r in frozen_ex[j] if r >= 0],
                (FRESH, "all"): [catalog_items[r] for r in fresh_all[j] if r >= 0],
                (FRESH, "exclude-bought"): [catalog_items[r] for r in fresh_ex[j] if r >= 0],
                ("popularity", "all"): fill([], order),
                ("popularity", "exclude-bought"): fill([], order, seen),
                ("buy-again-days", "all"): fill(buy_again_days(own, pop), order),
                ("buy-again-recency", "all"): fill(buy_again_recency(own, pop, d, tau["tau_days"]), order),
                ("tifu-knn", "all"): top_from_scores(tifu_scores[j % TIFU_CHUNK], pop, order, frozenset(), on_sale),
                ("tifu-knn", "exclude-bought"): top_from_scores(tifu_scores[j % TIFU_CHUNK], pop, order, seen, on_sale),
            }
            lists[("buy-again-days", "exclude-bought")] = lists[("popularity", "exclude-bought")]
            lists[("buy-again-recency", "exclude-bought")] = lists[("popularity", "exclude-bought")]
            for (m, v), ranking in lists.items():
                if v == "all":
                    tallies[(m, v)].add(d, ranking, targets)
                elif new_targets:
                    tallies[(m, v)].add(d, ranking, new_targets)
        # (3) the day's purchases come back; one learning round of the production learner
        served_lists = [([item_names[catalog_items[r]] for r in top_all[n] if r >= 0],
                         [float(x) for r, x in zip(top_all[n], click_all[n]) if r >= 0]) for n in range(len(customers))]
        joined, offset = joined_day(int(day_numbers[d]), users, [[item_names[i] for i in baskets[c]] for c in customers],
                                    hist_names, served_lists, version, offset)
        t = time.time()
        learner.add(model.examples(joined))
        decision = learner.round({"offset": offset - 1, "pending": []})
        round_s.append(time.time() - t)
        rounds.append({"day": d, "served_by": version, "decision": decision["decision"],
                       "version": decision.get("version"), "reasons": decision.get("reasons", []),
                       "trained_rows": decision.get("trained_rows"), "window_rows": decision.get("window_rows"),
                       "gate": {k: {kk: vv for kk, vv in v.items() if kk in ("champion", "challenger", "interval")}
                                for k, v in decision.get("evidence", {}).get("metrics", {}).items()},
                       "seconds": round_s[-1]})
        # the service records each reported purchase into the user's history
        for c in customers:
            for i in baskets[c]:
                history.record(cust_names[c], item_names[i], purchase=True)
        purchases.add_day(d, cust_of_day[d], item_of_day[d])
        tifu.update(purchases, customers)
        day_s.append(time.time() - t_day)
        hr = {m: tallies[(m, "all")].summary()["hr@10_by_day"].get(str(d), math.nan) for m in METHODS}
        progress(f"day {d} ({str(day_values[d])[:10]}): {len(returning)} customers; HR@10 "
                 + ", ".join(f"{m} {v:.3f}" for m, v in hr.items())
                 + f"; served by v{version}, round {decision['decision']} in {round_s[-1]:.0f} s, day {day_s[-1]:.0f} s")

    result = summarize(args, tallies, rounds, tau, evaluated, day_values, w0)
    elapsed = time.time() - started
    result["timing_s"] = {"total": elapsed, "bootstrap": bootstrap_s, "round_median": float(np.median(round_s)),
                          "serving_median": float(np.median(serve_s)), "day_median": float(np.median(day_s))}
    result["machine"] = _machine_info(torch=torch.__version__)
    out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nwrote {out} in {elapsed:.0f} s")
    return 0


def summarize(args, tallies: dict, rounds: list[dict[str, Any]], tau: dict[str, Any], evaluated: list[int],
              day_values: np.ndarray, w0: int) -> dict[str, Any]:
    """Results, the model vs the strongest baseline (paired bootstrap over (customer, day)s),
    and the markdown table printed for the benchmarks document."""
    summary = {f"{m}/{v}": tallies[(m, v)].summary() for m in METHODS for v in VARIANTS}
    comparisons: dict[str, Any] = {}
    for v in VARIANTS:
        names = [b for b in BASELINES if not (v == "exclude-bought" and b.startswith("buy-again"))]
        strongest = max(names, key=lambda b: summary[f"{b}/{v}"]["hr@10"])
        boot = paired_bootstrap(np.asarray(tallies[(MODEL, v)].hit), np.asarray(tallies[(strongest, v)].hit),
                                resamples=args.resamples, seed=args.seed)
        ndcg = paired_bootstrap(np.asarray(tallies[(MODEL, v)].ndcg), np.asarray(tallies[(strongest, v)].ndcg),
                                resamples=args.resamples, seed=args.seed + 1)
        target = TARGET_RATIO if v == "all" else 1.0
        comparisons[v] = {"strongest_baseline": strongest, "model_hr@10": boot["mean_a"],
                          "baseline_hr@10": boot["mean_b"], "ratio": boot["ratio"],
                          "ratio_interval": boot["ratio_interval"], "difference": boot["difference"],
                          "difference_interval": boot["difference_interval"], "ndcg_ratio": ndcg["ratio"],
                          "ndcg_ratio_interval": ndcg["ratio_interval"], "target_ratio": target,
                          "met": bool(boot["ratio"] >= target) if v == "all" else bool(boot["ratio"] > target),
                          "units": boot["units"], "resamples": boot["resamples"], "confidence": boot["confidence"]}
    ablations: dict[str, Any] = {}
    for a in ABLATIONS:
        for v in VARIANTS:
            boot = paired_bootstrap(np.asarray(tallies[(MODEL, v)].hit), np.asarray(tallies[(a, v)].hit),
                                    resamples=args.resamples, seed=args.seed + 2)
            ablations.setdefault(a, {})[v] = {
                "model_hr@10": boot["mean_a"], "ablation_hr@10": boot["mean_b"], "ratio": boot["ratio"],
                "ratio_interval": boot["ratio_interval"], "units": boot["units"], "confidence": boot["confidence"]}
    decisions = collections.Counter(r["decision"] for r in rounds)
    lines = ["| method | HR@10 | NDCG@10 | HR@10 excl. bought | NDCG@10 excl. bought |", "|---|---|---|---|---|"]
    for m in METHODS:
        a, e = summary[f"{m}/all"], summary[f"{m}/exclude-bought"]
        excl = (f"{e['hr@10']:.4f} | {e['ndcg@10']:.4f}" if not m.startswith("buy-again")
                else "= popularity | = popularity")
        label = {"model": "model (production rounds, served by the exported ONNX graphs)",
                 FROZEN: "bootstrap-frozen (the first version, never replaced; same graphs)",
                 FRESH: "bootstrap-fresh-sales (the first version's graphs, each day's recent sales)",
                 "buy-again-recency": f"buy-again-recency (tau {tau['tau_days']:g} d)",
                 "tifu-knn": "tifu-knn (k 300, r_b 0.9, r_g 0.7, alpha 0.7, 7 groups)"}.get(m, m)
        lines.append(f"| {label} | {a['hr@10']:.4f} | {a['ndcg@10']:.4f} | {excl} |")
    lines.append("")
    lines.append(f"Window {str(day_values[w0])[:10]} .. {str(day_values[-1])[:10]} ({args.days} days); "
                 f"(customer, day) pairs: {summary[f'{MODEL}/all']['n']} (all), "
                 f"{summary[f'{MODEL}/exclude-bought']['n']} (with an item never bought before); every method on the "
                 f"same pairs and catalog.")
    lines.append(f"Learning rounds: {len(rounds)} ({', '.join(f'{k} {n}' for k, n in sorted(decisions.items()))}).")
    for v, c in comparisons.items():
        want = f">= {c['target_ratio']:g}x" if v == "all" else "above"
        lines.append(f"{v}: model / strongest baseline ({c['strongest_baseline']}) HR@10 {c['model_hr@10']:.4f} / "
                     f"{c['baseline_hr@10']:.4f} = {c['ratio']:.3f}x, {c['confidence']:.0%} paired-bootstrap interval "
                     f"[{c['ratio_interval'][0]:.3f}, {c['ratio_interval'][1]:.3f}] over {c['units']} (customer, day)s; "
                     f"NDCG@10 ratio {c['ndcg_ratio']:.3f}x; target {want}: {'MET' if c['met'] else 'MISSED'}")
    meaning = {FROZEN: "what the daily rounds add", FRESH: "what the rounds add beyond refreshing the recent sales"}
    for a, by_variant in ablations.items():
        for v, c in by_variant.items():
            lines.append(f"{v}: model / {a} HR@10 {c['model_hr@10']:.4f} / {c['ablation_hr@10']:.4f} = "
                         f"{c['ratio']:.3f}x, {c['confidence']:.0%} paired-bootstrap interval "
                         f"[{c['ratio_interval'][0]:.3f}, {c['ratio_interval'][1]:.3f}] ({meaning[a]})")
    table = "\n".join(lines)
    print(table)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "protocol": {"window_days": args.days, "window": [str(day_values[w0])[:10], str(day_values[-1])[:10]],
                         "max_customers_per_day": args.max_customers or "all", "customers_per_day": evaluated,
                         "seed": args.seed, "k": K, "bootstrap_epochs": args.bootstrap_epochs,
                         "bootstrap_holdout_days": args.holdout_days, "quick": args.quick,
                         "gate_latency_budget_ms": args.latency_budget_ms, "round_epochs": args.round_epochs,
                         "replay_ratio": args.replay_ratio, "round_lr_factor": args.round_lr_factor,
                         "end_offset_days": args.end_offset_days,
                         "recency_tau": tau, "tifu_knn": TIFU_TAFENG, "serving": "registry CURRENT version, "
                         "item_tower.onnx + model.onnx in ONNX Runtime", "learning": "one Learner.round per day on "
                         "the day's joined purchase outcomes (trainer settings)"},
            "results": summary, "comparison": comparisons, "ablations": ablations, "rounds": rounds,
            "decisions": dict(decisions), "table": table}


if __name__ == "__main__":
    raise SystemExit(main())
