"""Which not-yet-learned items a customer's exploration slot ranks: the ones whose titles are
closest to what the customer interacted with.

A brand-new item has no id row and no sales: the version scores it on its content alone, and
that score's personalisation varies with the training's random draws. Ranking every unlearned
item by it, the slot showed the matching new item to 161 of 233 one-kind customers of the
cold-start test with one seed and to 47 with another (bench.cold_start --seed). The title
embedding (the sentence encoder's, which no training moves) does not: the mean of the
customer's history titles picks an item of the customer's kind of shop for 218 of the 233.
The version's graph still shortlists and scores the candidates (score and probabilities in
the answer): its content score's best EXPLORE_SHORTLIST, among which the titles pick; a
customer without a history gets the content score's best. Past EXPLORE_POOL unlearned items, a
request's exploration ranks a uniform draw of EXPLORE_POOL of them (explore_pool).

The exploration is scored by the version's graph in one of two ways, the same scores either way
(tests/test_explore_run.py): a run of its own over a catalog matrix of only the rows it reads
(explore_inputs: the candidates and the history's items), or a second row of the request's run
over the whole catalog (with_explore_row). The service picks by load (RecommenderService.infer).
"""
from __future__ import annotations

import functools

import numpy as np
from prometheus_client import Counter

from services.recommender.contract import padded
from services.recommender.item_index import find_sorted

# The graph's content score shortlists this many unlearned items for the titles to pick from:
# comparing 64 titles costs nothing, while comparing every unlearned item's would cost 7 ms a
# request on a catalog grown by 90k upserted items (numpy, one core)
EXPLORE_SHORTLIST = 64
# The exploration run's candidates: every unlearned item while there are at most EXPLORE_POOL of
# them (a day's new items, until the next round learns them), else a uniform draw of
# EXPLORE_POOL a request, so each keeps its chance over requests. The run's restrict input and
# its catalog matrix hold them (explore_inputs). When the exploration was a second row of the
# request's run, whose batch takes its widest restrict, the whole set of 90k upserted items
# (restrict 262,144 wide) took a Recommend to 11.9 ms at p50 against 2.7 ms without it
# (bench.recommender_serving). A bounded pool bounds the cost of every request.
EXPLORE_POOL = 4096

_RUNS = Counter("storefront_recommender_explorations_total",
                "Requests with an exploration slot, by how the graph scored it: own_run (explore_inputs, "
                "idle or unbatched) or second_row (with_explore_row, runs queued)", ["how"])
EXPLORATIONS = {True: _RUNS.labels("own_run"), False: _RUNS.labels("second_row")}  # by "its own run?"


def explore_pool(unlearned: np.ndarray, rng: np.random.Generator, pool: int = EXPLORE_POOL) -> np.ndarray:
    """The exploration's candidate rows, ascending and distinct as `unlearned` is (explore_inputs
    needs both): `unlearned` itself when it holds at most `pool`, else `pool` of them drawn
    uniformly without replacement."""
    if len(unlearned) <= pool:
        return unlearned
    return unlearned[np.sort(rng.choice(len(unlearned), pool, replace=False, shuffle=False))]


def closest_titles(history: np.ndarray, candidates: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) into `candidates` [C, D] of the n title embeddings with the highest
    cosine to the mean of the `history` [H, D] embeddings (each at unit length). Every index when C <= n
    or the history is empty (nothing to be close to: the graph's content score ranks them)."""
    if len(candidates) <= n or len(history) == 0:
        return np.arange(len(candidates), dtype=np.int64)
    if n <= 0:
        return np.zeros(0, np.int64)
    h = history / np.maximum(np.linalg.norm(history, axis=1, keepdims=True), 1e-12)
    c = candidates / np.maximum(np.linalg.norm(candidates, axis=1, keepdims=True), 1e-12)
    sims = c @ h.mean(0)
    return np.sort(np.argpartition(-sims, n - 1)[:n]).astype(np.int64)


@functools.lru_cache(maxsize=16)
def _every_row(n: int) -> np.ndarray:
    """padded(0..n-1), read only: the exploration run's restrict (its candidates come first)."""
    out = padded(np.arange(n, dtype=np.int64))
    out.flags.writeable = False
    return out


def explore_inputs(feeds: dict[str, np.ndarray], vectors: np.ndarray, candidates: np.ndarray, k: int
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """(feeds, shared inputs, rows) of the exploration as a run of its own: the request's user,
    context and history (`feeds`, one row, catalog rows) ranking only `candidates` (catalog rows,
    ascending and distinct: explore_pool), its best k, over `vectors[rows]`, with rows the
    candidates, then the history's items that are not among them. Every row index in the feeds
    is remapped into rows; `rows[i]` is the catalog row of the run's item i. An item's score is
    what the whole catalog's run gives it: the graph reads item vectors only at the history's
    rows and the scored ones (tests/test_explore_run.py). Binary searches and one gather, about
    0.08 ms for 4,096 candidates (np.unique and np.isin over them took 1 ms)."""
    history, exclude = feeds["history"], feeds["exclude"]
    n = len(candidates)
    held = history >= 0
    items, inverse = np.unique(history[held], return_inverse=True)
    at, among = find_sorted(candidates, items)
    # a history item among the candidates is read where it is scored: its repeat term lands there
    place = np.where(among, at, n + np.cumsum(~among) - 1)
    remapped = np.full_like(history, -1)
    remapped[held] = place[inverse]
    rows = np.concatenate([candidates, items[~among]])
    ex_at, excluded = find_sorted(candidates, exclude[exclude >= 0])
    run = {"user": feeds["user"], "context": feeds["context"], "history": remapped,
           "k": np.array([[k]], np.int64), "restrict": _every_row(n), "exclude": padded(ex_at[excluded])}
    return run, {"item_vectors": vectors.take(rows, axis=0)}, rows


def with_explore_row(feeds: dict[str, np.ndarray], explore: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The request's feeds (one row) with a second row for the exploration: the same user,
    history and context, ranking only `explore` (catalog rows, padded), its best k. Both rows
    share one restrict width (-1 padding: the first row stays as it was)."""
    width = max(explore.shape[1], feeds["restrict"].shape[1])
    restrict = np.full((2, width), -1, np.int64)
    restrict[0, :feeds["restrict"].shape[1]] = feeds["restrict"][0]
    restrict[1, :explore.shape[1]] = explore[0]
    out = {name: np.repeat(a, 2, axis=0) for name, a in feeds.items() if name != "restrict"}
    out["restrict"] = restrict
    out["k"][1, 0] = k
    return out
