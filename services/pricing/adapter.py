"""Pricing domain rules: request -> candidate price grid -> one model run -> a price inside the guardrails.

A quote:
1. validates the request (INVALID_ARGUMENT naming the field; rules in protos/pricing/v1);
2. computes the effective range [lo, hi] = [max(min_price, ref (1 - pct/100)),
   min(max_price, ref (1 + pct/100))] (ref lies in [min_price, max_price], so lo <= ref <= hi);
3. builds the candidate grid: `grid_size - 1` prices evenly spaced over [lo, hi] plus the
   reference price itself (keeping the price unchanged is always a candidate);
4. runs the model once on the whole grid: the posterior-mean conversion of every candidate
   and the conversion under each of the model's Thompson samples (trainer.domains.pricing);
5. greedy price = the candidate of highest expected value (revenue p x conversion, or margin
   (p - unit_cost) x conversion) under the mean model. With probability `exploration_share`
   the quote explores, and an exploring quote is always priced off the greedy price (so the
   share of exploratory quotes is the setting, not the share of Thompson samples that happen
   to disagree with the mean: most agree once the posterior is tight, which left exploration
   at a few % of quotes whatever the setting):
   - a local step (the exploring quotes that are not wide steps): one Thompson sample, drawn at random, picks its
     best candidate other than the greedy price within `max_step_pct` percent of the greedy
     price. The sample varies every term of the model (product, segment, hour...), so where
     the posterior is unsure which neighbour is better, both get tried;
   - a wide step (a share `wide_step_share` of the exploring quotes): one Thompson sample,
     drawn at random, picks its best candidate other than the greedy price anywhere in the
     effective range. Local steps alone never leave the neighbourhood of the greedy price:
     from the lower guardrail, with a 10 % step, the upper part of a +-20 % range is never
     quoted, so a model whose form is wrong there (a market is never exactly logistic) is
     never corrected. The wide steps are the budget that lets exploration reach any price
     inside the guardrails, directed by the posterior: a price region the quotes have not
     tried keeps the prior's uncertainty in the model's demand-curve terms (trainer.domains.
     pricing_net, CURVE), so samples that rate it best keep coming while it is unsure, and
     the steps go where the posterior still disagrees with the greedy price rather than
     uniformly (measured on a calibration threshold market, seed 1, 6,000 quotes, offline
     loop: regret by thirds 8.4 / 7.7 / 7.9 % with sampled wide steps at wide_step_share 1,
     against 10.5 / 8.7 / 9.1 % in 3,000 quotes with uniform wide steps at 0.2);
   - a uniform step (a share `uniform_step_share` of the wide steps): a candidate other than
     the greedy price drawn uniformly. The samples go only where the posterior thinks a price
     may be better, and a posterior can be wrongly sure: fit on quotes near the lower edge, a
     model of the wrong family extrapolates a steep slope to the upper part of the range, its
     samples all agree that it never sells, and a segment that would pay more is never asked
     (measured on the threshold market, offline loop with the trainer's model: the least
     sensitive segment's learned sensitivity stayed that of the most sensitive one). Uniform
     steps put a bounded share of quotes everywhere, so such a belief is tested. Measured on
     the calibration threshold market (seed 1, products 31-60, 9,000 quotes, offline loop of
     the trainer's model and this choice; never the scored market): with uniform_step_share 0
     the last third's mean prices by segment were 0.88 / 0.91 / 0.92 x reference against the
     oracle's 0.86 / 1.00 / 1.20 (regret by thirds 7.7 / 6.2 / 5.7 %); with 0.5, 0.87 / 0.98 /
     0.99 (the least sensitive segment's learned optimum moved to +15 %; the greedy price
     follows as its quotes accumulate) at a cost in regret: 10.6 / 7.5 / 6.4 %.
   - decay: a quote explores with probability exploration_share x min(1, max(exploration_floor,
     gain / exploration_gain_scale)), gain = the Thompson samples' mean expected gain of their
     best price over the greedy one, relative to the greedy price's expected value
     (exploring_probability). At a fixed share the last third of a run explored as much as the
     first, and on a price-sensitive segment an exploratory quote costs most of its value however
     sure the model has become; with the decay, quotes whose terms are known mostly exploit, and
     those the posterior is still unsure about explore at the full share. The realised share is
     what the service reports (below), never more than the setting.
   `exploratory` is true exactly when the price differs from the greedy one (an exploring
   quote whose reachable candidates are all the greedy price, e.g. a pinned price, is not);
   expected_conversion and expected_value are the mean model's at the chosen price. The
   realised share is exported as storefront_pricing_exploratory_total / quotes.

The price is a grid value clipped to [lo, hi] (a no-op, kept so float rounding can never put
a quote outside the caller's guardrails).
"""
from __future__ import annotations

