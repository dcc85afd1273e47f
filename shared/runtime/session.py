"""ONNX Runtime sessions with the best execution provider the machine really has.

Order by default: TensorRT, then CUDA, then CPU. `available_providers()` is not proof:
onnxruntime-gpu lists TensorRT and CUDA even on a machine without a GPU, and a session
silently falls back to CPU when a provider fails to initialise. So the factory always
reads `session.get_providers()` after creation and reports what really runs; a provider
that was *forced* by configuration and did not take is an error, not a silent fallback.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import onnxruntime as ort

log = logging.getLogger(__name__)

SHORT_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class ProviderError(Exception):
    """A requested execution provider is unknown, not installed, or did not take effect."""


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    providers: str = "auto"  # "auto" or a comma list of tensorrt,cuda,cpu (order = preference)
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    trt_fp16: bool = False
    trt_cache_dir: str = "var/trt-cache"


def requested_providers(spec: str, available: Sequence[str]) -> tuple[list[str], bool]:
    """(provider names to ask for, whether they were forced) from a setting and what is installed."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        chosen = [p for p in PREFERENCE if p in available]
        return (chosen or ["CPUExecutionProvider"]), False
    chosen = []
    for short in (s.strip() for s in spec.split(",") if s.strip()):
        if short not in SHORT_NAMES:
            raise ProviderError(f"unknown execution provider {short!r}; use auto or a list of {sorted(SHORT_NAMES)}")
        full = SHORT_NAMES[short]
        if full not in available:
            raise ProviderError(f"execution provider {short!r} is not installed (available: {list(available)})")
        chosen.append(full)
    if not chosen:
        raise ProviderError("empty execution provider list")
    return chosen, True


def provider_options(name: str, opts: RuntimeOptions, engine_dir: Path | None) -> dict[str, Any]:
    if name == "TensorrtExecutionProvider":
        cache = str(engine_dir if engine_dir is not None else Path(opts.trt_cache_dir))
        os.makedirs(cache, exist_ok=True)
        # A stable folder per model version: engines survive restarts and are never
        # shared between versions (a stale engine for a new graph would be wrong).
        return {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": cache,
            "trt_fp16_enable": "True" if opts.trt_fp16 else "False",
        }
    return {}


@dataclasses.dataclass
class CreatedSession:
    session: ort.InferenceSession
    providers: list[str]  # what really runs, most preferred first

    @property
    def primary_provider(self) -> str:
        return self.providers[0]


def create_session(
    model_path: str | os.PathLike[str],
    opts: RuntimeOptions,
    *,
    engine_dir: Path | None = None,
    available: Sequence[str] | None = None,
) -> CreatedSession:
    available = list(available if available is not None else ort.get_available_providers())
    names, forced = requested_providers(opts.providers, available)
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = opts.inter_op_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = [(n, provider_options(n, opts, engine_dir)) for n in names]
    session = ort.InferenceSession(os.fspath(model_path), so, providers=providers)
    actual = list(session.get_providers())
    if forced and actual[0] != names[0]:
        raise ProviderError(f"execution provider {names[0]} was requested but the session runs on {actual[0]}")
    if actual[0] != names[0]:
        log.warning("execution provider %s did not initialise; running on %s", names[0], actual[0])
    return CreatedSession(session, actual)
