"""Recommender domain, trainer side: two towers, ESMM heads, a learned repeat term, export.

Item tower (exported alone as item_tower.onnx; the service runs it once per catalog item):
  item vector v [Dv] = [learned part | log1p(recent sales)]. Learned part = id embedding (0
  for an unknown item) + MLP(learned projection of the frozen sentence encoder's title
  embedding, category embedding, price-bucket embedding, log price), laid out as
  [v_click (d) | v_cvr (d) | b_click | b_cvr | beta]: the click and conversion parts, the two
  item biases (long-run popularity) and beta, the item's repeat propensity (milk is bought
  again, a kettle is not). Recent sales: the item's clicks and purchases decayed over 2 and 14
  days (trainer.domains.recommender_data.POPULARITY_TAU_DAYS), a snapshot taken at export
  (a buffer of the graph, by item code; 0 for an unknown item), weighted by learned weights in
  both heads: grocery demand follows promotions and seasons, which a daily update of the item
  biases follows too slowly. Dv = 2d + 5. During training the id embedding is dropped for a
  share of the items of each batch, so the content path alone ranks well: that is what serves
  an item before anyone interacted with it; training rows carry their day, and each row's
  items get the sales as of that day (no look-ahead).

User tower: user id embedding (code 0 = unknown user, trained by dropping ids, so the
  fallback is context + popularity) + projection of the recency-weighted mean of the item
  vectors of the user's history + page, device and hour embeddings -> MLP -> [u_click (d) |
  u_cvr (d) | delta] (delta: how much this user repeats).

Heads (ESMM): click logit c = u_click . v_click + b_click + repeat; conversion logit
  r = u_cvr . v_cvr + b_cvr; pCTR = sigmoid(c), pCVR = sigmoid(r), purchase = pCTR x pCVR
  (P(purchase | shown), learned through the click, never from clicked rows alone).
  Ranking score = c + r: the log-odds form of pCTCVR, which one MatMul of the augmented
  user vector [u_click, u_cvr, 1, 1, 0] with the catalog matrix gives directly.
Repeat term (inside the graph): for each distinct item of the history,
  a * log1p(sum of learned recency weights of its occurrences) + beta(item) + delta(user) + g,
  added to its click logit: a learned frequency x recency x repeatability score, which is
  what beats "buy again" on grocery data.

Training: every clicked or bought row is one sampled-softmax example over {the item, the
distinct items of its history, M items drawn uniformly from the catalog and the other items
of the mini-batch (a popularity-shaped sample that teaches the order among best sellers)},
with the logQ correction (minus the log probability that the sampler includes the item), so
scores rank the whole catalog; items the same user clicked or bought the same day are not
negatives of each other. Plus the ESMM log losses (click on shown rows and the drawn
negatives, click x conversion for the purchase) which keep the probabilities meaningful.
Mini-batches are made of whole contexts (one user, one day, one history: a basket), so the
user tower runs once per basket.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from trainer.domains.recommender_data import (COL_DAY, COL_DEVICE, COL_HIST, COL_HOUR, COL_ITEM, COL_PAGE, COL_USER,
                                              DEVICES, HISTORY_LEN, LEVEL_CLICK, LEVEL_IMPRESSION, LEVEL_PURCHASE,
                                              PAGES, POPULARITY_TAU_DAYS, TEXT_DIM, WIDTH, CatalogJournal, RecoState)
from trainer.export import batch1_latency_ms, declare_input_ranges
from trainer.learner import DomainModel, Examples

log = logging.getLogger(__name__)

MODEL_NAME = "recommender"
ITEM_TOWER_FILE = "item_tower.onnx"
LATENCY_CATALOG = 100_000  # catalog rows the latency gate scores (the serving target's size)
EVENT_LEVEL = {1: LEVEL_IMPRESSION, 2: LEVEL_CLICK, 3: LEVEL_CLICK, 4: LEVEL_PURCHASE}  # recommender.v1.Event


@dataclasses.dataclass(frozen=True)
class RecoDims:
    d: int = 24  # per head: Dv = 2d + 3
    hidden: int = 48  # user tower and item MLP width
    text_proj: int = 32
    category: int = 16
    price_buckets: int = 16
    price: int = 8

    @property
    def base_dim(self) -> int:
        """The learned part of an item vector: click (d), cvr (d), two biases, repeat propensity."""
        return 2 * self.d + 3

    @property
    def item_dim(self) -> int:
        """Dv: the learned part, then log1p of the item's recent sales per popularity timescale."""
        return self.base_dim + len(POPULARITY_TAU_DAYS)


def _pos_weight(raw: torch.Tensor) -> torch.Tensor:
    return F.softplus(raw)


