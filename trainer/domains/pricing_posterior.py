"""Pricing posterior: absorbing rows into the diagonal Laplace posterior (MAP by L-BFGS, then
the rows' Fisher information), the refit against the bootstrap anchor, precision caps and
the posterior-mean prediction.

Uncertainty: a diagonal Laplace posterior, updated online (Chapelle & Li, "An empirical
evaluation of Thompson sampling", 2011). Each parameter has a mean (the trained weight) and
a precision (buffer). Absorbing new rows = minimizing their weighted log loss plus
0.5 * sum(precision * (w - mean_before)^2) (the previous posterior as the prior), by a
full-batch L-BFGS solve, then adding the rows' diagonal Fisher information to the
precisions. Thompson samples: N_SAMPLES fixed standard-normal draws (buffers, same seed in
every version) give every term (global, subclass, product, segment, cell and hour; levels and
sensitivities) as mean + noise / sqrt(precision); the serving graph returns the conversion of
every sample, so the service picks a sample per request at random, and one ONNX call
evaluates every candidate price under the mean model and under every sample.

The learner's replay (rows it already trained on, mixed into each round) would count old
evidence twice in a posterior that already holds it: each row carries its event-log offset,
the network remembers the highest offset it absorbed, and rows at or below it are skipped.
(An outcome whose served prediction reached the log late, and so joins after a newer outcome
was absorbed, is skipped the same way: rare, and the cost is one lost row.)
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from trainer.domains.pricing_net import (COL_HOUR, COL_OFF_HI, COL_OFF_LO, COL_PRODUCT, COL_SEGMENT, COL_WEIGHT,
                                         COL_X, CURVE, GROUP_INDEX, LEVELS, N_KNOTS, N_SEGMENTS, OFFSET_SPLIT,
                                         PRIOR_PRECISION, SLOPE_BASE, SLOPE_MULT, PricingNet, curve_basis, curve_values,
                                         sensitivity)

# No term comes out of the bootstrap surer than this precision: the power prior (HISTORY_WEIGHT)
# discounts each row, but the shared terms (global, subclass, segment: every row informs them)
# would still sum a million discounted rows into near certainty, and a storefront whose
# conversion level or segments differ from the shelf's could then only move them through the
# few terms Ta Feng never saw (hours). A level precision of 50 (sd 0.14 logits) is what ~250
# storefront quotes at 30 % conversion give; sensitivity terms are capped at 25.
# The context sensitivity factors (segment, (product, segment) cell, hour: SLOPE_MULT) keep no
# more than their prior precision (BOOTSTRAP_CONTEXT_SLOPE_CAP): the bootstrap sets their means,
# but how the storefront's segments weigh price is what it cannot know from another shop's
# shelf (another population, channel and price range). At 25 (sd 0.2 of a log factor) the
# shelf's segment factors held: Ta Feng prices every segment as elastic, the greedy price then
# sits at the lower guardrail for all of them, the storefront's quotes vary the price too
# little to overturn sd 0.2 within thousands of quotes, and Thompson draws within +-20 % of
# a factor never leave the lower edge (measured with the Learner on simulated threshold-market
# quotes: the segment factors moved < 0.1 in 8,000 quotes). At the prior precision (sd 1.4
# for a segment, 0.7 for a cell) the samples price a segment anywhere in the guardrails until
# its own quotes say how sensitive it is.
BOOTSTRAP_PRECISION_CAP = {"level": 50.0, "slope": 25.0}
# The segments' curve shapes (CURVE) likewise: the shelf's shape is no evidence of the storefront's.
BOOTSTRAP_CONTEXT_SLOPE_CAP = {name: PRIOR_PRECISION[name] for name in (*SLOPE_MULT, CURVE)}


def _columns(X: np.ndarray):
    t = torch.from_numpy(np.ascontiguousarray(X, np.float32))
    off = t[:, COL_OFF_HI].double() * OFFSET_SPLIT + t[:, COL_OFF_LO].double()
    return (t[:, COL_PRODUCT].long(), t[:, COL_SEGMENT].long(), t[:, COL_HOUR].long(), t[:, COL_X],
            t[:, COL_WEIGHT], off.long())


def absorb(net: PricingNet, X: np.ndarray, y: np.ndarray, max_iter: int = 50, progress=None,
           fit_curve: bool = True) -> int:
    """Absorb the rows the posterior does not hold yet (offset > net.absorbed_offset): MAP under
    the current posterior as the prior, then add their Fisher information. Returns rows absorbed.
    fit_curve False holds the segments' curve shapes at their means (a purely logistic fit: the
    logit market simulator's calibration, whose truth is the logistic part alone)."""
    product, segment, hour, x, weight, offset = _columns(X)
    fresh = offset > int(net.absorbed_offset)
    if not bool(fresh.any()):
        return 0
    product, segment, hour, x, weight = product[fresh], segment[fresh], hour[fresh], x[fresh], weight[fresh]
    target = torch.from_numpy(np.asarray(y, np.float32))[fresh]
    with torch.no_grad():
        for name in PricingNet.SHAPES:
            getattr(net, f"prior_{name}").copy_(getattr(net, name))
    _solve(net, product, segment, hour, x, weight, target, max_iter, progress, fit_curve)
    with torch.no_grad():
        _add_fisher(net, product, segment, hour, x, weight)
        net.absorbed_offset.fill_(int(offset.max()))
    if progress is not None:
        progress(max_iter, max_iter)
    return int(fresh.sum())


