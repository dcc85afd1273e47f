"""The recommender, trainer side, on real data: a version bootstrapped from a real Ta Feng
slice matches the contract (signature, extra files), its ONNX graphs match PyTorch, TopK /
restrict / exclude behave, a new item ranks by its title alone (small catalog, real titles),
and an incremental round on joined examples shaped as the service records them publishes."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from protos.feedback.v1 import feedback_pb2 as fb
from shared.feedback.records import feedback_outcome
from protos.recommender.v1 import recommender_pb2 as rec
from shared.feedback import fill_tensor
from shared.runtime.signature import signature_of_onnx
from shared.text import TextEncoder
from bench.impressions import TITLES  # one small titled catalog (three departments) for both
from tests.recommender_fixtures import bootstrap_small_recommender, exported_text_encoder
from trainer.domains.recommender import (ITEM_TOWER_FILE, ItemTowerExport, RecommenderModel, ScoringExport,
                                         scoring_parity)
from trainer.domains.recommender_data import COL_HIST, COL_ITEM, COL_USER, HISTORY_LEN, LEVEL_CLICK, LEVEL_PURCHASE, WIDTH
from trainer.joiner import JoinedExample
from trainer.learner import Learner, LearnerConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reco-trainer")
    # no must-beat bar: these tests are about the steps of a round (the gate's rule: tests/test_gate.py)
    registry, learner, lines = bootstrap_small_recommender(root, LearnerConfig(min_events=20, epochs=1,
                                                                               gate_min_gain=None))
    version = registry.current_version("recommender")
    folder = registry.version_dir("recommender", version)
    catalog = [json.loads(x) for x in (folder / "catalog.jsonl").read_text().splitlines()]
    tower = ort.InferenceSession(str(folder / ITEM_TOWER_FILE), providers=["CPUExecutionProvider"])
    encoder = TextEncoder.from_registry(registry)
    vocab = json.loads((folder / "vocab.json").read_text())
    cat_code = {c: n for n, c in enumerate(vocab["categories"], start=1)}
    feeds = {"item": np.arange(1, len(catalog) + 1, dtype=np.int64).reshape(-1, 1),
             "text": encoder.encode([c["title"] for c in catalog]),
             "category": np.array([[cat_code.get(c["category"], 0)] for c in catalog], np.int64),
             "price": np.array([[c["price"]] for c in catalog], np.float32)}
    item_vectors = tower.run(["item_vector"], feeds)[0]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return dict(root=root, registry=registry, learner=learner, folder=folder, catalog=catalog, vocab=vocab,
                tower_feeds=feeds, item_vectors=item_vectors, session=session, version=version)


def request(world, user=1, history=(), context=(1, 2, 10), k=10, restrict=(), exclude=(), r_len=4, e_len=4):
    h = np.full((1, HISTORY_LEN), -1, np.int64)
    h[0, :len(history)] = history
    r = np.full((1, r_len), -1, np.int64)
    r[0, :len(restrict)] = restrict
    e = np.full((1, e_len), -1, np.int64)
    e[0, :len(exclude)] = exclude
    return {"user": np.array([[user]], np.int64), "history": h, "context": np.array([context], np.int64),
            "k": np.array([[k]], np.int64), "restrict": r, "exclude": e, "item_vectors": world["item_vectors"]}


def run(world, feeds):
    return dict(zip(["items", "score", "click", "purchase"], world["session"].run(None, feeds)))


def stack(feeds_list):
    out = {k: np.concatenate([f[k] for f in feeds_list]) for k in feeds_list[0] if k != "item_vectors"}
    out["item_vectors"] = feeds_list[0]["item_vectors"]
    return out


def test_version_matches_the_contract(world):
    registry, folder, version = world["registry"], world["folder"], world["version"]
    m = registry.verify("recommender", version)
    sig = {t.name: (t.datatype, t.shape) for t in m.signature.inputs}
    dv = m.extra["item_vector_dim"]
    assert list(sig) == ["user", "history", "context", "k", "restrict", "exclude", "item_vectors"]
    assert sig == {"user": ("INT64", (-1, 1)), "history": ("INT64", (-1, m.extra["history_len"])),
                   "context": ("INT64", (-1, 3)), "k": ("INT64", (-1, 1)), "restrict": ("INT64", (-1, -1)),
                   "exclude": ("INT64", (-1, -1)), "item_vectors": ("FP32", (-1, dv))}
    assert {t.name: (t.datatype, t.shape) for t in m.signature.outputs} == {
        "items": ("INT64", (-1, -1)), "score": ("FP32", (-1, -1)), "click": ("FP32", (-1, -1)),
        "purchase": ("FP32", (-1, -1))}
    tower = signature_of_onnx(folder / ITEM_TOWER_FILE)
    assert {t.name: (t.datatype, t.shape) for t in tower.inputs} == {
        "item": ("INT64", (-1, 1)), "text": ("FP32", (-1, 384)), "category": ("INT64", (-1, 1)),
        "price": ("FP32", (-1, 1))}
    assert [(t.name, t.datatype, t.shape) for t in tower.outputs] == [("item_vector", "FP32", (-1, dv))]
    assert dv <= 64 and m.extra["text_dim"] == 384 and m.extra["pages"][0] == "home" and m.extra["devices"]
    assert {"item_tower.onnx", "vocab.json", "catalog.jsonl", "users.npz", "model.onnx"} <= set(m.files)
    vocab = world["vocab"]
    assert len(vocab["items"]) == len(world["catalog"]) == m.extra["items"]
    assert [c["item_id"] for c in world["catalog"]] == vocab["items"]  # catalog row = vocab index
    assert world["catalog"][0]["title"].startswith("product subclass ")
    with np.load(folder / "users.npz") as z:
        users, indptr, items = z["user_ids"].astype(str), z["indptr"], z["item_ids"].astype(str)
    assert indptr[0] == 0 and indptr[-1] == len(items) and len(indptr) == len(users) + 1
    lines = world["learner"].model.state  # the users' real purchases, oldest first
    assert set(users) <= set(vocab["users"]) and set(items) <= set(vocab["items"])
    assert len(items) == sum(len(v) for v in lines.interactions.values())
    # metrics and the gate's figures: parity, and the latency of one request over a 100k catalog
    gate = m.extra["gate"]
    assert gate["onnx_parity_max_abs"] <= 1e-4
    assert m.extra["latency_catalog_rows"] == 100_000 and 0 < gate["batch1_latency_ms"] <= 5.0
    assert 0 <= m.metrics["hr@10"] <= m.metrics["hr@50"] <= 1 and m.metrics["rows"] > 1000


def test_onnx_matches_pytorch(world):
    learner = world["learner"]
    net, model = learner.net, learner.model
    with torch.no_grad():
        want = ItemTowerExport(net).eval()(*(torch.from_numpy(v) for v in world["tower_feeds"].values())).numpy()
    assert np.max(np.abs(world["item_vectors"] - want)) <= 1e-4
    rng = np.random.default_rng(3)
    n = len(world["catalog"])
    rows = [request(world, user=int(rng.integers(0, 50)), history=rng.integers(0, n, int(rng.integers(0, 40))),
                    context=(int(rng.integers(0, 7)), int(rng.integers(0, 5)), int(rng.integers(0, 24))),
                    k=int(rng.integers(1, 30)), restrict=rng.integers(0, n, 4) if i % 3 == 1 else (),
                    exclude=rng.integers(0, n, 2) if i % 3 == 2 else ()) for i in range(24)]
    feeds = stack(rows)
    got = world["session"].run(None, feeds)
    with torch.no_grad():
        want = [t.numpy() for t in ScoringExport(net).eval()(*(torch.from_numpy(v) for v in feeds.values()))]
    assert scoring_parity(got, want) <= 1e-4
    assert model.parity(ScoringExport(net).eval(), world["folder"] / "model.onnx", feeds) <= 1e-4


def test_the_first_version_answers_the_same_at_every_hour(world):
    """Ta Feng has no hours (its rows carry random ones, trainer.domains.recommender_data.TafengRows):
    after the bootstrap every hour has the mean embedding, so an answer does not depend on the
    hour of day it is asked at until live traffic teaches the hours something."""
    n = len(world["catalog"])
    for user, history in ((3, [1, 5, 9]), (0, []), (7, list(range(0, n, max(1, n // 20)))[:20])):
        answers = [run(world, request(world, user=user, history=history, context=(1, 2, hour))) for hour in range(24)]
        for hour, answer in enumerate(answers[1:], start=1):
            assert answer["items"].tolist() == answers[0]["items"].tolist(), hour
            np.testing.assert_allclose(answer["score"], answers[0]["score"], rtol=0, atol=1e-5, err_msg=str(hour))


@pytest.mark.parametrize("random_hours", [True, False])
def test_the_bootstrap_evens_out_the_hours_only_when_its_rows_had_random_ones(random_hours):
    """A bootstrap on rows with real hours (a store's own history) keeps the hour effects it
    learned; one on Ta Feng's random hours gives every hour the mean."""
    from trainer.domains.recommender import RecommenderModel
    from trainer.domains.recommender_net import RecoNet

    model = RecommenderModel()
    model.state.random_hours = random_hours
    net = RecoNet(10, 10, 2)
    with torch.no_grad():
        net.hour.weight.copy_(torch.randn(net.hour.weight.shape, generator=torch.Generator().manual_seed(0)))
    learned = net.hour.weight.detach().clone()
    model.finish_bootstrap(net)
    if random_hours:
        assert torch.allclose(net.hour.weight, learned.mean(0, keepdim=True).expand_as(learned))
    else:
        assert torch.equal(net.hour.weight, learned)


def test_topk_restrict_exclude_and_batching(world):
    n = len(world["catalog"])
    history = [5, 9, 5, 17]
    alone = run(world, request(world, user=3, history=history, k=20))
    items, score = alone["items"][0], alone["score"][0]
    assert len(items) == 20 and len(set(items)) == 20 and np.all(np.diff(score) <= 0) and np.isfinite(score).all()
    assert np.all((alone["purchase"] <= alone["click"] + 1e-7) & (alone["click"] >= 0) & (alone["click"] <= 1))
    # exclude: the listed rows disappear, the rest keep their order
    ex = run(world, request(world, user=3, history=history, k=20, exclude=items[:3]))
    assert not set(items[:3]) & set(ex["items"][0][np.isfinite(ex["score"][0])])
    assert list(ex["items"][0][:17]) == list(items[3:])
    # restrict: only the listed rows are ranked; the rest of the top-k is -inf
    cands = [int(items[15]), 100, 200, 300]
    re = run(world, request(world, user=3, history=history, k=6, restrict=cands))
    finite = np.isfinite(re["score"][0])
    assert finite.sum() == 4 and set(re["items"][0][finite]) == set(cands)
    assert re["items"][0][0] == items[15]  # the best of them by the same score
    # restrict + exclude together
    both = run(world, request(world, user=3, history=history, k=6, restrict=cands, exclude=[100]))
    assert set(both["items"][0][np.isfinite(both["score"][0])]) == {int(items[15]), 200, 300}
    # the repeat term: items of the history are ranked higher than without a history
    cold = run(world, request(world, user=0, history=[], k=n))
    warm = run(world, request(world, user=0, history=[5, 5, 5], k=n))
    rank = lambda out, row: int(np.where(out["items"][0] == row)[0][0])  # noqa: E731
    assert rank(warm, 5) < rank(cold, 5)
    # batching: a batch of mixed requests answers each exactly as alone; k = the batch's max
    reqs = [request(world, user=3, history=history, k=20), request(world, user=0, k=5, restrict=cands),
            request(world, user=7, history=[1, 2], k=3, exclude=[int(items[0])])]
    batch = run(world, stack(reqs))
    assert batch["items"].shape == (3, 20)
    for i, r in enumerate(reqs):
        one = run(world, r)
        kk = one["items"].shape[1]
        np.testing.assert_array_equal(batch["items"][i, :kk][np.isfinite(one["score"][0])],
                                      one["items"][0][np.isfinite(one["score"][0])])
        np.testing.assert_allclose(batch["score"][i, :kk], one["score"][0], rtol=1e-5, atol=1e-5)
    # k beyond the catalog is clipped to it
    small = dict(request(world, k=50), item_vectors=world["item_vectors"][:7])
    assert run(world, small)["items"].shape == (1, 7)


NEW_ITEMS = {"dairy": "Organic whole milk 2 litres", "tools": "Claw hammer with fibreglass handle",
             "coffee": "Arabica coffee beans 250 g"}


def test_a_new_item_ranks_by_its_title_alone():
    """Real titles, no category (the title is the only content): customers who buy from one
    group get that group's brand-new item (unknown id, never interacted) above the others."""
    encoder = TextEncoder(exported_text_encoder()[0])
    model = RecommenderModel(encoder=encoder.encode, latency_catalog=1000, negatives=16, batch_size=256)
    records = [{"item_id": f"{g}-{i}", "title": t, "category": "", "price": 3.0}
               for g, titles in TITLES.items() for i, t in enumerate(titles)]
    model.add_catalog(records)
    rng = np.random.default_rng(0)
    groups = list(TITLES)
    X, y = [], []
    for u in range(1, 91):
        g = groups[u % 3]
        model.state.user_code(f"customer-{u}", add=True)
        bought = [model.state.item_code(f"{g}-{i}") for i in rng.permutation(8)]
        for n in range(1, 8):  # each purchase with the earlier ones as history, most recent first
            row = np.full(WIDTH, -1, np.float32)
            row[:COL_HIST] = [u, 0, 0, 12, bought[n], 11_000]
            hist = bought[:n][::-1]
            row[COL_HIST:COL_HIST + len(hist)] = hist
            X.append(row)
            y.append(LEVEL_PURCHASE)
    X, y = np.stack(X), np.asarray(y, np.float32)
    net = model.new_network(X)
    opt = model.optimizer(net)
    model.train(net, opt, X, y, epochs=30, seed=0)
    # the new items: unknown to the vocabulary (code 0), embedded from the title only
    new = list(NEW_ITEMS.values())
    tower = ItemTowerExport(net).eval()
    with torch.no_grad():
        vec = tower(torch.zeros(3, 1, dtype=torch.int64), torch.from_numpy(encoder.encode(new)),
                    torch.zeros(3, 1, dtype=torch.int64), torch.full((3, 1), 3.0))
        catalog = torch.cat([model.all_item_vectors(net), vec])
        scoring = ScoringExport(net).eval()
        n = len(catalog)
        new_rows = {g: n - 3 + i for i, g in enumerate(groups)}
        wins = 0
        for u in range(1, 91):
            g = groups[u % 3]
            hist = torch.full((1, HISTORY_LEN), -1, dtype=torch.int64)
            own = [model.state.item_code(f"{g}-{i}") - 1 for i in range(3)]
            hist[0, :3] = torch.tensor(own)
            items, score, _, _ = scoring(torch.tensor([[u]]), hist, torch.tensor([[0, 0, 12]]), torch.tensor([[3]]),
                                         torch.tensor([list(new_rows.values())]), torch.full((1, 1), -1),
                                         catalog)
            wins += int(items[0, 0]) == new_rows[g]
    assert wins >= 80, f"the group's new item ranked first among the 3 new items for {wins}/90 customers"


def joined_example(offset, prediction_id, user_id, history_ids, item_ids, outcome_item, event, served_version="1"):
    served = fb.ServedPrediction(prediction_id=prediction_id, served_at=1000.0 + offset)
    served.model.name, served.model.version = "recommender", served_version
    fill_tensor(served.inputs.add(), "user", np.array([[0]], np.int64))
    fill_tensor(served.inputs.add(), "history_ids", np.array([history_ids], dtype=object).reshape(1, -1))
    fill_tensor(served.inputs.add(), "context", np.array([[1, 2, 14]], np.int64))
    fill_tensor(served.outputs.add(), "item_ids", np.array([item_ids], dtype=object))
    fill_tensor(served.outputs.add(), "click", np.linspace(0.5, 0.1, len(item_ids), dtype=np.float32).reshape(1, -1))
    fill_tensor(served.outputs.add(), "purchase", np.linspace(0.2, 0.01, len(item_ids), dtype=np.float32).reshape(1, -1))
    served.request.Pack(rec.RecommendRequest(user_id=user_id, k=len(item_ids)))
    label = rec.RecommendationOutcome(prediction_id=prediction_id, item_id=outcome_item, event=event)
    outcome = feedback_outcome(label, 1001.0 + offset, 1001.0 + offset)
    return JoinedExample("recommender", prediction_id, offset, offset - 1, served, outcome, "recommender",
                         served_version, 1.0, label)


def test_an_incremental_round_on_joined_examples_publishes(world, tmp_path):
    learner, registry = world["learner"], world["registry"]
    vocab = world["vocab"]
    model = learner.model
    # a brand-new item arrives through the service's catalog journal
    journal = tmp_path / "items.jsonl"
    journal.write_text(json.dumps({"item_id": "new-oat-milk", "title": "Oat milk 1 litre", "category": "dairy",
                                   "price": 2.5}) + "\n")
    from trainer.domains.recommender_catalog import CatalogJournal

    model.journal = CatalogJournal(journal)
    users, items = vocab["users"], vocab["items"]
    rng = np.random.default_rng(0)
    joined, offset = [], 1
    for n in range(120):
        shown = [items[i] for i in rng.choice(len(items), 5, replace=False)]
        user = users[n % 40] if n % 10 else "brand-new-customer"
        pid = f"p{n}"
        hist = [items[i] for i in rng.choice(len(items), 3, replace=False)]
        for item in shown[:3]:
            joined.append(joined_example(offset, pid, user, hist, shown, item, rec.EVENT_IMPRESSION))
            offset += 1
        target = "new-oat-milk" if n % 4 == 0 else shown[0]
        joined.append(joined_example(offset, pid, user, hist, shown, target, rec.EVENT_CLICK))
        offset += 1
        if n % 2 == 0:
            joined.append(joined_example(offset, pid, user, hist, shown, target, rec.EVENT_PURCHASE))
            offset += 1
    ex = model.examples(joined)
    # impressions of the clicked item count once, at the highest level of that (prediction, item)
    assert len(ex) == 120 * 3 + 120 - sum(1 for n in range(120) if n % 4)  # clicked shown[0] merges its impression
    assert set(np.unique(ex.y)) == {0.0, LEVEL_CLICK, LEVEL_PURCHASE}
    assert ex.X.shape[1] == WIDTH and np.isfinite(ex.served_p[ex.y == 0]).all()
    new_item = model.state.item_code("new-oat-milk")
    new_user = model.state.user_code("brand-new-customer")
    assert new_item > len(items) and new_user > len(users)
    assert (ex.X[:, COL_ITEM] == new_item).sum() == 30 and (ex.X[:, COL_USER] == new_user).sum() > 0
    learner.add(ex)
    assert learner.due()
    entry = learner.round({"offset": offset - 1, "pending": []})
    assert entry["decision"] == "published", entry
    preq = entry["prequential"]  # the learning report's figures: what was served vs what happened
    assert preq["window_rows"] == np.isfinite(ex.served_p).sum() and 0 < preq["click_rate"] < 1 and preq["click_log_loss"] > 0
    assert 0 <= preq["served_click_auc"] <= 1
    m = registry.manifest("recommender", entry["version"])
    assert m.parent == world["version"] and m.learned_up_to == offset - 1
    folder = registry.version_dir("recommender", entry["version"])
    vocab2 = json.loads((folder / "vocab.json").read_text())
    assert vocab2["items"][:len(items)] == items and "new-oat-milk" in vocab2["items"]  # codes never move
    assert "brand-new-customer" in vocab2["users"]
    catalog2 = [json.loads(x) for x in (folder / "catalog.jsonl").read_text().splitlines()]
    assert {"item_id": "new-oat-milk", "title": "Oat milk 1 litre", "category": "dairy", "price": 2.5} in catalog2
    with np.load(folder / "users.npz") as z:
        u = list(z["user_ids"].astype(str))
        i = u.index("brand-new-customer")
        assert "new-oat-milk" in set(z["item_ids"][z["indptr"][i]:z["indptr"][i + 1]].astype(str))
    # the checkpoint restores the vocabulary with the weights
    again = Learner(RecommenderModel(registry_dir=registry.root), registry, world["root"] / "trainer")
    assert again.restore()
    assert again.model.state.item_code("new-oat-milk") == new_item
    assert again.model.state.user_code("brand-new-customer") == new_user
    X = ex.X[:50]
    np.testing.assert_allclose(again.model.predict(again.net, X), model.predict(learner.net, X), rtol=1e-5, atol=1e-6)


def test_a_checkpoint_written_with_a_64_place_history_restores_and_learns_on(world, tmp_path):
    """An older trainer's checkpoint (rows, weights and Adam moments for 64 history places) is
    upgraded on restore: no label or replayed row is lost, the older places start as the oldest
    one, and a training step runs on the restored optimizer."""
    from trainer.domains.recommender_data import COL_POSITION
    from trainer.learner import Checkpoint, Examples

    old_h = 64
    assert HISTORY_LEN > old_h
    learner, registry = world["learner"], world["registry"]
    state = Checkpoint(learner.checkpoint.path).load()
    keep = np.r_[0:COL_HIST + old_h, COL_POSITION:WIDTH]

    def old_rows(ex):
        return Examples(ex.X[:, keep], ex.y, ex.served_p, ex.offsets)

    def old_weights(w):
        return None if w is None else {k: (v[:old_h] if k in ("pool_weight", "repeat_weight") else v) for k, v in w.items()}

    names = [n for n, p in learner.net.named_parameters() if n not in ("item_id.weight", "user_id.weight")]
    places = {names.index("pool_weight"), names.index("repeat_weight")}
    dense = state["opt"]["dense"]
    assert places <= set(dense["state"])  # the bootstrap stepped them: there are moments to upgrade
    old = {**state, "replay": old_rows(state["replay"]), "window": old_rows(state["window"]),
           "net": old_weights(state["net"]), "champion": old_weights(state.get("champion")),
           "canary": old_weights(state.get("canary")),
           "opt": {**state["opt"], "dense": {**dense, "state": {
               i: {k: (v[:old_h] if i in places and k in ("exp_avg", "exp_avg_sq") else v) for k, v in s.items()}
               for i, s in dense["state"].items()}}}}
    assert old["replay"].X.shape[1] == WIDTH - (HISTORY_LEN - old_h)
    workdir = tmp_path / "trainer"
    Checkpoint(workdir / "checkpoints" / "recommender.pt").save(old)

    again = Learner(RecommenderModel(registry_dir=registry.root), registry, workdir)
    assert again.restore()
    expected = state["replay"].X.copy()
    expected[:, COL_HIST + old_h:COL_POSITION] = -1  # the places the old layout did not keep are empty
    np.testing.assert_array_equal(again.replay.X, expected)
    np.testing.assert_array_equal(again.replay.y, state["replay"].y)
    assert len(again.window) == len(state["window"]) and again.offset == state["offset"]
    for name in ("pool_weight", "repeat_weight"):
        got, was = getattr(again.net, name).detach(), state["net"][name]
        np.testing.assert_array_equal(got[:old_h], was[:old_h])
        assert (got[old_h:] == was[old_h - 1]).all()
    before = again.net.pool_weight.detach().clone()
    again.model.train(again.net, again.opt, again.replay.X[:512], again.replay.y[:512], 1, 0)
    assert not torch.equal(again.net.pool_weight.detach(), before)
    assert np.isfinite(again.model.predict(again.net, again.replay.X[:50])).all()
