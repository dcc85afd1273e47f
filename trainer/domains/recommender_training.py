"""Recommender training: the sampled softmax with logQ correction plus the ESMM losses, run on
mini-batches of whole contexts (trainer.domains.recommender.RecommenderModel.train calls it).

Training: every clicked or bought row is one sampled-softmax example over {the item, the
distinct items of its history, M items drawn uniformly from the catalog and the other items
of the mini-batch (a popularity-shaped sample that teaches the order among best sellers)},
with the logQ correction (minus the log probability that the sampler includes the item), so
scores rank the whole catalog; items the same user clicked or bought the same day are not
negatives of each other. Plus the ESMM log losses (click on shown rows and the drawn
negatives, click x conversion for the purchase) which keep the probabilities meaningful.
Mini-batches are made of whole contexts (one user, one day, one history: a basket), so the
user tower runs once per basket.

Items shown and not clicked (rows at the impression level with a served place, COL_POSITION:
the impressions the joiner derives from served records) calibrate the click probability and do
not move the ranking: they are left out of the gradient losses above, and after the update the
click calibration [a, b] (RecoNet.click_probability: sigmoid(a * c + b)) is fitted by maximum
likelihood on the shown rows, clicked or not (fit_click_calibration). An item a list showed
is, by construction, one the serving version ranked high: as a ranking negative it would teach
the next version to avoid what the last one showed (the choice is a design argument, not a
measured comparison: tests/test_impressions.py checks that HR@10 does not drop against a learner
fed the clicks alone).

Position bias: a shown item lower in the list is clicked less for reasons that are not the
item's. Rows of served items carry their 1-based place; a click at place p is weighted by
1 / theta_p in the ranking and click losses (inverse propensity), theta_p = the click rate at p
relative to place 1 over the rows being trained on (smoothed toward the overall rate, clipped to
[0.1, 1]), the weights self-normalized to mean 1 over the clicks, so the order among items no
longer rewards having been shown on top. The calibration is fitted without weights: the click
probability served is that of a click where such items are shown. Serving has no position input.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from trainer.domains.recommender_data import (COL_DAY, COL_ITEM, COL_POSITION, HISTORY_LEN, LEVEL_CLICK, LEVEL_PURCHASE,
                                              WIDTH, upgrade_rows)
from trainer.domains.recommender_net import PER_PLACE_PARAMETERS, RecoDims, RecoNet, longer_history
from trainer.learner import Examples


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


def optimizer_parameters(net: RecoNet) -> tuple[list[torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """The id tables (SparseAdam) and the named rest (Adam), in the optimizers' order."""
    sparse = [net.item_id.weight, net.user_id.weight]
    return sparse, [(n, p) for n, p in net.named_parameters() if all(p is not q for q in sparse)]


def upgrade_checkpoint(state: dict[str, Any], dims: RecoDims) -> dict[str, Any]:
    """The learner's checkpoint of a trainer whose rows held a shorter history (64 places before
    HISTORY_LEN became 128), in today's layout: its replay and window rows get empty older
    places (upgrade_rows), its networks weigh them like their oldest place (RecoNet.
    load_state_dict) and the dense optimizer's moments for the per-place weights start at 0
    there. A checkpoint already in today's layout comes back as it is."""
    upgraded = dict(state)
    for key in ("replay", "window", "holdout"):
        ex = state.get(key)
        if isinstance(ex, Examples) and ex.X.shape[1] != WIDTH:
            upgraded[key] = Examples(upgrade_rows(ex.X), ex.y, ex.served_p, ex.offsets)
    dense = state["opt"].get("dense") if isinstance(state.get("opt"), dict) else None
    if dense is not None:
        _, named = optimizer_parameters(RecoNet(1, 1, 1, dims))
        places = {i for i, (n, _) in enumerate(named) if n in PER_PLACE_PARAMETERS}
        moments = {i: ({k: (longer_history(v, HISTORY_LEN, 0.0) if k in ("exp_avg", "exp_avg_sq") else v)
                        for k, v in s.items()} if i in places else s) for i, s in dense["state"].items()}
        upgraded["opt"] = {**state["opt"], "dense": {**dense, "state": moments}}
    return upgraded


MIN_PROPENSITY = 0.1  # clicks at a place clicked 10x less than the top weigh at most 10x
PROPENSITY_PRIOR_ROWS = 50.0  # shown rows' worth of the overall click rate each place's rate starts from


