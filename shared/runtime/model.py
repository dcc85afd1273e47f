"""A loaded, validated model version, and the handle that swaps the live one atomically.

Loading is load-beside-then-swap: a new version is verified (checksums), checked against
the signature the service declares, given a session, and warmed up on sample inputs whose
outputs must be finite (and pass the service's own range check) before the handle points
at it. Requests hold a reference to the LoadedModel they started with, so a swap never
disturbs one in flight; the old session is freed when its last request finishes.

A service whose model needs more than its session can prepare per-version state at load
time (`ModelLoader.prepare`, run in the loader thread before warm-up, its result kept on
`LoadedModel.prepared`): e.g. the recommender computes its catalog's item vectors with the
new version's own item tower, so a swap never pairs one version's scoring graph with
another version's vectors. Its warm-up can then feed that state (`warmup_feeds`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from shared.errors import InvalidArgument
from shared.registry import Manifest, ModelRegistry, RegistryError, Signature
from shared.registry.manifest import intersect_ranges
from shared.runtime.dtypes import NUMPY_OF_V2
from shared.runtime.session import CreatedSession, ProviderError, RuntimeOptions, create_session
from shared.runtime.signature import signature_of_session

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]
# A service's check of warm-up outputs: return None when fine, else the reason to refuse.
OutputCheck = Callable[[Arrays], "str | None"]


class ModelRejected(Exception):
    """A version that must not serve; the message says why."""


@dataclasses.dataclass(eq=False)
class LoadedModel:
    name: str
    version: str
    signature: Signature
    created: CreatedSession
    manifest: Manifest | None = None
    loaded_at: float = dataclasses.field(default_factory=time.time)
    path: Path | None = None  # the model file; its folder holds the version's extra files
    prepared: Any = None  # what ModelLoader.prepare returned for this version (None without one)

    def __post_init__(self) -> None:
        self.input_names = [t.name for t in self.signature.inputs]
        self.output_names = [t.name for t in self.signature.outputs]
        self._session = self.created.session
        # What every request's inputs are checked against (check_input_ranges): the ranges
        # the model file declares, narrowed by its manifest's. Computed once per version:
        # the check is on the hot path.
        declared = self.signature.input_ranges()
        if self.manifest is not None:
            for name, r in self.manifest.signature.input_ranges().items():
                if name in self.input_names:
                    declared[name] = intersect_ranges(declared.get(name), r)
        self.input_ranges: dict[str, tuple[int | float, int | float]] = declared

    def check_input_ranges(self, feeds: Arrays) -> None:
        """InvalidArgument naming the first input with a value outside its declared range.

        One min and one max per ranged input, in the input's own dtype (no conversion of
        the array): microseconds for the index inputs it is declared on. An id outside its
        embedding table would make the session run fail for every request merged into the
        same batch, so this runs before a request is queued."""
        for name, (lo, hi) in self.input_ranges.items():
            x = feeds.get(name)
            if x is None or x.size == 0:
                continue
            # Python scalars: exact for int64/uint64 ids, whatever the bounds' type; one
            # element (a domain request's id) skips the two reductions
            if x.size == 1:
                low = high = x.item()
            else:
                low, high = x.min().item(), x.max().item()
            if low < lo or high > hi:
                bad = low if low < lo else high
                raise InvalidArgument(f"input {name!r} has value {bad} outside the model's valid range "
                                      f"[{lo}, {hi}]")

    @property
    def provider(self) -> str:
        return self.created.primary_provider

    def run(self, feeds: Arrays) -> list[np.ndarray]:
        """All outputs, in signature order. Thread-safe (ORT sessions are); releases the GIL."""
        return self._session.run(self.output_names, feeds)


def sample_inputs(signature: Signature, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs that fit the signature: the batch axis = batch, other dynamic axes = 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in signature.inputs:
        shape = [batch if i == 0 and d == -1 else (1 if d == -1 else d) for i, d in enumerate(spec.shape)]
        dtype = NUMPY_OF_V2[spec.datatype]
        if dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            # ids/indices: 0 is valid in any table, unless a declared range starts above it
            low = 0 if spec.value_range is None else min(max(0, spec.value_range[0]), spec.value_range[1])
            out[spec.name] = np.full(shape, low, dtype=dtype)
    return out


def warm_up(model: LoadedModel, batches: tuple[int, ...], check: OutputCheck | None,
            inputs_for: Callable[[Signature, int], Arrays] = sample_inputs,
            warmup_feeds: "Callable[[LoadedModel, int], Arrays] | None" = None) -> None:
    for batch in batches:
        feeds = warmup_feeds(model, batch) if warmup_feeds is not None else inputs_for(model.signature, batch)
        outputs = model.run(feeds)
        named = dict(zip(model.output_names, outputs))
        for name, y in named.items():
            if y.dtype.kind == "f" and not np.isfinite(y).all():
                raise ModelRejected(f"warm-up output {name!r} has non-finite values at batch {batch}")
        if check is not None:
            reason = check(named)
            if reason:
                raise ModelRejected(f"warm-up output check failed at batch {batch}: {reason}")


@dataclasses.dataclass
class ModelLoader:
    """Everything needed to turn a file or a registry version into a validated LoadedModel."""

    options: RuntimeOptions = dataclasses.field(default_factory=RuntimeOptions)
    expected: Signature | None = None  # what the service declares; None = accept the first one seen
    output_check: OutputCheck | None = None
    # A service's check of a registry version's manifest (feature names, thresholds...).
    manifest_check: Callable[[Manifest], "str | None"] | None = None
    warmup_batches: tuple[int, ...] = (1, 8)
    inputs_for: Callable[[Signature, int], Arrays] = sample_inputs
    # Per-version state built in the loader thread before warm-up (kept on LoadedModel.prepared);
    # raising refuses the version (ModelRejected keeps its message, anything else is wrapped).
    prepare: Callable[[LoadedModel], Any] | None = None
    # Warm-up feeds built from the loaded version itself (its prepared state); overrides inputs_for.
    warmup_feeds: Callable[[LoadedModel, int], Arrays] | None = None

    def _load(self, name: str, version: str, path: Path, manifest: Manifest | None,
              engine_dir: Path | None) -> LoadedModel:
        """Create the session, check its signature (against the manifest and what the service
        declares), warm it up. The signature is read from the session, not by parsing the
        file again: parsing a model with large initializers in Python would hold the GIL
        (and stall the serving loop) for tens of milliseconds."""
        try:
            created = create_session(path, self.options, engine_dir=engine_dir)
        except ProviderError as e:
            raise ModelRejected(str(e)) from e
        except Exception as e:  # onnxruntime raises its own types for unreadable graphs
            raise ModelRejected(f"{name}/{version} is not a model onnxruntime can load: {e}") from e
        try:
            signature = signature_of_session(created.session)
        except ValueError as e:
            raise ModelRejected(str(e)) from e
        if manifest is not None:
            diffs = manifest.signature.differences(signature)
            if diffs:
                raise ModelRejected("model file disagrees with its manifest: " + "; ".join(diffs))
        if self.expected is not None:
            diffs = self.expected.differences(signature)
            if diffs:
                raise ModelRejected("signature differs from what the service declares: " + "; ".join(diffs))
        signature = self._ranged(signature, manifest)
        model = LoadedModel(name, version, signature, created, manifest, path=path)
        if self.prepare is not None:
            try:
                model.prepared = self.prepare(model)
            except ModelRejected:
                raise
            except Exception as e:
                log.exception("%s/%s: preparation failed", name, version)
                raise ModelRejected(f"preparation failed: {e}") from e
        try:
            warm_up(model, self.warmup_batches, self.output_check, self.inputs_for, self.warmup_feeds)
        except ModelRejected:
            raise
        except Exception as e:
            raise ModelRejected(f"warm-up failed: {e}") from e
        return model

    @staticmethod
    def _ranged(signature: Signature, manifest: Manifest | None) -> Signature:
        """The session's signature with its manifest's input ranges folded in (each narrows
        the allowed values); declarations that leave nothing allowed refuse the version.
        Ranges are per version (a new vocabulary may hold more ids), so the signature the
        service expects (which a generic server pins from its first version) adds none."""
        if manifest is None:
            return signature
        ranges = {}
        for spec in signature.inputs:
            r = intersect_ranges(spec.value_range,
                                 *(t.value_range for t in manifest.signature.inputs if t.name == spec.name))
            if r is not None:
                if not r[0] <= r[1]:
                    raise ModelRejected(f"input {spec.name!r}: the declared value ranges do not overlap")
                ranges[spec.name] = r
        return signature.with_input_ranges(ranges)

    def from_file(self, name: str, path: str | os.PathLike[str], version: str = "1") -> LoadedModel:
        path = Path(path)
        if not path.is_file():
            raise ModelRejected(f"model file {path} does not exist")
        return self._load(name, version, path, None, None)

    def from_registry(self, registry: ModelRegistry, name: str, version: str) -> LoadedModel:
        try:
            manifest = registry.verify(name, version)
        except RegistryError as e:
            raise ModelRejected(str(e)) from e
        if self.manifest_check is not None:
            reason = self.manifest_check(manifest)
            if reason:
                raise ModelRejected(f"manifest refused: {reason}")
        engine_dir = Path(self.options.trt_cache_dir) / name / version
        return self._load(name, version, registry.model_path(name, version), manifest, engine_dir)


class ModelHandle:
    """The live version of one model, plus the previous one kept warm for instant rollback.

    Swaps happen on the event loop thread; a request reads `current` once and keeps that
    object, so it finishes on the version it started with.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.current: LoadedModel | None = None
        self.previous: LoadedModel | None = None
        self._listeners: list[Callable[[LoadedModel], None]] = []

    def on_swap(self, listener: Callable[[LoadedModel], None]) -> None:
        self._listeners.append(listener)

    def swap(self, new: LoadedModel) -> LoadedModel | None:
        old = self.current
        if old is not None and old.version == new.version:
            return old
        self.previous, self.current = old, new
        for listener in self._listeners:
            listener(new)
        return old

    def loaded(self, version: str) -> LoadedModel | None:
        for m in (self.current, self.previous):
            if m is not None and m.version == version:
                return m
        return None
