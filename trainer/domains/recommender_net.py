"""Recommender network: two towers, ESMM heads, a learned repeat term, and the two graphs exported
(trainer.domains.recommender_export writes them; trainer.domains.recommender is the model glue).

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
  biases follows too slowly. Dv = 2d + 5. An item nobody has interacted with yet (and the
  unknown item, code 0) gets the cold-item prior as its recent sales: the geometric mean of the
  selling items' (RecoState.popularity). During training the id embedding AND the sales of a
  share of the items of each batch are dropped (the sales replaced by the prior): such an item
  looks exactly like a brand-new one, so the content path alone learns to rank it: that is
  what serves an item before anyone interacted with it; training rows carry their day, and
  each row's items get the sales as of that day (no look-ahead).

User tower: user id embedding (code 0 = unknown user, trained by dropping ids, so the
  fallback is context + popularity) + projection of the recency-weighted mean of the item
  vectors of the user's history + page, device and hour embeddings -> MLP -> [u_click (d) |
  u_cvr (d) | delta] (delta: how much this user repeats).

Heads (ESMM): click logit c = u_click . v_click + b_click + repeat; conversion logit
  r = u_cvr . v_cvr + b_cvr; pCTR = sigmoid(c), pCVR = sigmoid(r), purchase = pCTR x pCVR
  (P(purchase | shown), learned through the click, never from clicked rows alone). The pCTR
  served is calibrated: sigmoid(a * c + b), a and b fitted on the items shown, clicked or not.
  Ranking score = c + r: the log-odds form of pCTCVR, which one MatMul of the augmented
  user vector [u_click, u_cvr, 1, 1, 0] with the catalog matrix gives directly.
Repeat term (inside the graph): for each distinct item of the history,
  a * log1p(sum of learned recency weights of its occurrences) + beta(item) + delta(user) + g,
  added to its click logit: a learned frequency x recency x repeatability score, which is
  what beats "buy again" on grocery data.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from trainer.domains.recommender_data import DEVICES, HISTORY_LEN, PAGES, POPULARITY_TAU_DAYS, TEXT_DIM


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


# parameters with one entry per history place (most recent first)
PER_PLACE_PARAMETERS = ("pool_weight", "repeat_weight")


def longer_history(value: torch.Tensor, history_len: int, fill: float | None = None) -> torch.Tensor:
    """A per-place tensor learned with a shorter history, extended to history_len places: the
    older places start as its oldest one (fill: a constant instead, e.g. 0 for an optimizer's
    moments)."""
    missing = history_len - value.shape[0]
    if missing <= 0:
        return value
    tail = value[-1:].expand(missing) if fill is None else value.new_full((missing,), fill)
    return torch.cat([value, tail])


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
        # click calibration (Platt): the click probability served is sigmoid(a * c + b), [a, b]
        # fitted on the items shown (clicked or not) after each update (recommender_training.
        # fit_click_calibration); a buffer, not a parameter: no gradient step moves it, and the
        # ranking (c + r) does not depend on it
        self.register_buffer("click_calibration", torch.tensor([1.0, 0.0]))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's; weights saved before the click calibration existed get the identity,
        and weights learned with a shorter history weigh the older places like their oldest."""
        if "click_calibration" not in state_dict:
            state_dict = {**state_dict, "click_calibration": torch.tensor([1.0, 0.0])}
        if any(name in state_dict and state_dict[name].shape[0] < self.history_len for name in PER_PLACE_PARAMETERS):
            state_dict = {**state_dict, **{name: longer_history(state_dict[name], self.history_len)
                                           for name in PER_PLACE_PARAMETERS if name in state_dict}}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def click_probability(self, c: torch.Tensor) -> torch.Tensor:
        """The calibrated click probability of click logits c (the repeat term included)."""
        return torch.sigmoid(self.click_calibration[0] * c + self.click_calibration[1])

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
        click = net.click_probability(c)
        return items, score, click, click * torch.sigmoid(r)
