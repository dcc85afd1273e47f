"""Load-test scenario for pricing: quotes for real Ta Feng products, sales reported as they happen.

    python -m ops.loadtest quote --target 127.0.0.1:50053 -c 32 -d 30

The products, their reference prices, costs and demand come from the threshold market
(bench.pricing_sim.threshold_market, calibrated on Ta Feng Jan-Feb 2001; another family than the
service's logistic model, and built in seconds where the logit market's calibration fit takes
minutes on two cores): the --rows most sold products with price variation (at most 300). Each
call quotes one arrival: a product in proportion to its real Jan-Feb lines, one of the market's
three age groups as the segment, an hour drawn like storefront traffic, the merchant's
guardrails (min_price = the unit cost for margin quotes, half the reference for revenue ones;
max_price = 1.5 x reference; max_change_pct 10, 20 or 30), and the product's objective (every
other product whose cost is under 95 % of its reference is priced for margin, the rest for
revenue). The customer then buys iff their uniform draw is under the market's true conversion
at the quoted price (a willingness to pay above the price), with real Ta Feng line amounts as
units; the outcome (sold or not) is reported through ReportOutcome after --label-delay-s
(jittered 0.5x-1.5x), for a share --outcome-rate of the quotes.
"""
from __future__ import annotations

import asyncio
import random
from typing import Awaitable, Callable

import grpc
import numpy as np

from ops.loadgen import Later, report_outcome

MAX_PRODUCTS = 300
CHANGE_PCTS = (10.0, 20.0, 30.0)


def quotes(rows: int, n: int, seed: int = 0):
    """The market and `n` arrivals with their QuoteRequests (guardrail pct varied per arrival)."""
    import dataclasses

    from bench.eval_pricing import quote_request
    from bench.pricing_sim import arrivals, threshold_market

    market = threshold_market(max(1, min(rows, MAX_PRODUCTS)), seed=seed)
    # margin quotes too (the threshold market prices everything for revenue): every other product
    # with room between its cost and its reference, its cost as the guardrails' floor
    margin = (np.arange(len(market.products)) % 2 == 1) & (market.cost < 0.95 * market.reference)
    market = dataclasses.replace(market, margin=margin, min_price=np.where(margin, market.cost, market.min_price))
    arr = arrivals(market, n, seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    requests = []
    for i in range(n):
        req = quote_request(market, arr, i)
        req.guardrails.max_change_pct = float(rng.choice(CHANGE_PCTS))
        requests.append(req)
    return market, arr, requests


async def scenario(channel: grpc.aio.Channel, args) -> tuple[Callable[[int], Awaitable[object]], Callable[[], Awaitable[None]]]:
    from protos.pricing.v1 import pricing_pb2, pricing_pb2_grpc

    seed = getattr(args, "seed", 0)
    delay = getattr(args, "label_delay_s", 2.0)
    outcome_rate = getattr(args, "outcome_rate", 1.0)
    timeout = getattr(args, "timeout", 10.0)
    market, arr, requests = await asyncio.to_thread(quotes, getattr(args, "rows", 5000), 20_000, seed)
    stub = pricing_pb2_grpc.PricingStub(channel)
    rng = random.Random(seed)
    later = Later()

    async def report(pid: str, sold: bool, units: int, price: float) -> None:
        await asyncio.sleep(delay * rng.uniform(0.5, 1.5))
        outcome = pricing_pb2.PricingOutcome(prediction_id=pid, sold=sold, units=units if sold else 0,
                                             price=price if sold else 0.0)
        await report_outcome(lambda: stub.ReportOutcome(outcome, timeout=timeout))

    async def call(i: int):
        k = i % len(requests)
        resp = await stub.Quote(requests[k], timeout=timeout)
        if rng.random() < outcome_rate:
            p = int(arr.product[k])
            sold = bool(arr.u[k] < market.conversion(np.array([p]), arr.segment[k:k + 1], np.array([resp.price]))[0])
            later(report(resp.prediction_id, sold, int(arr.units[k]), resp.price))
        return resp

    return call, later.drain
