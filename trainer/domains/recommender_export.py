"""Recommender export: item_tower.onnx (the item tower alone) and model.onnx (the scoring graph),
ONNX Runtime runs and the parity measure of two scoring runs."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from trainer.domains.recommender_data import DEVICES, HISTORY_LEN, PAGES
from trainer.domains.recommender_net import ItemTowerExport, RecoDims, RecoNet, ScoringExport
from trainer.export import declare_input_ranges, torch_to_onnx

ITEM_TOWER_FILE = "item_tower.onnx"


def export_onnx(model, net: RecoNet, path):
    """model.onnx at path and item_tower.onnx beside it; the catalog matrix of this
    version is kept for the parity and latency checks (signature_inputs)."""
    from shared.runtime.signature import signature_of_onnx

    path = Path(path)
    net.eval()
    # the popularity the served item vectors carry: recent sales as of the day after the
    # latest known sale (a fresh version every round keeps it current)
    day = model.export_day()
    with torch.no_grad():
        table = torch.from_numpy(model.state.popularity([day])[day])
        net.popularity.zero_()
        net.popularity[:len(table)] = table[:len(net.popularity)]
    model._exported = {"popularity_day": day}
    tower_path = path.parent / ITEM_TOWER_FILE
    tower = ItemTowerExport(net).eval()
    f = model._feature_tensors()
    n = max(1, model.state.n_items)
    codes = torch.arange(1, n + 1).clamp(max=model.state.n_items)
    tower_feeds = {"item": codes.unsqueeze(1).numpy(), "text": f["text_emb"][f["text"][codes]].numpy(),
                   "category": f["category"][codes].unsqueeze(1).numpy(),
                   "price": f["price"][codes].unsqueeze(1).numpy()}
    _export(tower, {k: torch.from_numpy(v[:7]) for k, v in tower_feeds.items()}, ["item_vector"], tower_path,
            {k: {0: "items"} for k in tower_feeds})
    with torch.no_grad():
        catalog = tower(*(torch.from_numpy(v) for v in tower_feeds.values())).numpy()
    tower_diff = _max_abs(_ort_run(tower_path, tower_feeds)[0], catalog)
    scoring = ScoringExport(net).eval()
    example = _scoring_example(catalog[:97] if len(catalog) >= 97 else _pad_rows(catalog, 97), model.dims)
    _export(scoring, example, ["items", "score", "click", "purchase"], path,
            {"user": {0: "batch"}, "history": {0: "batch"}, "context": {0: "batch"}, "k": {0: "batch"},
             "restrict": {0: "batch", 1: "restrict"}, "exclude": {0: "batch", 1: "exclude"},
             "item_vectors": {0: "catalog"}}, compare=scoring_parity)
    declare_input_ranges(path, scoring_input_ranges(net))
    model._exported.update({"catalog": catalog, "tower_parity": tower_diff, "folder": path.parent,
                           "signature": signature_of_onnx(path)})
    return path, scoring


# ---- export helpers ----
def _export(module: nn.Module, example: dict[str, torch.Tensor], outputs: list[str], path: Path,
            dynamic: dict[str, dict[int, str]], compare=None) -> Path:
    import warnings

    import onnx

    dims: dict[str, torch.export.Dim] = {}
    shapes = {}
    for name, axes in dynamic.items():
        shapes[name] = {}
        for axis, dim_name in axes.items():
            if dim_name not in dims:
                dims[dim_name] = torch.export.Dim(dim_name, min=1, max=1 << 24)
            shapes[name][axis] = dims[dim_name]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        torch_to_onnx(module, tuple(example.values()), list(example), outputs, path,
                      {k: shapes.get(k, {}) for k in example}, compare=compare)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def scoring_input_ranges(net: RecoNet) -> dict[str, tuple[int, int]]:
    """The ids the scoring graph's index inputs may take (declared in model.onnx): user codes
    up to the user table's capacity (0 = unknown), context codes (page, device, hour) up to the
    largest of the three vocabularies. history/restrict/exclude hold rows of the catalog
    matrix the request itself brings (its size is not known at export), and the graph masks
    rows outside it, so they have no static range; k is clamped by the graph."""
    return {"user": (0, net.user_capacity), "context": (0, max(len(PAGES), len(DEVICES), 23))}


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    reps = int(math.ceil(n / max(1, len(a))))
    return np.concatenate([a] * reps)[:n] if len(a) else np.zeros((n, a.shape[1]), np.float32)


def _scoring_example(catalog: np.ndarray, dims: RecoDims) -> dict[str, torch.Tensor]:
    """Example inputs for the exporter: every dynamic axis a distinct size, none 1."""
    b, n = 3, len(catalog)
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(-1, n, (b, HISTORY_LEN), generator=g)
    return {"user": torch.tensor([[1], [0], [2]]), "history": hist,
            "context": torch.tensor([[1, 2, 10], [0, 0, 0], [3, 1, 23]]), "k": torch.tensor([[5], [10], [2]]),
            "restrict": torch.tensor([[-1] * 5, [1, 2, 3, -1, -1], [-1] * 5]),
            "exclude": torch.tensor([[4, -1, -1, -1], [-1] * 4, [0, 1, -1, -1]]),
            "item_vectors": torch.from_numpy(np.ascontiguousarray(catalog, np.float32))}


def _ort_session(path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_run(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _ort_session(path).run(None, dict(feeds))


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def scoring_parity(got: Sequence[np.ndarray], want: Sequence[np.ndarray], tie_tol: float = 1e-4) -> float:
    """Parity of (items, score, click, purchase) from two runs: inf when the filtered (-inf)
    entries differ or an item differs without a score tie; else the max abs difference of
    scores and probabilities at finite entries."""
    items_a, score_a, click_a, buy_a = got
    items_b, score_b, click_b, buy_b = want
    if items_a.shape != items_b.shape:
        return float("inf")
    fin_a, fin_b = np.isfinite(score_a), np.isfinite(score_b)
    if not np.array_equal(fin_a, fin_b):
        return float("inf")
    differs = (items_a != items_b) & fin_a
    if differs.any():
        # a swap of two tied items is not a difference of the models
        if np.max(np.abs(score_a[differs] - score_b[differs])) > tie_tol:
            return float("inf")
    same = fin_a & ~differs
    diffs = [_max_abs(score_a[fin_a], score_b[fin_a])]
    diffs += [_max_abs(x[same], y[same]) for x, y in ((click_a, click_b), (buy_a, buy_b))]
    return max(diffs)


def catalog_vocab_json(path: Path) -> dict[str, list[str]]:
    return json.loads(Path(path).read_text())