def refit(net: PricingNet, anchor: PricingNet, X: np.ndarray, y: np.ndarray, max_iter: int = 30) -> int:
    """The posterior of ALL storefront rows X (every quote since the bootstrap) under the
    bootstrap's posterior (`anchor`) as the prior: the MAP over them jointly (started from the
    net's current means), then the anchor's precisions plus the rows' Fisher information.

    Absorbing each round's rows into the previous round's diagonal posterior (absorb) forgets
    how the terms were correlated: quotes near one price tell level - sensitivity x price, not
    each; the diagonal then holds the level as known (its precision grows with every quote)
    and a later round can move the sensitivity only by also moving that "known" level, which
    its prior forbids. Refitting all rows at once keeps the correlations of the data exact;
    only the bootstrap's part is diagonal. (On simulated threshold-market quotes, where the
    service quotes near the lower guardrail and only a few percent of quotes vary the price
    widely, it did not by itself separate the segments within 8,000 quotes: those quotes do
    not identify a flat segment's sensitivity, with or without the correlations.) Returns
    the rows fitted."""
    if not len(X):
        return 0
    product, segment, hour, x, weight, offset = _columns(X)
    target = torch.from_numpy(np.asarray(y, np.float32))
    with torch.no_grad():
        for name in PricingNet.SHAPES:
            getattr(net, f"prior_{name}").copy_(getattr(anchor, name))
            getattr(net, f"prec_{name}").copy_(getattr(anchor, f"prec_{name}"))
    _solve(net, product, segment, hour, x, weight, target, max_iter, None)
    with torch.no_grad():
        _add_fisher(net, product, segment, hour, x, weight)
        net.absorbed_offset.fill_(int(offset.max()))
    return len(X)


