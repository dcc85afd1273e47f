"""Small real ONNX recommender versions that follow the model contract exactly
(notes: scoring graph model.onnx + item_tower.onnx + vocab.json + catalog.jsonl + users.npz),
built with onnx.helper and random weights, for service tests that need control the real
trainer does not give: several versions with different item-vector widths, a version whose
item tower is broken. Behaviour tests of what the model learned use the real bootstrapped
recommender (tests/recommender_fixtures.py).

Scoring: user vector = user embedding + mean of the history rows' item vectors; score =
user . item over the catalog matrix; restrict/exclude masks (-inf); TopK(max k of the batch,
clipped to the catalog size) inside the graph; click = sigmoid(score), purchase = click *
sigmoid(score - 1) (ESMM shape).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shared.registry import ModelRegistry
from shared.runtime.signature import signature_of_onnx

TEXT_DIM = 384
I64, F32 = TensorProto.INT64, TensorProto.FLOAT


def _save(nodes, name, inputs, outputs, inits, path: Path) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def scoring_graph(path: Path, n_users: int, dim: int, history_len: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    inits = {
        "U": (rng.standard_normal((n_users + 1, dim)) * 0.3).astype(np.float32),
        "zero_i": np.array(0, np.int64), "one_f": np.array(1.0, np.float32), "zero_f": np.array(0.0, np.float32),
        "neg_inf": np.array(-np.inf, np.float32), "ax1": np.array([1], np.int64), "ax0": np.array([0], np.int64),
        "one_i": np.array(1, np.int64),
    }
    v = helper.make_tensor_value_info
    nodes = [
        helper.make_node("Squeeze", ["user", "ax1"], ["user1"]),
        helper.make_node("Gather", ["U", "user1"], ["uvec"]),  # [B, D]
        # history: mean of the valid rows' item vectors
        helper.make_node("GreaterOrEqual", ["history", "zero_i"], ["hmask_b"]),
        helper.make_node("Max", ["history", "zero_i"], ["hidx"]),
        helper.make_node("Gather", ["item_vectors", "hidx"], ["hvec"]),  # [B, H, D]
        helper.make_node("Cast", ["hmask_b"], ["hmask"], to=F32),
        helper.make_node("Unsqueeze", ["hmask", "ax1"], ["hmask0"]),
        helper.make_node("Transpose", ["hmask0"], ["hmask3"], perm=[0, 2, 1]),  # [B, H, 1]
        helper.make_node("Mul", ["hvec", "hmask3"], ["hvec_m"]),
        helper.make_node("ReduceSum", ["hvec_m", "ax1"], ["hsum"], keepdims=0),  # [B, D]
        helper.make_node("ReduceSum", ["hmask", "ax1"], ["hcount"], keepdims=1),  # [B, 1]
        helper.make_node("Max", ["hcount", "one_f"], ["hcount1"]),
        helper.make_node("Div", ["hsum", "hcount1"], ["hmean"]),
        helper.make_node("Add", ["uvec", "hmean"], ["u"]),
        helper.make_node("Transpose", ["item_vectors"], ["ivT"], perm=[1, 0]),
        helper.make_node("MatMul", ["u", "ivT"], ["raw"]),  # [B, N]
        # restrict: rows with any id >= 0 rank only those ids
        helper.make_node("Shape", ["raw"], ["bn"]),
        helper.make_node("ConstantOfShape", ["bn"], ["zeros_bn"], value=helper.make_tensor("z", F32, [1], [0.0])),
        helper.make_node("GreaterOrEqual", ["restrict", "zero_i"], ["rmask_b"]),
        helper.make_node("Cast", ["rmask_b"], ["rmask"], to=F32),
        helper.make_node("Max", ["restrict", "zero_i"], ["ridx"]),
        helper.make_node("ScatterElements", ["zeros_bn", "ridx", "rmask"], ["rhit"], axis=1, reduction="max"),
        helper.make_node("ReduceMax", ["rmask", "ax1"], ["rany"], keepdims=1),  # [B, 1]
        helper.make_node("Sub", ["one_f", "rany"], ["rnone"]),
        helper.make_node("Max", ["rhit", "rnone"], ["allowed"]),  # 1 = may be ranked
        helper.make_node("GreaterOrEqual", ["exclude", "zero_i"], ["emask_b"]),
        helper.make_node("Cast", ["emask_b"], ["emask"], to=F32),
        helper.make_node("Max", ["exclude", "zero_i"], ["eidx"]),
        helper.make_node("ScatterElements", ["zeros_bn", "eidx", "emask"], ["ehit"], axis=1, reduction="max"),
        helper.make_node("Sub", ["allowed", "ehit"], ["keep"]),
        helper.make_node("Greater", ["keep", "zero_f"], ["keep_b"]),
        helper.make_node("Where", ["keep_b", "raw", "neg_inf"], ["masked"]),
        # K = min(max k of the batch, catalog size)
        helper.make_node("ReduceMax", ["k"], ["kmax"], keepdims=0),
        helper.make_node("Shape", ["item_vectors"], ["nd"]),
        helper.make_node("Gather", ["nd", "zero_i"], ["n"]),
        helper.make_node("Min", ["kmax", "n"], ["kk"]),
        helper.make_node("Max", ["kk", "one_i"], ["kk1"]),
        helper.make_node("Unsqueeze", ["kk1", "ax0"], ["K"]),
        helper.make_node("TopK", ["masked", "K"], ["score", "items"], axis=1, largest=1, sorted=1),
        helper.make_node("Sigmoid", ["score"], ["click"]),
        helper.make_node("Sub", ["score", "one_f"], ["s1"]),
        helper.make_node("Sigmoid", ["s1"], ["cvr"]),
        helper.make_node("Mul", ["click", "cvr"], ["purchase"]),
    ]
    inputs = [v("user", I64, ["b", 1]), v("history", I64, ["b", history_len]), v("context", I64, ["b", 3]),
              v("k", I64, ["b", 1]), v("restrict", I64, ["b", "r"]), v("exclude", I64, ["b", "e"]),
              v("item_vectors", F32, ["n", dim])]
    outputs = [v("items", I64, ["b", "kout"]), v("score", F32, ["b", "kout"]), v("click", F32, ["b", "kout"]),
               v("purchase", F32, ["b", "kout"])]
    # context is part of the contract; this small graph reads it only to keep it an input
    nodes.append(helper.make_node("Identity", ["context"], ["context_unused"]))
    return _save(nodes, "reco_scoring", inputs, outputs, inits, path)


def item_tower(path: Path, n_items: int, n_categories: int, dim: int, seed: int) -> Path:
    rng = np.random.default_rng(seed + 1)
    inits = {"W": (rng.standard_normal((TEXT_DIM, dim)) * 0.2).astype(np.float32),
             "E": (rng.standard_normal((n_items + 1, dim)) * 0.1).astype(np.float32),
             "C": (rng.standard_normal((n_categories + 1, dim)) * 0.1).astype(np.float32),
             "P": (rng.standard_normal((1, dim)) * 0.01).astype(np.float32), "ax1": np.array([1], np.int64)}
    v = helper.make_tensor_value_info
    nodes = [helper.make_node("MatMul", ["text", "W"], ["t"]),
             helper.make_node("Squeeze", ["item", "ax1"], ["item1"]),
             helper.make_node("Gather", ["E", "item1"], ["e"]),
             helper.make_node("Squeeze", ["category", "ax1"], ["cat1"]),
             helper.make_node("Gather", ["C", "cat1"], ["c"]),
             helper.make_node("MatMul", ["price", "P"], ["p"]),
             helper.make_node("Sum", ["t", "e", "c", "p"], ["item_vector"])]
    return _save(nodes, "reco_item_tower",
                 [v("item", I64, ["n", 1]), v("text", F32, ["n", TEXT_DIM]), v("category", I64, ["n", 1]),
                  v("price", F32, ["n", 1])], [v("item_vector", F32, ["n", dim])], inits, path)


def publish_contract_version(registry: ModelRegistry, folder: Path, catalog: list[dict], users: dict[str, list[str]],
                             *, dim: int = 16, history_len: int = 8, seed: int = 0,
                             pages=("home", "product", "category", "cart"),
                             devices=("desktop", "mobile", "tablet", "app")) -> str:
    """Publish one `recommender` version built from a catalog (dicts: item_id, title, category,
    price) and users' interactions (oldest first). Returns the version."""
    folder.mkdir(parents=True, exist_ok=True)
    categories = sorted({c["category"] for c in catalog})
    model = scoring_graph(folder / "model.onnx", len(users), dim, history_len, seed)
    item_tower(folder / "item_tower.onnx", len(catalog), len(categories), dim, seed)
    (folder / "vocab.json").write_text(json.dumps({"users": list(users), "items": [c["item_id"] for c in catalog],
                                                   "categories": categories}))
    (folder / "catalog.jsonl").write_text("".join(json.dumps(c) + "\n" for c in catalog))
    ids = list(users)
    np.savez(folder / "users.npz", user_ids=np.array(ids, dtype=str),
             indptr=np.cumsum([0] + [len(users[u]) for u in ids]).astype(np.int64),
             item_ids=np.array([i for u in ids for i in users[u]], dtype=str))
    return registry.publish("recommender", model, signature_of_onnx(model),
                            extra={"history_len": history_len, "item_vector_dim": dim, "pages": list(pages),
                                   "devices": list(devices), "text_dim": TEXT_DIM},
                            extra_files=[folder / n for n in ("item_tower.onnx", "vocab.json", "catalog.jsonl",
                                                              "users.npz")]).version
