"""Recommender domain, trainer side: what the model knows about users and items.

`RecoState` is the vocabulary and catalog the network's tables are indexed by, and each
user's interactions; it lives in the learner's checkpoint beside the weights:
- users / items / categories: ids (str); code = index + 1, 0 = unknown. Append-only, so a
  code never changes meaning between versions. The network is built with a fixed capacity
  per table (room to grow between bootstraps); an id beyond capacity stays code 0 (users:
  context + popularity fallback; items: text path only) until the next bootstrap.
- per item code: title, category code, price, and the index of its title's embedding
  (titles are embedded once by the frozen text encoder; equal titles share one row);
- interactions: per user code, the item codes they clicked or bought, oldest first
  (exported as users.npz for the service's history and exclude_purchased).

The readers of the services' catalog (the JSONL journal, or the shared catalog on Redis) are
in trainer.domains.recommender_catalog.

`TafengRows` turns the real Ta Feng purchase lines into training rows in time order. Ta Feng
has no titles: an item's "title" is built from its product subclass code
("product subclass 100205"), so on Ta Feng the text path carries the category only; the
title path proper is tested on small catalogs with real titles (tests/).
"""
from __future__ import annotations

import collections
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

# H: most recent interactions fed to the user tower and the repeat term. 128, not 64: on Ta Feng's
# last 30 days, 14,691 of 28,870 (customer, day)s rebuy an item of their whole history, 14,063 of
# one in their last 64 lines and 14,547 in their last 128 (buy-again counts every day, however
# old); measured on the validation window (bench.eval_recommender --end-offset-days 30, never the
# scored one): HR@10 0.3813 -> 0.3855. Checkpoints written with a shorter history are upgraded on
# restore (upgrade_rows, trainer.domains.recommender_training.upgrade_checkpoint).
HISTORY_LEN = 128
PAGES = ("home", "product", "category", "search", "cart", "checkout")
DEVICES = ("desktop", "mobile", "tablet", "app")
TEXT_DIM = 384
# Event levels (the label y of a row): shown and not clicked, clicked (or put in the cart), bought.
LEVEL_IMPRESSION, LEVEL_CLICK, LEVEL_PURCHASE = 0, 1, 2
# Columns of a training row X (float32; codes and day numbers are integers < 2^24, exact).
COL_USER, COL_PAGE, COL_DEVICE, COL_HOUR, COL_ITEM, COL_DAY = range(6)  # COL_DAY: days since 1970-01-01 (UTC)
COL_HIST = 6
# the item's place in the served list, 1-based (0: the row comes from no served list, e.g. the
# bootstrap's purchases): training corrects the click head's position bias with it
COL_POSITION = COL_HIST + HISTORY_LEN
WIDTH = COL_POSITION + 1
# Recent popularity: per item, sales (clicks and purchases) decayed with these time constants
# (days), counted strictly before the day in question. Grocery sales follow promotions and
# seasons: on Ta Feng the last 3 days' best sellers beat the all-time ones by 80 % on items a
# customer never bought (HR@10 0.27 vs 0.15).
POPULARITY_TAU_DAYS = (2.0, 14.0)
POPULARITY_HORIZON_DAYS = 90  # sales older than this no longer count (weight < e^-6)


def upgrade_rows(X: np.ndarray) -> np.ndarray:
    """Training rows written with a shorter history (a checkpoint of an older trainer) in the
    current layout: the missing, older history places are empty (-1), as for a user with a short
    history. Rows already WIDTH wide are returned as they are; wider ones are refused."""
    if X.shape[1] == WIDTH:
        return X
    old = X.shape[1] - COL_HIST - 1  # that layout's history length
    if not 0 < old < HISTORY_LEN:
        raise ValueError(f"recommender rows {X.shape[1]} wide: not this layout ({WIDTH}) nor an older one")
    pad = np.full((X.shape[0], HISTORY_LEN - old), -1.0, X.dtype)
    return np.concatenate([X[:, :COL_HIST + old], pad, X[:, COL_HIST + old:]], axis=1)


def tafeng_title(subclass) -> str:
    """Ta Feng has no product titles; the text embedded for an item is its subclass code."""
    return f"product subclass {subclass}"


