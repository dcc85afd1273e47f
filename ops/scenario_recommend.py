"""Load-test scenario for the recommender: real Ta Feng customers browsing, clicking, buying.

    python -m ops.loadtest recommend --target 127.0.0.1:50052 -c 32 -d 30

Each call is a Recommend for a real Ta Feng customer who shops in the last 30 days of the
data (cycling through --rows of them), on a page/device/hour drawn like storefront traffic,
k = 10, a quarter of them with exclude_purchased. What happens next is driven by what the
customer really bought in those 30 days: a recommended item the customer really bought is
clicked with probability --bought-click-rate (a list shown is mostly scrolled past, even the
items one came for) after --click-delay-s (jittered), and bought --label-delay-s after that
click; any other shown item is clicked with probability --click-rate (window shopping, no
purchase). With the defaults a few percent of the shown items are clicked; every other shown
item is an impression the trainer learns as not clicked (from the served record). A share
--outcome-rate of the responses get their outcomes reported at all (1.0 = every one).
Outcomes go through ReportOutcome, as a storefront backend would report them.

Ta Feng ids: customer and product ids as decimal strings, as the trainer's bootstrap names them.
"""
from __future__ import annotations

import asyncio
import random
from typing import Awaitable, Callable

import grpc
import numpy as np

from ops.loadgen import Later, report_outcome

PAGES = (("home", 0.45), ("product", 0.25), ("category", 0.2), ("cart", 0.1))
DEVICES = (("mobile", 0.55), ("desktop", 0.3), ("tablet", 0.05), ("app", 0.1))
# Storefront traffic by hour of day (relative): quiet at night, peaks at lunch and evening.
HOURLY = np.array([1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 4, 5, 6, 7, 6, 5, 5, 6, 7, 8, 9, 8, 6, 4, 2], float)
EVALUATION_DAYS = 30
CLICK_RATE = 0.03  # a shown item the customer did not buy in the 30 days
BOUGHT_CLICK_RATE = 0.3  # a shown item the customer did buy (then bought after the click)


def customers_and_purchases(rows: int, seed: int = 0) -> tuple[list[str], dict[str, set[str]]]:
    """Up to `rows` customers who shop both before and in the last 30 days of Ta Feng (known
    to a model bootstrapped on the earlier part), and what each bought in those 30 days."""
    from trainer.tafeng import load_tafeng

    df = load_tafeng()
    cut = df["day"].max() - np.timedelta64(EVALUATION_DAYS, "D")
    before = set(df.loc[df["day"] <= cut, "customer_id"].unique())
    late = df[df["day"] > cut]
    late = late[late["customer_id"].isin(before)]
    bought = late.groupby("customer_id")["product_id"].apply(lambda s: {str(x) for x in s})
    customers = sorted(str(c) for c in bought.index)
    random.Random(seed).shuffle(customers)
    customers = customers[:rows]
    return customers, {c: bought[int(c)] for c in customers}


async def scenario(channel: grpc.aio.Channel, args) -> tuple[Callable[[int], Awaitable[object]], Callable[[], Awaitable[None]]]:
    from protos.recommender.v1 import recommender_pb2 as pb
    from protos.recommender.v1 import recommender_pb2_grpc as pb_grpc

    seed = getattr(args, "seed", 0)
    customers, purchases = await asyncio.to_thread(customers_and_purchases, getattr(args, "rows", 5000), seed)
    k = getattr(args, "k", 10)
    click_rate = getattr(args, "click_rate", CLICK_RATE)
    bought_click_rate = getattr(args, "bought_click_rate", BOUGHT_CLICK_RATE)
    click_delay = getattr(args, "click_delay_s", 1.0)
    purchase_delay = getattr(args, "label_delay_s", 2.0)
    outcome_rate = getattr(args, "outcome_rate", 1.0)
    timeout = getattr(args, "timeout", 10.0)
    rng = random.Random(seed)
    stub = pb_grpc.RecommenderStub(channel)
    pages, page_w = zip(*PAGES)
    devices, device_w = zip(*DEVICES)
    hours = list(range(24))
    hour_w = (HOURLY / HOURLY.sum()).tolist()
    requests = []
    for i, c in enumerate(customers):
        ctx = pb.Context(page=rng.choices(pages, page_w)[0], device=rng.choices(devices, device_w)[0],
                         hour_of_day=rng.choices(hours, hour_w)[0])
        requests.append(pb.RecommendRequest(user_id=c, context=ctx, k=k, exclude_purchased=i % 4 == 0))
    later = Later()

    async def report(pid: str, item_id: str, bought: bool) -> None:
        await asyncio.sleep(click_delay * rng.uniform(0.5, 1.5))
        click = pb.RecommendationOutcome(prediction_id=pid, item_id=item_id, event=pb.EVENT_CLICK)
        if await report_outcome(lambda: stub.ReportOutcome(click, timeout=timeout)) and bought:
            await asyncio.sleep(purchase_delay * rng.uniform(0.5, 1.5))
            purchase = pb.RecommendationOutcome(prediction_id=pid, item_id=item_id, event=pb.EVENT_PURCHASE)
            await report_outcome(lambda: stub.ReportOutcome(purchase, timeout=timeout))

    async def call(i: int):
        n = i % len(requests)
        req = requests[n]
        resp = await stub.Recommend(req, timeout=timeout)
        if rng.random() < outcome_rate:
            real = purchases[req.user_id]
            for item in resp.items:
                if item.item_id in real:
                    if rng.random() < bought_click_rate:
                        later(report(resp.prediction_id, item.item_id, True))
                elif rng.random() < click_rate:
                    later(report(resp.prediction_id, item.item_id, False))
        return resp

    return call, later.drain
