"""The recommender learning from what it showed (issue 16), measured on a simulated storefront.

    nice .venv/bin/python -m bench.impressions        # writes bench/results/impressions.json

A catalog of 72 real product titles (three kinds of shop, three brands each; the real text
encoder), 120 customers of three kinds, each liking 6 items of its kind and having bought 4 of
them. A first version is trained by the real learner on those purchases (Learner.bootstrap,
ONNX export, registry). Then rounds: each customer is served the registry's current version
through its exported item_tower.onnx and model.onnx (ONNX Runtime, top 10) and clicks exactly
one of the ten: the first it likes, else one at random (a click rate of 0.1 by construction).
The served records and clicks go into a real SQLite event log; the joiner (a clock moved past
the label window) emits the clicks and the impressions it derives from the served records, and
Learner.round trains, gates and publishes. A second learner, a copy of the same first version,
gets the same clicks without the impressions.

Reported: the mean click probability the serving version answered, per round, against the
observed click rate; the same for the clicks-only learner's last version; HR@10 of the liked
items the customers have not bought (never clicked either way) from each learner's exported
model, with the paired standard error of the difference. The gate's margin is wide here
(LearnerConfig.gate_margin 0.5) and it has no must-beat bar (gate_min_gain None): its HR@10 is
over clicks on the serving version's own lists, where the champion scores 1.0 by construction.
"""
from __future__ import annotations

import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from protos.common.v1 import common_pb2
from protos.feedback.v1 import feedback_pb2 as fb
from protos.recommender.v1 import recommender_pb2 as rec
from shared.feedback import fill_tensor
from shared.feedback.records import feedback_outcome
from shared.registry import ModelRegistry
from shared.text import TextEncoder
from trainer.domains.recommender import ITEM_TOWER_FILE, RecommenderModel
from trainer.domains.recommender_data import COL_HIST, COL_POSITION, HISTORY_LEN, LEVEL_PURCHASE, WIDTH
from trainer.eventlog import STORED, SqliteEventLog
from trainer.joiner import Joiner
from trainer.learner import Learner, LearnerConfig

RESULT = Path(__file__).parent / "results" / "impressions.json"

DAY = 86400.0
T0 = 20_100 * DAY + 9 * 3600.0  # a morning, days after the first version's purchases
WINDOW = 600.0



class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def served_record(pid: str, user_id: str, at: float, item_ids: list[str], click: np.ndarray, history_ids=(),
                  user_code: int = 0, version: str = "1") -> fb.FeedbackRecord:
    """A FeedbackRecord shaped as services/recommender/adapter.py's served_record writes it."""
    s = fb.ServedPrediction(prediction_id=pid, served_at=at,
                            model=common_pb2.ModelRef(name="recommender", version=version))
    fill_tensor(s.inputs.add(), "user", np.array([[user_code]], np.int64))
    fill_tensor(s.inputs.add(), "history_ids", np.array(list(history_ids), dtype=object).reshape(1, -1))
    fill_tensor(s.inputs.add(), "context", np.array([[1, 2, 9]], np.int64))
    fill_tensor(s.outputs.add(), "item_ids", np.array(item_ids, dtype=object).reshape(1, -1))
    fill_tensor(s.outputs.add(), "click", np.asarray(click, np.float32).reshape(1, -1))
    fill_tensor(s.outputs.add(), "purchase", (np.asarray(click, np.float32) / 4).reshape(1, -1))
    s.request.Pack(rec.RecommendRequest(user_id=user_id, k=len(item_ids)))
    return fb.FeedbackRecord(record_id=f"s-{pid}", domain="recommender", served=s)


def outcome_record(pid: str, item: str, event, at: float) -> fb.FeedbackRecord:
    o = rec.RecommendationOutcome(prediction_id=pid, item_id=item, event=event, occurred_at=at)
    return fb.FeedbackRecord(record_id=f"o-{pid}-{item}-{int(event)}", domain="recommender",
                             outcome=feedback_outcome(o, at, at))


def append(log, records) -> None:
    statuses = {r.status for r in log.append_batch(list(records))}
    if statuses != {STORED}:
        raise RuntimeError(f"event log: not every record stored ({statuses})")



# ---------------------------------------------------------------- the simulated storefront

TITLES = {
    "dairy": ["Whole milk 1 litre", "Semi-skimmed milk 2 litres", "Greek yogurt 500 g", "Mature cheddar cheese 400 g",
              "Salted butter 250 g", "Skimmed milk 1 litre", "Natural yogurt 4 pack", "Mozzarella cheese ball"],
    "tools": ["Claw hammer 16 oz", "Cordless drill 18 V", "Screwdriver set 12 pieces", "Adjustable spanner 10 inch",
              "Tape measure 5 m", "Hand saw 22 inch", "Pliers set 3 pieces", "Spirit level 60 cm"],
    "coffee": ["Espresso coffee beans 1 kg", "Ground coffee medium roast", "Instant coffee granules 200 g",
               "Decaf coffee pods 30 pack", "Colombian coffee beans 500 g", "Coffee filter papers",
               "Cold brew coffee 1 litre", "Dark roast coffee beans"],
}
BRANDS = ("Acme", "Northfield", "Hillside")
USERS = 120
ROUNDS = 3
K = 10


