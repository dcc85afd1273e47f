"""Recommender departments over real gRPC (a real ONNX version of the model contract, the real
sentence encoder): two catalogs upserted into two departments beside the version's own catalog
(the default department ""); requests scoped to departments never return another department's
item, for known, unknown and anonymous users (the popularity fallback), with candidates and
exclusions; an unscoped request keeps ranking everything; a moved item follows its new
department; the journal keeps departments across a restart; the new fields are validated.
The exploration slot respects the scope and ends once a published version knows the items."""
from __future__ import annotations

import grpc
import pytest

from protos.recommender.v1 import recommender_pb2 as pb
from shared.registry import ModelRegistry
from tests.reco_onnx import publish_contract_version
from tests.recommender_fixtures import RunningRecommender, exported_text_encoder, recommender_test_settings
from trainer.text_encoder import publish_text_encoder

GROCERY = [("Organic whole milk 1 litre", "dairy"), ("Semi-skimmed milk 2 litres", "dairy"),
           ("Greek yoghurt 500 g", "dairy"), ("Green tea bags, 80 pack", "drinks"),
           ("Dark roast coffee beans 500 g", "drinks"), ("Cheddar cheese, mature, 400 g", "dairy")]
CATALOG = [{"item_id": f"sku-{i}", "title": t, "category": c, "price": 1.0 + i} for i, (t, c) in enumerate(GROCERY)]
USERS = {"alice": ["sku-0", "sku-1", "sku-2"], "bob": ["sku-3", "sku-4"]}
FILMS = [pb.Item(item_id=f"film-{i}", title=t, category=c, price=9.99, department="films") for i, (t, c) in enumerate([
    ("The Godfather (1972)", "crime"), ("Casablanca (1942)", "romance"), ("Alien (1979)", "science fiction"),
    ("Spirited Away (2001)", "animation"), ("Heat (1995)", "crime"), ("Amelie (2001)", "comedy"),
    ("The Matrix (1999)", "science fiction")])]
GARDEN = [pb.Item(item_id=f"garden-{i}", title=t, category="garden", price=20.0 + i, department="garden")
          for i, t in enumerate(["Garden hose, 25 m", "Terracotta plant pot 30 cm", "Pruning shears",
                                 "Lawn fertiliser 5 kg"])]
DEPARTMENT_OF = {**{c["item_id"]: "" for c in CATALOG}, **{it.item_id: it.department for it in FILMS + GARDEN}}
WHO = ["alice", "bob", "someone-new", ""]  # known users, an unknown one and an anonymous visitor


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("departments")
    registry = ModelRegistry(root / "registry")
    publish_text_encoder(registry, exported=exported_text_encoder())
    publish_contract_version(registry, root / "v1", CATALOG, USERS, dim=16, seed=3)
    return root, registry


def ids(resp) -> list[str]:
    return [it.item_id for it in resp.items]


async def recommend(stub, user: str, k: int = 200, **kw):
    return await stub.Recommend(pb.RecommendRequest(user_id=user, k=k, context=pb.Context(hour_of_day=10), **kw))


async def test_scoped_requests_never_cross_departments(world):
    root, registry = world
    async with RunningRecommender(recommender_test_settings(root, registry, "scoped")) as stub:
        first = await stub.UpsertItems(pb.UpsertItemsRequest(items=FILMS))
        assert (first.inserted, first.catalog_size) == (len(FILMS), len(CATALOG) + len(FILMS))
        await stub.UpsertItems(pb.UpsertItemsRequest(items=GARDEN))
        for user in WHO:
            everything = await recommend(stub, user)
            # no scope: today's behaviour, the whole catalog ranked
            assert sorted(ids(everything)) == sorted(DEPARTMENT_OF), user
            assert everything.fallback == (user not in USERS)
            for scope in (["films"], [""], ["garden"], ["films", "garden"], ["garden", ""]):
                resp = await recommend(stub, user, departments=scope)
                assert sorted(ids(resp)) == sorted(i for i, d in DEPARTMENT_OF.items() if d in scope), (user, scope)
                assert resp.fallback == everything.fallback
                # a short list is the unscoped ranking's order within the scope (model and fallback alike)
                top3 = await recommend(stub, user, k=3, departments=scope)
                assert ids(top3) == [i for i in ids(everything) if DEPARTMENT_OF[i] in scope][:3], (user, scope)
            # candidates from several departments: only those in scope are ranked
            mixed = ["sku-0", "film-1", "garden-2", "film-4", "sku-5"]
            resp = await recommend(stub, user, departments=["films"], candidate_item_ids=mixed)
            assert sorted(ids(resp)) == ["film-1", "film-4"]
            # an unknown department holds nothing: an empty answer, not another department's items
            assert ids(await recommend(stub, user, departments=["toys"])) == []
            resp = await recommend(stub, user, departments=["toys"], candidate_item_ids=mixed)
            assert ids(resp) == []
        # exclusions apply inside the scope: alice bought sku-0..2, all in the default department
        resp = await recommend(stub, "alice", departments=[""], exclude_purchased=True)
        assert sorted(ids(resp)) == ["sku-3", "sku-4", "sku-5"]
        # replacing an item with another department moves it
        moved = pb.Item(item_id="film-2", title=FILMS[2].title, category="science fiction", price=9.99,
                        department="garden")
        await stub.UpsertItems(pb.UpsertItemsRequest(items=[moved]))
        films = ids(await recommend(stub, "", departments=["films"]))
        assert "film-2" not in films and len(films) == len(FILMS) - 1
        assert "film-2" in ids(await recommend(stub, "", departments=["garden"]))
    # a restart replays the journal: departments (and the move) survive
    async with RunningRecommender(recommender_test_settings(root, registry, "scoped")) as stub:
        for user in WHO:
            garden = ids(await recommend(stub, user, departments=["garden"]))
            assert sorted(garden) == sorted([it.item_id for it in GARDEN] + ["film-2"])
            default = ids(await recommend(stub, user, departments=[""]))
            assert sorted(default) == sorted(c["item_id"] for c in CATALOG)


