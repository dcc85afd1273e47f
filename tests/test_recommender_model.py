"""The recommender service over the real bootstrapped model (trained by the real learner on a
slice of the real Ta Feng data, with the real sentence encoder), over real gRPC: known
customers get personal rankings that beat the popularity fallback on their own items, unknown
users get the fallback, the service's item vectors are the trainer's (catalog items, and a
new item embedded from its title), a hot swap under load fails no request."""
from __future__ import annotations

import asyncio
import collections
import json
import random
import shutil

import grpc
import numpy as np
import pytest

from protos.recommender.v1 import recommender_pb2 as pb
from protos.recommender.v1 import recommender_pb2_grpc as pb_grpc
from services.recommender.main import RecommenderSettings, build, make_app
from tests.recommender_fixtures import bootstrap_small_recommender
from tests.server_harness import until

VERSION_FILES = ("item_tower.onnx", "vocab.json", "catalog.jsonl", "users.npz")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("reco-real")
    registry, learner, _ = bootstrap_small_recommender(root)
    version = registry.current_version("recommender")
    folder = registry.version_dir("recommender", version)
    catalog = [json.loads(x) for x in (folder / "catalog.jsonl").read_text().splitlines() if x.strip()]
    with np.load(folder / "users.npz") as z:
        users, indptr, items = z["user_ids"].astype(str), z["indptr"], z["item_ids"].astype(str)
    history = {u: items[indptr[i]:indptr[i + 1]].tolist() for i, u in enumerate(users)}
    return root, registry, catalog, history, learner


def settings(root, registry, name, **kw):
    base = dict(host="127.0.0.1", port=0, metrics_port=0, registry_dir=str(registry.root), trainer_target="",
                catalog_path=str(root / name / "items.jsonl"), poll_interval_s=0.05, grace_s=1.0, log_format="text")
    base.update(kw)
    return RecommenderSettings(**base)


def ids(resp) -> list[str]:
    return [it.item_id for it in resp.items]


async def test_real_model_personal_rankings_fallback_and_a_new_item_from_its_text(real):
    root, registry, catalog, history, learner = real
    app, service = build(settings(root, registry, "rank"))
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    stub = pb_grpc.RecommenderStub(channel)
    try:
        rng = random.Random(0)
        heavy = [u for u, h in history.items() if len(h) >= 8]
        customers = rng.sample(heavy, min(40, len(heavy)))
        assert len(customers) >= 20
        # unknown users: the popularity fallback, the same list for the same context
        fallback = [await stub.Recommend(pb.RecommendRequest(user_id=f"new-visitor-{i}", k=10,
                                                             context=pb.Context(page="home", hour_of_day=10)))
                    for i in range(2)]
        assert all(f.fallback for f in fallback) and ids(fallback[0]) == ids(fallback[1])
        assert len(fallback[0].items) == 10
        personal_hits, fallback_hits, lists = [], [], set()
        for user in customers:
            resp = await stub.Recommend(pb.RecommendRequest(user_id=user, k=10,
                                                            context=pb.Context(page="home", hour_of_day=10)))
            assert not resp.fallback and len(resp.items) == 10
            assert [it.score for it in resp.items] == sorted((it.score for it in resp.items), reverse=True)
            assert all(0 <= it.purchase_probability <= it.click_probability <= 1 for it in resp.items)
            own = set(history[user])
            personal_hits.append(len(own & set(ids(resp))))
            fallback_hits.append(len(own & set(ids(fallback[0]))))
            lists.add(tuple(ids(resp)))
            # exclude_purchased leaves every item the customer bought out
            ex = await stub.Recommend(pb.RecommendRequest(user_id=user, k=10, exclude_purchased=True))
            assert not own & set(ids(ex)) and len(ex.items) == 10
        # the model learned the customers (grocery: people buy again what they bought)
        assert np.mean(personal_hits) > 1.3 * max(np.mean(fallback_hits), 0.1), (personal_hits, fallback_hits)
        assert len(lists) > len(customers) // 2  # personal, not one list for everyone

        # the service's item vectors are the trainer's: same features (id code, title embedding,
        # category code, price) through the version's own item tower
        import torch

        state = app.models["recommender"].current.prepared
        snap = service.catalog.current
        trained = learner.model.all_item_vectors(learner.net).numpy()  # row = vocabulary index
        vocab = [c["item_id"] for c in catalog]
        sample = rng.sample(range(len(vocab)), 200)
        rows = [snap.row(learner.model.state.items[i]) for i in sample]
        np.testing.assert_allclose(state.index.vectors[rows], trained[sample], atol=2e-4)

        # a brand-new item (an id the model never saw) is embedded from its title through the
        # content path (no id embedding) and is recommendable at once; a changed title re-embeds it
        category = catalog[0]["category"]
        title = "Organic whole milk, 1 litre"
        up = await stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="brand-new", title=title,
                                                                          category=category, price=39.0)]))
        assert up.inserted == 1
        user = customers[0]
        resp = await stub.Recommend(pb.RecommendRequest(user_id=user, k=1, candidate_item_ids=["brand-new"]))
        assert ids(resp) == ["brand-new"] and np.isfinite(resp.items[0].score)
        encoder = service.encoder
        cat_code = learner.model.state.category_index[category]
        with torch.no_grad():
            want = learner.net.item_vectors(torch.tensor([0]), torch.from_numpy(encoder.encode([title])),
                                            torch.tensor([cat_code]), torch.tensor([39.0])).numpy()
        got = state.index.vectors[service.catalog.current.row("brand-new")]
        np.testing.assert_allclose(got, want[0], atol=2e-4)
        await stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="brand-new", title="Claw hammer",
                                                                    category=category, price=39.0)]))
        moved = state.index_for(service.catalog.current).vectors[service.catalog.current.row("brand-new")]
        assert np.abs(moved - got).max() > 1e-3
    finally:
        await channel.close()
        await app.stop()