def _solve(net: PricingNet, product, segment, hour, x, weight, target, max_iter: int, progress,
           fit_curve: bool = True) -> None:
    """MAP of the rows' weighted log loss plus 0.5 sum(prec (w - prior_w)^2), the prior's means
    in net.prior_*, its precisions in net.prec_*; writes the means of the rows it touches."""
    names = [n for n in PricingNet.SHAPES if n != CURVE]
    # The solve runs over the rows of each table these quotes touch, not the whole tables: an
    # untouched row's gradient is its prior's alone, which is 0 (absorb: the prior is the current
    # mean; refit: an untouched row was never fitted, so it is still the anchor's), so it would
    # stay where it is anyway. Same minimizer; but L-BFGS's vector
    # work scales with the parameters it holds, and the cell tables hold 360k rows of which a
    # round touches a few hundred (a solve over everything took 10x longer).
    idx = net.indices(product, segment, hour)
    local, inverse, prior_mean, precision, mask, rows_of = {}, {}, {}, {}, {}, {}
    with torch.no_grad():
        for name in names:
            rows_, inverse[name] = torch.unique(idx[GROUP_INDEX[name]], return_inverse=True)
            local[name] = getattr(net, name)[rows_].clone().requires_grad_(True)
            prior_mean[name] = getattr(net, f"prior_{name}")[rows_].clone()
            precision[name] = getattr(net, f"prec_{name}")[rows_]
            mask[name] = net.mask_at(name, rows_)
            rows_of[name] = rows_
        # the curve: the touched segments' knot rows, as [segments, N_KNOTS] blocks
        segs, seg_inverse = torch.unique(segment, return_inverse=True)
        curve_table = getattr(net, CURVE).view(N_SEGMENTS, N_KNOTS)
        curve_local = curve_table[segs].clone().requires_grad_(fit_curve)
        curve_prior = getattr(net, f"prior_{CURVE}").view(N_SEGMENTS, N_KNOTS)[segs].clone()
        curve_prec = getattr(net, f"prec_{CURVE}").view(N_SEGMENTS, N_KNOTS)[segs].clone()
        basis = curve_basis(x)
    total_w = float(weight.sum())
    opt = torch.optim.LBFGS([*local.values(), *([curve_local] if fit_curve else [])], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")
    calls = [0]

    def closure():
        opt.zero_grad()
        level = sum(local[n][inverse[n]] * mask[n][inverse[n]] for n in LEVELS)
        base = sum(local[n][inverse[n]] * mask[n][inverse[n]] for n in SLOPE_BASE)
        mult = sum(local[n][inverse[n]] * mask[n][inverse[n]] for n in SLOPE_MULT)
        slope = sensitivity(base, mult)
        z = level - slope * x + (basis * curve_values(curve_local[seg_inverse], slope)).sum(-1)
        nll = (weight * nn.functional.binary_cross_entropy_with_logits(z, target, reduction="none")).sum()
        prior = sum(0.5 * (precision[n] * (local[n] - prior_mean[n]) ** 2).sum() for n in names)
        prior = prior + 0.5 * (curve_prec * (curve_local - curve_prior) ** 2).sum()
        loss = (nll + prior) / max(total_w, 1.0)  # scaled for the line search; same minimizer
        loss.backward()
        calls[0] += 1
        if progress is not None:
            progress(min(calls[0], max_iter), max_iter)
        return loss

    opt.step(closure)
    with torch.no_grad():
        for name in names:
            getattr(net, name)[rows_of[name]] = local[name].detach()
        curve_table[segs] = curve_local.detach()


def _centered_by_cell(values: torch.Tensor, info: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """values minus their info-weighted mean over the rows of the same (product, segment) cell."""
    cells, inverse = torch.unique(cell, return_inverse=True)
    s0 = torch.zeros(len(cells), dtype=values.dtype).index_add_(0, inverse, info)
    s1 = torch.zeros(len(cells), dtype=values.dtype).index_add_(0, inverse, info * values)
    return values - (s1 / s0.clamp(min=1e-12))[inverse]


def _add_fisher(net: PricingNet, product, segment, hour, x, weight) -> None:
    """Fisher information of the rows into the precision of every group's row the quote used.

    Levels: the diagonal, sum of w p (1 - p) (d logit / d a)^2 = sum of w p (1 - p).
    Sensitivities: the information about a sensitivity term when each (product, segment)
    cell's level is free, the Schur complement of the (cell level, sensitivity) Fisher block:
    with g = d logit / d b and info = w p (1 - p), sum info (g - mean_cell g)^2, the mean
    info-weighted over the absorbed rows of the row's cell. Quotes of a cell at one price tell
    the conversion there, which the cell's level explains just as well: they carry no
    information about how conversion changes with the price. The plain diagonal (sum info
    g^2, which grows with |x| and with the spread of the products' sensitivities even then)
    would claim they do: a service that mostly quotes its greedy price, far from the
    reference (x = 0), grew a segment factor's precision to ~700 within 3,200 quotes of the
    segment that hardly varied the price (~75 with this centering; measured with the Learner
    on simulated threshold-market quotes),
    locked them at the bootstrap's values and shrank their Thompson noise, so exploration
    could not correct them either. Centering within one absorption (a round's rows; a cell
    with one row there adds nothing) is conservative: the precision grows with the price
    variation a round shows, never more."""
    level, base, mult, idx = net.level_slope(product, segment, hour)
    slope = sensitivity(base, mult)
    p = torch.sigmoid(level - slope * x + net.curve(segment, x, slope))
    info = weight * p * (1 - p)
    g_base = torch.sigmoid(base) * torch.exp(mult.clamp(-8.0, 8.0)) * x  # d logit / d base (up to sign)
    g_mult = slope * x  # d logit / d log factor (up to sign)
    info_base = info * _centered_by_cell(g_base, info, idx["cell"]) ** 2
    info_mult = info * _centered_by_cell(g_mult, info, idx["cell"]) ** 2
    for name in LEVELS:
        getattr(net, f"prec_{name}").index_add_(0, idx[GROUP_INDEX[name]], info)
    for name in SLOPE_BASE:
        getattr(net, f"prec_{name}").index_add_(0, idx[GROUP_INDEX[name]], info_base)
    for name in SLOPE_MULT:
        getattr(net, f"prec_{name}").index_add_(0, idx[GROUP_INDEX[name]], info_mult)
    # a curve knot, like a sensitivity, learns from how conversion varies with the price within a
    # cell (its hat weight centered per cell: quotes at one price are the cell level's evidence)
    basis = curve_basis(x)  # [B, N_KNOTS]
    knot_rows = segment.unsqueeze(1) * N_KNOTS + torch.arange(N_KNOTS)
    for k in range(N_KNOTS):
        info_k = info * _centered_by_cell(basis[:, k], info, idx["cell"]) ** 2
        getattr(net, f"prec_{CURVE}").index_add_(0, knot_rows[:, k], info_k)


def cap_precision(net: PricingNet, cap: dict[str, float] | None = None,
                  context_cap: dict[str, float] | None = None) -> None:
    """Cap every precision at BOOTSTRAP_PRECISION_CAP (levels / sensitivities), the context
    sensitivity factors at BOOTSTRAP_CONTEXT_SLOPE_CAP: what the bootstrap's history may claim
    to know at most (see their comment)."""
    cap = cap or BOOTSTRAP_PRECISION_CAP
    context = BOOTSTRAP_CONTEXT_SLOPE_CAP if context_cap is None else context_cap
    with torch.no_grad():
        for name in PricingNet.SHAPES:
            limit = cap["level" if name in LEVELS else "slope"]
            if name in context:
                limit = min(limit, context[name])
            getattr(net, f"prec_{name}").clamp_(max=limit)


def predict_mean(net: PricingNet, X: np.ndarray) -> np.ndarray:
    product, segment, hour, x, _, _ = _columns(X)
    with torch.no_grad():
        return torch.sigmoid(net.logit(product, segment, hour, x)).numpy()


def weighted_log_loss(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    pc = np.clip(p, 1e-6, 1 - 1e-6)
    ll = -(y * np.log(pc) + (1 - y) * np.log(1 - pc))
    return float(np.average(ll, weights=w)) if len(y) else float("nan")
