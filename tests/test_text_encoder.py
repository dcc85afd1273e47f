"""The exported sentence encoder: ONNX matches PyTorch, TextEncoder's batching/padding/cache
do not change an embedding, similar titles are close, and the registry gets one version."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.registry import ModelRegistry
from shared.text import MODEL_NAME, TEXT_DIM, TextEncoder, load_tokenizer, tokenize
from tests.recommender_fixtures import exported_text_encoder
from trainer.text_encoder import SentenceEncoder, publish_text_encoder

TITLES = [
    "Semi-skimmed milk 2 litres",
    "Organic whole milk 1 litre",
    "Claw hammer with fibreglass handle",
    "Cordless drill 18V with two batteries and a carry case",
    "Green tea bags, 80 pack",
    "product subclass 100205",
]


@pytest.fixture(scope="module")
def exported() -> tuple[Path, float]:
    return exported_text_encoder()


@pytest.fixture(scope="module")
def encoder(exported) -> TextEncoder:
    return TextEncoder(exported[0], batch_size=4, cache_size=4)


def test_export_matches_pytorch_and_sentence_transformers_pooling(exported):
    path, diff = exported
    assert diff <= 1e-5
    # independent check on other texts: ONNX Runtime vs the torch module, and vs pooling
    # written out here from the transformer's token states (what sentence-transformers does)
    import onnxruntime as ort

    feeds = tokenize(load_tokenizer(), TITLES)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["embedding"], feeds)[0]
    module = SentenceEncoder().eval()
    ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    with torch.no_grad():
        want = module(ids, mask).numpy()
        states = module.transformer(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    m = feeds["attention_mask"][..., None].astype(np.float32)
    pooled = (states * m).sum(1) / m.sum(1)
    manual = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert got.shape == (len(TITLES), TEXT_DIM)
    assert np.max(np.abs(got - want)) <= 1e-5
    assert np.max(np.abs(got - manual)) <= 1e-5


def test_encode_is_independent_of_batching_padding_and_cache(encoder):
    batched = encoder.encode(TITLES)
    assert batched.shape == (len(TITLES), TEXT_DIM) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    alone = np.stack([encoder.encode_uncached([t])[0] for t in TITLES])  # no padding at all
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    hits = encoder.hits
    again = encoder.encode(TITLES[-2:] + TITLES[-2:])  # the most recent ones are still cached (size 4)
    assert encoder.hits == hits + 4
    np.testing.assert_array_equal(again[:2], batched[-2:])
    assert encoder.cache_len() <= 4  # bounded
    assert encoder.encode([]).shape == (0, TEXT_DIM)


def test_similar_titles_are_closer_than_unrelated_ones(encoder):
    e = encoder.encode(TITLES)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # milk vs milk, milk vs hammer
    assert sim[2, 3] > sim[2, 4]  # hammer vs drill, hammer vs tea


def test_publish_once_then_load_from_registry(tmp_path, exported):
    registry = ModelRegistry(tmp_path / "registry")
    assert publish_text_encoder(registry, exported=exported) == "1"
    assert publish_text_encoder(registry, exported=exported) == "1"  # present: not published again
    m = registry.verify(MODEL_NAME, "1")
    assert [t.name for t in m.signature.inputs] == ["input_ids", "attention_mask"]
    assert [(t.name, t.shape) for t in m.signature.outputs] == [("embedding", (-1, TEXT_DIM))]
    assert m.metrics["onnx_parity_max_abs"] <= 1e-5
    enc = TextEncoder.from_registry(registry)
    assert enc.version == "1" and enc.encode(["tea"]).shape == (1, TEXT_DIM)