import time
from typing import Hashable, Mapping

import numpy as np
from prometheus_client import Counter, Histogram

from protos.common.v1 import common_pb2
from protos.feedback.v1 import feedback_pb2
from protos.pricing.v1 import pricing_pb2
from shared.domain import DomainService, Prepared, check_id, event_time, feedback_outcome, finite
from shared.errors import InvalidArgument
from shared.registry import Manifest, Signature, TensorSpec
from shared.runtime.model import LoadedModel

N_SAMPLES = 16  # Thompson samples in the serving graph (trainer.domains.pricing.N_SAMPLES)
SIGNATURE = Signature(
    inputs=(TensorSpec("product", "INT64", (-1,)), TensorSpec("segment", "INT64", (-1,)),
            TensorSpec("hour", "INT64", (-1,)), TensorSpec("log_price_ratio", "FP32", (-1, -1))),
    outputs=(TensorSpec("conversion", "FP32", (-1, -1)), TensorSpec("sampled_conversion", "FP32", (-1, N_SAMPLES, -1))),
)
# Share of the wide steps priced uniformly at random over the other candidates instead of by a
# Thompson sample (see the module docstring).
UNIFORM_STEP_SHARE = 0.5
# Exploration that decays as the posterior narrows (PricingService.exploring_probability): a
# quote explores with the full exploration_share while the Thompson samples' expected gain over
# the greedy price is at least EXPLORATION_GAIN_SCALE of its value, in proportion below, and
# never less than EXPLORATION_FLOOR of the share. Chosen on the calibration threshold market
# (bench.eval_pricing_offline: products 31-60, never the scored market; 12,000 quotes in rounds
# of 450), by the mean whole-run regret over three arrival/exploration seeds (0, 1, 2), because a
# single run's regret moves by 1-2 points with its random draws alone:
#   fixed share (scale 0): 6.58 / 5.72 / 7.68 = 6.66 %, last third 6.19 % on average, 20 % explored;
#   scale 0.1, floor 0.1: 5.54 / 8.05 / 6.35 = 6.65 % (seed 1: 9-11 % explored, and the model
#     stayed sure the two less sensitive segments buy little at high prices: 0.91 x reference for
#     both, where the optimum is 1.0 and 1.2: too few quotes left to test that belief);
#   scale 0.05, floor 0.3: 6.21 / 6.59 / 6.82 = 6.54 %;
#   scale 0.1, floor 0.3: 5.95 / 5.80 / 6.17 = 5.97 %, last third 4.50 % on average (5.11 / 3.97 /
#     4.41), 12-16 % explored.
# (single seed-0 runs: scale 0.01 floor 0.1: 5.81 %, 20 % explored, almost every quote's samples
# still disagree by 1 %; 0.03 / 0.1: 6.17 %; 0.03 / 0.3: 5.85 %; 0.3 / 0.1: 7.51 %, 6-7 % explored.)
EXPLORATION_GAIN_SCALE = 0.1
EXPLORATION_FLOOR = 0.3
X_CLIP = 5.0  # the model's clip of log(price / reference) (trainer.domains.pricing_data.X_CLIP)
MAX_SEGMENT_LEN = 64

EXPLORATORY = Counter("storefront_pricing_exploratory_total",
                      "Quotes priced off the greedy price (realised exploration: divide by the quotes), by step",
                      ["model", "step"])
QUOTES = Counter("storefront_pricing_quotes_total", "Quotes served, by objective and whether the price was exploratory",
                 ["model", "objective", "exploratory"])
PRICE_CHANGE = Histogram("storefront_pricing_price_change_ratio", "Quoted price / reference price",
                         ["model"], buckets=(0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0))


def check_manifest(manifest: Manifest) -> str | None:
    extra = manifest.extra
    products = extra.get("products")
    if not isinstance(products, list) or not all(isinstance(p, str) for p in products):
        return "extra.products must list the product ids in code order"
    segments = extra.get("segments")
    if not isinstance(segments, list) or not segments or segments[0] != "other":
        return "extra.segments must list the segment names in code order, 'other' first"
    return None


