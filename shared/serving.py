"""ServedModel: one model as a service sees it: handle, loader, hot reloader and batcher.

The composition root of every service builds one per model it owns; the V2 servicer and
the domain servicers both call `infer` on it, so both APIs share one queue, one batcher
and one live version.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from shared import metrics
from shared.batching import MicroBatcher
from shared.errors import NotFound, Unavailable
from shared.registry import ModelRegistry, Signature
from shared.reload import HotReloader
from shared.runtime.model import LoadedModel, ModelHandle, ModelLoader
from shared.settings import ServingSettings

log = logging.getLogger(__name__)


class ServedModel:
    def __init__(self, name: str, loader: ModelLoader, *, registry: ModelRegistry | None = None,
                 model_file: str | Path | None = None, poll_interval_s: float = 0.5,
                 max_request_rows: int = 1024, max_batch_size: int = 64, max_queue_delay_us: int = 0,
                 max_queue_size: int = 1024, batch_workers: int = 1) -> None:
        if (registry is None) == (model_file is None):
            raise ValueError("serve a model from exactly one of: a registry, a file")
        self.name = name
        self.loader = loader
        self.handle = ModelHandle(name)
        self.batcher = MicroBatcher(self.handle, max_batch_size=max_batch_size,
                                    max_queue_delay_us=max_queue_delay_us, max_queue_size=max_queue_size,
                                    workers=batch_workers)
        self.registry = registry
        self.model_file = Path(model_file) if model_file is not None else None
        self.max_request_rows = max_request_rows
        self.reloader = HotReloader(registry, self.handle, loader, poll_interval_s) if registry else None

    @classmethod
    def from_settings(cls, name: str, settings: ServingSettings, loader: ModelLoader,
                      model_file: str | None = None) -> "ServedModel":
        return cls(name, loader, registry=None if model_file else ModelRegistry(settings.registry_dir),
                   model_file=model_file, poll_interval_s=settings.poll_interval_s,
                   max_request_rows=settings.max_request_rows, max_batch_size=settings.max_batch_size,
                   max_queue_delay_us=settings.max_queue_delay_us, max_queue_size=settings.max_queue_size,
                   batch_workers=settings.batch_workers)

    @property
    def current(self) -> LoadedModel | None:
        return self.handle.current

    @property
    def ready(self) -> bool:
        return self.handle.current is not None

    def signature(self) -> Signature:
        """The signature requests are checked against: the declared one, else the live model's."""
        if self.loader.expected is not None:
            return self.loader.expected
        model = self.handle.current
        if model is None:
            raise Unavailable(f"model {self.name!r} is not loaded yet")
        return model.signature

    async def start(self) -> None:
        """Start batching and reloading; load what is there now (a file, or CURRENT if any)."""
        self.batcher.start()
        if self.model_file is not None:
            model = await asyncio.to_thread(self.loader.from_file, self.name, self.model_file)
            self.handle.swap(model)
            metrics.RELOADS.labels(self.name, "loaded").inc()
            metrics.set_model_info(self.name, model.version, model.provider)
            log.info("model %s: serving %s on %s", self.name, self.model_file, model.provider)
        else:
            await self.reloader.check_once()
            if self.handle.current is None:
                log.warning("model %s: no servable version in %s yet; NOT_SERVING until one is published",
                            self.name, self.registry.root)
            self.reloader.start()

    async def stop(self) -> None:
        if self.reloader is not None:
            await self.reloader.stop()
        await self.batcher.stop()

    async def infer(self, feeds: Mapping[str, np.ndarray], rows: int, deadline: float | None = None,
                    version: str = "", *, shared: Mapping[str, np.ndarray] | None = None,
                    model: LoadedModel | None = None) -> tuple[list[np.ndarray], LoadedModel]:
        """Run validated inputs through the batcher. version, when given, must be the live one.

        shared: inputs without a batch axis (fed once per run, e.g. a catalog matrix);
        model: the version these inputs were prepared for, which then runs them even if a
        newer one was swapped in meanwhile (see shared.batching)."""
        live = self.handle.current
        if live is None and model is None:
            raise Unavailable(f"model {self.name!r} is not loaded yet")
        if version and version != (model or live).version:
            raise NotFound(f"model {self.name!r} version {version!r} is not served (serving {live.version})")
        return await self.batcher.infer(feeds, rows, deadline, shared=shared, model=model)

    @staticmethod
    def deadline_of(context) -> float | None:
        """The gRPC deadline on the time.monotonic() clock, or None."""
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining
