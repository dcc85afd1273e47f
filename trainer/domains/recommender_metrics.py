"""Recommender domain, trainer side: the metrics its gate and reports compute (HR/NDCG of
single target items, click log loss and calibration error), and the V2 BYTES tensor decoder
its parity checks read item ids with."""
from __future__ import annotations

import numpy as np


def ranking_metrics(rank: np.ndarray, k: int = 10) -> dict[str, float]:
    """HR@k and NDCG@k of single target items given their 0-based ranks."""
    if len(rank) == 0:
        return {f"hr@{k}": float("nan"), f"ndcg@{k}": float("nan")}
    hit = rank < k
    return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean())}


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan")


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE: the row-weighted mean over 10 equal-width probability bins of |mean p - observed rate|."""
    y, p = np.asarray(y, np.float64), np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    if len(y) == 0:
        return float("nan")
    b = np.minimum((p * bins).astype(np.int64), bins - 1)
    n = np.bincount(b, minlength=bins)
    gap = np.abs(np.bincount(b, p, bins) - np.bincount(b, y, bins))  # per bin: n x |mean p - rate|
    return float(gap.sum() / n.sum())


def decode_bytes_tensor(t) -> list[str]:
    """A V2 BYTES tensor (4-byte little-endian length, then the bytes, per element) as strings."""
    raw, out, pos = t.raw_data, [], 0
    while pos + 4 <= len(raw):
        n = int.from_bytes(raw[pos:pos + 4], "little")
        out.append(raw[pos + 4:pos + 4 + n].decode("utf-8", "replace"))
        pos += 4 + n
    return out
