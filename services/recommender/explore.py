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
request's row ranks a uniform draw of EXPLORE_POOL of them (explore_pool).
"""
from __future__ import annotations

import numpy as np

# The graph's content score shortlists this many unlearned items for the titles to pick from:
# comparing 64 titles costs nothing, while comparing every unlearned item's would cost 7 ms a
# request on a catalog grown by 90k upserted items (numpy, one core)
EXPLORE_SHORTLIST = 64
# The exploration row's candidates: every unlearned item while there are at most EXPLORE_POOL of
# them (a day's new items, until the next round learns them), else a uniform draw of
# EXPLORE_POOL a request, so each keeps its chance over requests. The row's restrict input
# carries them, and every row of a batch takes the widest restrict of the batch: with the whole
# set of 90k upserted items (restrict 262,144 wide) a Recommend took 11.9 ms at p50 against
# 2.7 ms with no exploration row (bench.recommender_serving), and a batch of 32 as long as 32 of
# them. A bounded pool bounds the cost of every request.
EXPLORE_POOL = 4096


def explore_pool(unlearned: np.ndarray, rng: np.random.Generator, pool: int = EXPLORE_POOL) -> np.ndarray:
    """The exploration row's candidate rows: `unlearned` itself when it holds at most `pool`,
    else `pool` of them drawn uniformly (with replacement: a repeated row is ranked once)."""
    if len(unlearned) <= pool:
        return unlearned
    return unlearned[rng.integers(0, len(unlearned), pool)]


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
