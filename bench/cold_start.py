"""Cold start of the recommender: how soon a brand-new item is shown, and whether it is shown to
the right customers, before anyone interacted with it.

    nice .venv/bin/python -m bench.cold_start            # both catalogs, writes bench/results/cold_start.json
    nice .venv/bin/python -m bench.cold_start --catalogs text --seed 2 --out /tmp/cold_start_seed2.json

Withheld-items protocol. A first version is trained by the real learner (the production
bootstrap path: Learner.bootstrap, holdout, ONNX export, registry) on the days before day T,
on a catalog WITHOUT the withheld items. At day T the withheld items enter the catalog with
title, category and price only, as an UpsertItems would bring them: the exported item tower
embeds them with item code 0 (no id row) and no recent sales, exactly as the service does.
Every ranking is produced by the exported graphs (item_tower.onnx over the catalog, model.onnx
per customer, ONNX Runtime). No retraining during the scored days: this is what the content
path alone does, before the loop's next round learns the new items' ids.

Scored, per catalog:
- shown on day 1: share of the new items in at least one top-10 of the customers who shop on
  day T (the first day the new items are in the catalog);
- HR@10 on first positives: each new item's purchases on the first day it sells (within the
  scored days), the customer's top-10 that day (history as of that day) holds it or not;
- the same for 7-day popularity (purchases of the last 7 days, new items included as soon
  as they sell) and for the model trained without cold-item simulation (id dropout alone,
  recent sales kept: the former training rule), which shows what the simulation changes.

Catalogs:
- text: a small catalog of real product titles (THEMES below: eight kinds of shop, 14 titles
  each, 4 of each withheld) with empty categories, so the title is all the content there is,
  and generated customers who shop mostly from one or two favourite kinds (SHOPPING: a
  known generative rule, stated there; the titles are real text, the shopping is simulated);
- tafeng: the first TAFENG_LINES lines of Ta Feng; the withheld items are the products first
  sold on or after day T (Ta Feng has no titles: title = "product subclass <code>", category
  = the subclass, price = the median of their lines).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from services.recommender.explore import EXPLORE_SHORTLIST, closest_titles

RESULTS = Path(__file__).resolve().parent / "results" / "cold_start.json"
K = 10
TAFENG_LINES = 60_000  # ~9 days of Ta Feng
TAFENG_NEW_FROM = 7  # day index T: products first sold on or after it are the new items
TEXT_DAYS, TEXT_NEW_FROM = 35, 28
EPOCHS = 2  # the production bootstrap's default (Ta Feng: ~100 steps an epoch at this size)
TEXT_EPOCHS = 20  # the text catalog has ~1/10 of the rows: ~200 steps in all

# Real product titles: eight kinds of shop. The last WITHHELD titles of each are the new items.
THEMES: dict[str, list[str]] = {
    "coffee": ["Dark roast coffee beans 1 kg", "Espresso ground coffee 250 g", "Colombian medium roast whole beans",
               "Decaf instant coffee granules 200 g", "Cold brew coffee concentrate 1 l", "Arabica coffee pods, 30 pack",
               "Ethiopian Yirgacheffe light roast beans", "Hazelnut flavoured ground coffee",
               "French press coarse ground coffee", "Italian espresso beans, crema blend",
               "Single-origin Kenyan coffee beans 500 g", "Organic fair trade ground coffee 500 g",
               "Vietnamese robusta coffee, strong", "Coffee capsules lungo intensity 8, 50 pack"],
    "baby": ["Newborn nappies size 1, 56 pack", "Sensitive baby wipes, 12 x 64", "Baby formula milk stage 1 800 g",
             "Organic baby rice cereal 4 months+", "Nappy rash cream 100 g", "Baby shampoo, tear-free 500 ml",
             "Toddler pull-up pants size 5", "Baby food pouch, apple and banana", "Infant teething gel 15 g",
             "Baby bottle anti-colic 260 ml", "Nappies size 4, jumbo pack 80", "Baby porridge oats, 6 months+",
             "Fragrance-free baby lotion 300 ml", "Follow-on milk stage 2 800 g"],
    "pets": ["Adult dry dog food, chicken 12 kg", "Grain-free wet cat food pouches, 12 x 85 g",
             "Cat litter, clumping 10 l", "Dog dental chews, large, 28 sticks", "Kitten dry food, salmon 2 kg",
             "Dog shampoo for sensitive skin", "Catnip mouse toys, 3 pack", "Puppy training pads, 100 pack",
             "Senior dog food, lamb and rice 7 kg", "Cat scratching post, sisal 80 cm",
             "Tinned dog food in gravy, 6 x 400 g", "Cat treats, tuna flavour 60 g",
             "Dog poop bags, 300 rolls", "Indoor cat dry food, turkey 4 kg"],
    "baking": ["Plain flour 1.5 kg", "Self-raising flour 1 kg", "Caster sugar 1 kg", "Fast action dried yeast, 8 sachets",
               "Baking powder 170 g", "Vanilla extract 100 ml", "Cocoa powder for baking 250 g",
               "Icing sugar 500 g", "Strong white bread flour 1.5 kg", "Dark chocolate chips 100 g",
               "Bicarbonate of soda 200 g", "Ground almonds 200 g", "Light brown soft sugar 500 g",
               "Wholemeal bread flour 1.5 kg"],
    "cleaning": ["Washing up liquid, lemon 900 ml", "Bleach thick 750 ml", "Dishwasher tablets, 60 pack",
                 "Laundry detergent liquid, 40 washes", "Multi-surface spray cleaner 500 ml", "Toilet cleaner gel 750 ml",
                 "Microfibre cloths, 6 pack", "Fabric conditioner, 50 washes", "Oven cleaner foam 500 ml",
                 "Limescale remover spray 750 ml", "Glass and window cleaner 750 ml", "Laundry capsules, 38 washes",
                 "Anti-bacterial kitchen wipes, 80", "Floor cleaner, pine 1.5 l"],
    "beer_wine": ["Lager beer, 12 x 330 ml cans", "Sauvignon blanc white wine 75 cl", "India pale ale, 4 x 440 ml",
                  "Rioja red wine 75 cl", "Prosecco sparkling wine 75 cl", "Stout beer, 4 x 500 ml",
                  "Pinot grigio white wine 75 cl", "Craft pilsner, 6 x 330 ml bottles", "Malbec red wine 75 cl",
                  "Cider, 10 x 440 ml cans", "Rose wine, Provence 75 cl", "Wheat beer, 4 x 500 ml",
                  "Chianti red wine 75 cl", "Session IPA, 12 x 330 ml cans"],
    "vegan": ["Oat milk barista edition 1 l", "Firm tofu block 400 g", "Plant-based burger patties, 2 pack",
              "Almond milk unsweetened 1 l", "Vegan cheddar-style block 200 g", "Soya mince, frozen 500 g",
              "Tempeh 200 g", "Coconut yoghurt alternative 400 g", "Vegan mayonnaise 270 g",
              "Seitan pieces 250 g", "Chickpea falafel, 12 pack", "Meat-free sausages, 6 pack",
              "Pea protein milk 1 l", "Cashew cream cheese alternative 150 g"],
    "stationery": ["A4 lined notebooks, 5 pack", "Ballpoint pens blue, 20 pack", "Printer paper A4, 500 sheets",
                   "Sticky notes 76 x 76 mm, 12 pads", "Highlighter pens, assorted, 6", "Stapler with 1000 staples",
                   "Pencils HB with erasers, 12", "Ring binder A4, 2 rings", "Correction tape, 3 pack",
                   "Spiral sketch pad A3", "Gel pens black, 10 pack", "Document wallets A4, 50 pack",
                   "Whiteboard markers, 4 colours", "Envelopes C5 self-seal, 100"],
}
WITHHELD = 4  # per theme: the new items
SHOPPING = dict(users=400, visit_p=0.35, basket=(1, 4), favourite_share=0.85, zipf=1.1, seed=7)


def text_world(days: int = TEXT_DAYS, new_from: int = TEXT_NEW_FROM, **shopping):
    """(catalog records, purchase lines DataFrame, new item ids, user -> favourite themes).
    Customers have one or two favourite kinds of shop; a basket line is from a favourite kind
    with probability favourite_share, else from any kind; within a kind items are drawn by a
    Zipf law over a random order (a few best sellers). New items are in the pools from day
    new_from on only, at a random place of the order. Categories are empty: the title carries
    the kind of shop."""
    import pandas as pd

    p = {**SHOPPING, **shopping}
    rng = np.random.default_rng(p["seed"])
    catalog, new_ids, pools = [], [], {}
    for theme, titles in THEMES.items():
        ids = []
        for j, title in enumerate(titles):
            item_id = f"{theme}-{j}"
            catalog.append({"item_id": item_id, "title": title, "category": "", "price": float(
                np.round(rng.uniform(1.5, 30.0), 2))})
            ids.append(item_id)
            if j >= len(titles) - WITHHELD:
                new_ids.append(item_id)
        order = rng.permutation(ids).tolist()
        weights = 1.0 / np.arange(1, len(order) + 1) ** p["zipf"]
        pools[theme] = (order, weights)
    new = set(new_ids)
    themes = list(THEMES)
    favourites = {f"c{u}": list(rng.choice(themes, size=1 + int(rng.random() < 0.4), replace=False))
                  for u in range(p["users"])}
    rows = []
    start = np.datetime64("2026-01-05")
    for d in range(days):
        for user, favs in favourites.items():
            if rng.random() >= p["visit_p"]:
                continue
            for _ in range(int(rng.integers(p["basket"][0], p["basket"][1] + 1))):
                theme = rng.choice(favs) if rng.random() < p["favourite_share"] else rng.choice(themes)
                order, weights = pools[theme]
                live = np.array([d >= new_from or it not in new for it in order])
                w = weights * live
                rows.append((start + d, user, order[int(rng.choice(len(order), p=w / w.sum()))]))
    df = pd.DataFrame(rows, columns=["day", "customer_id", "product_id"]).drop_duplicates()
    df = df.sort_values("day", kind="stable").reset_index(drop=True)
    return catalog, df, new_ids, favourites


def tafeng_world(lines: int = TAFENG_LINES, new_from: int = TAFENG_NEW_FROM):
    """(catalog records, purchase lines, new item ids): the products first sold on or after day
    index new_from are the new items."""
    from trainer.domains.recommender_data import tafeng_catalog
    from trainer.tafeng import load_tafeng

    df = load_tafeng(lines)
    days = np.sort(df["day"].unique())
    first = df.groupby("product_id")["day"].min()
    new_ids = sorted(str(p) for p in first[first >= days[new_from]].index)
    return tafeng_catalog(df), df[["day", "customer_id", "product_id"]].copy(), new_ids


def train_version(root: Path, catalog: list[dict], df, new_ids, new_from: int, encoder, *, cold_items: bool = True,
                  epochs: int = EPOCHS, seed: int = 0, **model_kw):
    """A first version trained by the real learner on the days before day index new_from, on the
    catalog without the new items; published (with the text encoder) into root/registry.
    Returns (registry, version folder)."""
    from shared.registry import ModelRegistry
    from trainer.domains.recommender import RecommenderModel
    from trainer.domains.recommender_data import TafengRows
    from trainer.learner import Learner
    from trainer.text_encoder import publish_text_encoder

    registry = ModelRegistry(root / "registry")
    publish_text_encoder(registry, exported=encoder)
    days = np.sort(df["day"].unique())
    new = set(new_ids)
    old = df[(df["day"] < days[new_from]) & ~df["product_id"].astype(str).isin(new)]
    model = RecommenderModel(registry_dir=registry.root, cold_items=cold_items, seed=seed, latency_catalog=20_000,
                             **model_kw)
    model.state.cold_prior = cold_items  # the former rule had neither the simulation nor the prior
    model.add_catalog([c for c in catalog if c["item_id"] not in new])
    rows = TafengRows(old, model.state, seed=seed)  # its random hours (Ta Feng has none)
    n = len(rows.days)
    X, y = rows.rows(0, n - 1)
    Xh, yh = rows.rows(n - 1, n)
    Learner(model, registry, root / "trainer").bootstrap(X, y, Xh, yh, epochs)
    version = registry.current_version("recommender")
    return registry, registry.version_dir("recommender", version)


class ExportedRanker:
    """Rankings by a version's exported graphs over a catalog that includes items the version
    never saw (item code 0, as the service's item index feeds them)."""

    def __init__(self, folder: Path, catalog: list[dict], encode, explore_share: float = 0.0) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        vocab = json.loads((folder / "vocab.json").read_text())
        self.extra = json.loads((folder / "manifest.json").read_text())["extra"]
        self.history_len = int(self.extra["history_len"])
        user_code = {u: i + 1 for i, u in enumerate(vocab["users"])}
        item_code = {it: i + 1 for i, it in enumerate(vocab["items"])}
        category_code = {c: i + 1 for i, c in enumerate(vocab["categories"])}
        self.user_code = user_code
        self.ids = [c["item_id"] for c in catalog]
        self.row = {it: r for r, it in enumerate(self.ids)}
        tower = ort.InferenceSession(str(folder / "item_tower.onnx"), so, providers=["CPUExecutionProvider"])
        feeds = {"item": np.array([[item_code.get(c["item_id"], 0)] for c in catalog], np.int64),
                 "text": np.asarray(encode([c["title"] for c in catalog]), np.float32),
                 "category": np.array([[category_code.get(c["category"], 0)] for c in catalog], np.int64),
                 "price": np.array([[c["price"]] for c in catalog], np.float32)}
        self.vectors = tower.run(["item_vector"], feeds)[0]
        self.texts = feeds["text"]
        self.unlearned = np.flatnonzero(feeds["item"][:, 0] == 0)
        self.explore_share = explore_share
        self.scoring = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])

    def top(self, users: list[str], histories: list[list[str]], k: int = K) -> np.ndarray:
        """Top-k catalog rows [len(users), k] (history: item ids, most recent first); with an
        explore_share, the service's exploration slot (services.recommender.adapter): the best
        of the unlearned items (for a customer with a history: the floor(k x share) whose titles
        are closest to the history's) take that many last places when the ranking shows fewer."""
        top = self._top(users, histories, k)
        slots = int(k * self.explore_share)
        if not slots or not len(self.unlearned):
            return top
        # as the service picks (services.recommender.adapter): the graph's best unlearned items,
        # and for a customer with a history the shortlist's titles closest to the history's
        best_new = self._top(users, histories, max(slots, EXPLORE_SHORTLIST), restrict=[self.unlearned] * len(users))
        unlearned = set(self.unlearned.tolist())
        for i, h in enumerate(histories):
            ranked = top[i].tolist()
            need = slots - sum(r in unlearned for r in ranked)
            candidates = [r for r in best_new[i].tolist() if r not in ranked]
            rows = self._rows(h)
            if rows:
                candidates = [candidates[j] for j in closest_titles(self.texts[rows], self.texts[candidates], slots)]
            extra = candidates[:max(0, need)]
            if extra:
                top[i] = ranked[:k - len(extra)] + extra
        return top

    def _rows(self, history: list[str]) -> list[int]:
        """The catalog rows of a history's items (most recent first), as many as the graph reads."""
        return [self.row[x] for x in history if x in self.row][:self.history_len]

    def _top(self, users: list[str], histories: list[list[str]], k: int, restrict=None) -> np.ndarray:
        """restrict: None (every row) or one array of rows per user."""
        out = []
        for s in range(0, len(users), 256):
            us, hs = users[s:s + 256], histories[s:s + 256]
            hist = np.full((len(us), self.history_len), -1, np.int64)
            for i, h in enumerate(hs):
                rows = self._rows(h)
                hist[i, :len(rows)] = rows
            chunk = restrict[s:s + 256] if restrict is not None else [np.array([-1])] * len(us)
            allowed = np.full((len(us), max(1, max(len(r) for r in chunk))), -1, np.int64)
            for i, r in enumerate(chunk):
                allowed[i, :len(r)] = r
            feeds = {"user": np.array([[self.user_code.get(u, 0)] for u in us], np.int64), "history": hist,
                     "context": np.tile(np.array([[0, 0, 10]], np.int64), (len(us), 1)),
                     "k": np.full((len(us), 1), k, np.int64),
                     "restrict": allowed,
                     "exclude": np.full((len(us), 1), -1, np.int64), "item_vectors": self.vectors}
            out.append(self.scoring.run(["items"], feeds)[0][:, :k])
        return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def score(df, catalog: list[dict], new_ids: list[str], new_from: int, rankers: dict, history_len: int,
          eval_days: int = 7) -> dict:
    """The protocol's figures for each ranker (name -> ExportedRanker) and 7-day popularity."""
    new = set(new_ids)
    days = np.sort(df["day"].unique())
    scored_days = days[new_from:new_from + eval_days]
    ids = [c["item_id"] for c in catalog]
    row = {it: r for r, it in enumerate(ids)}
    is_new = np.array([it in new for it in ids])
    df = df.assign(product_id=df["product_id"].astype(str), customer_id=df["customer_id"].astype(str))
    first_day = df[df["product_id"].isin(new) & df["day"].isin(scored_days)].groupby("product_id")["day"].min()
    results = {name: {"first_positives": 0, "hits": 0, "shown_day1": set()} for name in [*rankers, "popularity_7d"]}
    for day in scored_days:
        before = df[df["day"] < day]
        recent = before[before["day"] >= day - np.timedelta64(7, "D")]
        pop = np.zeros(len(ids))
        for it, n in recent["product_id"].value_counts().items():
            if it in row:
                pop[row[it]] = n
        pop_top = np.argsort(-pop, kind="stable")[:K]
        hist = (before.groupby("customer_id")["product_id"].apply(lambda s: s.tolist()[::-1][:history_len])
                .to_dict())
        today = df[df["day"] == day]
        shoppers = sorted(today["customer_id"].unique())
        firsts = today[today["product_id"].map(lambda p: p in first_day.index and first_day[p] == day)]
        tops = {name: r.top(shoppers, [hist.get(u, []) for u in shoppers]) for name, r in rankers.items()}
        tops["popularity_7d"] = np.tile(pop_top, (len(shoppers), 1))
        at = {u: i for i, u in enumerate(shoppers)}
        for name, top in tops.items():
            res = results[name]
            if day == scored_days[0]:
                res["shown_day1"] = {ids[r] for r in top.reshape(-1) if is_new[r]}
            for user, item in zip(firsts["customer_id"], firsts["product_id"]):
                res["first_positives"] += 1
                res["hits"] += int(row[item] in set(top[at[user]].tolist()))
    out = {}
    for name, res in results.items():
        out[name] = {"new_items": len(new), "new_items_sold": int(len(first_day)),
                     "shown_day1_share": round(len(res["shown_day1"]) / max(1, len(new)), 4),
                     "first_positives": res["first_positives"],
                     "hr@10_first_positives": round(res["hits"] / max(1, res["first_positives"]), 4)}
    return out


