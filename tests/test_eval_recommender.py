"""The recommender eval's baselines against hand-computed cases and brute force, and the whole
eval on a small real Ta Feng slice: every method scored on the same (customer, day)s, the
model's rankings served by the versions the production rounds published."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench.eval_recommender import (BASELINES, METHODS, Purchases, TifuKnn, buy_again_days, buy_again_recency, fill,
                                    main, popularity_order, tifu_vector, top_from_scores)
from tests.recommender_fixtures import exported_text_encoder


def test_buy_again_counts_distinct_days_not_lines():
    """Three lines of item 1 in one basket count one day; item 2 bought on two days ranks first."""
    p = Purchases(n_items=5)
    p.add_day(0, np.array([7, 7, 7, 7]), np.array([1, 1, 1, 2]))
    p.add_day(3, np.array([7]), np.array([2]))
    assert p.days[7] == {1: [0], 2: [0, 3]}
    assert p.baskets[7] == [(0, [1, 2]), (3, [2])]
    pop = p.popularity(4)
    assert pop.tolist() == [0, 3, 2, 0, 0]  # purchase lines of days 0..3
    assert buy_again_days(p.days[7], pop) == [2, 1]
    # recency: one purchase yesterday beats one 3 days earlier; ties broken by popularity
    p.add_day(4, np.array([8, 8]), np.array([3, 4]))
    p.add_day(5, np.array([8]), np.array([0]))
    assert buy_again_recency(p.days[8], p.popularity(6), 6, tau=7.0) == [0, 3, 4]


def test_popularity_is_the_seven_days_before():
    p = Purchases(n_items=3)
    p.add_day(0, np.array([1]), np.array([0]))
    p.add_day(5, np.array([1, 2]), np.array([1, 1]))
    p.add_day(8, np.array([1]), np.array([2]))
    assert p.popularity(8).tolist() == [0, 2, 0]  # days 1..7: day 0 is too old, day 8 not yet
    assert popularity_order(p.popularity(9)).tolist() == [1, 2]
    assert p.popularity(0).tolist() == [0, 0, 0]


def test_fill_and_top_from_scores_exclude_and_never_repeat():
    order = np.array([4, 3, 2, 1, 0])
    assert fill([1, 2], order, k=4) == [1, 2, 4, 3]
    assert fill([1, 2], order, exclude={1, 4}, k=3) == [2, 3, 0]
    scores = np.array([0.0, 0.5, 0.5, 0.9, 0.0])
    pop = np.array([0, 1, 7, 0, 3])
    allowed = np.array([True, True, True, False, True])  # item 3 is not on sale
    on_sale_order = np.array([4, 2, 1, 0])  # popularity only ranks items sold lately: on sale
    assert top_from_scores(scores, pop, on_sale_order, frozenset(), allowed, k=4) == [2, 1, 4, 0]  # 1-2 tie: popularity
    assert top_from_scores(scores, pop, on_sale_order, {2}, allowed, k=2) == [1, 4]


def test_tifu_vector_follows_the_authors_formula():
    # fewer baskets than groups: one basket per group; basket j (of n) weighs r_b^(n-1-j) x r_g^(G-1-j) / n
    rb, rg, G = 0.9, 0.7, 7
    v = tifu_vector([[1], [1, 2], [3]], rb, rg, G)
    want = {1: (rb ** 2 * rg ** 6 + rb * rg ** 5) / 3, 2: rb * rg ** 5 / 3, 3: rg ** 4 / 3}
    assert v.keys() == want.keys() and all(v[i] == pytest.approx(want[i]) for i in want)
    # 5 baskets in 2 groups (3 + 2, the first groups take the remainder): group means, group decay
    baskets = [[0], [0], [1], [1], [2]]
    v = tifu_vector(baskets, rb, rg, 2)
    w = [rb ** (4 - j) for j in range(5)]
    want = {0: rg * (w[0] + w[1]) / 3 / 2, 1: (rg * w[2] / 3 + w[3] / 2) / 2, 2: w[4] / 2 / 2}
    assert all(v[i] == pytest.approx(want[i]) for i in want)


def test_tifu_knn_scores_match_a_dense_brute_force():
    rng = np.random.default_rng(3)
    n_users, n_items, k, alpha = 40, 25, 5, 0.7
    p = Purchases(n_items)
    for day in range(12):
        buyers = rng.choice(n_users, size=15, replace=False)
        customers = np.repeat(buyers, rng.integers(1, 6, size=len(buyers)))
        p.add_day(day, customers, rng.integers(0, n_items, size=len(customers)))
    tifu = TifuKnn(n_items, k=k, within_decay=0.9, group_decay=0.7, alpha=alpha, group_count=3)
    tifu.update(p, list(p.baskets))
    users = sorted(p.baskets)
    dense = np.zeros((len(users), n_items))
    for n, c in enumerate(users):
        for i, x in tifu_vector([b for _, b in p.baskets[c]], 0.9, 0.7, 3).items():
            dense[n, i] = x
    got = tifu.scores(users, chunk=7)
    checked = 0
    for n in range(len(users)):
        d = np.sqrt(((dense - dense[n]) ** 2).sum(1))
        order = np.argsort(d, kind="stable")
        if np.isclose(d[order[k - 1]], d[order[k]]):
            continue  # a tie at the k-th neighbour: either choice is right
        want = alpha * dense[n] + (1 - alpha) * dense[order[:k]].mean(0)
        np.testing.assert_allclose(got[n], want, atol=1e-9)
        checked += 1
    assert checked >= 20


@pytest.mark.timeout(1200)  # two production rounds (export, parity, latency on a 100k catalog): minutes on 2 busy cores
@pytest.mark.long
def test_the_eval_on_a_small_ta_feng_slice(tmp_path):
    """First ~6 days of Ta Feng, the last 2 evaluated: the production bootstrap, a round a day,
    the model served from the registry's versions; every method on the same pairs."""
    out = tmp_path / "eval.json"
    assert main(["--lines", "40000", "--days", "2", "--max-customers", "40", "--bootstrap-epochs", "1",
                 "--resamples", "200", "--tau-grid", "7,30", "--out", str(out)],
                text_encoder=exported_text_encoder()) == 0
    r = json.loads(out.read_text())
    res = r["results"]
    assert set(r["protocol"]["customers_per_day"]) == {40}
    for v in ("all", "exclude-bought"):
        ns = {res[f"{m}/{v}"]["n"] for m in METHODS}
        assert len(ns) == 1 and ns.pop() > 0, (v, ns)
    assert res["model/all"]["n"] == 80
    for m in METHODS:
        assert 0.0 <= res[f"{m}/all"]["hr@10"] <= 1.0 and 0.0 <= res[f"{m}/all"]["ndcg@10"] <= res[f"{m}/all"]["hr@10"]
    rounds = r["rounds"]
    assert [x["served_by"] for x in rounds][0] == "1"
    assert all(x["decision"] in ("published", "refused", "deferred") for x in rounds)
    if rounds[0]["decision"] == "published":  # the next day is served by what the round published
        assert rounds[1]["served_by"] == rounds[0]["version"]
    c = r["comparison"]["all"]
    assert c["strongest_baseline"] in BASELINES and c["units"] == 80
    assert c["ratio_interval"][0] <= c["ratio"] <= c["ratio_interval"][1]
    assert r["comparison"]["exclude-bought"]["strongest_baseline"] in ("popularity", "tifu-knn")
    # the bootstrap's version ranked the same pairs; on the first day it is the one served
    f = r["ablations"]["bootstrap-frozen"]["all"]
    assert f["units"] == 80 and f["ablation_hr@10"] == res["bootstrap-frozen/all"]["hr@10"]
    assert set(r["ablations"]) == {"bootstrap-frozen", "bootstrap-fresh-sales"}
    # (batched differently: a last-bit tie may flip one customer's list)
    first = str(rounds[0]["day"])
    assert abs(res["bootstrap-frozen/all"]["hr@10_by_day"][first] - res["model/all"]["hr@10_by_day"][first]) <= 1 / 40