def page_code(page: str) -> int:
    return PAGES.index(page) + 1 if page in PAGES else 0


def device_code(device: str) -> int:
    return DEVICES.index(device) + 1 if device in DEVICES else 0


Encoder = Callable[[Sequence[str]], np.ndarray]  # texts -> [n, 384] float32


class RecoState:
    """Vocabulary, catalog features, title embeddings and interactions (see the module doc)."""

    def __init__(self) -> None:
        self.cold_prior = True  # items not yet interacted with get the cold-item prior (see popularity)
        self.users: list[str] = []
        self.items: list[str] = []
        self.categories: list[str] = []
        self.user_index: dict[str, int] = {}
        self.item_index: dict[str, int] = {}
        self.category_index: dict[str, int] = {}
        # per item code (index 0 = the unknown item)
        self.item_title: list[str] = [""]
        self.item_category: list[int] = [0]
        self.item_price: list[float] = [0.0]
        self.item_text: list[int] = [0]
        # title embeddings: row 0 = zeros (no title)
        self.texts: list[str] = [""]
        self.text_index: dict[str, int] = {"": 0}
        self.text_emb = np.zeros((1, TEXT_DIM), np.float32)
        self.interactions: dict[int, list[int]] = collections.defaultdict(list)
        self.sales: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)  # day -> item -> n
        self.sales_revision = 0
        self._popularity_cache: tuple[tuple[int, bool], dict[int, np.ndarray]] | None = None
        self.user_capacity = 0  # table sizes of the network (0 = not built yet)
        self.item_capacity = 0
        self.category_capacity = 0
        self.revision = 0  # bumped on every change of item features (caches key on it)
        # the bootstrap's rows carry random hours (TafengRows: the data has none); not saved:
        # it matters only until the bootstrap ends (RecommenderModel.finish_bootstrap)
        self.random_hours = False

    # ---- sizes ----
    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def set_capacity(self, users: int, items: int, categories: int) -> None:
        self.user_capacity, self.item_capacity, self.category_capacity = users, items, categories

    # ---- ids -> codes ----
    def user_code(self, user_id: str, add: bool = False) -> int:
        code = self.user_index.get(user_id)
        if code is not None:
            return code
        if not add or not user_id or (self.user_capacity and len(self.users) >= self.user_capacity):
            return 0
        self.users.append(user_id)
        self.user_index[user_id] = code = len(self.users)
        return code

    def item_code(self, item_id: str) -> int:
        return self.item_index.get(item_id, 0)

    def _category_code(self, category: str) -> int:
        if not category:
            return 0
        code = self.category_index.get(category)
        if code is None:
            if self.category_capacity and len(self.categories) >= self.category_capacity:
                return 0
            self.categories.append(category)
            self.category_index[category] = code = len(self.categories)
        return code

    def upsert_items(self, records: Iterable[Mapping[str, Any]], encoder: Encoder | None) -> int:
        """Add or update items (item_id, title, category, price). New titles are embedded with
        encoder (None: titles must already be known). Returns the number of new item codes;
        items beyond capacity are skipped (logged)."""
        records = list(records)
        new_titles = sorted({str(r.get("title") or "") for r in records} - self.text_index.keys())
        if new_titles:
            if encoder is None:
                raise ValueError(f"{len(new_titles)} new titles and no text encoder to embed them")
            emb = np.asarray(encoder(new_titles), np.float32).reshape(len(new_titles), TEXT_DIM)
            for t in new_titles:
                self.text_index[t] = len(self.texts)
                self.texts.append(t)
            self.text_emb = np.concatenate([self.text_emb, emb])
        added = skipped = 0
        for r in records:
            item_id = str(r["item_id"])
            title = str(r.get("title") or "")
            features = (title, self._category_code(str(r.get("category") or "")),
                        max(0.0, float(r.get("price") or 0.0)), self.text_index[title])
            code = self.item_index.get(item_id)
            if code is None:
                if self.item_capacity and len(self.items) >= self.item_capacity:
                    skipped += 1
                    continue
                self.items.append(item_id)
                self.item_index[item_id] = code = len(self.items)
                for column, value in zip((self.item_title, self.item_category, self.item_price, self.item_text),
                                         features):
                    column.append(value)
                added += 1
            else:
                self.item_title[code], self.item_category[code], self.item_price[code], self.item_text[code] = features
        if skipped:
            log.warning("recommender: %d new items beyond the item table's capacity %d stay on the text path until "
                        "the next bootstrap", skipped, self.item_capacity)
        self.revision += 1
        return added

    def record_interactions(self, user_codes: Sequence[int], item_codes: Sequence[int],
                            days: Sequence[int] | int | None = None) -> None:
        """Clicks/purchases: into the users' histories and (with their day) the item sales."""
        if days is not None and np.ndim(days) == 0:
            days = [int(days)] * len(item_codes)
        for n, (u, i) in enumerate(zip(user_codes, item_codes)):
            if i <= 0:
                continue
            if u > 0:
                self.interactions[int(u)].append(int(i))
            if days is not None:
                self.sales[int(days[n])][int(i)] += 1
        if days is not None:
            self.sales_revision += 1

    def latest_day(self) -> int | None:
        return max(self.sales) if self.sales else None

    def first_sold(self) -> np.ndarray:
        """int64 [n_items + 1]: the first day each item code was clicked or bought (a huge value
        for never, and for row 0)."""
        first = np.full(self.n_items + 1, np.iinfo(np.int64).max, np.int64)
        for day, c in self.sales.items():
            items = np.fromiter(c.keys(), np.int64, len(c))
            items = items[items <= self.n_items]
            first[items] = np.minimum(first[items], day)
        return first

    def popularity(self, days: Sequence[int]) -> dict[int, np.ndarray]:
        """day -> float32 [n_items + 1, len(POPULARITY_TAU_DAYS)]: each item's sales before that
        day, decayed by exp(-age / tau). Items nobody had interacted with before that day (row 0,
        the unknown item, too) get the cold-item prior instead of 0: the geometric mean of the
        recent sales of the items that sold (per timescale), so that a brand-new item is not
        ranked as the least popular item of the catalog before anyone could buy it; its content
        path learns the offset from there (cold-item simulation, recommender_training). Cached
        per sales revision."""
        key = (self.sales_revision, self.cold_prior)
        if self._popularity_cache is None or self._popularity_cache[0] != key:
            self._popularity_cache = (key, {})
        cache = self._popularity_cache[1]
        wanted = sorted({int(d) for d in days} - cache.keys())
        if wanted:
            n = self.n_items + 1
            taus = np.asarray(POPULARITY_TAU_DAYS, np.float64)
            sale_days = sorted(d for d in self.sales if wanted[0] - POPULARITY_HORIZON_DAYS <= d < wanted[-1])
            acc = np.zeros((n, len(taus)), np.float64)
            at = wanted[0] - POPULARITY_HORIZON_DAYS
            k = 0
            first = self.first_sold()
            for day in wanted:
                while k < len(sale_days) and sale_days[k] < day:
                    s = sale_days[k]
                    acc *= np.exp(-(s - at) / taus)
                    at = s
                    c = self.sales[s]
                    items = np.fromiter(c.keys(), np.int64, len(c))
                    counts = np.fromiter(c.values(), np.float64, len(c))
                    ok = items < n
                    acc[items[ok]] += counts[ok, None]  # items are distinct keys: no repeated index
                    k += 1
                table = (acc * np.exp(-(day - at) / taus)).astype(np.float32)
                sold = table.sum(1) > 0
                if self.cold_prior and sold.any():
                    table[first >= day] = np.expm1(np.log1p(table[sold]).mean(0))
                cache[day] = table
        return {int(d): cache[int(d)] for d in days}

    def history(self, user_code: int, length: int = HISTORY_LEN) -> np.ndarray:
        """The user's most recent item codes, most recent first, padded with -1."""
        out = np.full(length, -1, np.int64)
        seen = self.interactions.get(user_code, ())
        recent = seen[-length:][::-1]
        out[:len(recent)] = recent
        return out

    # ---- feature arrays by item code ----
    def item_features(self) -> dict[str, np.ndarray]:
        return {"category": np.asarray(self.item_category, np.int64), "price": np.asarray(self.item_price, np.float32),
                "text": np.asarray(self.item_text, np.int64)}

    def catalog_records(self) -> list[dict[str, Any]]:
        cats = [""] + self.categories
        return [{"item_id": iid, "title": self.item_title[c], "category": cats[self.item_category[c]],
                 "price": float(self.item_price[c])} for c, iid in enumerate(self.items, start=1)]

    # ---- export files ----
    def write_vocab(self, path: Path) -> Path:
        """vocab.json: users, items and categories in code order, and "cold_items": the items
        nobody has interacted with yet (their id rows are untrained: the service keeps them in
        its exploration pool, as it does items the version has no code for)."""
        first = self.first_sold()
        cold = [it for code, it in enumerate(self.items, start=1) if first[code] == np.iinfo(np.int64).max]
        path.write_text(json.dumps({"users": self.users, "items": self.items, "categories": self.categories,
                                    "cold_items": cold}))
        return path

    def write_catalog(self, path: Path) -> Path:
        with open(path, "w") as f:
            for r in self.catalog_records():
                f.write(json.dumps(r) + "\n")
        return path

    def write_users(self, path: Path) -> Path:
        """users.npz: user_ids (str), indptr (int64 CSR), item_ids (str), oldest first."""
        codes = sorted(u for u, seen in self.interactions.items() if seen)
        indptr = np.zeros(len(codes) + 1, np.int64)
        flat: list[int] = []
        for n, u in enumerate(codes):
            flat.extend(self.interactions[u])
            indptr[n + 1] = len(flat)
        items = np.asarray(self.items, dtype=object)
        with open(path, "wb") as f:
            np.savez_compressed(f, user_ids=np.asarray([self.users[u - 1] for u in codes], dtype=str),
                                indptr=indptr, item_ids=items[np.asarray(flat, np.int64) - 1].astype(str)
                                if flat else np.zeros(0, dtype=str))
        return path

    # ---- checkpoint ----
    def to_dict(self) -> dict[str, Any]:
        codes = sorted(self.interactions)
        lengths = np.asarray([len(self.interactions[u]) for u in codes], np.int64)
        flat = np.asarray([i for u in codes for i in self.interactions[u]], np.int32)
        return {"users": self.users, "items": self.items, "categories": self.categories,
                "item_title": self.item_title, "item_category": np.asarray(self.item_category, np.int32),
                "item_price": np.asarray(self.item_price, np.float32), "item_text": np.asarray(self.item_text, np.int32),
                "texts": self.texts, "text_emb": self.text_emb,
                "interaction_users": np.asarray(codes, np.int32), "interaction_lengths": lengths,
                "interaction_items": flat,
                "sales": np.asarray([(d, i, c) for d, cnt in self.sales.items() for i, c in cnt.items()],
                                    np.int64).reshape(-1, 3),
                "capacity": [self.user_capacity, self.item_capacity, self.category_capacity]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RecoState":
        s = cls()
        s.users, s.items, s.categories = list(d["users"]), list(d["items"]), list(d["categories"])
        s.user_index = {u: n for n, u in enumerate(s.users, start=1)}
        s.item_index = {i: n for n, i in enumerate(s.items, start=1)}
        s.category_index = {c: n for n, c in enumerate(s.categories, start=1)}
        s.item_title = list(d["item_title"])
        s.item_category = [int(x) for x in d["item_category"]]
        s.item_price = [float(x) for x in d["item_price"]]
        s.item_text = [int(x) for x in d["item_text"]]
        s.texts = list(d["texts"])
        s.text_index = {t: n for n, t in enumerate(s.texts)}
        s.text_emb = np.asarray(d["text_emb"], np.float32)
        ends = np.cumsum(d["interaction_lengths"])
        flat = np.asarray(d["interaction_items"]).tolist()
        for u, end, n in zip(np.asarray(d["interaction_users"]).tolist(), ends.tolist(),
                             np.asarray(d["interaction_lengths"]).tolist()):
            s.interactions[u] = flat[end - n:end]
        for day, item, count in np.asarray(d.get("sales", np.zeros((0, 3), np.int64))).tolist():
            s.sales[day][item] += count
        s.set_capacity(*d["capacity"])
        return s


def tafeng_catalog(df) -> list[dict[str, Any]]:
    """One record per product: its subclass as text and category, its median unit price."""
    g = df.groupby("product_id").agg(subclass=("product_subclass", "first"), price=("unit_price", "median"))
    return [{"item_id": str(pid), "title": tafeng_title(sub), "category": str(sub), "price": float(price)}
            for pid, sub, price in zip(g.index, g["subclass"], g["price"])]


class TafengRows:
    """Ta Feng purchase lines as training rows, in day order.

    Each purchase line is a click and a purchase (level 2) of its product by its customer; the
    history of a row is the customer's purchases on earlier days, most recent first (the
    day's own basket is not visible to itself). Ta Feng has no page, device or hour: page and
    device are 0 (other) and the hour is drawn uniformly (a noise the user tower is trained
    around); RecommenderModel.finish_bootstrap then gives every hour the mean embedding, so no
    hour carries a spurious effect before live traffic teaches them.
    """

    def __init__(self, df, state: RecoState, seed: int = 0) -> None:
        self.df = df
        self.state = state
        self.days = np.asarray(sorted(df["day"].unique()))
        self.day_of_row = df["day"].to_numpy()
        state.random_hours = True
        self.users = np.asarray([state.user_code(str(c), add=True) for c in df["customer_id"].to_numpy()], np.int64)
        self.items = np.asarray([state.item_code(str(p)) for p in df["product_id"].to_numpy()], np.int64)
        self.day_numbers = (self.days.astype("datetime64[D]").astype(np.int64))  # days since 1970-01-01
        self.rng = np.random.default_rng(seed)
        self._recent: dict[int, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=HISTORY_LEN))
        self._day_pos = 0
        # row ranges per day (df is sorted by day)
        starts = np.searchsorted(self.day_of_row, self.days, side="left")
        self._bounds = list(zip(starts, list(starts[1:]) + [len(df)]))

    def day_rows(self, day_index: int) -> slice:
        a, b = self._bounds[day_index]
        return slice(int(a), int(b))

    def history_of(self, user: int) -> np.ndarray:
        out = np.full(HISTORY_LEN, -1, np.int64)
        recent = self._recent.get(user)
        if recent:
            h = list(recent)[::-1]
            out[:len(h)] = h
        return out

    def rows_for_day(self, day_index: int) -> tuple[np.ndarray, np.ndarray]:
        """X, y of one day's lines (histories as of the start of the day). Call in day order;
        advance() afterwards records the day's purchases into the histories."""
        sl = self.day_rows(day_index)
        users, items = self.users[sl], self.items[sl]
        X = np.zeros((len(users), WIDTH), np.float32)
        X[:, COL_USER] = users
        X[:, COL_ITEM] = items
        X[:, COL_DAY] = self.day_numbers[day_index]
        basket: dict[int, tuple[np.ndarray, int]] = {}  # one history and one hour per customer and day
        for n, u in enumerate(users.tolist()):
            b = basket.get(u)
            if b is None:
                basket[u] = b = (self.history_of(u), int(self.rng.integers(0, 24)))
            X[n, COL_HIST:COL_POSITION] = b[0]
            X[n, COL_HOUR] = b[1]
        return X, np.full(len(users), LEVEL_PURCHASE, np.float32)

    def advance(self, day_index: int) -> None:
        sl = self.day_rows(day_index)
        for u, i in zip(self.users[sl].tolist(), self.items[sl].tolist()):
            self._recent[u].append(i)
        self.state.record_interactions(self.users[sl], self.items[sl], int(self.day_numbers[day_index]))

    def rows(self, first_day: int, stop_day: int, progress: Callable[[int], None] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        Xs, ys = [], []
        for d in range(first_day, stop_day):
            X, y = self.rows_for_day(d)
            Xs.append(X)
            ys.append(y)
            self.advance(d)
            if progress:
                progress(d)
        if not Xs:
            return np.zeros((0, WIDTH), np.float32), np.zeros(0, np.float32)
        return np.concatenate(Xs), np.concatenate(ys)