def check_outputs(outputs: Mapping[str, np.ndarray]) -> str | None:
    for name in ("conversion", "sampled_conversion"):
        y = outputs[name]
        if (y < 0).any() or (y > 1).any():
            return f"{name} outside [0, 1]"
    return None


class Vocab:
    """Product id -> code and segment -> code of one model version (from its manifest's extra)."""

    def __init__(self, extra: Mapping) -> None:
        self.products = {p: i + 1 for i, p in enumerate(extra.get("products", []))}
        self.segments = {s: i for i, s in enumerate(extra.get("segments", ["other"]))}


def effective_range(ref: float, min_price: float, max_price: float, max_change_pct: float | None) -> tuple[float, float]:
    if max_change_pct is None:
        return min_price, max_price
    return max(min_price, ref * (1.0 - max_change_pct / 100.0)), min(max_price, ref * (1.0 + max_change_pct / 100.0))


_STEPS: dict[int, np.ndarray] = {}


def candidate_grid(ref: float, lo: float, hi: float, size: int) -> np.ndarray:
    """size - 1 evenly spaced prices over [lo, hi] (both ends exactly), plus ref; sorted, inside [lo, hi]."""
    steps = _STEPS.get(size)
    if steps is None:
        steps = _STEPS[size] = np.linspace(0.0, 1.0, max(size - 1, 1))
    grid = np.empty(len(steps) + 1)
    grid[:-1] = lo + (hi - lo) * steps
    if len(steps) > 1:
        grid[-2] = hi  # lo + (hi - lo) * 1.0 may miss hi by an ulp
    grid[-1] = ref
    grid.sort()
    np.clip(grid, lo, hi, out=grid)
    return grid