def test_a_day_comes_back_as_the_rows_the_service_would_have_recorded():
    """joined_day -> the domain's examples(): one row per distinct item bought, the customer's
    user code, the history as served, the day of the purchase, level purchase."""
    from bench.eval_recommender import joined_day
    from trainer.domains.recommender import RecommenderModel
    from trainer.domains.recommender_data import COL_DAY, COL_HIST, COL_ITEM, COL_POSITION, COL_USER, LEVEL_PURCHASE

    def titles_as_vectors(texts):  # the text path is not under test here: one fixed vector per title
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=384) for t in texts]).astype(np.float32)

    model = RecommenderModel(encoder=titles_as_vectors)
    model.add_catalog([{"item_id": f"p{i}", "title": f"product {i}", "category": "c", "price": 1.0 + i}
                       for i in range(6)])
    day = 11_354  # 2001-02-01
    joined, end = joined_day(day, ["alice", "bob"], [["p1", "p2"], ["p3"]], [["p5", "p4"], []],
                             [(["p1", "p0"], [0.4, 0.3]), (["p0"], [0.2])], "7", first_offset=10)
    assert end == 10 + 2 + 3  # one served prediction and one outcome per item bought, each an offset
    ex = model.examples(joined)
    assert len(ex) == 3 and (ex.y == LEVEL_PURCHASE).all()
    users = [model.state.users[int(u) - 1] for u in ex.X[:, COL_USER]]
    items = [model.state.items[int(i) - 1] for i in ex.X[:, COL_ITEM]]
    assert list(zip(users, items)) == [("alice", "p1"), ("alice", "p2"), ("bob", "p3")]
    assert (ex.X[:, COL_DAY] == day).all()
    alice_hist = [model.state.items[int(h) - 1] for h in ex.X[0, COL_HIST:COL_POSITION] if h > 0]
    assert alice_hist == ["p5", "p4"] and (ex.X[2, COL_HIST:COL_POSITION] == -1).all()
    np.testing.assert_allclose(ex.served_p, [0.4, np.nan, np.nan])  # p1 was served with click 0.4