def catalog_records() -> list[dict]:
    return [{"item_id": f"{g}-{n}-{b}", "title": f"{b} {t}", "category": g, "price": 2.0 + n}
            for g, titles in TITLES.items() for n, t in enumerate(titles) for b in BRANDS]


class Storefront:
    """Customers of three kinds; each likes 6 items of its kind, bought 4 of them before."""

    def __init__(self, model: RecommenderModel) -> None:
        rng = np.random.default_rng(3)
        groups = list(TITLES)
        self.items = [r["item_id"] for r in catalog_records()]
        self.liked: dict[str, list[str]] = {}
        for u in range(USERS):
            g = groups[u % 3]
            own = [i for i in self.items if i.startswith(g)]
            self.liked[f"customer-{u}"] = [own[k] for k in rng.choice(len(own), 6, replace=False)]
        self.model = model

    def first_rows(self) -> tuple[np.ndarray, np.ndarray]:
        rows = []
        for user, liked in self.liked.items():
            u = self.model.state.user_code(user, add=True)
            codes = [self.model.state.item_code(i) for i in liked[:4]]
            for n in range(4):
                row = np.full(WIDTH, -1, np.float32)
                row[:COL_HIST] = [u, 1, 2, 9, codes[n], T0 // DAY - 3 + n % 2]
                row[COL_HIST:COL_HIST + n] = codes[:n][::-1]
                row[COL_POSITION] = 0
                rows.append(row)
        return np.stack(rows), np.full(len(rows), LEVEL_PURCHASE, np.float32)

    def history(self, user: str) -> list[str]:
        return self.liked[user][:4][::-1]


class Serving:
    """The registry's current recommender as the service runs it: item_tower.onnx over the
    version's catalog, then model.onnx (TopK inside the graph)."""

    def __init__(self, registry: ModelRegistry, encoder: TextEncoder) -> None:
        self.version = registry.current_version("recommender")
        folder = registry.version_dir("recommender", self.version)
        catalog = [json.loads(x) for x in (folder / "catalog.jsonl").read_text().splitlines()]
        vocab = json.loads((folder / "vocab.json").read_text())
        self.users = {u: n for n, u in enumerate(vocab["users"], start=1)}
        self.row_of = {it: n for n, it in enumerate(vocab["items"])}
        cat_code = {c: n for n, c in enumerate(vocab["categories"], start=1)}
        tower = ort.InferenceSession(str(folder / ITEM_TOWER_FILE), providers=["CPUExecutionProvider"])
        feeds = {"item": np.arange(1, len(catalog) + 1, dtype=np.int64).reshape(-1, 1),
                 "text": np.stack([encoded(encoder, c["title"]) for c in catalog]),
                 "category": np.array([[cat_code.get(c["category"], 0)] for c in catalog], np.int64),
                 "price": np.array([[c["price"]] for c in catalog], np.float32)}
        self.item_vectors = tower.run(["item_vector"], feeds)[0]
        self.item_ids = [c["item_id"] for c in catalog]
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])

    def top(self, users: list[str], histories: list[list[str]], k: int = K):
        b = len(users)
        h = np.full((b, HISTORY_LEN), -1, np.int64)
        for n, hist in enumerate(histories):
            h[n, :len(hist)] = [self.row_of[i] for i in hist]
        feeds = {"user": np.array([[self.users.get(u, 0)] for u in users], np.int64), "history": h,
                 "context": np.tile(np.array([[1, 2, 9]], np.int64), (b, 1)), "k": np.full((b, 1), k, np.int64),
                 "restrict": np.full((b, 1), -1, np.int64), "exclude": np.full((b, 1), -1, np.int64),
                 "item_vectors": self.item_vectors}
        if any(i.name == "history_age" for i in self.session.get_inputs()):
            feeds["history_age"] = np.full_like(h, -1)  # histories without days here: ages unknown
        items, _, click, _ = self.session.run(None, feeds)
        return [[self.item_ids[r] for r in row] for row in items], click


@functools.lru_cache(maxsize=None)
def encoded(encoder: TextEncoder, title: str) -> np.ndarray:
    return encoder.encode([title])[0]


def hits(serving: Serving, shop: Storefront) -> np.ndarray:
    """Per liked item a customer has not bought yet: in the exported model's top 10 or not."""
    users = list(shop.liked)
    top, _ = serving.top(users, [shop.history(u) for u in users])
    return np.array([i in top[n] for n, u in enumerate(users) for i in shop.liked[u][4:]], np.float64)