async def test_department_fields_are_validated(world):
    root, registry = world
    async with RunningRecommender(recommender_test_settings(root, registry, "validate")) as stub:
        bad = [(dict(departments=["d"] * 17), "departments has 17 names; at most 16"),
               (dict(departments=["films", "x" * 65]), "departments[1] is longer than 64 characters")]
        for fields, words in bad:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await recommend(stub, "alice", **fields)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()
        ok = await recommend(stub, "alice", departments=["d"] * 16)  # the bound itself is allowed
        assert ids(ok) == []
        item = pb.Item(item_id="film-x", title="Metropolis (1927)", price=5.0, department="f" * 65)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.UpsertItems(pb.UpsertItemsRequest(items=[FILMS[0], item]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "items[1].department is longer than 64 characters" in e.value.details()
        item.department = "f" * 64
        assert (await stub.UpsertItems(pb.UpsertItemsRequest(items=[item]))).inserted == 1
        assert ids(await recommend(stub, "", departments=["f" * 64])) == ["film-x"]


async def test_the_exploration_slot_ends_when_a_version_learns_the_items(tmp_path):
    """While the serving version has no id for upserted items, every answer of k = 10 holds one
    of them (the slot, or the ranking itself) and only within the request's scope; once a
    version that knows them is published (what the loop's next round does), the slot stops:
    no second graph row, nothing counted as explored."""
    from prometheus_client import REGISTRY

    from tests.server_harness import until

    def explored() -> float:
        return REGISTRY.get_sample_value("storefront_recommender_explored_items_total") or 0.0

    registry = ModelRegistry(tmp_path / "registry")
    publish_text_encoder(registry, exported=exported_text_encoder())
    shop = [{"item_id": f"sku-{i}", "title": f"{t}, pack of {n}", "category": c, "price": 1.0 + n}
            for i, ((t, c), n) in enumerate((g, n) for g in GROCERY for n in (1, 2, 4, 6, 12))]
    users = {f"u{i}": [shop[(i * 7 + j) % len(shop)]["item_id"] for j in range(4)] for i in range(8)}
    publish_contract_version(registry, tmp_path / "v1", shop, users, dim=16, seed=5)
    new = [{"item_id": f"film-{i}", "title": it.title, "category": it.category, "price": it.price}
           for i, it in enumerate(FILMS[:3])]
    async with RunningRecommender(recommender_test_settings(tmp_path, registry, "explore")) as stub:
        await stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(**n, department="films") for n in new]))
        new_ids = {n["item_id"] for n in new}
        before = explored()
        for user in [*users, "someone-new", ""]:
            top = ids(await recommend(stub, user, k=10))
            assert len(top) == 10 and len(new_ids & set(top)) >= 1, (user, top)
            scoped = ids(await recommend(stub, user, k=10, departments=[""]))
            assert not new_ids & set(scoped)  # the new items are outside this scope: no slot for them
        assert explored() > before
        # the next version knows the new items: nothing left to explore
        publish_contract_version(registry, tmp_path / "v2", shop + new, users, dim=16, seed=6)
        await until(lambda: stub_version_is(stub, "2"), "version 2 to serve")
        before = explored()
        for user in [*users, "someone-new", ""]:
            assert len(ids(await recommend(stub, user, k=10))) == 10
        assert explored() == before


async def stub_version_is(stub, version: str) -> bool:
    return (await recommend(stub, "", k=1)).model.version == version
