"""Real recommender artifacts for tests: the text encoder exported once per test process,
and (bootstrap_small_recommender) a recommender trained by the real learner on a small slice
of the real Ta Feng data, published with the encoder into a registry under tmp."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from trainer.text_encoder import export_text_encoder


@functools.lru_cache(maxsize=1)
def exported_text_encoder() -> tuple[Path, float]:
    """(path, ONNX-vs-PyTorch max abs diff) of the encoder, exported once per process (~10 s)."""
    folder = Path(tempfile.mkdtemp(prefix="text-encoder-"))
    atexit.register(shutil.rmtree, folder, True)
    return export_text_encoder(folder / "model.onnx")