def click_propensities(position: np.ndarray, level: np.ndarray) -> np.ndarray:
    """theta by place (index = 1-based place; [0] = 1 for rows from no served list): the click
    rate of the shown rows at each place relative to place 1, smoothed toward the overall rate,
    clipped to [MIN_PROPENSITY, 1]."""
    position = np.asarray(position, np.int64)
    clicked = np.asarray(level) >= LEVEL_CLICK
    shown = position > 0
    top = int(position.max()) if len(position) else 0
    theta = np.ones(top + 1)
    if not shown.any():
        return theta
    n = np.bincount(position[shown], minlength=top + 1).astype(np.float64)
    c = np.bincount(position[shown], weights=clicked[shown].astype(np.float64), minlength=top + 1)
    overall = c.sum() / n.sum()
    rate = (c + PROPENSITY_PRIOR_ROWS * overall) / (n + PROPENSITY_PRIOR_ROWS)
    if rate[1] > 0:
        theta[1:] = np.clip(rate[1:] / rate[1], MIN_PROPENSITY, 1.0)
    return theta


def click_weights(position: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Per row: 1 / theta of its place for a clicked row, normalized to mean 1 over the clicked
    rows; 1 for every other row (see the module doc)."""
    position = np.asarray(position, np.int64)
    clicked = np.asarray(level) >= LEVEL_CLICK
    w = np.ones(len(position))
    if not clicked.any():
        return w
    inv = 1.0 / click_propensities(position, level)[position[clicked]]
    w[clicked] = inv / inv.mean()
    return w


MIN_CALIBRATION_ROWS = 100  # shown rows (with at least one click and one not) before a fit
CALIBRATION_ROWS = 20_000  # the newest shown rows the fit uses


def click_logits(model, net, X: np.ndarray) -> np.ndarray:
    """[n]: the click logit c (repeat term included, before calibration) of each row's item,
    as RecommenderModel.predict scores it, without ranking the whole catalog."""
    net.eval()
    out = np.zeros(len(X), np.float32)
    if len(X) == 0:
        return out
    user, ctx, item, hist = model._split(X)
    days = np.asarray(X, np.float32)[:, COL_DAY].astype(np.int64)
    d = net.dims.d
    with torch.no_grad():
        for day in np.unique(days):
            catalog = model.all_item_vectors(net, int(day))
            on_day = np.flatnonzero(days == day)
            for a in range(0, len(on_day), 2048):
                sl = torch.from_numpy(on_day[a:a + 2048])
                h = torch.where(hist[sl] > 0, hist[sl] - 1, -1)
                valid = h >= 0
                h_rows = torch.where(valid, h, 0)
                hv = catalog[h_rows]
                u = net.user_vectors(user[sl], ctx[sl], hv, valid)
                rep = net.repeat_values(h_rows, valid, hv[..., 2 * d + 2], u[:, 2 * d])
                rows = (item[sl] - 1).clamp(min=0)
                c, _ = net.heads(u, catalog[rows])
                out[sl.numpy()] = (c + (rep * (h == rows.unsqueeze(1))).sum(1)).numpy()
    return out


def fit_click_calibration(model, net, X, y) -> dict[str, float] | None:
    """Fit net.click_calibration [a, b] (sigmoid(a * c + b) = P(click | shown)) by maximum
    likelihood on the rows of X with a served place, clicked or not (the newest
    CALIBRATION_ROWS); a >= 0.05 keeps the probability increasing in the click logit. None
    (calibration unchanged) with fewer than MIN_CALIBRATION_ROWS such rows or one class only."""
    X = np.asarray(X, np.float32)
    shown = np.flatnonzero(X[:, COL_POSITION] > 0)[-CALIBRATION_ROWS:] if len(X) else np.zeros(0, np.int64)
    if len(shown) < MIN_CALIBRATION_ROWS:
        return None
    clicked = torch.from_numpy((np.asarray(y)[shown] >= LEVEL_CLICK).astype(np.float32))
    if clicked.sum() in (0, len(shown)):
        return None
    c = torch.from_numpy(click_logits(model, net, X[shown]))
    ab = net.click_calibration.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([ab], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def nll():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(ab[0].clamp(min=0.05) * c + ab[1], clicked)
        loss.backward()
        return loss

    opt.step(nll)
    with torch.no_grad():
        fitted = torch.stack([ab[0].clamp(min=0.05), ab[1]])
        if torch.isfinite(fitted).all():
            net.click_calibration.copy_(fitted)
        p = torch.sigmoid(net.click_calibration[0] * c + net.click_calibration[1])
    return {"rows": len(shown), "click_rate": float(clicked.mean()), "mean_click_p": float(p.mean()),
            "a": float(net.click_calibration[0]), "b": float(net.click_calibration[1])}


def train_epochs(model, net, opt, X, y, epochs, seed) -> None:
    """`epochs` passes of the loss over X (levels y) for a RecommenderModel `model` and its net."""
    net.train()
    g = torch.Generator().manual_seed(int(seed) + model.seed)
    user_all, ctx_all, item_all, hist_all = model._split(X)
    level_all = torch.from_numpy(np.asarray(y, np.float32)).round().to(torch.int64)
    position_all = np.asarray(X, np.float32)[:, COL_POSITION].round().astype(np.int64).clip(min=0)
    weight_all = torch.from_numpy(click_weights(position_all, level_all.numpy()).astype(np.float32))
    # shown and not clicked: calibration only (see the module doc)
    weight_all[torch.from_numpy(position_all > 0) & (level_all < LEVEL_CLICK)] = 0.0
    days_col = np.asarray(X, np.float32)[:, COL_DAY].astype(np.int64) if len(X) else np.zeros(1, np.int64)
    day_index, sales = model.sales_tables(days_col)
    day_all = torch.from_numpy(np.asarray([day_index[int(x)] for x in days_col[:len(X)]], np.int64))
    n_items = max(1, model.state.n_items)
    sales = sales[:, :n_items + 1]
    d = net.dims.d
    m = min(model.negatives, n_items)
    # in-batch negatives are drawn like the rows: by each item's share of the rows
    item_share = torch.from_numpy(np.bincount(np.asarray(X, np.float32)[:, COL_ITEM].astype(np.int64).clip(0, n_items),
                                              minlength=n_items + 1)[:n_items + 1] / max(1, len(X)))
    for _ in range(epochs):
        for ctx_rows, rows, local in model.batches(X, g):
            ctx_rows, rows, local = (torch.from_numpy(a) for a in (ctx_rows, rows, local))
            user, ctx, hist = user_all[ctx_rows], ctx_all[ctx_rows], hist_all[ctx_rows]  # per context
            item, level, weight = item_all[rows], level_all[rows], weight_all[rows]  # per row
            day = day_all[ctx_rows]  # per context (a context is one user on one day)
            n_ctx, n_rows = len(ctx_rows), len(rows)
            user = torch.where(torch.rand(n_ctx, generator=g) < model.user_dropout, 0, user)
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
            # cold-item simulation: a dropped item loses its id embedding AND its recent sales,
            # which get the cold-item prior (row 0 of the sales table: RecoState.popularity) as a
            # brand-new item has when it is served (no id row, the prior in the exported
            # snapshot), so the content path (title, category, price) learns to score a new item
            # on its own instead of only as a correction to an id and sales
            keep = (torch.rand(len(uniq), generator=g) >= model.id_dropout).to(torch.float32)
            code = torch.arange(n_items + 1)  # item code -> the row of the sales table its features use
            if model.cold_items:
                code[uniq.clamp(0, n_items)] = torch.where(keep > 0, uniq.clamp(0, n_items), 0)
            vu = model._item_base(net, uniq, keep)
            item_c = code[item.clamp(0, n_items)]
            v_pos = net.with_popularity(vu[inv[:n_rows]], sales[day[local], item_c])
            hb = vu.new_zeros(n_ctx, hist.shape[1], vu.shape[1])
            hb[valid] = vu[inv[n_rows:n_rows + int(valid.sum())]]
            hv = net.with_popularity(hb, sales[day.unsqueeze(1), code[hist.clamp(0, n_items)]])
            vb_neg = vu[inv[-mm:]]
            pop_neg = torch.log1p(sales[day.unsqueeze(1), code[negs].unsqueeze(0)])  # [C, M, 2]
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
            ce = -(torch.log_softmax(logits, dim=1)[:, 0] * positive * weight).sum() / positive.sum().clamp(min=1)
            # ESMM: pCTR on the row's item and the uniform draws; pCTCVR = pCTR x pCVR
            click = positive.to(torch.float32)
            bought = (level >= LEVEL_PURCHASE).to(torch.float32)
            lp_buy = F.logsigmoid(c_pos) + F.logsigmoid(r_pos)
            l_click = F.binary_cross_entropy_with_logits(c_pos, click, weight=weight, reduction="sum")
            l_buy = -(weight * (bought * lp_buy + (1 - bought) * torch.log1p(-torch.exp(lp_buy).clamp(max=1 - 1e-6)))).sum()
            neg_weight = (~clash_ctx[:, :mm]).float() * torch.zeros(n_ctx).index_add_(0, local, click).unsqueeze(1)
            lp_buy_neg = F.logsigmoid(c_neg) + F.logsigmoid(r_neg)
            l_neg = ((F.softplus(c_neg) - torch.log1p(-torch.exp(lp_buy_neg).clamp(max=1 - 1e-6))) * neg_weight).sum() / mm
            esmm = (l_click + l_buy + l_neg) / n_rows
            loss = ce + model.esmm_weight * esmm
            opt.zero_grad()
            loss.backward()
            opt.step()
            if model.on_batch is not None:
                model.on_batch(1)
    net.eval()
