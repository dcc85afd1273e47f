"""Ta Feng purchase lines -> conversion training data for the pricing model.

Ta Feng records sales only: nobody logged the customers who saw a price and did not buy.
The exposure assumption that turns it into conversion data:

- an *exposure* of product i is a basket (one customer on one day) that contains at least
  one product of i's subclass (PRODUCT_SUBCLASS): that customer was at the shelf where i
  stood and saw its price;
- a *conversion* is such a basket that contains i itself.

So the model learns P(buy i | shopping i's subclass, price, segment), a choice share, and a
price cut that brings extra customers to the subclass (traffic) is not credited to i. Rows
are aggregated binomials per (product, day, segment): n = exposures, k = conversions,
label y = k / n with weight n (the log-likelihood of n Bernoulli rows, exactly).

The price a product had on a day is the median unit price (SALES_PRICE / AMOUNT) of its
lines that day; on a day without a sale it is unknown, and the last known price is carried
forward (then the first one backward): shelf prices are sticky, and a day without sales at
a known price is exactly the negative evidence conversion needs. The reference price of a
product is its most frequent unit price over the period (the list price; promotions are the
deviations), and the model input is x = log(price / reference).

Segments are Ta Feng's customer age groups ("<25", "25-29", ..., ">65"); a missing one is
"other". Ta Feng has dates but no times: these rows carry no hour of day (see
trainer.domains.pricing, hour code NO_HOUR).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

OTHER = "other"
# Ta Feng age groups, in age order; code 0 is OTHER (missing or unknown segment).
SEGMENTS = (OTHER, "<25", "25-29", "30-34", "35-39", "40-44", "45-49", "50-54", "55-59", "60-64", ">65")
X_CLIP = 5.0  # |log(price / reference)| beyond this is treated as this (e^5 = 148x)


@dataclasses.dataclass
class Vocabulary:
    """Product ids and their subclasses, in code order. Code 0 of each is "unknown"."""

    products: list[str]  # products[code - 1] is the id of product code `code`
    categories: list[str]  # categories[code - 1] is the subclass of category code `code`
    product_category: np.ndarray  # [len(products) + 1] int64: category code of each product code

    def product_codes(self, ids) -> np.ndarray:
        index = {p: i + 1 for i, p in enumerate(self.products)}
        return np.array([index.get(str(p), 0) for p in ids], np.int64)


@dataclasses.dataclass
class ConversionRows:
    """Aggregated binomial rows: one per (product, day, segment) with exposures."""

    product: np.ndarray  # int64 codes
    segment: np.ndarray  # int64 codes
    x: np.ndarray  # float32 log(price / reference)
    n: np.ndarray  # float32 exposures
    k: np.ndarray  # float32 conversions
    day: np.ndarray  # datetime64[D]

    def __len__(self) -> int:
        return len(self.n)

    def take(self, mask) -> "ConversionRows":
        return ConversionRows(self.product[mask], self.segment[mask], self.x[mask], self.n[mask], self.k[mask],
                              self.day[mask])


def segment_codes(age_groups: pd.Series) -> np.ndarray:
    index = {s: i for i, s in enumerate(SEGMENTS)}
    return age_groups.map(lambda a: index.get(a, 0) if isinstance(a, str) else 0).to_numpy(np.int64)


def vocabulary(df: pd.DataFrame) -> Vocabulary:
    """Every product of the data (sorted ids) and its subclass (its most frequent one)."""
    sub = df.groupby("product_id")["product_subclass"].agg(lambda s: s.value_counts().index[0])
    products = [str(p) for p in sub.index]
    categories = sorted({str(c) for c in sub.to_numpy()})
    cat_code = {c: i + 1 for i, c in enumerate(categories)}
    pc = np.zeros(len(products) + 1, np.int64)
    pc[1:] = [cat_code[str(c)] for c in sub.to_numpy()]
    return Vocabulary(products, categories, pc)


def reference_prices(df: pd.DataFrame) -> pd.Series:
    """Most frequent unit price per product (ties: the higher price, the list price)."""
    counts = df.groupby(["product_id", "unit_price"]).size().rename("lines").reset_index()
    counts = counts.sort_values(["product_id", "lines", "unit_price"], ascending=[True, False, False])
    return counts.drop_duplicates("product_id").set_index("product_id")["unit_price"]


def daily_prices(df: pd.DataFrame, products: np.ndarray, days: pd.DatetimeIndex) -> pd.DataFrame:
    """[day x product] unit price: the day's median, carried forward, then backward."""
    sub = df[df["product_id"].isin(products)]
    med = sub.groupby(["day", "product_id"])["unit_price"].median().unstack("product_id")
    return med.reindex(index=days, columns=products).ffill().bfill()


