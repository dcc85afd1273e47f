"""Pricing domain, trainer side: a hierarchical Bayesian conversion model of price and context.

Model. For a quote of product i (subclass c) at price p with reference price r, to a
customer of segment s at hour h, with x = log(p / r):

    logit P(sale) = a0 + a_c + a_i + a_s + a_is + a_h
                    - softplus(b0 + b_c + b_i) * exp(b_s + b_is + b_h) * x

a_* are conversion levels, b_* price sensitivities (softplus keeps demand decreasing in
price: the slope is the elasticity of the odds). Both the level and the sensitivity are
hierarchical: product terms are offsets from their subclass, subclass terms offsets from the
global ones; a segment has a store-wide offset (a_s, b_s: shared by every product) and each
(product, segment) cell an offset from product + segment (a_is, b_is); hours have offsets of
their own. The segment, cell and hour sensitivity terms multiply the product's (log scale):
"this segment is half as price-sensitive" holds across products whose own sensitivities
differ tenfold, where an additive offset would mean a different factor for each product. Each offset has a Gaussian prior at 0 (precisions PRIOR_PRECISION), so a product
with little data is priced like its subclass, a subclass like the store, and a segment that
a product rarely sees like that product adjusted by how the segment behaves across the store
(a segment can be priced higher where it is less sensitive: a level alone could only push
the best price down). Unknown products (code 0: not in the vocabulary) and unknown subclasses
use the shared and segment terms only. Hours are learned online only (Ta Feng has no times;
its rows carry NO_HOUR, whose terms are 0); their strong prior keeps them near 0 until the
storefront's quotes show an hour-of-day effect.

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

Bootstrap (bootstrap_pricing, `python -m trainer bootstrap --domains pricing`, ~20 s): Ta Feng
Nov-Dec 2000 turned into conversion rows by the exposure assumption of
trainer.domains.pricing_data (an exposure = a basket holding the product's subclass, a
conversion = one holding the product; binomial rows per product-day-segment with the day's
price), weighted by HISTORY_WEIGHT (a power prior: the grocery shelf is not the storefront),
absorbed from the prior in one L-BFGS solve; the last week is the holdout. The vocabulary is
every Ta Feng product (23,812) with its subclass; it travels in the checkpoint (extra state)
and in each manifest (extra.products, in code order), which the service maps ids with.

Serving graph (ONNX), every axis 0 dynamic, the grid axis dynamic too:
  inputs  product [B] INT64 (vocabulary code, 0 = unknown), segment [B] INT64 (code in
          SEGMENTS), hour [B] INT64 (0..23), log_price_ratio [B, G] FP32 (log(price / reference)
          of each candidate price);
  outputs conversion [B, G] FP32 (posterior-mean model), sampled_conversion [B, N_SAMPLES, G]
          FP32 (each Thompson sample).

Training rows (Examples.X, width WIDTH): product, segment, hour, x, weight, offset_hi,
offset_lo; y = converted share (0/1 for a quote, k/n for an aggregated Ta Feng row of weight n).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from trainer.domains.pricing_data import SEGMENTS, X_CLIP, Vocabulary
from trainer.learner import DomainModel, Examples

log = logging.getLogger(__name__)

MODEL_NAME = "pricing"
PRODUCT_CAPACITY = 32768  # product codes the network holds (Ta Feng has 23,812; 0 = unknown)
CATEGORY_CAPACITY = 4096  # subclass codes (Ta Feng has 2,010; 0 = unknown)
N_SEGMENTS = len(SEGMENTS)
CELL_CAPACITY = PRODUCT_CAPACITY * N_SEGMENTS  # (product, segment) cells: code product * N_SEGMENTS + segment
NO_HOUR = 24  # hour code of rows without a time of day (Ta Feng); its terms are fixed at 0
N_SAMPLES = 16  # Thompson samples in the serving graph
NOISE_SEED = 1234
# The (product, segment) groups draw their Thompson noise from a table of this many slots (cell
# code modulo NOISE_SLOTS) instead of one per cell: 16 x 360k draws would triple the exported
# file. Cells that share a slot belong to different products (a product's 11 cells are 11
# consecutive codes), so the terms of one quote always get independent draws; that two products
# share a draw does not bias any quote (each quote's price depends on its own terms only).
NOISE_SLOTS = 8192
# Prior precisions (1 / variance) of the parameter groups. Global terms are nearly free; subclass
# offsets moderately shrunk, product offsets more (sd 0.7 for levels, 0.5 for slopes). Segment
# sensitivity factors (store level, shared by every product; log scale) sd 1.4: segments may
# differ several-fold in price sensitivity, and thousands of quotes inform each. A (product,
# segment) cell's offsets from its product and its segment (sd 0.7; factor 2 for the slope):
# one cell holds a few hundred quotes at most, whose price information over a +-20 % range is
# small, so a cell stays near product x segment until its own data disagree. Hours: levels
# sd 0.5, sensitivity factors sd 0.25 (the storefront rarely changes sensitivity by the hour,
# and 24 hours split the data thin: the data must show it clearly).
PRIOR_PRECISION = {"a0": 1e-2, "b0": 1e-2, "a_cat": 1.0, "b_cat": 2.0, "a_prod": 2.0, "b_prod": 4.0,
                   "a_seg": 1.0, "b_seg": 0.5, "a_cell": 2.0, "b_cell": 2.0, "a_hour": 4.0, "b_hour": 16.0}
# Which code indexes each group: the parameter's row for a quote.
GROUP_INDEX = {"a0": "global", "b0": "global", "a_cat": "category", "b_cat": "category", "a_prod": "product",
               "b_prod": "product", "a_seg": "segment", "b_seg": "segment", "a_cell": "cell", "b_cell": "cell",
               "a_hour": "hour", "b_hour": "hour"}
LEVELS = tuple(n for n in GROUP_INDEX if n.startswith("a"))  # terms of the conversion level
SLOPE_BASE = ("b0", "b_cat", "b_prod")  # the product's price sensitivity (pre-softplus)
SLOPE_MULT = ("b_seg", "b_cell", "b_hour")  # log factors of it by segment, cell and hour
SLOPES = SLOPE_BASE + SLOPE_MULT
# Thompson samples vary every term that decides the price: the segment, hour and cell terms as
# much as the product's (a sample that left them at their means would never explore them).
SAMPLED = LEVELS + SLOPES
OFFSET_SPLIT = float(1 << 20)  # offsets ride in two float32 columns, exact up to 2**44
COL_PRODUCT, COL_SEGMENT, COL_HOUR, COL_X, COL_WEIGHT, COL_OFF_HI, COL_OFF_LO = range(7)
WIDTH = 7
B0_INIT = math.log(math.e - 1.0)  # softplus(B0_INIT) = 1: unit elasticity before any data


def split_offsets(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.asarray(offsets, np.int64)
    return (o // int(OFFSET_SPLIT)).astype(np.float32), (o % int(OFFSET_SPLIT)).astype(np.float32)


def rows(product, segment, hour, x, weight, offsets) -> np.ndarray:
    """Training rows in the WIDTH layout."""
    n = len(product)
    X = np.empty((n, WIDTH), np.float32)
    X[:, COL_PRODUCT], X[:, COL_SEGMENT], X[:, COL_HOUR] = product, segment, hour
    X[:, COL_X] = np.clip(x, -X_CLIP, X_CLIP)
    X[:, COL_WEIGHT] = weight
    X[:, COL_OFF_HI], X[:, COL_OFF_LO] = split_offsets(np.broadcast_to(offsets, (n,)))
    return X


def sensitivity(base: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """The price sensitivity (elasticity of the odds, > 0): the product's softplus(base) times
    the segment, cell and hour factor exp(mult). The factor's exponent is clamped at +-8 (a
    factor of 3,000: far beyond any prior or data) so a wild Thompson draw of a group with
    prior precision can never overflow."""
    return nn.functional.softplus(base) * torch.exp(mult.clamp(-8.0, 8.0))


class PricingNet(nn.Module):
    """Means (parameters), precisions and prior means (buffers), fixed Thompson noise, the
    product -> subclass table and the vocabulary (extra state: saved in checkpoints)."""

    SHAPES = {"a0": (1,), "b0": (1,), "a_cat": (CATEGORY_CAPACITY,), "b_cat": (CATEGORY_CAPACITY,),
              "a_prod": (PRODUCT_CAPACITY,), "b_prod": (PRODUCT_CAPACITY,), "a_seg": (N_SEGMENTS,),
              "b_seg": (N_SEGMENTS,), "a_cell": (CELL_CAPACITY,), "b_cell": (CELL_CAPACITY,),
              "a_hour": (NO_HOUR + 1,), "b_hour": (NO_HOUR + 1,)}

    def __init__(self) -> None:
        super().__init__()
        for name, shape in self.SHAPES.items():
            init = torch.full(shape, B0_INIT) if name == "b0" else torch.zeros(shape)
            setattr(self, name, nn.Parameter(init))
            self.register_buffer(f"prec_{name}", torch.full(shape, PRIOR_PRECISION[name]))
            self.register_buffer(f"prior_{name}", init.clone())
            if GROUP_INDEX[name] != "cell":  # cells are masked by their product code (see mask_at)
                self.register_buffer(f"mask_{name}", self._mask(name, shape))
        g = torch.Generator().manual_seed(NOISE_SEED)
        for name in SAMPLED:
            slots = min(self.SHAPES[name][0], NOISE_SLOTS) if GROUP_INDEX[name] == "cell" else self.SHAPES[name][0]
            self.register_buffer(f"noise_{name}", torch.randn((N_SAMPLES, slots), generator=g))
        self.register_buffer("product_category", torch.zeros(PRODUCT_CAPACITY, dtype=torch.int64))
        self.register_buffer("absorbed_offset", torch.tensor(-1, dtype=torch.int64))
        self.vocab: Vocabulary | None = None

    @staticmethod
    def _mask(name: str, shape) -> torch.Tensor:
        m = torch.ones(shape)
        if GROUP_INDEX[name] in ("category", "product"):
            m[0] = 0.0  # unknown product / subclass: shared terms only
        if GROUP_INDEX[name] == "hour":
            m[NO_HOUR] = 0.0
        return m

    # ---- vocabulary (checkpointed through extra state) ----
    def set_vocabulary(self, vocab: Vocabulary) -> None:
        if len(vocab.products) + 1 > PRODUCT_CAPACITY or len(vocab.categories) + 1 > CATEGORY_CAPACITY:
            raise ValueError(f"vocabulary of {len(vocab.products)} products / {len(vocab.categories)} subclasses "
                             f"exceeds capacity {PRODUCT_CAPACITY - 1} / {CATEGORY_CAPACITY - 1}")
        self.vocab = vocab
        table = torch.zeros(PRODUCT_CAPACITY, dtype=torch.int64)
        table[: len(vocab.product_category)] = torch.from_numpy(vocab.product_category)
        self.product_category.copy_(table)

    def get_extra_state(self) -> Any:
        if self.vocab is None:
            return None
        return {"products": self.vocab.products, "categories": self.vocab.categories}

    def set_extra_state(self, state: Any) -> None:
        if state:
            n = len(state["products"]) + 1
            self.vocab = Vocabulary(list(state["products"]), list(state["categories"]),
                                    self.product_category[:n].numpy().copy())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A checkpoint of the model before per-segment sensitivities (no segment-slope, cell or
        hour-slope groups, Thompson noise for fewer groups) loads with what it lacks at its
        initial value (the prior; fresh noise draws): the learner keeps its posterior and goes
        on learning instead of refusing to start until a new bootstrap."""
        if prefix + "a0" in state_dict:  # a pricing checkpoint, not something else
            for key, value in [*self.named_parameters(recurse=False), *self.named_buffers(recurse=False)]:
                if prefix + key not in state_dict:
                    state_dict[prefix + key] = value.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- the model ----
    def indices(self, product, segment, hour) -> dict[str, torch.Tensor]:
        """The row of every group for each quote."""
        return {"global": torch.zeros_like(product), "category": self.product_category[product], "product": product,
                "segment": segment, "hour": hour, "cell": product * N_SEGMENTS + segment}

    def mask_at(self, name: str, index: torch.Tensor) -> torch.Tensor:
        if GROUP_INDEX[name] == "cell":  # the cells of product 0 (unknown): shared terms only
            return (index >= N_SEGMENTS).to(torch.float32)
        return getattr(self, f"mask_{name}")[index]

    def term_at(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """[B] the group's masked mean term (gathered first: a run touches the rows of its batch)."""
        return getattr(self, name)[index] * self.mask_at(name, index)

    def terms(self, name: str) -> torch.Tensor:
        """The whole masked table of a group (for inspection and the simulators)."""
        return self.term_at(name, torch.arange(self.SHAPES[name][0]))

    def level_slope(self, product, segment, hour):
        """Per row: the mean level, the product's sensitivity pre-activation, the log factor of
        segment, cell and hour, and the rows' group indices."""
        idx = self.indices(product, segment, hour)
        level = sum(self.term_at(n, idx[GROUP_INDEX[n]]) for n in LEVELS)
        base = sum(self.term_at(n, idx[GROUP_INDEX[n]]) for n in SLOPE_BASE)
        mult = sum(self.term_at(n, idx[GROUP_INDEX[n]]) for n in SLOPE_MULT)
        return level, base, mult, idx

    def logit(self, product, segment, hour, x):
        level, base, mult, _ = self.level_slope(product, segment, hour)
        return level - sensitivity(base, mult) * x

    def sampled_noise(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """[B, N_SAMPLES] noise of a group: fixed draw / sqrt(precision), masked."""
        scale = self.mask_at(name, index) / torch.sqrt(getattr(self, f"prec_{name}")[index])
        noise = getattr(self, f"noise_{name}")
        slot = index % noise.shape[1] if noise.shape[1] < self.SHAPES[name][0] else index
        return (noise[:, slot] * scale).transpose(0, 1)

    def forward(self, product, segment, hour, log_price_ratio):
        level, base, mult, idx = self.level_slope(product, segment, hour)
        x = log_price_ratio.clamp(-X_CLIP, X_CLIP)
        conversion = torch.sigmoid(level.unsqueeze(1) - sensitivity(base, mult).unsqueeze(1) * x)
        s_level = level.unsqueeze(1) + sum(self.sampled_noise(n, idx[GROUP_INDEX[n]]) for n in LEVELS)
        s_base = base.unsqueeze(1) + sum(self.sampled_noise(n, idx[GROUP_INDEX[n]]) for n in SLOPE_BASE)
        s_mult = mult.unsqueeze(1) + sum(self.sampled_noise(n, idx[GROUP_INDEX[n]]) for n in SLOPE_MULT)
        sampled = torch.sigmoid(s_level.unsqueeze(2) - sensitivity(s_base, s_mult).unsqueeze(2) * x.unsqueeze(1))
        return conversion, sampled

    def slopes(self, product, segment, hour) -> torch.Tensor:
        """[B] the mean price sensitivity of each quote (reports, tests, simulators)."""
        with torch.no_grad():
            _, base, mult, _ = self.level_slope(product, segment, hour)
            return sensitivity(base, mult)


def _columns(X: np.ndarray):
    t = torch.from_numpy(np.ascontiguousarray(X, np.float32))
    off = t[:, COL_OFF_HI].double() * OFFSET_SPLIT + t[:, COL_OFF_LO].double()
    return (t[:, COL_PRODUCT].long(), t[:, COL_SEGMENT].long(), t[:, COL_HOUR].long(), t[:, COL_X],
            t[:, COL_WEIGHT], off.long())


def absorb(net: PricingNet, X: np.ndarray, y: np.ndarray, max_iter: int = 50, progress=None) -> int:
    """Absorb the rows the posterior does not hold yet (offset > net.absorbed_offset): MAP under
    the current posterior as the prior, then add their Fisher information. Returns rows absorbed."""
    product, segment, hour, x, weight, offset = _columns(X)
    fresh = offset > int(net.absorbed_offset)
    if not bool(fresh.any()):
        return 0
    product, segment, hour, x, weight = product[fresh], segment[fresh], hour[fresh], x[fresh], weight[fresh]
    target = torch.from_numpy(np.asarray(y, np.float32))[fresh]
    with torch.no_grad():
        for name in PricingNet.SHAPES:
            getattr(net, f"prior_{name}").copy_(getattr(net, name))
    _solve(net, product, segment, hour, x, weight, target, max_iter, progress)
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


def _solve(net: PricingNet, product, segment, hour, x, weight, target, max_iter: int, progress) -> None:
    """MAP of the rows' weighted log loss plus 0.5 sum(prec (w - prior_w)^2), the prior's means
    in net.prior_*, its precisions in net.prec_*; writes the means of the rows it touches."""
    names = list(PricingNet.SHAPES)
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
    total_w = float(weight.sum())
    opt = torch.optim.LBFGS(list(local.values()), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")
    calls = [0]

    def closure():
        opt.zero_grad()
        level = sum(local[n][inverse[n]] * mask[n][inverse[n]] for n in LEVELS)
        base = sum(local[n][inverse[n]] * mask[n][inverse[n]] for n in SLOPE_BASE)
        mult = sum(local[n][inverse[n]] * mask[n][inverse[n]] for n in SLOPE_MULT)
        z = level - sensitivity(base, mult) * x
        nll = (weight * nn.functional.binary_cross_entropy_with_logits(z, target, reduction="none")).sum()
        prior = sum(0.5 * (precision[n] * (local[n] - prior_mean[n]) ** 2).sum() for n in names)
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
    p = torch.sigmoid(level - slope * x)
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



# ---- calibration: predicted vs observed conversion per segment ----
CALIBRATION_MIN_QUOTES = 50  # segments with fewer quotes are listed but not judged (max_abs_*)


def segment_calibration(segment: np.ndarray, y: np.ndarray, p: np.ndarray, weight: np.ndarray | None = None,
                        min_quotes: int = CALIBRATION_MIN_QUOTES, names: Sequence[str] = SEGMENTS) -> dict[str, Any]:
    """Predicted against observed conversion per segment, at the prices the rows were quoted at.

    segment: codes (index into names); y: sold (0/1, or a share for aggregated rows); p: the
    model's conversion at the row's price; weight: row weights (default 1). Per segment with
    rows: quotes (total weight), observed and predicted (weighted means), gap = predicted -
    observed, and z = gap / its standard error under the model (sqrt(sum w^2 p (1-p)) / sum w:
    how far the observed share may fall from a calibrated prediction by chance alone; exact for
    0/1 quotes). max_abs_gap / max_abs_z and worst over segments with at least min_quotes: a
    model that is right on average can still be off by segment (an insensitive segment
    predicted like the others converts more at high prices than the model says)."""
    segment = np.asarray(segment, np.int64).reshape(-1)
    y = np.asarray(y, np.float64).reshape(-1)
    p = np.clip(np.asarray(p, np.float64).reshape(-1), 0.0, 1.0)
    w = np.ones_like(y) if weight is None else np.asarray(weight, np.float64).reshape(-1)
    if not len(segment) == len(y) == len(p) == len(w):
        raise ValueError(f"segment_calibration: lengths differ ({len(segment)}, {len(y)}, {len(p)}, {len(w)})")
    out: dict[str, Any] = {"segments": {}, "max_abs_gap": float("nan"), "max_abs_z": float("nan"), "worst": None,
                           "min_quotes": int(min_quotes)}
    worst = (-1.0, None)
    for code in np.unique(segment):
        m = segment == code
        total = float(w[m].sum())
        if total <= 0:
            continue
        observed, predicted = float(w[m] @ y[m] / total), float(w[m] @ p[m] / total)
        se = math.sqrt(float((w[m] ** 2) @ (p[m] * (1 - p[m])))) / total
        gap = predicted - observed
        name = names[code] if 0 <= code < len(names) else str(int(code))
        out["segments"][name] = {"quotes": round(total, 3), "observed": observed, "predicted": predicted,
                                 "gap": gap, "z": gap / se if se > 0 else float("nan")}
        if total >= min_quotes and abs(gap) > worst[0]:
            worst = (abs(gap), name)
    judged = [v for v in out["segments"].values() if v["quotes"] >= min_quotes]
    if judged:
        out["max_abs_gap"] = max(abs(v["gap"]) for v in judged)
        out["max_abs_z"] = max(abs(v["z"]) for v in judged if v["z"] == v["z"]) if any(
            v["z"] == v["z"] for v in judged) else float("nan")
        out["worst"] = worst[1]
    return out


def calibration_of_rows(X: np.ndarray, y: np.ndarray, p: np.ndarray, min_quotes: int = CALIBRATION_MIN_QUOTES
                        ) -> dict[str, Any]:
    """segment_calibration of training rows (WIDTH layout) and the model's predictions for them.
    Storefront quotes (rows with an hour) are judged on their own when there are any: the
    replayed Ta Feng rows (no hour, aggregated exposures of another population) would otherwise
    weigh in with their exposure counts; without quotes (the bootstrap) the Ta Feng rows are
    judged, weighted by their exposures."""
    X = np.asarray(X)
    quotes = X[:, COL_HOUR] < NO_HOUR
    rows_ = quotes if quotes.any() else np.ones(len(X), bool)
    out = segment_calibration(X[rows_, COL_SEGMENT], np.asarray(y)[rows_], np.asarray(p).reshape(-1)[rows_],
                              X[rows_, COL_WEIGHT], min_quotes)
    out["rows"] = "storefront quotes" if quotes.any() else "ta feng exposures"
    return out


def calibration_figures(cal: dict[str, Any], prefix: str = "calibration") -> dict[str, float]:
    """Flat figures of a calibration (report_metrics holds numbers only): the largest absolute
    gap and z over judged segments, and each judged segment's gap."""
    out = {f"{prefix}_max_abs_gap": cal["max_abs_gap"], f"{prefix}_max_abs_z": cal["max_abs_z"]}
    for name, v in cal["segments"].items():
        if v["quotes"] >= cal["min_quotes"]:
            out[f"{prefix}_gap[{name}]"] = v["gap"]
    return out

class PricingExport(nn.Module):
    def __init__(self, net: PricingNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, product, segment, hour, log_price_ratio):
        return self.net(product, segment, hour, log_price_ratio)


INPUT_NAMES = ("product", "segment", "hour", "log_price_ratio")
# The ids each index input may take: the rows of its parameter tables (product codes index
# a_prod/b_prod and the product -> subclass table; hour NO_HOUR is "no time of day"). Declared
# in the exported file, so servers refuse anything else before it reaches a Gather.
INPUT_RANGES = {"product": (0, PRODUCT_CAPACITY - 1), "segment": (0, N_SEGMENTS - 1), "hour": (0, NO_HOUR)}
OUTPUT_NAMES = ("conversion", "sampled_conversion")


def export_pricing(net: PricingNet, path: Path) -> Path:
    """ONNX export with the batch axis and the grid axis dynamic."""
    from trainer.export import export_onnx

    module = PricingExport(net).eval()
    example = (torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([3, 4]), torch.zeros(2, 3))
    return export_onnx(module, dict(zip(INPUT_NAMES, [(2,), (2,), (2,), (2, 3)])), OUTPUT_NAMES, path,
                       example=example, dynamic={"log_price_ratio": {1: "grid"}}, ranges=INPUT_RANGES)


HISTORY_ROWS = 50_000  # storefront rows each round refits; older ones are absorbed into the anchor
SERVED_HISTORY = 50_000  # served quotes kept for the prequential calibration (>= the learner's window)


class PricingModel(DomainModel):
    """The learner's view of pricing. `epochs` scales the L-BFGS iterations of an absorption.
    The optimizer the learner checkpoints is not used for steps: every absorption is its own
    full-batch L-BFGS solve (its objective changes with the prior), built inside train()."""

    name = MODEL_NAME
    width = WIDTH

    def __init__(self, iterations_per_epoch: int = 30, bootstrap_iterations: int = 60) -> None:
        self.iterations_per_epoch = iterations_per_epoch
        self.bootstrap_iterations = bootstrap_iterations
        self.vocab: Vocabulary | None = None  # set by the bootstrap before new_network
        self.progress = None  # optional callback(done, total) of a bootstrap solve
        # The learner hands report_metrics / manifest_extra / prequential_metrics labels and
        # predictions only; the per-segment calibration needs each row's segment. The rows of
        # the last predict() (the learner scores the rows it then reports on) and of the recent
        # served quotes (from examples(), in the order the learner receives them) are kept, and
        # used only when they match what the learner passes (never attributed to other rows).
        self._predicted: tuple[np.ndarray, np.ndarray] | None = None
        self._served = np.zeros((0, 3), np.float64)  # segment, sold, served conversion
        # the bootstrap's posterior (the prior of every refit) and the storefront rows since (train)
        self._anchor: PricingNet | None = None
        self._history = (np.zeros((0, WIDTH), np.float32), np.zeros(0, np.float32))

    def new_network(self, bootstrap_X: np.ndarray) -> PricingNet:
        net = PricingNet()
        if self.vocab is not None:
            net.set_vocabulary(self.vocab)
        return net

    def optimizer(self, net):
        return torch.optim.SGD([net.a0], lr=0.0)  # checkpointed by the learner, never stepped

    def train(self, net, opt, X, y, epochs, seed) -> None:
        """Bootstrap: absorb the Ta Feng rows, cap the precisions, keep the result as the anchor
        (the prior of every later refit). A round: the rows not seen before join the storefront
        history, and the net is refit on the whole history under the anchor (refit). Without an
        anchor (a checkpoint from before it), each round's rows are absorbed into the previous
        posterior as before."""
        offsets = X[:, COL_OFF_HI].astype(np.float64) * OFFSET_SPLIT + X[:, COL_OFF_LO] if len(X) else np.zeros(0)
        bootstrap = len(X) and float(np.max(offsets)) == 0.0
        iters = self.bootstrap_iterations if bootstrap else self.iterations_per_epoch * max(1, epochs)
        if bootstrap:
            absorb(net, X, y, max_iter=iters, progress=self.progress)
            cap_precision(net)
            self._anchor = self._copy(net)
            self._history = (np.zeros((0, WIDTH), np.float32), np.zeros(0, np.float32))
            return
        if self._anchor is None:
            absorb(net, X, y, max_iter=iters)
            return
        hX, hy = self._history
        last = float(hX[-1, COL_OFF_HI]) * OFFSET_SPLIT + float(hX[-1, COL_OFF_LO]) if len(hX) else 0.0
        new = offsets > last  # the learner's replay passes rows the history holds already
        if new.any():
            order = np.argsort(offsets[new], kind="stable")
            hX = np.concatenate([hX, np.asarray(X, np.float32)[new][order]])
            hy = np.concatenate([hy, np.asarray(y, np.float32)[new][order]])
        if len(hX) > HISTORY_ROWS:  # the oldest rows go into the anchor (absorbed once, as before)
            cut = len(hX) - HISTORY_ROWS
            absorb(self._anchor, hX[:cut], hy[:cut], max_iter=iters)
            hX, hy = hX[cut:], hy[cut:]
        self._history = (hX, hy)
        refit(net, self._anchor, hX, hy, max_iter=iters)

    @staticmethod
    def _copy(net: PricingNet) -> PricingNet:
        out = PricingNet()
        out.load_state_dict(net.state_dict())
        return out

    def domain_state(self) -> dict[str, Any]:
        if self._anchor is None:
            return {}
        keep = {*PricingNet.SHAPES, *(f"prec_{n}" for n in PricingNet.SHAPES), "product_category", "absorbed_offset"}
        return {"anchor": {k: v.clone() for k, v in self._anchor.state_dict().items() if k in keep},
                "history_X": self._history[0].copy(), "history_y": self._history[1].copy()}

    def load_domain_state(self, state: dict[str, Any]) -> None:
        if state and "anchor" in state:
            self._anchor = PricingNet()
            self._anchor.load_state_dict(state["anchor"], strict=False)  # means, precisions, subclasses
            self._history = (np.asarray(state["history_X"], np.float32), np.asarray(state["history_y"], np.float32))

    def predict(self, net, X) -> np.ndarray:
        p = predict_mean(net, X)
        self._predicted = (np.asarray(X), p)
        return p

    def calibration(self, y: np.ndarray, p: np.ndarray) -> dict[str, Any] | None:
        """Per-segment calibration of predictions p for labels y, when p is the last predict()'s
        output (so the rows, and their segments, are known); else None."""
        last = self._predicted
        if last is None or len(last[1]) != len(p) or len(y) != len(p):
            return None
        if not (last[1] is p or np.array_equal(last[1], p)):
            return None
        return calibration_of_rows(last[0], y, p)

    def prequential_metrics(self, y: np.ndarray, served_p: np.ndarray) -> dict[str, float]:
        """The default figures plus the per-segment calibration of what was served: the conversion
        the serving version predicted at the price it quoted, against the sales (segments from the
        quotes examples() turned into rows, when they are the rows the learner passes)."""
        out = super().prequential_metrics(y, served_p)
        n = len(y)
        hist = self._served
        if n and len(hist) >= n and np.array_equal(hist[-n:, 1], np.asarray(y, np.float64)) and np.allclose(
                hist[-n:, 2], np.asarray(served_p, np.float64), rtol=0, atol=1e-6):
            out.update(calibration_figures(segment_calibration(hist[-n:, 0], y, served_p), "served_calibration"))
        return out

    def gate_spec(self):
        """The gate (trainer/gate.py) on the window of recent quotes neither version trained
        on: the log-likelihood of the observed sales (as mean log loss of the posterior-mean
        conversion at the quoted price, lower is better). Expected revenue at the quoted
        prices would score the same conversion probabilities times a price the model did not
        choose alone (Thompson sampling and the step limit do), so the likelihood is the
        cleaner test of what the model knows. 30 sales and 100 quotes at least; the window is
        capped at 5,000 quotes. Not seeded with the bootstrap's Ta Feng holdout week: those
        are aggregated shelf rows of another population, not storefront quotes."""
        from trainer.gate import GateSpec, log_loss_rows, mean_metric

        return GateSpec(metrics=(mean_metric("log_loss", log_loss_rows, False),),
                        positive=lambda y: np.asarray(y) > 0, min_positives=30, min_rows=100, max_rows=5000,
                        seed_from_bootstrap=False)

    def report_metrics(self, y, p) -> dict[str, float]:
        out = {"log_loss": weighted_log_loss(y, p), "brier": float(np.mean((y - p) ** 2)) if len(y) else float("nan"),
               "mean_conversion": float(np.mean(y)) if len(y) else float("nan"),
               "mean_predicted": float(np.mean(p)) if len(y) else float("nan"), "rows": int(len(y))}
        cal = self.calibration(y, p)
        if cal is not None:
            out.update(calibration_figures(cal))
        return out

    def export(self, net, path):
        self.vocab = net.vocab or self.vocab  # a restored network carries the vocabulary
        return export_pricing(net, path), PricingExport(net).eval()

    def signature_inputs(self, X) -> dict[str, np.ndarray]:
        X = np.asarray(X, np.float32)
        grid = X[:, COL_X:COL_X + 1] + np.linspace(-0.3, 0.3, 5, dtype=np.float32)[None, :]
        return {"product": X[:, COL_PRODUCT].astype(np.int64), "segment": X[:, COL_SEGMENT].astype(np.int64),
                "hour": np.minimum(X[:, COL_HOUR], 23).astype(np.int64), "log_price_ratio": grid}

    def manifest_extra(self, y, p) -> dict[str, Any]:
        import hashlib

        products = self.vocab.products if self.vocab else []
        # the same vocabulary in every version: the service keeps its id -> code map across reloads
        digest = hashlib.sha256("\n".join([*products, "|", *SEGMENTS]).encode()).hexdigest()
        out = {"products": products, "segments": list(SEGMENTS), "vocabulary_id": digest,
               "samples": N_SAMPLES, "x_clip": X_CLIP}
        cal = self.calibration(y, p)
        if cal is not None:  # predicted vs observed conversion per segment on the rows the version was judged on
            out["calibration"] = cal
        return out

    def examples(self, joined: Sequence[Any]) -> Examples:
        """Training rows from joined quotes: the served product/segment/hour codes, the quoted
        price relative to the request's reference price, sold or not. When one poll holds
        several outcomes of the same quote, the one with the latest occurred_at counts (the
        proto's rule; an outcome corrected in a later poll adds a row instead: the posterior
        cannot take a row back)."""
        from protos.pricing.v1 import pricing_pb2
        from shared.feedback import tensor_to_numpy

        latest: dict[str, tuple[float, tuple]] = {}
        for j in joined:
            if j.outcome.WhichOneof("outcome") != "pricing":
                continue
            tensors = {t.name: t for t in j.served.inputs}
            if not {"product", "segment", "hour"} <= tensors.keys():
                continue
            req, resp = pricing_pb2.QuoteRequest(), pricing_pb2.QuoteResponse()
            if not (j.served.request.Unpack(req) and j.served.response.Unpack(resp)):
                continue
            if not (req.reference_price > 0 and resp.price > 0):
                continue
            try:
                codes = [int(tensor_to_numpy(tensors[n]).reshape(-1)[0]) for n in ("product", "segment", "hour")]
            except (ValueError, IndexError):
                continue
            if not (0 <= codes[0] < PRODUCT_CAPACITY and 0 <= codes[1] < N_SEGMENTS and 0 <= codes[2] < NO_HOUR):
                continue  # served by a model of another vocabulary shape: not this learner's input
            x = math.log(resp.price / req.reference_price)
            sold = 1.0 if j.outcome.pricing.sold else 0.0
            row = (*codes, x, sold, resp.expected_conversion, j.offset)
            seen = latest.get(j.prediction_id)
            if seen is None or j.outcome.pricing.occurred_at >= seen[0]:
                latest[j.prediction_id] = (j.outcome.pricing.occurred_at, row)
        out = sorted((row for _, row in latest.values()), key=lambda r: r[-1])
        if not out:
            return Examples.empty(WIDTH)
        a = np.array(out, np.float64)
        X = rows(a[:, 0], a[:, 1], a[:, 2], a[:, 3], 1.0, a[:, 6].astype(np.int64))
        served = np.column_stack([a[:, 1], a[:, 4], a[:, 5].astype(np.float32)])
        self._served = np.concatenate([self._served, served])[-SERVED_HISTORY:]
        return Examples(X, a[:, 4].astype(np.float32), a[:, 5].astype(np.float32), a[:, 6].astype(np.int64))


# ---- bootstrap from Ta Feng ----
BOOTSTRAP_END = "2001-01-01"  # bootstrap learns from Nov-Dec 2000; the simulator is calibrated on Jan-Feb 2001
HOLDOUT_DAYS = 7  # the last week before BOOTSTRAP_END is the bootstrap's holdout
MIN_LINES = 30  # products with at least this many lines (and two prices) give training rows
# Power prior: one Ta Feng exposure counts as this share of an observed quote. The shelf of a
# Taiwanese grocery in 2000 is not this storefront: at full weight its thousands of exposures per
# product would make the posterior so sure that the storefront's own sales could hardly move it
# (and Thompson sampling would hardly explore). At 0.1 a product's history weighs like a few
# hundred quotes; measured on the market simulator (bench.eval_pricing), see the README.
HISTORY_WEIGHT = 0.1
# ... and no term comes out of the bootstrap surer than this precision: the power prior
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
BOOTSTRAP_CONTEXT_SLOPE_CAP = {name: PRIOR_PRECISION[name] for name in SLOPE_MULT}


def bootstrap_data(limit: int | None = None, end: str = BOOTSTRAP_END, min_lines: int = MIN_LINES,
                   history_weight: float = HISTORY_WEIGHT):
    """(vocabulary, train rows, holdout rows) from Ta Feng before `end` (rows: (X, y)); each
    row's weight is its exposures x history_weight."""
    import pandas as pd

    from trainer.domains import pricing_data
    from trainer.tafeng import load_tafeng

    df = load_tafeng(limit)
    vocab = pricing_data.vocabulary(df)
    period = df[df["day"] < pd.Timestamp(end)]
    products = pricing_data.priced_products(period, min_lines)
    conv = pricing_data.conversion_rows(period, vocab, products)
    cut = np.datetime64(pd.Timestamp(end) - pd.Timedelta(days=HOLDOUT_DAYS), "D")

    def to_xy(r):
        return rows(r.product, r.segment, NO_HOUR, r.x, r.n * history_weight, 0), (r.k / r.n).astype(np.float32)

    return vocab, to_xy(conv.take(conv.day < cut)), to_xy(conv.take(conv.day >= cut))


def bootstrap_pricing(registry, workdir: Path, *, force: bool = False, model: PricingModel | None = None,
                      show_progress: bool = True, limit: int | None = None, **_) -> dict | None:
    """Train version 1 on Ta Feng (Nov-Dec 2000) and publish it."""
    import time

    from trainer.learner import Learner

    if registry.current_version(MODEL_NAME) is not None and not force:
        log.info("pricing: registry already has version %s; bootstrap skipped", registry.current_version(MODEL_NAME))
        return None
    t0 = time.time()
    model = model or PricingModel()
    vocab, (X, y), (hX, hy) = bootstrap_data(limit)
    model.vocab = vocab
    if show_progress:
        from trainer.bootstrap import progress_bar

        bar = progress_bar("pricing bootstrap (L-BFGS iterations)")
        model.progress = bar
    learner = Learner(model, registry, workdir)
    entry = learner.bootstrap(X, y, hX, hy, epochs=1)
    model.progress = None
    p = predict_mean(learner.net, hX)
    log.info("pricing: bootstrapped version %s from %d Ta Feng product-day-segment rows (%d exposures x %g) of %d "
             "products in %.1f s; holdout weighted log loss %.4f (constant rate: %.4f)", entry.get("version"),
             len(y), int(X[:, COL_WEIGHT].sum() / HISTORY_WEIGHT), HISTORY_WEIGHT, len(np.unique(X[:, COL_PRODUCT])),
             time.time() - t0,
             weighted_log_loss(hy, p, hX[:, COL_WEIGHT]),
             weighted_log_loss(hy, np.full_like(hy, np.average(y, weights=X[:, COL_WEIGHT])), hX[:, COL_WEIGHT]))
    return entry
