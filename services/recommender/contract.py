"""What a recommender model version must be to be served: its manifest's extras and its outputs
(checked at load: a version that fails is refused and the old one keeps serving), and the
shape of the id lists its graph takes (restrict/exclude/explore rows, padded with -1 to a few
widths so requests of different lengths batch together)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from shared.registry import Manifest

MIN_BUCKET = 64  # smallest padded width of a non-empty restrict/exclude list


def bucket(n: int, empty: int = 1) -> int:
    """Padded width for n ids: `empty` for none, else MIN_BUCKET x a power of 4 (64, 256,
    1024, ...). Few widths -> requests batch together; padding costs the graph O(width) per
    row, nothing next to scoring the catalog."""
    if n <= 0:
        return empty
    width = MIN_BUCKET
    while width < n:
        width *= 4
    return width


def padded(rows: Sequence[int], empty: int = 1, at_least: int = 1) -> np.ndarray:
    out = np.full((1, max(at_least, bucket(len(rows), empty))), -1, np.int64)
    out[0, : len(rows)] = rows
    return out


def check_manifest(manifest: Manifest) -> str | None:
    e = manifest.extra
    for key in ("history_len", "item_vector_dim"):
        if not isinstance(e.get(key), int) or e[key] < 1:
            return f"extra.{key} must be a positive integer"
    for key in ("pages", "devices"):
        if not isinstance(e.get(key), list) or not all(isinstance(x, str) for x in e[key]):
            return f"extra.{key} must be a list of strings"
    return None


def check_outputs(outputs: Mapping[str, np.ndarray]) -> str | None:
    for name in ("click", "purchase"):
        p = outputs[name]
        if (p < 0).any() or (p > 1).any():
            return f"{name} probability outside [0, 1]"
    return None