def conversion_rows(df: pd.DataFrame, vocab: Vocabulary, products: np.ndarray,
                    references: pd.Series | None = None) -> ConversionRows:
    """The binomial rows of `products` (ids) over the days of df (see the module docstring).
    references: reference price per product id (default: reference_prices(df))."""
    df = df[["day", "customer_id", "age_group", "product_subclass", "product_id", "unit_price"]]
    products = np.asarray(products)
    ref = (references if references is not None else reference_prices(df)).reindex(products)
    days = pd.DatetimeIndex(sorted(df["day"].unique()))
    prices = daily_prices(df, products, days)
    seg = pd.Series(segment_codes(df["age_group"]), index=df.index, name="segment")
    df = df.assign(segment=seg)
    # exposures: baskets (customer-day) per (subclass, day, segment)
    baskets_sub = df.drop_duplicates(["day", "customer_id", "product_subclass"])
    exposures = baskets_sub.groupby(["product_subclass", "day", "segment"]).size().rename("n").reset_index()
    # conversions: baskets with the product per (product, day, segment)
    mine = df[df["product_id"].isin(products)].drop_duplicates(["day", "customer_id", "product_id"])
    conv = mine.groupby(["product_id", "day", "segment"]).size().rename("k").reset_index()
    sub_of = df[df["product_id"].isin(products)].groupby("product_id")["product_subclass"].agg(
        lambda s: s.value_counts().index[0])
    rows = pd.DataFrame({"product_id": products, "product_subclass": sub_of.reindex(products).to_numpy()})
    rows = rows.merge(exposures, on="product_subclass", how="inner")
    rows = rows.merge(conv, on=["product_id", "day", "segment"], how="left")
    rows["k"] = rows["k"].fillna(0.0)
    # a product's rows start on the first day it was seen selling (before, it may not have been stocked)
    first = df[df["product_id"].isin(products)].groupby("product_id")["day"].min()
    rows = rows[rows["day"].to_numpy() >= first.reindex(rows["product_id"]).to_numpy()]
    stacked = prices.stack().rename("price").reset_index()
    stacked.columns = ["day", "product_id", "price"]
    rows = rows.merge(stacked, on=["day", "product_id"], how="inner")
    x = np.log(rows["price"].to_numpy() / ref.reindex(rows["product_id"]).to_numpy())
    codes = vocab.product_codes(rows["product_id"].to_numpy())
    return ConversionRows(codes, rows["segment"].to_numpy(np.int64), np.clip(x, -X_CLIP, X_CLIP).astype(np.float32),
                          rows["n"].to_numpy(np.float32), np.minimum(rows["k"], rows["n"]).to_numpy(np.float32),
                          rows["day"].to_numpy().astype("datetime64[D]"))


def priced_products(df: pd.DataFrame, min_lines: int, min_prices: int = 2) -> np.ndarray:
    """Products with at least min_lines purchase lines and min_prices distinct unit prices."""
    g = df.groupby("product_id")["unit_price"].agg(["size", "nunique"])
    return g[(g["size"] >= min_lines) & (g["nunique"] >= min_prices)].index.to_numpy()
