"""Pricing network: the hierarchical Bayesian conversion model, its parameter layout and
its serving graph (the posterior updates are trainer.domains.pricing_posterior; the
learner's glue is trainer.domains.pricing).

Model. For a quote of product i (subclass c) at price p with reference price r, to a
customer of segment s at hour h, with x = log(p / r):

    logit P(sale) = a0 + a_c + a_i + a_s + a_is + a_h
                    - softplus(b0 + b_c + b_i) * exp(b_s + b_is + b_h) * x + c_s(x)

a_* are conversion levels, b_* price sensitivities (softplus keeps demand decreasing in
price: the slope is the elasticity of the odds). Both the level and the sensitivity are
hierarchical: product terms are offsets from their subclass, subclass terms offsets from the
global ones; a segment has a store-wide offset (a_s, b_s: shared by every product) and each
(product, segment) cell an offset from product + segment (a_is, b_is); hours have offsets of
their own. c_s(x) is the segment's demand-curve shape: piecewise linear in x over fixed knots,
prior 0 (see CURVE), its rises capped so that demand never increases with the price (curve_values). The segment, cell and hour sensitivity terms multiply the product's (log scale):
"this segment is half as price-sensitive" holds across products whose own sensitivities
differ tenfold, where an additive offset would mean a different factor for each product. Each offset has a Gaussian prior at 0 (precisions PRIOR_PRECISION), so a product
with little data is priced like its subclass, a subclass like the store, and a segment that
a product rarely sees like that product adjusted by how the segment behaves across the store
(a segment can be priced higher where it is less sensitive: a level alone could only push
the best price down). Unknown products (code 0: not in the vocabulary) and unknown subclasses
use the shared and segment terms only. Hours are learned online only (Ta Feng has no times;
its rows carry NO_HOUR, whose terms are 0); their strong prior keeps them near 0 until the
storefront's quotes show an hour-of-day effect.

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

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.domains.pricing_data import SEGMENTS, X_CLIP, Vocabulary

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
                   "a_seg": 1.0, "b_seg": 0.5, "a_cell": 2.0, "b_cell": 2.0, "a_hour": 4.0, "b_hour": 16.0,
                   "c_seg": 2.0}
# The segment's demand-curve shape: a piecewise-linear offset of the logit over log price (knots
# CURVE_KNOTS, hat basis; constant beyond the outer knots), store-wide per segment, prior sd 0.7
# logit per knot around 0 (a logistic curve). A logistic in log price cannot follow a threshold
# market's "flat up to the willingness to pay, then a cliff": fit near the ceiling it reads the
# segment as insensitive, fit across the cliff as uniformly steep; and with the levels held by the
# shelf's history, a segment that converts above them was explained by a steeper slope (measured:
# refitting the 45-49 segment's own quotes of a threshold market raised its sensitivity from 4.4
# to 7). The curve offsets carry what the logistic cannot, per price region, and their Thompson
# noise makes price regions no quote has tried look possibly better (exploration by uncertainty).
CURVE = "c_seg"
CURVE_KNOTS = (-0.3, -0.225, -0.15, -0.075, 0.0, 0.075, 0.15, 0.225, 0.3)
N_KNOTS = len(CURVE_KNOTS)
CURVE_SPACING = 0.075
CURVE_RISE_CAP = 0.95  # the curve may cancel at most this share of the logistic's slope (curve_values)
# Which code indexes each group: the parameter's row for a quote.
GROUP_INDEX = {"a0": "global", "b0": "global", "a_cat": "category", "b_cat": "category", "a_prod": "product",
               "b_prod": "product", "a_seg": "segment", "b_seg": "segment", "a_cell": "cell", "b_cell": "cell",
               "a_hour": "hour", "b_hour": "hour", "c_seg": "segment"}
LEVELS = tuple(n for n in GROUP_INDEX if n.startswith("a"))  # terms of the conversion level
SLOPE_BASE = ("b0", "b_cat", "b_prod")  # the product's price sensitivity (pre-softplus)
SLOPE_MULT = ("b_seg", "b_cell", "b_hour")  # log factors of it by segment, cell and hour
SLOPES = SLOPE_BASE + SLOPE_MULT
# Thompson samples vary every term that decides the price: the segment, hour and cell terms as
# much as the product's (a sample that left them at their means would never explore them).
SAMPLED = LEVELS + SLOPES + (CURVE,)
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


def curve_basis(x: torch.Tensor) -> torch.Tensor:
    """[..., N_KNOTS] hat-function weights of log price ratios x (they sum to 1; x beyond the
    outer knots takes the outer knot's weight)."""
    knots = torch.tensor(CURVE_KNOTS, dtype=x.dtype)
    xc = x.clamp(CURVE_KNOTS[0], CURVE_KNOTS[-1]).unsqueeze(-1)
    return (1.0 - (xc - knots).abs() / CURVE_SPACING).clamp(min=0.0)


def curve_values(knots: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """[..., N_KNOTS] the curve's offsets at the knots as the model uses them: each rise from one
    knot to the next is capped at slope x CURVE_SPACING, so the logit's total slope in x,
    -slope + rise / spacing, is never positive: demand never increases with the price, under
    the mean and under every Thompson sample (a free curve with noise would let a sample rate a
    higher price as converting more; CURVE_RISE_CAP < 1 keeps it strictly decreasing, so float
    rounding cannot turn a flat stretch into a rise). knots: [..., N_KNOTS] the parameters; slope: [...] the
    logistic sensitivity of the same quote (or sample)."""
    rise = torch.minimum(knots[..., 1:] - knots[..., :-1], slope.unsqueeze(-1) * (CURVE_RISE_CAP * CURVE_SPACING))
    return torch.cat([knots[..., :1], knots[..., :1] + torch.cumsum(rise, dim=-1)], dim=-1)


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
              "a_hour": (NO_HOUR + 1,), "b_hour": (NO_HOUR + 1,), "c_seg": (N_SEGMENTS * N_KNOTS,)}

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

    def curve_table(self) -> torch.Tensor:
        """[N_SEGMENTS, N_KNOTS] the segments' curve offsets at the knots."""
        return self.c_seg.view(N_SEGMENTS, N_KNOTS)

    def curve(self, segment, x, slope) -> torch.Tensor:
        """The mean curve offset of each quote's segment at x ([B] or [B, G]), slope [B] the
        quote's sensitivity (see curve_values)."""
        c = curve_values(self.curve_table()[segment], slope)
        return (curve_basis(x) * (c.unsqueeze(1) if x.dim() == 2 else c)).sum(-1)

    def sampled_curve(self, segment) -> torch.Tensor:
        """[B, N_SAMPLES, N_KNOTS] the curve offsets of each Thompson sample."""
        noise = self.noise_c_seg.view(N_SAMPLES, N_SEGMENTS, N_KNOTS)[:, segment, :].transpose(0, 1)
        scale = 1.0 / torch.sqrt(self.prec_c_seg.view(N_SEGMENTS, N_KNOTS)[segment])
        return self.curve_table()[segment].unsqueeze(1) + noise * scale.unsqueeze(1)

    def logit(self, product, segment, hour, x):
        level, base, mult, _ = self.level_slope(product, segment, hour)
        slope = sensitivity(base, mult)
        return level - slope * x + self.curve(segment, x, slope)

    def sampled_noise(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """[B, N_SAMPLES] noise of a group: fixed draw / sqrt(precision), masked."""
        scale = self.mask_at(name, index) / torch.sqrt(getattr(self, f"prec_{name}")[index])
        noise = getattr(self, f"noise_{name}")
        slot = index % noise.shape[1] if noise.shape[1] < self.SHAPES[name][0] else index
        return (noise[:, slot] * scale).transpose(0, 1)

    def forward(self, product, segment, hour, log_price_ratio):
        level, base, mult, idx = self.level_slope(product, segment, hour)
        x = log_price_ratio.clamp(-X_CLIP, X_CLIP)
        basis = curve_basis(x)  # [B, G, K]
        slope = sensitivity(base, mult)
        conversion = torch.sigmoid(level.unsqueeze(1) - slope.unsqueeze(1) * x + self.curve(segment, x, slope))
        s_level = level.unsqueeze(1) + sum(self.sampled_noise(n, idx[GROUP_INDEX[n]]) for n in LEVELS)
        s_base = base.unsqueeze(1) + sum(self.sampled_noise(n, idx[GROUP_INDEX[n]]) for n in SLOPE_BASE)
        s_mult = mult.unsqueeze(1) + sum(self.sampled_noise(n, idx[GROUP_INDEX[n]]) for n in SLOPE_MULT)
        s_slope = sensitivity(s_base, s_mult)  # [B, N]
        s_knots = curve_values(self.sampled_curve(segment), s_slope)  # [B, N, K]
        s_curve = (basis.unsqueeze(1) * s_knots.unsqueeze(2)).sum(-1)  # [B, N, G]
        sampled = torch.sigmoid(s_level.unsqueeze(2) - s_slope.unsqueeze(2) * x.unsqueeze(1) + s_curve)
        return conversion, sampled

    def slopes(self, product, segment, hour) -> torch.Tensor:
        """[B] the mean price sensitivity of each quote (reports, tests, simulators)."""
        with torch.no_grad():
            _, base, mult, _ = self.level_slope(product, segment, hour)
            return sensitivity(base, mult)


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