class RecoNet(nn.Module):
    def __init__(self, users: int, items: int, categories: int, dims: RecoDims = RecoDims(),
                 history_len: int = HISTORY_LEN) -> None:
        super().__init__()
        self.dims, self.history_len = dims, history_len
        self.user_capacity, self.item_capacity, self.category_capacity = users, items, categories
        dv, h = dims.item_dim, dims.hidden
        # item tower
        # sparse gradients: a step touches the rows of its batch, not the whole (capacity-sized) table
        self.item_id = nn.Embedding(items + 1, dims.base_dim, padding_idx=0, sparse=True)
        nn.init.normal_(self.item_id.weight, std=0.01)
        with torch.no_grad():
            self.item_id.weight[0].zero_()
        self.text_proj = nn.Linear(TEXT_DIM, dims.text_proj)
        self.category = nn.Embedding(categories + 1, dims.category)
        self.price_bucket = nn.Embedding(dims.price_buckets, dims.price)
        self.register_buffer("price_bounds", torch.linspace(2.0, 8.0, dims.price_buckets - 1))
        self.register_buffer("log_price_mean", torch.tensor(4.5))
        self.register_buffer("log_price_std", torch.tensor(1.0))
        self.item_mlp = nn.Sequential(nn.Linear(dims.text_proj + dims.category + dims.price + 1, h), nn.ReLU(),
                                      nn.Linear(h, dims.base_dim))
        # recent sales per item code, as of the export (the trainer refreshes it at every
        # export; training passes each row's own as-of-that-day figures instead)
        self.register_buffer("popularity", torch.zeros(items + 1, len(POPULARITY_TAU_DAYS)))
        self.pop_click = nn.Parameter(torch.full((len(POPULARITY_TAU_DAYS),), 0.25))
        self.pop_cvr = nn.Parameter(torch.full((len(POPULARITY_TAU_DAYS),), 0.25))
        # user tower
        self.user_id = nn.Embedding(users + 1, h, sparse=True)
        nn.init.normal_(self.user_id.weight, std=0.05)
        self.page = nn.Embedding(len(PAGES) + 1, h)
        self.device = nn.Embedding(len(DEVICES) + 1, h)
        self.hour = nn.Embedding(24, h)
        for e in (self.page, self.device, self.hour):
            nn.init.zeros_(e.weight)  # no effect until live traffic teaches one
        self.history_proj = nn.Linear(dv, h)
        self.pool_weight = nn.Parameter(torch.zeros(history_len))
        self.user_mlp = nn.Sequential(nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2 * dims.d + 1))
        # repeat term
        self.repeat_weight = nn.Parameter(torch.full((history_len,), 0.5413))  # softplus = 1
        self.repeat_scale = nn.Parameter(torch.tensor(1.0))
        self.repeat_bias = nn.Parameter(torch.tensor(0.0))

    def init_popularity(self, item_codes: np.ndarray, n_items: int) -> None:
        """Start the item biases at log popularity in the bootstrap data (the sampled softmax
        would get there, slowly) and the repeat term at the lift a bought-before item has."""
        counts = np.bincount(item_codes[(item_codes > 0) & (item_codes <= n_items)], minlength=n_items + 1)[1:]
        seen = counts > 0
        if not seen.any():
            return
        logpop = np.log(counts[seen].astype(np.float64))
        # items never sold keep a zero id bias: their popularity comes from the content path
        bias = np.zeros(n_items, np.float32)
        bias[seen] = logpop - logpop.mean()
        d = self.dims.d
        with torch.no_grad():
            self.item_id.weight[1:n_items + 1, 2 * d] = torch.as_tensor(bias)
            self.item_id.weight[1:n_items + 1, 2 * d + 1] = torch.as_tensor(bias)
            self.repeat_bias.fill_(3.0)

    # ---- item tower ----
    def set_price_scale(self, prices: np.ndarray) -> None:
        lp = np.log1p(np.clip(np.asarray(prices, np.float64), 0, None))
        if len(lp) < 2:
            return
        qs = np.quantile(lp, np.linspace(0, 1, self.dims.price_buckets + 1)[1:-1])
        # Boundaries halfway between two distinct prices: a price never sits on a boundary,
        # where a last-bit difference of log1p between PyTorch and ONNX Runtime would flip
        # its bucket.
        u = np.unique(lp)
        idx = np.clip(np.searchsorted(u, qs, side="right"), 1, len(u) - 1) if len(u) > 1 else np.zeros(0, int)
        bounds = (u[idx - 1] + u[idx]) / 2 if len(u) > 1 else qs
        self.price_bounds.copy_(torch.as_tensor(bounds, dtype=torch.float32))
        self.log_price_mean.fill_(float(lp.mean()))
        self.log_price_std.fill_(float(max(lp.std(), 1e-3)))

    def content(self, text: torch.Tensor, category: torch.Tensor, price: torch.Tensor,
                projected: torch.Tensor | None = None) -> torch.Tensor:
        """text [n, 384] (or projected: text_proj already applied), category [n] codes,
        price [n] raw -> [n, Dv]."""
        lp = torch.log1p(price.clamp(min=0.0))
        bucket = (lp.unsqueeze(-1) > self.price_bounds).sum(-1)
        category = torch.where((category < 0) | (category > self.category_capacity), 0, category)
        x = torch.cat([self.text_proj(text) if projected is None else projected, self.category(category),
                       self.price_bucket(bucket),
                       ((lp - self.log_price_mean) / self.log_price_std).unsqueeze(-1)], dim=-1)
        return self.item_mlp(x)

    def item_base(self, item: torch.Tensor, text: torch.Tensor | None, category: torch.Tensor,
                  price: torch.Tensor, id_keep: torch.Tensor | None = None,
                  projected: torch.Tensor | None = None) -> torch.Tensor:
        """The learned part of the item vectors [n, base_dim]."""
        item = torch.where((item < 0) | (item > self.item_capacity), 0, item)
        ids = self.item_id(item)
        if id_keep is not None:
            ids = ids * id_keep.unsqueeze(-1)
        return self.content(text, category, price, projected) + ids

    @staticmethod
    def with_popularity(base: torch.Tensor, sales: torch.Tensor) -> torch.Tensor:
        return torch.cat([base, torch.log1p(sales.clamp(min=0.0))], dim=-1)

    def item_vectors(self, item: torch.Tensor, text: torch.Tensor | None, category: torch.Tensor,
                     price: torch.Tensor, id_keep: torch.Tensor | None = None,
                     projected: torch.Tensor | None = None, sales: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors [n, Dv]; sales: recent sales [n, 2] (default: the exported snapshot)."""
        if sales is None:
            sales = self.popularity[torch.where((item < 0) | (item > self.item_capacity), 0, item)]
        return self.with_popularity(self.item_base(item, text, category, price, id_keep, projected), sales)

    # ---- user tower ----
    def user_vectors(self, user: torch.Tensor, context: torch.Tensor, hist_vectors: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        """user [B], context [B, 3], hist_vectors [B, H, Dv], valid [B, H] -> [B, 2d + 1]."""
        user = torch.where((user < 0) | (user > self.user_capacity), 0, user)
        page = torch.where((context[:, 0] < 0) | (context[:, 0] > len(PAGES)), 0, context[:, 0])
        device = torch.where((context[:, 1] < 0) | (context[:, 1] > len(DEVICES)), 0, context[:, 1])
        hour = context[:, 2].clamp(0, 23)
        w = torch.exp(self.pool_weight - self.pool_weight.max()) * valid.to(hist_vectors.dtype)
        pooled = (hist_vectors * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-6)
        z = self.user_id(user) + self.history_proj(pooled) + self.page(page) + self.device(device) + self.hour(hour)
        return self.user_mlp(z)

    def repeat_values(self, history: torch.Tensor, valid: torch.Tensor, beta: torch.Tensor,
                      delta: torch.Tensor, with_first: bool = False):
        """Repeat term per history position [B, H]: non-zero only at the first (most recent)
        occurrence of each distinct item. history holds item codes or catalog rows (equality
        is all that is used), valid marks real entries, beta [B, H] the items' propensities."""
        same = (history.unsqueeze(2) == history.unsqueeze(1)) & valid.unsqueeze(1) & valid.unsqueeze(2)
        weight = _pos_weight(self.repeat_weight)
        count = (same.to(beta.dtype) * weight).sum(-1)  # recency-weighted occurrences of the item at j
        h = history.shape[1]
        earlier = torch.ones(h, h, dtype=torch.bool, device=history.device).tril(-1)
        first = valid & ~(same & earlier).any(-1)
        value = self.repeat_scale * torch.log1p(count) + beta + delta.unsqueeze(-1) + self.repeat_bias
        value = value * first.to(beta.dtype)
        return (value, first) if with_first else value

    def augmented_users(self, u: torch.Tensor) -> torch.Tensor:
        """[u_click, u_cvr, 1, 1, 0, w_pop]: one MatMul with item vectors gives c (without the
        repeat term) + r."""
        d = self.dims.d
        ones = torch.ones_like(u[:, :2])
        pop = (self.pop_click + self.pop_cvr).unsqueeze(0).expand(u.shape[0], -1)
        return torch.cat([u[:, :2 * d], ones, torch.zeros_like(u[:, :1]), pop], dim=1)

    def heads(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Click and conversion logits (without the repeat term) of users u [..., 2d+1] and
        items v [..., Dv] (broadcast)."""
        d, p = self.dims.d, self.dims.base_dim
        pop = v[..., p:]
        c = (u[..., :d] * v[..., :d]).sum(-1) + v[..., 2 * d] + (pop * self.pop_click).sum(-1)
        r = (u[..., d:2 * d] * v[..., d:2 * d]).sum(-1) + v[..., 2 * d + 1] + (pop * self.pop_cvr).sum(-1)
        return c, r


class ItemTowerExport(nn.Module):
    """item_tower.onnx: item [n,1], text [n,384], category [n,1], price [n,1] -> item_vector [n,Dv]."""

    def __init__(self, net: RecoNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, item, text, category, price):
        return self.net.item_vectors(item[:, 0], text, category[:, 0], price[:, 0])


class ScoringExport(nn.Module):
    """model.onnx: the user tower, the scoring of the whole catalog matrix (one MatMul), the
    repeat term, restrict/exclude filters and TopK, in one graph (see the module doc)."""

    def __init__(self, net: RecoNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, user, history, context, k, restrict, exclude, item_vectors):
        net, d = self.net, self.net.dims.d
        n = item_vectors.shape[0]
        valid = (history >= 0) & (history < n)
        rows = torch.where(valid, history, 0)
        hv = item_vectors[rows]  # [B, H, Dv]
        u = net.user_vectors(user[:, 0], context, hv, valid)
        scores = net.augmented_users(u) @ item_vectors.t()  # [B, N]: c + r without repeat
        rep = net.repeat_values(rows, valid, hv[..., 2 * d + 2], u[:, 2 * d])
        scores = scores.scatter_add(1, rows, rep)
        # exclude: -inf at listed rows (padding adds 0 to row 0)
        ex_valid = (exclude >= 0) & (exclude < n)
        scores = scores.scatter_add(1, torch.where(ex_valid, exclude, 0),
                                    torch.where(ex_valid, float("-inf"), 0.0).to(scores.dtype))
        # restrict: rows with any entry keep only those entries (max-scatter onto -inf)
        re_valid = (restrict >= 0) & (restrict < n)
        re_rows = torch.where(re_valid, restrict, 0)
        kept = torch.where(re_valid, torch.gather(scores, 1, re_rows), float("-inf"))
        has = re_valid.any(1, keepdim=True)
        scores = (scores + torch.where(has, float("-inf"), 0.0)).scatter_reduce(1, re_rows, kept, "amax")
        top_k = torch.clamp(k.max(), min=1, max=n).item()
        torch._check(top_k >= 1)
        torch._check(top_k <= scores.shape[1])
        score, items = torch.topk(scores, top_k, dim=1)
        v = item_vectors[items]  # [B, K, Dv]
        c, r = net.heads(u.unsqueeze(1), v)
        c = c + ((items.unsqueeze(2) == rows.unsqueeze(1)).to(rep.dtype) * rep.unsqueeze(1)).sum(-1)
        click = torch.sigmoid(c)
        return items, score, click, click * torch.sigmoid(r)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch ops on n intra-op threads, then restore. The recommender's ops are many and
    small: on a busy 2-core machine a second thread mostly spins waiting for the first
    (measured: 1 thread 0.09 s per training batch, 2 threads 2.2 s, under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class JointOptimizer:
    """Several optimizers stepped as one (SparseAdam for the id tables, Adam for the rest),
    with the state_dict/load_state_dict the learner's checkpoint uses."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers.values():
            o.step()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every group of every optimizer, the very dicts (as torch optimizers expose them), so the
        learner can scale the step size of all of them while in drift."""
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])


# ---- metrics ----
def ranking_metrics(rank: np.ndarray, k: int = 10) -> dict[str, float]:
    """HR@k and NDCG@k of single target items given their 0-based ranks."""
    if len(rank) == 0:
        return {f"hr@{k}": float("nan"), f"ndcg@{k}": float("nan")}
    hit = rank < k
    return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean())}


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan")


def decode_bytes_tensor(t) -> list[str]:
    """A V2 BYTES tensor (4-byte little-endian length, then the bytes, per element) as strings."""
    raw, out, pos = t.raw_data, [], 0
    while pos + 4 <= len(raw):
        n = int.from_bytes(raw[pos:pos + 4], "little")
        out.append(raw[pos + 4:pos + 4 + n].decode("utf-8", "replace"))
        pos += 4 + n
    return out


class RecommenderModel(DomainModel):
    """The learner's view of the recommender (see the module doc for the network).

    state: the vocabulary/catalog/interactions (RecoState), saved in the learner's checkpoint
    through domain_state()/load_domain_state(). encoder: texts -> title embeddings (a
    shared.text.TextEncoder; default: the registry's `text-encoder`, loaded on first need).
    catalog_path: the service's catalog journal, read for items the trainer does not know.
    """

    name = MODEL_NAME
    width = WIDTH

    def __init__(self, dims: RecoDims = RecoDims(), *, batch_size: int = 1024, lr: float = 5e-3,
                 sparse_lr: float = 5e-3,
                 negatives: int = 256, user_dropout: float = 0.1, id_dropout: float = 0.25,
                 esmm_weight: float = 0.3, encoder: Callable[[Sequence[str]], np.ndarray] | None = None,
                 registry_dir: str | Path | None = None, catalog_path: str | Path | None = None,
                 latency_catalog: int = LATENCY_CATALOG, seed: int = 0, threads: int = 1) -> None:
        self.dims, self.batch_size, self.lr, self.sparse_lr, self.negatives = dims, batch_size, lr, sparse_lr, negatives
        self.user_dropout, self.id_dropout, self.esmm_weight = user_dropout, id_dropout, esmm_weight
        self.state = RecoState()
        self._encoder = encoder
        self.registry_dir = registry_dir
        self.journal = CatalogJournal(catalog_path) if catalog_path else None
        self.latency_catalog = latency_catalog
        self.seed, self.threads = seed, threads
        self.on_batch: Callable[[int], None] | None = None  # progress callback (bootstrap's bar)
        self._features: tuple[int, dict[str, torch.Tensor]] | None = None
        self._exported: dict[str, Any] = {}
        self.skipped_unknown_items = 0

    # ---- state ----
    def domain_state(self) -> dict[str, Any]:
        return {"reco_state": self.state.to_dict()}

    def load_domain_state(self, state: dict[str, Any]) -> None:
        if "reco_state" in state:
            self.state = RecoState.from_dict(state["reco_state"])
            self._features = None

    def encoder(self) -> Callable[[Sequence[str]], np.ndarray]:
        if self._encoder is None:
            from shared.registry import ModelRegistry
            from shared.text import TextEncoder

            if self.registry_dir is None:
                raise RuntimeError("recommender: no text encoder and no registry to load one from")
            self._encoder = TextEncoder.from_registry(ModelRegistry(self.registry_dir)).encode
        return self._encoder

    def add_catalog(self, records, encoder=None) -> int:
        self._features = None
        return self.state.upsert_items(records, encoder or self.encoder())

    def _feature_tensors(self) -> dict[str, torch.Tensor]:
        if self._features is None or self._features[0] != self.state.revision:
            f = self.state.item_features()
            self._features = (self.state.revision, {
                "category": torch.from_numpy(f["category"]), "price": torch.from_numpy(f["price"]),
                "text": torch.from_numpy(f["text"]), "text_emb": torch.from_numpy(self.state.text_emb)})
        return self._features[1]

    # ---- network ----
    def new_network(self, bootstrap_X: np.ndarray) -> RecoNet:
        s = self.state
        if not s.item_capacity:
            # room to grow between bootstraps: new users and items get their own rows
            s.set_capacity(2 * s.n_users + 10_000, 2 * s.n_items + 10_000, 2 * len(s.categories) + 1_000)
        torch.manual_seed(self.seed)
        net = RecoNet(s.user_capacity, s.item_capacity, s.category_capacity, self.dims)
        if s.n_items:
            net.set_price_scale(np.asarray(s.item_price[1:], np.float32))
        X = np.asarray(bootstrap_X)
        if len(X) > 1:
            net.init_popularity(X[:, COL_ITEM].astype(np.int64), self.state.n_items)
        return net

    def optimizer(self, net):
        sparse = [net.item_id.weight, net.user_id.weight]
        dense = [p for p in net.parameters() if all(p is not q for q in sparse)]
        return JointOptimizer({"sparse": torch.optim.SparseAdam(sparse, lr=self.sparse_lr),
                               "dense": torch.optim.Adam(dense, lr=self.lr)})

    def _item_base(self, net: RecoNet, codes: torch.Tensor, id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The learned part of the item vectors of item codes, from the state's features."""
        f = self._feature_tensors()
        codes = codes.clamp(0, self.state.n_items)
        uniq_text, inv = torch.unique(f["text"][codes], return_inverse=True)
        projected = net.text_proj(f["text_emb"][uniq_text])[inv]  # each distinct title projected once
        return net.item_base(codes, None, f["category"][codes], f["price"][codes], id_keep, projected)

    def sales_tables(self, days) -> tuple[dict[int, int], torch.Tensor]:
        """Recent sales of every item code as of each day: (day -> index, [days, n_items+1, 2])."""
        days = sorted({int(x) for x in np.asarray(days).reshape(-1)})
        tables = self.state.popularity(days)
        return {d: n for n, d in enumerate(days)}, torch.from_numpy(np.stack([tables[d] for d in days]))

    def export_day(self) -> int:
        """The day the exported popularity is as of: the day after the latest known sale."""
        latest = self.state.latest_day()
        return latest + 1 if latest is not None else 0

    def all_item_vectors(self, net: RecoNet, day: int | None = None) -> torch.Tensor:
        """[n_items, Dv], row = item code - 1 (the catalog order of the export), with the
        popularity as of `day` (default: as exported, export_day())."""
        day = self.export_day() if day is None else int(day)
        codes = torch.arange(1, self.state.n_items + 1)
        with torch.no_grad():
            sales = torch.from_numpy(self.state.popularity([day])[day][1:])
            return net.with_popularity(self._item_base(net, codes), sales)

    @staticmethod
    def _split(X: np.ndarray) -> tuple[torch.Tensor, ...]:
        Xt = torch.from_numpy(np.ascontiguousarray(X, np.float32)).round().to(torch.int64)
        return Xt[:, COL_USER], Xt[:, COL_PAGE:COL_HOUR + 1], Xt[:, COL_ITEM], Xt[:, COL_HIST:]

    @staticmethod
    def contexts(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Group rows by what the user tower sees (user, context, history): (context index of
        each row, row of X that represents each context). The rows of one basket share one."""
        keys = np.ascontiguousarray(np.delete(np.asarray(X, np.float32), COL_ITEM, axis=1))
        view = keys.view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).ravel()
        _, first, inverse = np.unique(view, return_index=True, return_inverse=True)
        return inverse.reshape(-1), first

    def batches(self, X: np.ndarray, g: torch.Generator) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Mini-batches of whole contexts, about batch_size rows each: (context representative
        rows, rows, context index of each row within the batch)."""
        ctx_of_row, rep_rows = self.contexts(X)
        order = np.argsort(ctx_of_row, kind="stable")
        counts = np.bincount(ctx_of_row, minlength=len(rep_rows))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        perm = torch.randperm(len(rep_rows), generator=g).numpy()
        cum = np.cumsum(counts[perm])
        cuts = np.searchsorted(cum, np.arange(self.batch_size, cum[-1] if len(cum) else 0, self.batch_size), "left") + 1
        out = []
        for part in np.split(perm, cuts):
            if len(part) == 0:
                continue
            n = counts[part]
            local = np.repeat(np.arange(len(part)), n)
            offs = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
            rows = order[np.repeat(starts[part], n) + offs]
            out.append((rep_rows[part], rows, local))
        return out

    def train(self, net, opt, X, y, epochs, seed) -> None:
        with torch_threads(self.threads):
            self._train(net, opt, X, y, epochs, seed)

    def _train(self, net, opt, X, y, epochs, seed) -> None:
        net.train()
        g = torch.Generator().manual_seed(int(seed) + self.seed)
        user_all, ctx_all, item_all, hist_all = self._split(X)
        level_all = torch.from_numpy(np.asarray(y, np.float32)).round().to(torch.int64)
        days_col = np.asarray(X, np.float32)[:, COL_DAY].astype(np.int64) if len(X) else np.zeros(1, np.int64)
        day_index, sales = self.sales_tables(days_col)
        day_all = torch.from_numpy(np.asarray([day_index[int(x)] for x in days_col[:len(X)]], np.int64))
        n_items = max(1, self.state.n_items)
        sales = sales[:, :n_items + 1]
        d = net.dims.d
        m = min(self.negatives, n_items)
        # in-batch negatives are drawn like the rows: by each item's share of the rows
        item_share = torch.from_numpy(np.bincount(np.asarray(X, np.float32)[:, COL_ITEM].astype(np.int64).clip(0, n_items),
                                                  minlength=n_items + 1)[:n_items + 1] / max(1, len(X)))
        for _ in range(epochs):
            for ctx_rows, rows, local in self.batches(X, g):
                ctx_rows, rows, local = (torch.from_numpy(a) for a in (ctx_rows, rows, local))
                user, ctx, hist = user_all[ctx_rows], ctx_all[ctx_rows], hist_all[ctx_rows]  # per context
                item, level = item_all[rows], level_all[rows]  # per row
                day = day_all[ctx_rows]  # per context (a context is one user on one day)
                n_ctx, n_rows = len(ctx_rows), len(rows)
                user = torch.where(torch.rand(n_ctx, generator=g) < self.user_dropout, 0, user)
                valid = hist > 0
                # negatives: M uniform draws (without replacement) and the batch's own items (a
                # popularity-shaped sample, which teaches the order among best sellers); q = the
                # probability that an item is among them, for the logQ correction
                negs = torch.unique(torch.cat([torch.randperm(n_items, generator=g)[:m] + 1, item[item > 0]]))
                q = 1.0 - (1.0 - m / n_items) * (1.0 - item_share.to(torch.float64)) ** n_rows
                log_q = torch.log(q.clamp(min=1e-12)).to(torch.float32)  # [n_items + 1]
                mm = len(negs)
                codes = torch.cat([item, hist[valid], negs])
                uniq, inv = torch.unique(codes, return_inverse=True)
                keep = (torch.rand(len(uniq), generator=g) >= self.id_dropout).to(torch.float32)
                vu = self._item_base(net, uniq, keep)
                v_pos = net.with_popularity(vu[inv[:n_rows]], sales[day[local], item.clamp(0, n_items)])
                hb = vu.new_zeros(n_ctx, hist.shape[1], vu.shape[1])
                hb[valid] = vu[inv[n_rows:n_rows + int(valid.sum())]]
                hv = net.with_popularity(hb, sales[day.unsqueeze(1), hist.clamp(0, n_items)])
                vb_neg = vu[inv[-mm:]]
                pop_neg = torch.log1p(sales[day.unsqueeze(1), negs.unsqueeze(0)])  # [C, M, 2]
                u = net.user_vectors(user, ctx, hv, valid)  # [C, 2d+1]
                rep, first = net.repeat_values(hist, valid, hv[..., 2 * d + 2], u[:, 2 * d], with_first=True)
                s_hist = torch.einsum("cd,chd->ch", net.augmented_users(u), hv) + rep  # [C, H]
                c_neg = u[:, :d] @ vb_neg[:, :d].t() + vb_neg[:, 2 * d] + (pop_neg * net.pop_click).sum(-1)  # [C, M]
                r_neg = u[:, d:2 * d] @ vb_neg[:, d:2 * d].t() + vb_neg[:, 2 * d + 1] + (pop_neg * net.pop_cvr).sum(-1)
                # per row
                u_row, hist_row = u[local], hist[local]
                in_hist = (hist_row == item.unsqueeze(1)) & valid[local]  # [R, H]
                c_pos, r_pos = net.heads(u_row, v_pos)
                c_pos = c_pos + (rep[local] * in_hist).sum(1)
                positive = level >= LEVEL_CLICK
                # items the same context also clicked/bought are not negatives of each other
                taken = torch.zeros(n_ctx, hist.shape[1]).index_add_(0, local, (in_hist & positive.unsqueeze(1)).float())
                slot = torch.full((n_items + 1,), mm, dtype=torch.int64)
                slot[negs] = torch.arange(mm)
                # a draw is no negative for a context that has it in its history or clicked/bought it
                clash_ctx = torch.zeros(n_ctx, mm + 1, dtype=torch.bool)
                clash_ctx.scatter_(1, torch.where(valid, slot[hist.clamp(min=0)], mm), True)
                clash_ctx[local, slot[item.clamp(0, n_items)]] = True
                clash = clash_ctx[local][:, :mm]
                # sampled softmax with logQ correction over positive, history, drawn negatives
                s_pos = c_pos + r_pos - torch.where(in_hist.any(1), 0.0, log_q[item.clamp(0, n_items)])
                s_histc = torch.where(first[local] & ~in_hist & (taken[local] == 0), s_hist[local], float("-inf"))
                s_negc = torch.where(clash, float("-inf"), (c_neg + r_neg)[local] - log_q[negs])
                logits = torch.cat([s_pos.unsqueeze(1), s_histc, s_negc], dim=1)
                ce = -(torch.log_softmax(logits, dim=1)[:, 0] * positive).sum() / positive.sum().clamp(min=1)
                # ESMM: pCTR on the row's item and the uniform draws; pCTCVR = pCTR x pCVR
                click = positive.to(torch.float32)
                bought = (level >= LEVEL_PURCHASE).to(torch.float32)
                lp_buy = F.logsigmoid(c_pos) + F.logsigmoid(r_pos)
                l_click = F.binary_cross_entropy_with_logits(c_pos, click, reduction="sum")
                l_buy = -(bought * lp_buy + (1 - bought) * torch.log1p(-torch.exp(lp_buy).clamp(max=1 - 1e-6))).sum()
                neg_weight = (~clash_ctx[:, :mm]).float() * torch.zeros(n_ctx).index_add_(0, local, click).unsqueeze(1)
                lp_buy_neg = F.logsigmoid(c_neg) + F.logsigmoid(r_neg)
                l_neg = ((F.softplus(c_neg) - torch.log1p(-torch.exp(lp_buy_neg).clamp(max=1 - 1e-6))) * neg_weight).sum() / mm
                esmm = (l_click + l_buy + l_neg) / n_rows
                loss = ce + self.esmm_weight * esmm
                opt.zero_grad()
                loss.backward()
                opt.step()
                if self.on_batch is not None:
                    self.on_batch(1)
        net.eval()

    # ---- prediction ----
    def score_all(self, net: RecoNet, user: torch.Tensor, ctx: torch.Tensor, hist: torch.Tensor,
                  catalog: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores of every catalog row [B, N] (c + r + repeat), the user vectors and the repeat
        values; hist holds catalog rows (item code - 1), -1 = padding."""
        d = net.dims.d
        valid = hist >= 0
        rows = torch.where(valid, hist, 0)
        hv = catalog[rows]
        u = net.user_vectors(user, ctx, hv, valid)
        rep = net.repeat_values(rows, valid, hv[..., 2 * d + 2], u[:, 2 * d])
        scores = (net.augmented_users(u) @ catalog.t()).scatter_add(1, rows, rep)
        return scores, u, rep

    def predict(self, net, X) -> np.ndarray:
        """[n, 3]: pCTR and pCTCVR of each row's item, and its 0-based rank among all catalog
        items for that user (the gate's HR@10)."""
        with torch_threads(self.threads):
            return self._predict(net, X)

    def _predict(self, net, X) -> np.ndarray:
        net.eval()
        out = np.zeros((len(X), 3), np.float32)
        if len(X) == 0:
            return out
        user, ctx, item, hist = self._split(X)
        days = np.asarray(X, np.float32)[:, COL_DAY].astype(np.int64)
        with torch.no_grad():
            for day in np.unique(days):
                catalog = self.all_item_vectors(net, int(day))  # popularity as of the row's day
                on_day = np.flatnonzero(days == day)
                for a in range(0, len(on_day), 512):
                    sl = torch.from_numpy(on_day[a:a + 512])
                    h = torch.where(hist[sl] > 0, hist[sl] - 1, -1)
                    scores, u, rep = self.score_all(net, user[sl], ctx[sl], h, catalog)
                    rows = (item[sl] - 1).clamp(min=0)
                    target = scores.gather(1, rows.unsqueeze(1))
                    rank = (scores > target).sum(1)
                    c, r = net.heads(u, catalog[rows])
                    c = c + (rep * (h == rows.unsqueeze(1))).sum(1)
                    known = item[sl] > 0
                    out[sl.numpy(), 0] = torch.sigmoid(c).numpy()
                    out[sl.numpy(), 1] = (torch.sigmoid(c) * torch.sigmoid(r)).numpy()
                    out[sl.numpy(), 2] = torch.where(known, rank, self.state.n_items).numpy()
        return out

    def prequential_loss(self, y: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Log loss of the served click probability against clicked-or-bought."""
        clicked = (np.asarray(y) >= LEVEL_CLICK).astype(np.float64)
        p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
        return -(clicked * np.log(p) + (1 - clicked) * np.log(1 - p))

    def prequential_metrics(self, y: np.ndarray, served_p: np.ndarray) -> dict[str, float]:
        """What was served, judged by what happened: the served click probability of each item
        an outcome was reported for, against whether it was clicked or bought (the learning
        report's curve; report_metrics needs the candidate's full score rows instead)."""
        clicked = (np.asarray(y) >= LEVEL_CLICK).astype(np.float64)
        p = np.asarray(served_p, np.float64)
        out = {"click_rate": float(clicked.mean()), "mean_served_click_p": float(p.mean()),
               "click_log_loss": _log_loss(clicked, p)}
        if 0 < clicked.sum() < len(clicked):
            from sklearn.metrics import roc_auc_score

            out["served_click_auc"] = float(roc_auc_score(clicked, p))
        return out

    def gate_spec(self):
        """The gate (trainer/gate.py) on the window of recent outcomes neither version trained
        on: HR@10 of each clicked or bought item, ranked among every catalog item for that
        user, history and context as served (predict's rank column). Requests may also carry
        a candidate list or exclude the user's purchases; neither is in the learner's
        examples (the served record's candidate lists are not kept in the rows), so the rank
        is over the whole catalog, the way a request without them is served. HR@10 is a mean
        of hits: 100 clicks give it a standard error near 0.05. Until then the click log loss
        of all shown items decides on 20 clicks. The window is capped at 5,000 rows: each
        row scores the whole catalog, twice (both versions) per round."""
        from trainer.gate import GateSpec, log_loss_rows, mean_metric

        clicked = lambda y: np.asarray(y) >= LEVEL_CLICK  # noqa: E731
        return GateSpec(
            metrics=(mean_metric("hr@10", lambda y, p: (np.asarray(p)[:, 2] < 10).astype(np.float64), True,
                                 rows=clicked),),
            positive=clicked, min_positives=100, min_rows=200, max_rows=5000,
            fallback=mean_metric("click_log_loss", lambda y, p: log_loss_rows(clicked(y), np.asarray(p)[:, 0]),
                                 False),
            fallback_positives=20)

    def report_metrics(self, y, p) -> dict[str, float]:
        y = np.asarray(y)
        pos = y >= LEVEL_CLICK
        m = {"rows": int(len(y)), "clicked_or_bought": int(pos.sum()), "bought": int((y >= LEVEL_PURCHASE).sum())}
        if len(y):
            m.update(ranking_metrics(p[pos, 2], 10))
            m.update(ranking_metrics(p[pos, 2], 50))
            m["click_log_loss"] = _log_loss(pos.astype(np.float64), p[:, 0])
        return m

    # ---- export ----
    def export(self, net, path):
        """model.onnx at path and item_tower.onnx beside it; the catalog matrix of this
        version is kept for the parity and latency checks (signature_inputs)."""
        from shared.runtime.signature import signature_of_onnx

        path = Path(path)
        net.eval()
        # the popularity the served item vectors carry: recent sales as of the day after the
        # latest known sale (a fresh version every round keeps it current)
        day = self.export_day()
        with torch.no_grad():
            table = torch.from_numpy(self.state.popularity([day])[day])
            net.popularity.zero_()
            net.popularity[:len(table)] = table[:len(net.popularity)]
        self._exported = {"popularity_day": day}
        tower_path = path.parent / ITEM_TOWER_FILE
        tower = ItemTowerExport(net).eval()
        f = self._feature_tensors()
        n = max(1, self.state.n_items)
        codes = torch.arange(1, n + 1).clamp(max=self.state.n_items)
        tower_feeds = {"item": codes.unsqueeze(1).numpy(), "text": f["text_emb"][f["text"][codes]].numpy(),
                       "category": f["category"][codes].unsqueeze(1).numpy(),
                       "price": f["price"][codes].unsqueeze(1).numpy()}
        _export(tower, {k: torch.from_numpy(v[:7]) for k, v in tower_feeds.items()}, ["item_vector"], tower_path,
                {k: {0: "items"} for k in tower_feeds})
        with torch.no_grad():
            catalog = tower(*(torch.from_numpy(v) for v in tower_feeds.values())).numpy()
        tower_diff = _max_abs(_ort_run(tower_path, tower_feeds)[0], catalog)
        scoring = ScoringExport(net).eval()
        example = _scoring_example(catalog[:97] if len(catalog) >= 97 else _pad_rows(catalog, 97), self.dims)
        _export(scoring, example, ["items", "score", "click", "purchase"], path,
                {"user": {0: "batch"}, "history": {0: "batch"}, "context": {0: "batch"}, "k": {0: "batch"},
                 "restrict": {0: "batch", 1: "restrict"}, "exclude": {0: "batch", 1: "exclude"},
                 "item_vectors": {0: "catalog"}})
        declare_input_ranges(path, scoring_input_ranges(net))
        self._exported.update({"catalog": catalog, "tower_parity": tower_diff, "folder": path.parent,
                               "signature": signature_of_onnx(path)})
        return path, scoring

    def signature_inputs(self, X) -> dict[str, np.ndarray]:
        """Rows as served (from X), a realistic catalog: this version's item vectors plus
        perturbed copies up to latency_catalog rows (no exact ties), some rows restricted or
        excluded."""
        catalog = self._exported.get("catalog")
        if catalog is None:
            raise RuntimeError("signature_inputs needs export() first (it uses the exported catalog)")
        rng = np.random.default_rng(1)
        if len(catalog) < self.latency_catalog:
            extra = catalog[rng.integers(0, len(catalog), self.latency_catalog - len(catalog))]
            extra = extra + rng.normal(0, 0.05, extra.shape).astype(np.float32)
            catalog = np.concatenate([catalog, extra]).astype(np.float32)
        X = np.asarray(X, np.float32)
        if len(X) == 0:
            X = np.zeros((4, WIDTH), np.float32)
        X = X[:64]
        b = len(X)
        user, ctx, _, hist = (t.numpy() for t in self._split(X))
        restrict = np.full((b, 8), -1, np.int64)
        exclude = np.full((b, 4), -1, np.int64)
        restrict[1::4] = rng.integers(0, len(catalog), (len(restrict[1::4]), 8))
        exclude[2::4, :2] = rng.integers(0, len(catalog), (len(exclude[2::4]), 2))
        return {"user": user.reshape(b, 1), "history": np.where(hist > 0, hist - 1, -1).astype(np.int64),
                "context": ctx.astype(np.int64), "k": np.full((b, 1), 10, np.int64), "restrict": restrict,
                "exclude": exclude, "item_vectors": catalog}

    def parity(self, module, path, feeds) -> float:
        """Max abs difference of ONNX Runtime vs PyTorch over scores and probabilities (equal
        -inf counts as equal), after checking that both pick the same items except where two
        scores tie within the tolerance; also the item tower's difference."""
        got = _ort_run(path, feeds)
        with torch.no_grad():
            want = [t.numpy() for t in module(*(torch.from_numpy(np.asarray(v)) for v in feeds.values()))]
        return max(scoring_parity(got, want), float(self._exported.get("tower_parity", 0.0)))

    def latency_ms(self, path, feeds) -> float:
        return batch1_latency_ms(path, feeds, runs=100, unbatched=("item_vectors",))

    def extra_files(self, net, folder) -> list[Path]:
        folder = Path(folder)
        tower = self._exported.get("folder", folder) / ITEM_TOWER_FILE
        return [tower, self.state.write_vocab(folder / "vocab.json"), self.state.write_catalog(folder / "catalog.jsonl"),
                self.state.write_users(folder / "users.npz")]

    def manifest_extra(self, y, p) -> dict[str, Any]:
        return {"history_len": HISTORY_LEN, "item_vector_dim": self.dims.item_dim, "pages": list(PAGES),
                "devices": list(DEVICES), "text_dim": TEXT_DIM, "users": self.state.n_users,
                "items": self.state.n_items, "categories": len(self.state.categories),
                "capacity": {"users": self.state.user_capacity, "items": self.state.item_capacity},
                "score": "click logit + conversion logit (log-odds of pCTCVR), repeat term included",
                "item_vector_layout": {"click": [0, self.dims.d], "cvr": [self.dims.d, 2 * self.dims.d],
                                       "click_bias": 2 * self.dims.d, "cvr_bias": 2 * self.dims.d + 1,
                                       "repeat_propensity": 2 * self.dims.d + 2,
                                       "log1p_recent_sales": [self.dims.base_dim, self.dims.item_dim]},
                "popularity_tau_days": list(POPULARITY_TAU_DAYS),
                "popularity_as_of_day": self._exported.get("popularity_day"),
                "latency_catalog_rows": self.latency_catalog}

    # ---- joined examples (what the service records) ----
    def _learn_catalog(self) -> None:
        if self.journal is not None:
            records = self.journal.read_new()
            if records:
                self.add_catalog(records)

    def examples(self, joined) -> Examples:
        """Rows from joined recommender outcomes: the user (by id, from the packed request: a
        user the serving version did not know gets a code now), the history as served (item
        ids, mapped to codes), the served context, the outcome's item and its event level.
        An item is learnable once its features are known (catalog journal); rows of an item
        with no known features are skipped and counted. Events of the same (prediction, item)
        within one call count once, at the highest level (a purchase implies the click)."""
        from protos.recommender.v1 import recommender_pb2 as rec
        from shared.feedback import tensor_to_numpy

        best: dict[tuple[str, str], tuple[int, Any]] = {}
        for j in joined:
            if j.outcome.WhichOneof("outcome") != "recommendation":
                continue
            o = j.outcome.recommendation
            level = EVENT_LEVEL.get(int(o.event))
            if level is None or not o.item_id:
                continue
            key = (j.prediction_id, o.item_id)
            if key not in best or level > best[key][0] or (level == best[key][0] and j.offset > best[key][1].offset):
                best[key] = (level, j)
        if not best:
            return Examples.empty(WIDTH)
        self._learn_catalog()
        rows, levels, served, offsets, pos_users, pos_items, pos_days = [], [], [], [], [], [], []
        for (_, item_id), (level, j) in sorted(best.items(), key=lambda kv: kv[1][1].offset):
            inputs = {t.name: t for t in j.served.inputs}
            outputs = {t.name: t for t in j.served.outputs}
            item = self.state.item_code(item_id)
            if item == 0:
                self.skipped_unknown_items += 1
                continue
            user_id = ""
            if j.served.HasField("request"):
                req = rec.RecommendRequest()
                if j.served.request.Unpack(req):
                    user_id = req.user_id
            user = self.state.user_code(user_id, add=True) if user_id else 0
            row = np.zeros(WIDTH, np.float32)
            row[COL_USER] = user
            if "context" in inputs:
                ctx = tensor_to_numpy(inputs["context"]).reshape(-1)
                if ctx.shape == (3,):
                    row[COL_PAGE] = ctx[0] if 0 <= ctx[0] <= len(PAGES) else 0
                    row[COL_DEVICE] = ctx[1] if 0 <= ctx[1] <= len(DEVICES) else 0
                    row[COL_HOUR] = min(max(int(ctx[2]), 0), 23)
            row[COL_ITEM] = item
            day = int((j.outcome.occurred_at or j.served.served_at) // 86400)
            row[COL_DAY] = day
            hist = [self.state.item_code(h) for h in decode_bytes_tensor(inputs["history_ids"])] \
                if "history_ids" in inputs else []
            hist = [h for h in hist if h > 0][:HISTORY_LEN]
            row[COL_HIST:] = -1
            row[COL_HIST:COL_HIST + len(hist)] = hist
            p = np.nan
            if "item_ids" in outputs and "click" in outputs:
                ids = decode_bytes_tensor(outputs["item_ids"])
                clicks = tensor_to_numpy(outputs["click"]).reshape(-1)
                if item_id in ids and ids.index(item_id) < len(clicks):
                    p = float(clicks[ids.index(item_id)])
            rows.append(row)
            levels.append(level)
            served.append(p)
            offsets.append(j.offset)
            if level >= LEVEL_CLICK:
                pos_users.append(user)
                pos_items.append(item)
                pos_days.append(day)
        self.state.record_interactions(pos_users, pos_items, pos_days)
        if self.skipped_unknown_items:
            log.warning("recommender: %d outcome rows so far name items with no known features (not in the catalog "
                        "journal): skipped", self.skipped_unknown_items)
        if not rows:
            return Examples.empty(WIDTH)
        return Examples(np.stack(rows), np.asarray(levels, np.float32), np.asarray(served, np.float32),
                        np.asarray(offsets, np.int64))


def model_from_settings(s=None) -> RecommenderModel:
    """The trainer's recommender (DOMAIN_MODELS): the registry's text encoder, the service's
    catalog journal (TrainerSettings.catalog_path)."""
    if s is None:
        return RecommenderModel()
    return RecommenderModel(registry_dir=s.registry_dir, catalog_path=s.catalog_path)


# ---- export helpers ----
def _export(module: nn.Module, example: dict[str, torch.Tensor], outputs: list[str], path: Path,
            dynamic: dict[str, dict[int, str]]) -> Path:
    import warnings

    import onnx

    dims: dict[str, torch.export.Dim] = {}
    shapes = {}
    for name, axes in dynamic.items():
        shapes[name] = {}
        for axis, dim_name in axes.items():
            if dim_name not in dims:
                dims[dim_name] = torch.export.Dim(dim_name, min=1, max=1 << 24)
            shapes[name][axis] = dims[dim_name]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        torch.onnx.export(module, tuple(example.values()), str(path), input_names=list(example), output_names=outputs,
                          dynamic_shapes={k: shapes.get(k, {}) for k in example}, dynamo=True, opset_version=18,
                          external_data=False, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def scoring_input_ranges(net: RecoNet) -> dict[str, tuple[int, int]]:
    """The ids the scoring graph's index inputs may take (declared in model.onnx): user codes
    up to the user table's capacity (0 = unknown), context codes (page, device, hour) up to the
    largest of the three vocabularies. history/restrict/exclude hold rows of the catalog
    matrix the request itself brings (its size is not known at export), and the graph masks
    rows outside it, so they have no static range; k is clamped by the graph."""
    return {"user": (0, net.user_capacity), "context": (0, max(len(PAGES), len(DEVICES), 23))}


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    reps = int(math.ceil(n / max(1, len(a))))
    return np.concatenate([a] * reps)[:n] if len(a) else np.zeros((n, a.shape[1]), np.float32)


def _scoring_example(catalog: np.ndarray, dims: RecoDims) -> dict[str, torch.Tensor]:
    """Example inputs for the exporter: every dynamic axis a distinct size, none 1."""
    b, n = 3, len(catalog)
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(-1, n, (b, HISTORY_LEN), generator=g)
    return {"user": torch.tensor([[1], [0], [2]]), "history": hist,
            "context": torch.tensor([[1, 2, 10], [0, 0, 0], [3, 1, 23]]), "k": torch.tensor([[5], [10], [2]]),
            "restrict": torch.tensor([[-1] * 5, [1, 2, 3, -1, -1], [-1] * 5]),
            "exclude": torch.tensor([[4, -1, -1, -1], [-1] * 4, [0, 1, -1, -1]]),
            "item_vectors": torch.from_numpy(np.ascontiguousarray(catalog, np.float32))}


def _ort_session(path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_run(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _ort_session(path).run(None, dict(feeds))


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def scoring_parity(got: Sequence[np.ndarray], want: Sequence[np.ndarray], tie_tol: float = 1e-4) -> float:
    """Parity of (items, score, click, purchase) from two runs: inf when the filtered (-inf)
    entries differ or an item differs without a score tie; else the max abs difference of
    scores and probabilities at finite entries."""
    items_a, score_a, click_a, buy_a = got
    items_b, score_b, click_b, buy_b = want
    if items_a.shape != items_b.shape:
        return float("inf")
    fin_a, fin_b = np.isfinite(score_a), np.isfinite(score_b)
    if not np.array_equal(fin_a, fin_b):
        return float("inf")
    differs = (items_a != items_b) & fin_a
    if differs.any():
        # a swap of two tied items is not a difference of the models
        if np.max(np.abs(score_a[differs] - score_b[differs])) > tie_tol:
            return float("inf")
    same = fin_a & ~differs
    diffs = [_max_abs(score_a[fin_a], score_b[fin_a])]
    diffs += [_max_abs(x[same], y[same]) for x, y in ((click_a, click_b), (buy_a, buy_b))]
    return max(diffs)


def catalog_vocab_json(path: Path) -> dict[str, list[str]]:
    return json.loads(Path(path).read_text())
