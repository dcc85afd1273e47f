"""A market simulator for pricing, calibrated on Ta Feng, whose true demand curves are known.

Calibration (a different period than the model's bootstrap, so the model does not start
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
The oracle: the best fixed price per product over a fine grid of the effective range,
maximizing the expected value over the segment mix (known exactly).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

CALIBRATION_START = "2001-01-01"
# Storefront traffic by hour of day (relative): quiet at night, peaks at lunch and in the evening.
HOURLY_TRAFFIC = np.array([2, 1, 1, 1, 1, 1, 2, 4, 6, 7, 8, 9, 10, 9, 8, 8, 8, 9, 11, 12, 12, 10, 7, 4], float)


@dataclasses.dataclass
class Market:
    products: list[str]  # Ta Feng product ids
    reference: np.ndarray  # [P] reference (list) price
    level: np.ndarray  # [P] true a_i (segment "other" baseline folded in)
    slope: np.ndarray  # [P] true beta_i (> 0)
    segment_effect: np.ndarray  # [S] true u_s
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

    def conversion(self, product: np.ndarray, segment: np.ndarray, price: np.ndarray) -> np.ndarray:
        z = self.level[product] + self.segment_effect[segment] - self.slope[product] * np.log(price / self.reference[product])
        return 1.0 / (1.0 + np.exp(-z))

    def mean_units(self) -> np.ndarray:
        return np.array([u.mean() for u in self.units])

    def unit_value(self, product, price):
        """Value of one unit sold at price: the price, or the price minus the cost (margin)."""
        return price - np.where(self.margin[product], self.cost[product], 0.0)

    def expected_value(self, product: int, price: np.ndarray) -> np.ndarray:
        """Expected value (revenue or margin) per arrival of `product` at each price, over the segment mix."""
        price = np.atleast_1d(price)
        p = sum(self.segment_share[s] * self.conversion(np.full(len(price), product), np.full(len(price), s), price)
                for s in range(len(self.segments)))
        return self.unit_value(product, price) * p * self.units[product].mean()

    def oracle_prices(self, points: int = 401) -> np.ndarray:
        """Best fixed price per product on a fine grid of its effective range."""
        out = np.empty(len(self.products))
        for i in range(len(self.products)):
            grid = np.linspace(self.lo[i], self.hi[i], points)
            out[i] = grid[int(np.argmax(self.expected_value(i, grid)))]
        return out


@dataclasses.dataclass
class Arrivals:
    product: np.ndarray  # index into Market.products
    segment: np.ndarray
    hour: np.ndarray
    u: np.ndarray  # the customer's uniform draw: buys iff u < P_true(price)
    units: np.ndarray  # units bought if the customer buys

    def __len__(self) -> int:
        return len(self.u)


def calibrate(n_products: int = 40, max_change_pct: float = 20.0, seed: int = 0, min_lines: int = 30) -> Market:
    """The market of the `n_products` most sold Jan-Feb products that also sold at two or more
    prices in both periods (so the bootstrap saw them, and the calibration can identify them)."""
    import torch

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
    pricing.absorb(net, X, (rows.k / rows.n).astype(np.float32), max_iter=60)
    # the most sold products among `both`, by Jan-Feb lines
    lines = after[after["product_id"].isin(both)].groupby("product_id").size().sort_values(ascending=False)
    chosen = lines.index[:n_products].to_numpy()
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
    return Market(products=[str(p) for p in chosen], reference=ref, level=level.astype(float), slope=slope.astype(float),
                  segment_effect=seg, segment_share=seg_share / seg_share.sum(), product_share=share / share.sum(),
                  min_price=np.where(margin, cost, 0.5 * ref), max_price=1.5 * ref, max_change_pct=max_change_pct,
                  units=amounts, segments=pricing_data.SEGMENTS, cost=cost, margin=margin)


def arrivals(market: Market, n: int, seed: int = 1) -> Arrivals:
    rng = np.random.default_rng(seed)
    product = rng.choice(len(market.products), size=n, p=market.product_share)
    units = np.array([market.units[i][rng.integers(len(market.units[i]))] for i in product])
    return Arrivals(product=product, segment=rng.choice(len(market.segments), size=n, p=market.segment_share),
                    hour=rng.choice(24, size=n, p=HOURLY_TRAFFIC / HOURLY_TRAFFIC.sum()), u=rng.random(n),
                    units=units)


class EpsilonGreedy:
    """Per product, epsilon-greedy over the same candidate grid as the service, on each arm's
    mean observed value (revenue or margin) per quote. Arms never tried are tried first (one pass, in random
    order); outcomes are learned at once (no label delay: an advantage over the service)."""

    def __init__(self, grids: list[np.ndarray], epsilon: float = 0.1, seed: int = 2) -> None:
        self.grids = grids
        self.epsilon = epsilon
        self.rng = np.random.default_rng(seed)
        self.pulls = [np.zeros(len(g)) for g in grids]
        self.value = [np.zeros(len(g)) for g in grids]

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
