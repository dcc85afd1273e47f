"""Hot reload: watch a model's CURRENT pointer in the registry and swap in new versions.

Polling (default every 0.5 s) rather than inotify: it works the same on a local folder and
on a shared network volume, and reading one small file is cheap. A new version is loaded
beside the old one in a worker thread (the event loop keeps serving), validated by the
ModelLoader, then swapped. A refused version is logged with its reason, counted, and not
retried until the pointer moves again; the old version keeps serving. A pointer that
moves back to the previous version (a rollback) swaps instantly: it is still loaded.
"""
from __future__ import annotations

import asyncio
import logging

from shared import metrics
from shared.registry import ModelRegistry, RegistryError
from shared.runtime.model import LoadedModel, ModelHandle, ModelLoader, ModelRejected

log = logging.getLogger(__name__)


class HotReloader:
    def __init__(self, registry: ModelRegistry, handle: ModelHandle, loader: ModelLoader,
                 poll_interval_s: float = 0.5) -> None:
        self.registry = registry
        self.handle = handle
        self.loader = loader
        self.poll_interval_s = poll_interval_s
        self.refused: dict[str, str] = {}  # version -> reason, so a bad version is not retried
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.handle.name

    async def check_once(self) -> LoadedModel | None:
        """Load and swap in the version CURRENT names, if it is new. Returns the new model."""
        try:
            version = self.registry.current_version(self.name)
        except RegistryError as e:
            log.error("model %s: cannot read the registry pointer: %s", self.name, e)
            return None
        if version is None or version in self.refused:
            return None
        current = self.handle.current
        if current is not None and current.version == version:
            return None
        kept = self.handle.loaded(version)
        if kept is not None:
            self._swap(kept, "rollback")
            return kept
        try:
            model = await asyncio.to_thread(self.loader.from_registry, self.registry, self.name, version)
        except ModelRejected as e:
            self.refused[version] = str(e)
            metrics.RELOADS.labels(self.name, "refused").inc()
            log.error("model %s: refused version %s, still serving %s: %s", self.name, version,
                      current.version if current else "nothing", e)
            return None
        self._swap(model, "loaded")
        return model

    def _swap(self, model: LoadedModel, result: str) -> None:
        old = self.handle.swap(model)
        metrics.RELOADS.labels(self.name, result).inc()
        metrics.set_model_info(self.name, model.version, model.provider)
        log.info("model %s: now serving version %s on %s (was %s)", self.name, model.version, model.provider,
                 old.version if old else "nothing")

    async def run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # never let the watcher die: the service must keep serving
                log.exception("model %s: reload check failed", self.name)
            await asyncio.sleep(self.poll_interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name=f"reload-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