class PricingService(DomainService[pricing_pb2.QuoteRequest, pricing_pb2.QuoteResponse]):
    domain = "pricing"
    prediction_id_legacy_domain = 3  # ids issued before domains were named still verify

    def __init__(self, served, feedback=None, *, exploration_share: float = 0.2, max_step_pct: float = 10.0,
                 wide_step_share: float = 1.0, uniform_step_share: float = UNIFORM_STEP_SHARE, grid_size: int = 21,
                 exploration_gain_scale: float = EXPLORATION_GAIN_SCALE, exploration_floor: float = EXPLORATION_FLOOR,
                 seed: int = -1) -> None:
        super().__init__(served, feedback)
        if (not 0.0 <= exploration_share <= 1.0 or max_step_pct < 0 or grid_size < 2 or not 0.0 <= wide_step_share <= 1.0
                or not 0.0 <= uniform_step_share <= 1.0 or exploration_gain_scale < 0
                or not 0.0 <= exploration_floor <= 1.0):
            raise ValueError("exploration_share, wide_step_share, uniform_step_share and exploration_floor in [0, 1], "
                             "max_step_pct >= 0, exploration_gain_scale >= 0, grid_size >= 2")
        self.exploration_share = exploration_share
        self.exploration_gain_scale = exploration_gain_scale
        self.exploration_floor = exploration_floor
        self.max_step = max_step_pct / 100.0
        self.wide_step_share = wide_step_share
        self.uniform_step_share = uniform_step_share
        self.grid_size = grid_size
        self.rng = np.random.default_rng(None if seed < 0 else seed)
        self._vocab: tuple[str, Vocab] | None = None
        self._counters: dict[tuple, list] = {}

    def vocab(self, model: LoadedModel) -> Vocab:
        """The maps of this version, built once per vocabulary (versions that share one, which
        the trainer marks with the same extra.vocabulary_id, share the maps)."""
        extra = model.manifest.extra if model.manifest else {}
        key = extra.get("vocabulary_id") or f"version-{model.version}"
        cached = self._vocab
        if cached is None or cached[0] != key:
            cached = self._vocab = (key, Vocab(extra))
        return cached[1]

    # ---- request -> model inputs ----
    def routing_key(self, request: pricing_pb2.QuoteRequest) -> str | None:
        """Canary routing by (product, segment): every customer of a segment is quoted one
        version's price for a product while a canary runs (no two prices for the same thing in
        the same audience at once), and each version's sales evidence stays per cell."""
        return f"{request.product_id}\x00{request.context.segment}"

    def preprocess(self, request: pricing_pb2.QuoteRequest, model: LoadedModel) -> Prepared:
        return self.prepare(request, self.vocab(model))

    def prepare(self, request: pricing_pb2.QuoteRequest, vocab: Vocab) -> Prepared:
        """Validate the request and build the model inputs with this vocabulary."""
        check_id(request.product_id, "product_id", 128)
        ref = finite(request.reference_price, "reference_price")
        if not ref > 0:
            raise InvalidArgument(f"reference_price must be > 0, got {ref}")
        cost = None
        if request.HasField("unit_cost"):
            cost = finite(request.unit_cost, "unit_cost")
            if cost < 0:
                raise InvalidArgument(f"unit_cost must be >= 0, got {cost}")
        if not request.HasField("guardrails"):
            raise InvalidArgument("guardrails is required")
        g = request.guardrails
        lo_price = finite(g.min_price, "guardrails.min_price")
        if lo_price < 0:
            raise InvalidArgument(f"guardrails.min_price must be >= 0, got {lo_price}")
        hi_price = finite(g.max_price, "guardrails.max_price")
        if not hi_price > 0:
            raise InvalidArgument(f"guardrails.max_price must be > 0, got {hi_price}")
        if hi_price < lo_price:
            raise InvalidArgument(f"guardrails.max_price ({hi_price}) must be >= guardrails.min_price ({lo_price})")
        pct = None
        if g.HasField("max_change_pct"):
            pct = finite(g.max_change_pct, "guardrails.max_change_pct")
            if not 0.0 <= pct <= 100.0:
                raise InvalidArgument(f"guardrails.max_change_pct must be in [0, 100], got {pct}")
        if not lo_price <= ref <= hi_price:
            raise InvalidArgument(f"reference_price ({ref}) must lie in [guardrails.min_price, guardrails.max_price] "
                                  f"= [{lo_price}, {hi_price}]")
        objective = request.objective
        if objective not in (pricing_pb2.OBJECTIVE_UNSPECIFIED, pricing_pb2.OBJECTIVE_REVENUE, pricing_pb2.OBJECTIVE_MARGIN):
            raise InvalidArgument(f"objective {objective} is not a known Objective")
        margin = objective == pricing_pb2.OBJECTIVE_MARGIN
        if margin and cost is None:
            raise InvalidArgument("unit_cost is required for OBJECTIVE_MARGIN")
        ctx = request.context
        if len(ctx.segment) > MAX_SEGMENT_LEN:
            raise InvalidArgument(f"context.segment is longer than {MAX_SEGMENT_LEN} characters")
        if ctx.HasField("hour_of_day"):
            if ctx.hour_of_day > 23:
                raise InvalidArgument(f"context.hour_of_day must be in 0..23, got {ctx.hour_of_day}")
            hour = ctx.hour_of_day
        else:
            hour = time.gmtime().tm_hour
        lo, hi = effective_range(ref, lo_price, hi_price, pct)
        grid = candidate_grid(ref, lo, hi, self.grid_size)
        with np.errstate(divide="ignore", over="ignore"):
            x = np.clip(np.log(grid / ref), -X_CLIP, X_CLIP).astype(np.float32)
        feeds = {"product": np.array([vocab.products.get(request.product_id, 0)], np.int64),
                 "segment": np.array([vocab.segments.get(ctx.segment, 0)], np.int64),
                 "hour": np.array([hour], np.int64),
                 "log_price_ratio": x[None, :]}
        return Prepared(feeds, 1, (grid, lo, hi, ref, cost if margin else None))

    # ---- model outputs -> price ----
    def postprocess(self, request, prepared: Prepared, outputs, model: LoadedModel, prediction_id: str):
        grid, lo, hi, ref, margin_cost = prepared.extra
        unit_value = grid - margin_cost if margin_cost is not None else grid
        mean = outputs["conversion"][0].astype(np.float64)
        value = unit_value * mean
        greedy = int(np.argmax(value))
        choice, step = greedy, None
        samples = outputs["sampled_conversion"][0]
        if self.exploration_share > 0 and self.rng.random() < self.exploring_probability(unit_value, samples, greedy,
                                                                                          float(value[greedy])):
            choice, step = self._explore(grid, greedy, unit_value, samples)
        price = float(min(max(grid[choice], lo), hi))
        exploratory = price != float(grid[greedy])
        objective = pricing_pb2.OBJECTIVE_MARGIN if margin_cost is not None else pricing_pb2.OBJECTIVE_REVENUE
        self._count(model.name, objective, exploratory, step)
        PRICE_CHANGE.labels(model.name).observe(price / ref)
        conversion = float(mean[choice])
        return pricing_pb2.QuoteResponse(
            prediction_id=prediction_id, price=price, expected_conversion=conversion,
            expected_value=float(unit_value[choice] * conversion), exploratory=exploratory,
            model=common_pb2.ModelRef(name=model.name, version=model.version),
            effective_min_price=lo, effective_max_price=hi)

    def exploring_probability(self, unit_value: np.ndarray, samples: np.ndarray, greedy: int, greedy_value: float
                              ) -> float:
        """The chance this quote explores: exploration_share, times the posterior's expected gain
        of the best price over the greedy one relative to exploration_gain_scale (capped at 1,
        at least exploration_floor); exploration_gain_scale 0: exploration_share always.

        The expected gain is the mean over the Thompson samples of (the sample's best expected
        value - its expected value at the greedy price), as a share of the mean model's expected
        value at the greedy price: what a quote stands to learn, in the currency it costs. It is
        large while the samples disagree about the best price and shrinks as the posterior
        narrows, so a quote explores less where its terms are known and the run's later quotes
        exploit (at a fixed share, a uniform step on a price-sensitive segment costs most of
        the quote's value however sure the model is). The floor keeps a bounded share
        exploring where the posterior is (maybe wrongly) sure: those are the quotes that test
        it (see the uniform step)."""
        share = self.exploration_share
        if self.exploration_gain_scale <= 0 or share <= 0:
            return share
        sampled_value = unit_value * samples  # [N_SAMPLES, G]
        gain = float(np.mean(sampled_value.max(axis=1) - sampled_value[:, greedy]))
        relative = gain / greedy_value if greedy_value > 0 else 1.0
        return share * min(1.0, max(self.exploration_floor, relative / self.exploration_gain_scale))

    def _explore(self, grid: np.ndarray, greedy: int, unit_value: np.ndarray, samples: np.ndarray
                 ) -> tuple[int, str | None]:
        """An exploratory candidate (index into grid) other than the greedy price, and its step
        kind ("local", "wide" or "uniform"); (greedy, None) when no other price is reachable."""
        other = grid != grid[greedy]  # the reference may duplicate a grid price: compare prices
        if not other.any():
            return greedy, None
        wide = self.wide_step_share > 0 and self.rng.random() < self.wide_step_share
        if wide and self.uniform_step_share > 0 and self.rng.random() < self.uniform_step_share:
            return int(self.rng.choice(np.flatnonzero(other))), "uniform"
        sampled_value = unit_value * samples[self.rng.integers(len(samples))]
        if wide:
            return int(np.argmax(np.where(other, sampled_value, -np.inf))), "wide"
        reach = other & (np.abs(grid - grid[greedy]) <= self.max_step * grid[greedy] + 1e-12)
        if not reach.any():
            return greedy, None
        return int(np.argmax(np.where(reach, sampled_value, -np.inf))), "local"

    def _count(self, model: str, objective: int, exploratory: bool, step: str | None) -> None:
        key = (model, objective, exploratory, step if exploratory else None)
        counters = self._counters.get(key)
        if counters is None:
            name = "margin" if objective == pricing_pb2.OBJECTIVE_MARGIN else "revenue"
            counters = [QUOTES.labels(model, name, "true" if exploratory else "false")]
            if exploratory:
                counters.append(EXPLORATORY.labels(model, step or "local"))
            self._counters[key] = counters
        for c in counters:
            c.inc()

    # ---- outcomes ----
    def outcome_to_feedback(self, outcome: pricing_pb2.PricingOutcome, now: float) -> tuple[Hashable, feedback_pb2.Outcome]:
        check_id(outcome.prediction_id, "prediction_id", 64)
        if outcome.sold:
            if outcome.units < 1:
                raise InvalidArgument(f"units must be >= 1 when sold is true, got {outcome.units}")
            price = finite(outcome.price, "price")
            if not price > 0:
                raise InvalidArgument(f"price must be > 0 when sold is true, got {price}")
        elif outcome.units != 0:
            raise InvalidArgument(f"units must be 0 when sold is false, got {outcome.units}")
        occurred = event_time(outcome.occurred_at, "occurred_at", now)
        message = pricing_pb2.PricingOutcome()
        message.CopyFrom(outcome)
        message.occurred_at = occurred
        if not outcome.sold:
            message.price = 0.0  # ignored when unsold: do not carry whatever was sent
        record = feedback_outcome(message, occurred)
        key = (outcome.prediction_id, outcome.sold, outcome.units, outcome.price if outcome.sold else 0.0,
               outcome.occurred_at)
        return key, record