def first_version(root: Path, encoder: TextEncoder) -> tuple[Learner, Storefront, ModelRegistry]:
    model = RecommenderModel(encoder=encoder.encode, latency_catalog=1000, negatives=16, batch_size=256)
    model.add_catalog(catalog_records())
    shop = Storefront(model)
    X, y = shop.first_rows()
    registry = ModelRegistry(root / "registry")
    # the gate's HR@10 here is over clicks on the serving version's own lists: every clicked item
    # was in its top 10, so it scores 1.0 by construction and any reordering looks worse; the
    # margin, and no must-beat bar (no challenger beats 1.0), let the loop go on, and the ranking
    # is compared below on liked items never shown
    config = LearnerConfig(min_events=1, epochs=2, gate_min_positives=40, gate_min_rows=200,
                           gate_publish_margin=None, gate_margin=0.5, gate_min_gain=None, gate_resamples=200)
    learner = Learner(model, registry, root / "trainer", config)
    learner.bootstrap(X, y, X[-120:], y[-120:], epochs=30)
    return learner, shop, registry



def impression_loop(root: Path, encoder: TextEncoder, rounds: int = 3) -> dict:
    """The loop of the module doc under root: figures, and the learner, its final serving and the
    clicks-only learner's (for the test's further checks)."""
    root = Path(root)
    learner, shop, registry = first_version(root / "shown", encoder)
    # the same first version, learning from the clicks alone (a copy of its registry and checkpoint)
    shutil.copytree(root / "shown", root / "clicks")
    registry_clicks = ModelRegistry(root / "clicks" / "registry")
    clicks_only = Learner(RecommenderModel(encoder=encoder.encode, latency_catalog=1000, negatives=16, batch_size=256),
                          registry_clicks, root / "clicks" / "trainer", learner.config)
    if not clicks_only.restore():
        raise RuntimeError("the copied first version did not restore")
    decisions, derived = [], []
    with SqliteEventLog(root / "events.db") as log:
        clock = Clock(T0)
        joiner = Joiner(log, {"recommender": WINDOW}, domain="recommender", grace_s=0.0, clock=clock)
        rng = np.random.default_rng(0)
        served_p, clicked = [], []
        for r in range(rounds):
            serving = Serving(registry, encoder)
            users = list(shop.liked)
            top, click = serving.top(users, [shop.history(u) for u in users])
            records, round_clicked = [], []
            at = T0 + r * 2 * WINDOW
            for n, user in enumerate(users):
                pid = f"r{r}-{n}"
                records.append(served_record(pid, user, at, top[n], click[n], shop.history(user),
                                             serving.users.get(user, 0), serving.version))
                # one click in ten shown: the first item it likes, else one of the ten at random
                liked = [i for i in top[n] if i in shop.liked[user]]
                choice = liked[0] if liked else top[n][int(rng.integers(K))]
                records.append(outcome_record(pid, choice, rec.EVENT_CLICK, at + 20))
                round_clicked += [i == choice for i in top[n]]
            append(log, records)
            served_p.append(float(click.mean()))
            clicked.append(float(np.mean(round_clicked)))
            clock.now = at + WINDOW + 1
            joined = joiner.poll(100_000)
            derived.append(sum(x.derived for x in joined))
            learner.add(learner.model.examples(joined))
            entry = learner.round(joiner.checkpoint())
            decisions.append(entry)
            clicks_only.add(clicks_only.model.examples([x for x in joined if not x.derived]))
            clicks_only.round(joiner.checkpoint())
        final = Serving(registry, encoder)
        final_clicks_only = Serving(registry_clicks, encoder)
        users = list(shop.liked)
        _, click = final.top(users, [shop.history(u) for u in users])
        served_p.append(float(click.mean()))
        _, click_clicks_only = final_clicks_only.top(users, [shop.history(u) for u in users])
    a, b = hits(final, shop), hits(final_clicks_only, shop)
    diff = a - b
    return {"figures": {"rounds": rounds, "customers": USERS, "k": K, "observed_click_rate": float(np.mean(clicked)),
                        "mean_served_click_p_by_round": served_p, "derived_impressions_by_round": derived,
                        "clicks_only_mean_click_p": float(click_clicks_only.mean()),
                        "decisions": [e["decision"] if e else None for e in decisions],
                        "hr@10_liked_not_bought": float(a.mean()), "clicks_only_hr@10_liked_not_bought": float(b.mean()),
                        "hr@10_paired_se": float(diff.std(ddof=1) / np.sqrt(len(diff))), "hr@10_targets": len(diff)},
            "learner": learner, "last_entry": decisions[-1], "final": final}


def main(argv: list[str] | None = None) -> int:
    from trainer.text_encoder import export_text_encoder

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-impressions-") as tmp:
        path, _ = export_text_encoder(Path(tmp) / "text-encoder.onnx")
        out = impression_loop(Path(tmp) / "loop", TextEncoder(path))
    result = {"bench": "impressions", "wall_s": round(time.perf_counter() - started, 1), **out["figures"]}
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