async def test_real_model_hot_swap_under_load_fails_no_request(real, tmp_path):
    root, registry, catalog, history, _ = real
    from shared.registry import ModelRegistry

    reg = ModelRegistry(tmp_path / "registry")
    for name in ("text-encoder", "recommender"):
        v = registry.current_version(name)
        folder = registry.version_dir(name, v)
        manifest = registry.manifest(name, v)
        extras = [folder / f for f in VERSION_FILES] if name == "recommender" else []
        reg.publish(name, registry.model_path(name, v), manifest.signature, extra=manifest.extra, extra_files=extras)
    app = make_app(settings(tmp_path, reg, "swap"))
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    stub = pb_grpc.RecommenderStub(channel)
    users = list(history)[:50] + ["somebody-new"]
    try:
        stop, failures, versions = asyncio.Event(), [], collections.Counter()

        async def client(i):
            while not stop.is_set():
                try:
                    r = await stub.Recommend(pb.RecommendRequest(user_id=users[i % len(users)], k=10), timeout=10)
                except grpc.aio.AioRpcError as e:
                    failures.append((e.code(), e.details()))
                    continue
                assert len(r.items) == 10
                versions[r.model.version] += 1
                i += 8

        clients = [asyncio.ensure_future(client(i)) for i in range(8)]
        v = registry.current_version("recommender")
        folder = registry.version_dir("recommender", v)
        for n in (2, 3):  # the same trained files as new versions: every load runs the full preparation
            # the version before answers its share of the load first
            await until(lambda: versions[str(n - 1)] >= 20, f"version {n - 1} to answer")
            await asyncio.to_thread(reg.publish, "recommender", folder / "model.onnx",
                                    registry.manifest("recommender", v).signature,
                                    extra=registry.manifest("recommender", v).extra,
                                    extra_files=[folder / f for f in VERSION_FILES])
        await until(lambda: versions["3"] >= 20, "version 3 to answer")
        stop.set()
        await asyncio.gather(*clients)
        assert failures == []
        assert versions["3"] > 0 and versions["1"] > 0, versions
    finally:
        await channel.close()
        await app.stop()
    shutil.rmtree(tmp_path / "registry", ignore_errors=True)
