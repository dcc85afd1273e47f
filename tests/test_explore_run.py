"""The exploration as a run of its own (services.recommender.explore.explore_inputs, over a
catalog matrix of only the rows it reads) and as a second row of the request's run over the whole
catalog (with_explore_row), through the version's real scoring graph, must rank alike: the same
items, scores and probabilities, the history's repeat term and the exclusions included."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from services.recommender.contract import padded
from services.recommender.explore import explore_inputs, with_explore_row
from tests.recommender_fixtures import bootstrap_small_recommender


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    registry, _, _ = bootstrap_small_recommender(tmp_path_factory.mktemp("explore-run"))
    version = registry.current_version("recommender")
    manifest = registry.manifest("recommender", version)
    session = ort.InferenceSession(str(registry.version_dir("recommender", version) / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return session, manifest.extra["history_len"], manifest.extra["item_vector_dim"]


def ranked(outputs, rows=None):
    items, score, click, purchase = outputs
    keep = np.isfinite(score[0])
    got = items[0][keep] if rows is None else rows[items[0][keep]]
    return got, score[0][keep], click[0][keep], purchase[0][keep]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_exploration_run_ranks_as_the_whole_catalog_does(graph, seed):
    session, history_len, dim = graph
    rng = np.random.default_rng(seed)
    n = 5000
    vectors = rng.normal(0, 0.5, (n, dim)).astype(np.float32)
    candidates = np.sort(rng.choice(n, 400, replace=False))  # ascending, distinct: as explore_pool gives them
    # a history that holds some candidates (their repeat term) and repeats one item
    held = np.concatenate([candidates[[7, 2, 300, 5, 0]], rng.integers(0, n, 12), candidates[[2]]])
    history = np.full((1, history_len), -1, np.int64)
    history[0, :len(held)] = held
    excluded = np.concatenate([candidates[[9, 1, 120, 33]], rng.integers(0, n, 6)])
    # the request's own row: k 10, no restrict
    feeds = {"user": np.array([[1]], np.int64), "history": history, "context": np.array([[1, 1, 20]], np.int64),
             "k": np.array([[10]], np.int64), "restrict": padded([]),
             "exclude": padded(excluded, empty=64, at_least=64)}
    # the exploration as the second row of the request's run, over the whole catalog
    both = session.run(None, {**with_explore_row(feeds, padded(candidates), 64), "item_vectors": vectors})
    whole = ranked([o[1:] for o in both])
    alone = ranked(session.run(None, {**feeds, "item_vectors": vectors}))
    # the first row is the request's (its top 10: the run returns the batch's largest k for every row)
    assert ranked([o[:1] for o in both])[0][:10].tolist() == alone[0].tolist()

    # the exploration as a run of its own, over only the rows it reads
    run, shared, rows = explore_inputs(feeds, vectors, candidates, 64)
    assert len(rows) <= len(candidates) + len(held)
    part = ranked(session.run(None, {**run, **shared}), rows)

    assert len(whole[0]) == 64
    assert whole[0].tolist() == part[0].tolist()
    for a, b in zip(whole[1:], part[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not set(part[0].tolist()) & set(excluded.tolist())
    assert set(part[0].tolist()) <= set(candidates.tolist())
    assert set(part[0].tolist()) & set(held[:5].tolist())  # the history's candidates rank (repeat term)
