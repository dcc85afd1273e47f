"""Market simulators for pricing whose true demand curves are known: two families.

1. `calibrate` -> LogitMarket: calibrated on Ta Feng with the model's own form (below). It
   measures how fast the loop finds prices on a market it can represent exactly; it cannot
   show what happens when the market is not of the model's family.
2. `threshold_market` -> ThresholdMarket: another family. Every customer has a threshold
   willingness to pay and buys iff the price is at most it (and the product interests them at
   all): P(sale) = interest x P(WTP >= p), with log(WTP / reference) ~ Normal(mu, sigma) per
   (product, segment), i.e. a lognormal survival with a ceiling: not a logistic curve in log
   price, and a ceiling no logistic level reproduces. Three segments of clearly different
   sensitivity (sigma 0.08 / 0.25 / 0.5 of log price) whose revenue-optimal prices lie near
   the lower guardrail, near the reference and at the upper guardrail (+-20 %); calibrated on
   Ta Feng Jan-Feb 2001 (segment and product arrival shares, conversion at the reference per
   (product, segment), prices and units). `skip` picks the next most sold products: the
   calibration markets the eval chooses its baselines' settings on.

Both share arrivals (products, segments, hours, one uniform draw per customer: common random
numbers), Ta Feng units, guardrails and the oracles: the best fixed price per product over the
segment mix (segment-blind) and per (product, segment) (the regret oracle).

LogitMarket calibration (a different period than the model's bootstrap, so the model does not start
from the truth): the same conversion construction as the bootstrap (trainer.domains.
pricing_data: exposures = baskets in the product's subclass, conversions = baskets with the
product, per product-day-segment) on Jan-Feb 2001 (the bootstrap learns Nov-Dec 2000), fitted
with the same hierarchical model (trainer.domains.pricing.absorb from the prior). The truth
of product i is that fit's posterior mean plus a deviation drawn from its posterior
(N(0, 1/precision) on the product's level and price sensitivity): a plausible demand curve
given the data, not the fitted one itself.

    P_true(sale | i, segment s, price p) = sigmoid(a_i + u_s - beta_i log(p / r_i))

r_i, the reference price of a quote, is the product's most frequent Jan-Feb unit price. Ta Feng
has no time of day: arrivals get an hour from a storefront-like daily traffic profile, and
the hour has no effect on demand (the model's hour terms must learn that it is 0).

Arrivals: the product in proportion to its Jan-Feb exposures, the segment in proportion to
Ta Feng's age-group shares. A sale sells a number of units drawn from the product's real
Ta Feng line amounts; revenue = price x units. Each arrival carries a uniform draw u: it
buys iff u < P_true(price), so every policy faces the same customers (common random numbers).

Objectives and guardrails. Every other product (those whose median Ta Feng unit cost is
below 95 % of the reference) is quoted for margin, with that cost as unit_cost and as
min_price (never sell below cost); the others for revenue, with min_price = 0.5 x reference.
max_price = 1.5 x reference, max_change_pct = `max_change_pct` for all. The value of a quote
is its revenue (price x units) or its margin ((price - cost) x units).
The oracles (both markets): the best fixed price over a fine grid of the effective range,
maximizing the expected value (known exactly) per product over the segment mix
(segment-blind), or per (product, segment).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pandas as pd

CALIBRATION_START = "2001-01-01"
# Storefront traffic by hour of day (relative): quiet at night, peaks at lunch and in the evening.
HOURLY_TRAFFIC = np.array([2, 1, 1, 1, 1, 1, 2, 4, 6, 7, 8, 9, 10, 9, 8, 8, 8, 9, 11, 12, 12, 10, 7, 4], float)


@dataclasses.dataclass
class Market:
    """What every market has: products, prices, guardrails, arrivals' mix; `conversion` is the family's."""

    products: list[str]  # Ta Feng product ids
    reference: np.ndarray  # [P] reference (list) price
    segment_share: np.ndarray  # [S] arrival share of each segment
    product_share: np.ndarray  # [P] arrival share of each product
    min_price: np.ndarray  # [P]
    max_price: np.ndarray  # [P]
    max_change_pct: float
    units: list[np.ndarray]  # per product: real Ta Feng line amounts to draw units from
    cost: np.ndarray  # [P] median Ta Feng unit cost
    margin: np.ndarray  # [P] bool: quoted for margin (else revenue)
    segments: tuple[str, ...]

    @property
    def lo(self) -> np.ndarray:
        return np.maximum(self.min_price, self.reference * (1.0 - self.max_change_pct / 100.0))

    @property
    def hi(self) -> np.ndarray:
        return np.minimum(self.max_price, self.reference * (1.0 + self.max_change_pct / 100.0))

    family = "abstract"

    def conversion(self, product: np.ndarray, segment: np.ndarray, price: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def active_segments(self) -> np.ndarray:
        return np.flatnonzero(self.segment_share > 0)

    def mean_units(self) -> np.ndarray:
        return np.array([u.mean() for u in self.units])

    def unit_value(self, product, price):
        """Value of one unit sold at price: the price, or the price minus the cost (margin)."""
        return price - np.where(self.margin[product], self.cost[product], 0.0)

    def expected_value(self, product: int, price: np.ndarray, segment: int | None = None) -> np.ndarray:
        """Expected value (revenue or margin) per arrival of `product` at each price: of one
        segment, or over the segment mix (segment None)."""
        price = np.atleast_1d(price)
        n = len(price)
        if segment is None:
            p = sum(self.segment_share[s] * self.conversion(np.full(n, product), np.full(n, s), price)
                    for s in self.active_segments)
        else:
            p = self.conversion(np.full(n, product), np.full(n, segment), price)
        return self.unit_value(product, price) * p * self.units[product].mean()

    def oracle_prices(self, points: int = 401) -> np.ndarray:
        """Best fixed price per product on a fine grid of its effective range (segment-blind)."""
        out = np.empty(len(self.products))
        for i in range(len(self.products)):
            grid = np.linspace(self.lo[i], self.hi[i], points)
            out[i] = grid[int(np.argmax(self.expected_value(i, grid)))]
        return out

    def oracle_segment_prices(self, points: int = 401) -> np.ndarray:
        """[P, S] best fixed price per (product, segment) on a fine grid of the effective range
        (the regret oracle: it knows each segment's curve; NaN for segments that never arrive)."""
        out = np.full((len(self.products), len(self.segments)), np.nan)
        for i in range(len(self.products)):
            grid = np.linspace(self.lo[i], self.hi[i], points)
            for s in self.active_segments:
                out[i, s] = grid[int(np.argmax(self.expected_value(i, grid, int(s))))]
        return out


@dataclasses.dataclass
class LogitMarket(Market):
    """The model's own family: logit P = a_i + u_s - beta_i log(p / r_i)."""

    level: np.ndarray = None  # [P] true a_i (segment "other" baseline folded in)
    slope: np.ndarray = None  # [P] true beta_i (> 0)
    segment_effect: np.ndarray = None  # [S] true u_s
    family = "logistic (the model's own)"

    def conversion(self, product: np.ndarray, segment: np.ndarray, price: np.ndarray) -> np.ndarray:
        z = self.level[product] + self.segment_effect[segment] - self.slope[product] * np.log(price / self.reference[product])
        return 1.0 / (1.0 + np.exp(-z))


@dataclasses.dataclass
class ThresholdMarket(Market):
    """Another family: P(sale) = interest x P(log(WTP / r_i) >= log(p / r_i)), log(WTP / r_i) ~
    Normal(mu, sigma) per (product, segment): each customer buys iff interested and the price is
    at most their willingness to pay (see the module docstring)."""

    interest: np.ndarray = None  # [P, S] share of arrivals who would buy at any price below their WTP
    wtp_mu: np.ndarray = None  # [P, S] mean of log(WTP / reference)
    wtp_sigma: np.ndarray = None  # [P, S] its standard deviation (small: price-sensitive)
    family = "threshold willingness to pay (lognormal per segment)"

    def conversion(self, product: np.ndarray, segment: np.ndarray, price: np.ndarray) -> np.ndarray:
        from scipy.special import ndtr

        z = (np.log(price / self.reference[product]) - self.wtp_mu[product, segment]) / self.wtp_sigma[product, segment]
        return self.interest[product, segment] * ndtr(-z)


@dataclasses.dataclass
class Arrivals:
    product: np.ndarray  # index into Market.products
    segment: np.ndarray
    hour: np.ndarray
    u: np.ndarray  # the customer's uniform draw: buys iff u < P_true(price)
    units: np.ndarray  # units bought if the customer buys

    def __len__(self) -> int:
        return len(self.u)


@functools.lru_cache(maxsize=2)
def _logit_fit(min_lines: int):
    """The Jan-Feb 2001 fit of the model's logistic part that LogitMarkets are drawn from (one
    solve per process: the scored market and its calibration market share it)."""
    from trainer.domains import pricing, pricing_data
    from trainer.tafeng import load_tafeng

    df = load_tafeng()
    vocab = pricing_data.vocabulary(df)
    start = pd.Timestamp(CALIBRATION_START)
    before, after = df[df["day"] < start], df[df["day"] >= start]
    both = np.intersect1d(pricing_data.priced_products(before, min_lines), pricing_data.priced_products(after, min_lines))
    fit_products = pricing_data.priced_products(after, min_lines)
    refs = pricing_data.reference_prices(after)
    rows = pricing_data.conversion_rows(after, vocab, fit_products, refs)
    X = pricing.rows(rows.product, rows.segment, pricing.NO_HOUR, rows.x, rows.n, 0)
    net = pricing.PricingNet()
    net.set_vocabulary(vocab)
    # the model's own form is the logistic part: the segments' curve shapes stay at 0 in this fit
    # (fitted, they would take part of the price response the truth below leaves out)
    pricing.absorb(net, X, (rows.k / rows.n).astype(np.float32), max_iter=60, fit_curve=False)
    return net, vocab, after, both, refs, rows


def calibrate(n_products: int = 40, max_change_pct: float = 20.0, seed: int = 0, min_lines: int = 30,
              skip: int = 0) -> LogitMarket:
    """The market of the `n_products` most sold Jan-Feb products that also sold at two or more
    prices in both periods (so the bootstrap saw them, and the calibration can identify them),
    after the `skip` most sold (a calibration market: other products than the scored one)."""
    import torch

    from trainer.domains import pricing_data

    net, vocab, after, both, refs, rows = _logit_fit(min_lines)
    # the most sold products among `both`, by Jan-Feb lines
    lines = after[after["product_id"].isin(both)].groupby("product_id").size().sort_values(ascending=False)
    chosen = lines.index[skip:skip + n_products].to_numpy()
    codes = torch.from_numpy(vocab.product_codes(chosen))
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        cat = net.product_category[codes]
        level = (net.terms("a0") + net.terms("a_cat")[cat] + net.terms("a_prod")[codes]).numpy()
        slope_pre = (net.terms("b0") + net.terms("b_cat")[cat] + net.terms("b_prod")[codes]).numpy()
        sd_a = (1.0 / net.prec_a_prod[codes].sqrt()).numpy()
        sd_b = (1.0 / net.prec_b_prod[codes].sqrt()).numpy()
        seg = net.terms("a_seg").numpy().astype(np.float64)
    level = level + rng.normal(0.0, sd_a)
    slope = np.log1p(np.exp(slope_pre + rng.normal(0.0, sd_b)))  # softplus
    exposures = pd.Series(rows.n, index=rows.product).groupby(level=0).sum()
    share = exposures.reindex(codes.numpy()).fillna(0).to_numpy(float)
    seg_share = np.bincount(pricing_data.segment_codes(after.drop_duplicates(["day", "customer_id"])["age_group"]),
                            minlength=len(pricing_data.SEGMENTS)).astype(float)
    sub = after[after["product_id"].isin(chosen)]
    cost = sub.groupby("product_id")["unit_cost"].median().reindex(chosen).to_numpy(float)
    ref = refs.reindex(chosen).to_numpy(float)
    amounts = [sub.loc[sub["product_id"] == p, "amount"].to_numpy(float) for p in chosen]
    margin = (np.arange(len(chosen)) % 2 == 1) & (cost < 0.95 * ref)
    return LogitMarket(products=[str(p) for p in chosen], reference=ref, level=level.astype(float), slope=slope.astype(float),
                  segment_effect=seg, segment_share=seg_share / seg_share.sum(), product_share=share / share.sum(),
                  min_price=np.where(margin, cost, 0.5 * ref), max_price=1.5 * ref, max_change_pct=max_change_pct,
                  units=amounts, segments=pricing_data.SEGMENTS, cost=cost, margin=margin)


# The threshold market's segments (Ta Feng age groups, so the model's segment vocabulary knows
# them) and what the market's family adds to Ta Feng: the sigma of log WTP (price sensitivity:
# small = sensitive) and where the revenue-optimal price of a typical product lies (x reference;
# beyond the +-20 % guardrails the optimum is the guardrail). Ta Feng has one price per day for
# everyone, so how differently its age groups weigh a price is not in the data: these are the
# market's design. Arrival shares and conversion levels come from Ta Feng (threshold_market).
THRESHOLD_SEGMENTS = {"<25": dict(sigma=0.08, optimum=0.86), "30-34": dict(sigma=0.25, optimum=1.0),
                      "45-49": dict(sigma=0.50, optimum=1.35)}
# Pseudo-exposures of the product's all-segment conversion share that a (product, segment)
# share is shrunk toward (a product with few baskets of a segment converts like the product).
SEGMENT_SHRINK = 50.0


def _optimal_z(sigma: float) -> float:
    """z at the revenue-optimal price of a lognormal-WTP survival: d/dx [x + log(1 - Phi((x -
    mu) / sigma))] = 0  <=>  phi(z) / (1 - Phi(z)) = sigma (the normal hazard equals sigma)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    return float(brentq(lambda z: norm.pdf(z) / norm.sf(z) - sigma, -12.0, 12.0))


def threshold_market(n_products: int = 30, max_change_pct: float = 20.0, seed: int = 0,
                     min_lines: int = 30, skip: int = 0) -> ThresholdMarket:
    """The threshold-WTP market on the `n_products` most sold Jan-Feb 2001 Ta Feng products (after
    the `skip` most sold: a calibration market) that also sold at two or more prices in Nov-Dec
    2000 (so the bootstrap knows them), calibrated on Ta Feng Jan-Feb as the bootstrap's data
    construction sees it (trainer.domains.pricing_data): reference = the most frequent unit
    price, units = the product's real line amounts, arrivals in proportion to its lines, the
    segments' arrival shares = their shares of Ta Feng's customer-days (renormalized over the
    three), and the conversion at the reference price of (product, segment) = its Ta Feng
    conversion share (baskets with the product / baskets of its subclass, the segment's shrunk
    toward the product's by SEGMENT_SHRINK pseudo-exposures). The family's part: mu = the
    segment's mu (placing the optimum at THRESHOLD_SEGMENTS' `optimum`) + a product shift
    N(0, 0.04), sigma = the segment's x exp(N(0, 0.1)), interest = the Ta Feng conversion share
    / P(WTP >= reference) (clipped to [0.02, 0.95]). Revenue for every product: min_price 0.5 x,
    max_price 1.5 x reference, max_change_pct for all."""
    from scipy.special import ndtr

    from trainer.domains import pricing_data
    from trainer.tafeng import load_tafeng

    df = load_tafeng()
    start = pd.Timestamp(CALIBRATION_START)
    before, after = df[df["day"] < start], df[df["day"] >= start]
    both = np.intersect1d(pricing_data.priced_products(before, min_lines), pricing_data.priced_products(after, min_lines))
    lines = after[after["product_id"].isin(both)].groupby("product_id").size().sort_values(ascending=False)
    chosen = lines.index[skip:skip + n_products].to_numpy()
    refs = pricing_data.reference_prices(after)
    ref = refs.reindex(chosen).to_numpy(float)
    sub = after[after["product_id"].isin(chosen)]
    amounts = [sub.loc[sub["product_id"] == p, "amount"].to_numpy(float) for p in chosen]
    cost = sub.groupby("product_id")["unit_cost"].median().reindex(chosen).to_numpy(float)
    vocab = pricing_data.vocabulary(df)
    conv = pricing_data.conversion_rows(after, vocab, chosen, refs)
    codes = vocab.product_codes(chosen)
    n, S = len(chosen), len(pricing_data.SEGMENTS)
    exposures, sales = np.zeros((n, S)), np.zeros((n, S))
    pos = {int(c): i for i, c in enumerate(codes)}
    rows_i = np.array([pos[int(c)] for c in conv.product])
    np.add.at(exposures, (rows_i, conv.segment), conv.n)
    np.add.at(sales, (rows_i, conv.segment), conv.k)
    product_rate = sales.sum(1) / np.maximum(exposures.sum(1), 1.0)
    rate = (sales + SEGMENT_SHRINK * product_rate[:, None]) / (exposures + SEGMENT_SHRINK)
    days = pricing_data.segment_codes(after.drop_duplicates(["day", "customer_id"])["age_group"])
    day_share = np.bincount(days, minlength=S).astype(float)
    rng = np.random.default_rng(seed)
    seg_share = np.zeros(S)
    mu, sigma, interest = np.zeros((n, S)), np.ones((n, S)), np.zeros((n, S))
    shift = rng.normal(0.0, 0.04, n)
    for name, spec in THRESHOLD_SEGMENTS.items():
        code = pricing_data.SEGMENTS.index(name)
        seg_share[code] = day_share[code]
        sigma[:, code] = spec["sigma"] * np.exp(rng.normal(0.0, 0.1, n))
        mu[:, code] = np.log(spec["optimum"]) - _optimal_z(spec["sigma"]) * spec["sigma"] + shift
        interest[:, code] = np.clip(rate[:, code] / ndtr(mu[:, code] / sigma[:, code]), 0.02, 0.95)
    share = lines.reindex(chosen).to_numpy(float)
    return ThresholdMarket(products=[str(p) for p in chosen], reference=ref, segment_share=seg_share / seg_share.sum(),
                           product_share=share / share.sum(), min_price=0.5 * ref, max_price=1.5 * ref,
                           max_change_pct=max_change_pct, units=amounts, cost=cost, margin=np.zeros(n, bool),
                           segments=pricing_data.SEGMENTS, interest=interest, wtp_mu=mu, wtp_sigma=sigma)


def arrivals(market: Market, n: int, seed: int = 1) -> Arrivals:
    rng = np.random.default_rng(seed)
    product = rng.choice(len(market.products), size=n, p=market.product_share)
    units = np.array([market.units[i][rng.integers(len(market.units[i]))] for i in product])
    return Arrivals(product=product, segment=rng.choice(len(market.segments), size=n, p=market.segment_share),
                    hour=rng.choice(24, size=n, p=HOURLY_TRAFFIC / HOURLY_TRAFFIC.sum()), u=rng.random(n),
                    units=units)


class EpsilonGreedy:
    """Per key (a product, or a (product, segment) cell), epsilon-greedy over the same candidate
    grid as the service, on each arm's mean observed value (revenue or margin) per quote.
    Without a prior, arms never tried are tried first (one pass, in random order). With a prior
    (`prior`: per key, each arm's expected value per quote under the model the service starts
    from), every arm starts with `prior_pulls` pseudo-quotes at that value: the same knowledge
    the service starts with, as a bandit can hold it. Outcomes are learned at once (no label
    delay: an advantage over the service)."""

    def __init__(self, grids: list[np.ndarray], epsilon: float = 0.1, seed: int = 2,
                 prior: list[np.ndarray] | None = None, prior_pulls: float = 0.0) -> None:
        self.grids = grids
        self.epsilon = epsilon
        self.rng = np.random.default_rng(seed)
        self.pulls = [np.zeros(len(g)) for g in grids]
        self.value = [np.zeros(len(g)) for g in grids]
        if prior is not None and prior_pulls > 0:
            self.pulls = [np.full(len(g), float(prior_pulls)) for g in grids]
            self.value = [np.asarray(v, float) * prior_pulls for v in prior]

    def choose(self, product: int) -> int:
        pulls = self.pulls[product]
        untried = np.flatnonzero(pulls == 0)
        if len(untried):
            return int(self.rng.choice(untried))
        if self.rng.random() < self.epsilon:
            return int(self.rng.integers(len(pulls)))
        return int(np.argmax(self.value[product] / pulls))

    def learn(self, product: int, arm: int, value: float) -> None:
        self.pulls[product][arm] += 1
        self.value[product][arm] += value


class ThompsonGrid:
    """Per key (a product, or a (product, segment) cell), Thompson sampling over the same
    candidate grid as the service: each arm's conversion has a Beta posterior, started from
    `prior` (per key, each arm's conversion under the model the service starts from) as
    `prior_pulls` pseudo-quotes (Beta(1, 1) without a prior); each quote draws a conversion per
    arm and takes the arm of the highest value (unit value x draw). Outcomes are learned at once
    (no label delay: an advantage over the service)."""

    def __init__(self, grids: list[np.ndarray], unit_values: list[np.ndarray], seed: int = 2,
                 prior: list[np.ndarray] | None = None, prior_pulls: float = 0.0) -> None:
        self.unit = unit_values
        self.rng = np.random.default_rng(seed)
        if prior is not None and prior_pulls > 0:
            p = [np.clip(np.asarray(v, float), 1e-3, 1 - 1e-3) for v in prior]
            self.alpha = [1.0 + prior_pulls * v for v in p]
            self.beta = [1.0 + prior_pulls * (1.0 - v) for v in p]
        else:
            self.alpha = [np.ones(len(g)) for g in grids]
            self.beta = [np.ones(len(g)) for g in grids]

    def choose(self, key: int) -> int:
        draw = self.rng.beta(self.alpha[key], self.beta[key])
        return int(np.argmax(self.unit[key] * draw))

    def learn(self, key: int, arm: int, sold: bool) -> None:
        if sold:
            self.alpha[key][arm] += 1.0
        else:
            self.beta[key][arm] += 1.0