def run_catalog(name: str, catalog, df, new_ids, new_from: int, encoder, epochs: int, seed: int = 0) -> dict:
    from shared.text import TextEncoder

    encode = TextEncoder(encoder[0]).encode
    rankers, meta = {}, {}
    for variant, cold in (("model", True), ("former_rule", False)):
        root = Path(tempfile.mkdtemp(prefix=f"cold-start-{name}-"))
        try:
            t0 = time.time()
            _, folder = train_version(root, catalog, df, new_ids, new_from, encoder, cold_items=cold, epochs=epochs,
                                      seed=seed)
            meta[variant] = {"train_s": round(time.time() - t0, 1)}
            if cold:
                rankers["model_with_explore_slot"] = ExportedRanker(folder, catalog, encode, explore_share=0.1)
                meta["model_with_explore_slot"] = meta[variant]
            rankers[variant] = ExportedRanker(folder, catalog, encode)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    history_len = rankers["model"].history_len
    out = score(df, catalog, new_ids, new_from, rankers, history_len)
    for variant, m in meta.items():
        out[variant].update(m)
    return out


def main(argv=None) -> int:
    from trainer.text_encoder import export_text_encoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalogs", default="text,tafeng")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds the first version's training (weights, batches, the random hours of its rows); "
                         "the committed results are seed 0")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    enc_dir = Path(tempfile.mkdtemp(prefix="cold-start-encoder-"))
    encoder = export_text_encoder(enc_dir / "model.onnx")
    results = {"protocol": "withheld items enter with title/category/price only; exported graphs rank; "
                           "no retraining during the scored days", "k": K,
               "epochs": {"text": TEXT_EPOCHS, "tafeng": EPOCHS}, "seed": args.seed}
    for name in args.catalogs.split(","):
        if name == "text":
            catalog, df, new_ids, _ = text_world()
            results["text"] = {"catalog": f"{len(catalog)} real product titles, {len(new_ids)} withheld; "
                                          f"simulated shoppers {SHOPPING}",
                               "new_from_day": TEXT_NEW_FROM,
                               **run_catalog(name, catalog, df, new_ids, TEXT_NEW_FROM, encoder, TEXT_EPOCHS,
                                             args.seed)}
        elif name == "tafeng":
            catalog, df, new_ids = tafeng_world()
            results["tafeng"] = {"catalog": f"Ta Feng first {TAFENG_LINES} lines; new = first sold on or after "
                                            f"day index {TAFENG_NEW_FROM}", "new_from_day": TAFENG_NEW_FROM,
                                 **run_catalog(name, catalog, df, new_ids, TAFENG_NEW_FROM, encoder, EPOCHS,
                                               args.seed)}
    results["wall_s"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'catalog':8} {'ranker':32} {'new':>5} {'shown day 1':>12} {'first pos':>10} {'HR@10':>7}")
    for name in ("text", "tafeng"):
        for ranker, r in results.get(name, {}).items():
            if isinstance(r, dict):
                print(f"{name:8} {ranker:32} {r['new_items']:5d} {r['shown_day1_share']:12.3f} "
                      f"{r['first_positives']:10d} {r['hr@10_first_positives']:7.3f}")
    shutil.rmtree(enc_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
