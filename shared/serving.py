"""ServedModel: one model as a service sees it: handle, loader, hot reloader and batcher.

The composition root of every service builds one per model it owns; the V2 servicer and
the domain servicers both call `infer` on it, so both APIs share one queue, one batcher
and one live version. `infer` is therefore where the checks every request needs live,
once for every API and domain:

- before queuing: inputs against the value ranges the model declares (index inputs: an id
  outside an embedding table fails the whole session run, i.e. every request merged with
  it), INVALID_ARGUMENT naming the input and the range;
- after the run: the outputs for this request's rows. NaN or +inf in a float output, or a
  value the service's own output check refuses (the one warm-up applies, e.g. a probability
  outside [0, 1]), is ModelOutputError (UNAVAILABLE), never an answer: a fraud score of NaN
  compares false with every threshold and would read as ALLOW. -inf is allowed: graphs use
  it on purpose as the mask value (the recommender's score of a filtered item); a -inf
  where a service needs a real number fails its output check instead.

Canary and shadow (registry CANARY, followed by the HotReloader when `follow_canary`): `pick(key)`
says which version answers a request: the canary for the keys whose hash falls below its share
(`shared.registry.canary_bucket`: sha256, the same on every replica), the champion otherwise.
`shadow_model()` is the version that scores every request beside the champion in shadow mode.
Shadow runs are fire-and-forget tasks through the same batcher (pinned to the shadow version,
so they never merge with the champion's rows), admitted only while fewer than
`shadow_max_inflight` are running and the batch queue is under half full: under load shadows
are dropped, never the answers (counted in storefront_shadow_total{result}).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Coroutine, Mapping

import numpy as np
from prometheus_client import Counter

from shared import metrics
from shared.batching import MicroBatcher
from shared.errors import ModelOutputError, NotFound, Unavailable, shorten
from shared.registry import ModelRegistry, Signature, canary_bucket
from shared.reload import Canary, HotReloader
from shared.runtime.model import LoadedModel, ModelHandle, ModelLoader
from shared.settings import ServingSettings

log = logging.getLogger(__name__)

SHADOW = Counter("storefront_shadow_total", "Shadow scorings of served requests by result: scored, dropped_busy "
                 "(shadow_max_inflight reached), dropped_queue (batch queue half full), failed, timeout",
                 ["model", "result"])
CANARY_FALLBACKS = Counter("storefront_canary_fallbacks_total", "Requests routed to the canary version that it could "
                           "not answer (an error, a refused output): the champion answered them", ["model"])


class ServedModel:
    def __init__(self, name: str, loader: ModelLoader, *, registry: ModelRegistry | None = None,
                 model_file: str | Path | None = None, poll_interval_s: float = 0.5,
                 max_request_rows: int = 1024, max_batch_size: int = 64, max_queue_delay_us: int = 0,
                 max_queue_size: int = 1024, batch_workers: int = 1, follow_canary: bool = False,
                 shadow_max_inflight: int = 64, shadow_timeout_s: float = 1.0) -> None:
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
        self.reloader = (HotReloader(registry, self.handle, loader, poll_interval_s, follow_canary=follow_canary)
                         if registry else None)
        self.shadow_max_inflight = shadow_max_inflight
        self.shadow_timeout_s = shadow_timeout_s
        self._shadow_tasks: set[asyncio.Task] = set()
        self._shadow_counters = {r: SHADOW.labels(name, r)
                                 for r in ("scored", "dropped_busy", "dropped_queue", "failed", "timeout")}
        self._fallbacks = CANARY_FALLBACKS.labels(name)
        self._nonfinite = metrics.OUTPUT_ERRORS.labels(name, "nonfinite")
        self._out_of_range = metrics.OUTPUT_ERRORS.labels(name, "out_of_range")
        self._last_output_log = -float("inf")

    @classmethod
    def from_settings(cls, name: str, settings: ServingSettings, loader: ModelLoader,
                      model_file: str | None = None) -> "ServedModel":
        return cls(name, loader, registry=None if model_file else ModelRegistry(settings.registry_dir),
                   model_file=model_file, poll_interval_s=settings.poll_interval_s,
                   max_request_rows=settings.max_request_rows, max_batch_size=settings.max_batch_size,
                   max_queue_delay_us=settings.max_queue_delay_us, max_queue_size=settings.max_queue_size,
                   batch_workers=settings.batch_workers,
                   follow_canary=getattr(settings, "canary", "off") == "follow",
                   shadow_max_inflight=getattr(settings, "shadow_max_inflight", 64),
                   shadow_timeout_s=getattr(settings, "shadow_timeout_ms", 1000.0) / 1000.0)

    @property
    def current(self) -> LoadedModel | None:
        return self.handle.current

    # ---- canary and shadow ----
    @property
    def canary(self) -> Canary | None:
        """The candidate served beside the champion (None: none, or not following CANARY)."""
        return self.reloader.canary if self.reloader is not None else None

    def pick(self, key: str | bytes | None) -> LoadedModel | None:
        """The canary version when this request key falls in its share, else None (the champion
        answers). A missing key (None or empty) draws a random one: such requests are split by
        share too, but not sticky."""
        canary = self.canary
        if canary is None or canary.mode != "canary":
            return None
        if not key:
            key = secrets.token_bytes(16)
        return canary.model if canary_bucket(self.name, canary.model.version, key) < canary.share else None

    def shadow_model(self) -> LoadedModel | None:
        """The version that scores every request in shadow mode (None: no shadow)."""
        canary = self.canary
        return canary.model if canary is not None and canary.mode == "shadow" else None

    def loaded_models(self) -> list[LoadedModel]:
        """Every version this process holds loaded: champion, previous (rollback) and candidate."""
        out: list[LoadedModel] = []
        canary = self.canary
        for m in (self.handle.current, self.handle.previous, canary.model if canary is not None else None):
            if m is not None and all(m is not o for o in out):
                out.append(m)
        return out

    def spawn_shadow(self, run: "Coroutine[object, object, None]") -> bool:
        """Start a shadow run as a task of its own, if admitted (see the module doc); False (the
        coroutine closed unstarted, the drop counted) when not. The task's own errors are its
        business: it must record them itself."""
        if len(self._shadow_tasks) >= self.shadow_max_inflight:
            self._shadow_counters["dropped_busy"].inc()
            run.close()
            return False
        if self.batcher.queued * 2 >= self.batcher.max_queue_size:  # answers first
            self._shadow_counters["dropped_queue"].inc()
            run.close()
            return False
        task = asyncio.get_running_loop().create_task(run, name=f"shadow-{self.name}")
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)
        return True

    def shadow_result(self, result: str) -> None:
        """Count one shadow run's result: scored, failed or timeout."""
        self._shadow_counters[result].inc()

    def canary_failed(self) -> None:
        """Count a canary-routed request the champion had to answer."""
        self._fallbacks.inc()

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
        # shadow runs answer nobody: cancelled, not waited for (each records its served
        # prediction without the shadow on the way out)
        for task in list(self._shadow_tasks):
            task.cancel()
        if self._shadow_tasks:
            await asyncio.gather(*self._shadow_tasks, return_exceptions=True)
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
        target = model or live
        if version and version != target.version:
            raise NotFound(f"model {self.name!r} version {shorten(version, 32)!r} is not served "
                           f"(serving {target.version})")
        # Checked against the version in hand; a swap before the run may bring another one.
        # Its ranges differ only if its vocabulary does, and the batcher re-runs a failed
        # merged batch request by request, so even then only this request can fail.
        if target.input_ranges:
            target.check_input_ranges(feeds)
            if shared:
                target.check_input_ranges(shared)
        outputs, used = await self.batcher.infer(feeds, rows, deadline, shared=shared, model=model)
        self.check_outputs(outputs, used)
        return outputs, used

    def check_outputs(self, outputs: list[np.ndarray], model: LoadedModel) -> None:
        """ModelOutputError unless this request's outputs are usable (see the module doc)."""
        for name, y in zip(model.output_names, outputs):
            # one pass per output: NaN < inf and inf < inf are both false; -inf passes
            if y.dtype.kind == "f" and not (y < np.inf).all():
                self._nonfinite.inc()
                self._log_output_error(model, f"output {name!r} has NaN or +inf values")
                raise ModelOutputError(f"model {self.name!r} version {model.version} produced a non-finite "
                                       f"{name!r} for this request; no answer was made from it")
        check = self.loader.output_check
        if check is not None:
            reason = check(dict(zip(model.output_names, outputs)))
            if reason:
                self._out_of_range.inc()
                self._log_output_error(model, reason)
                raise ModelOutputError(f"model {self.name!r} version {model.version} produced an output "
                                       f"outside its valid range for this request ({reason})")

    def _log_output_error(self, model: LoadedModel, what: str) -> None:
        # At most one line per 10 s per model: a bad version under load fails every request,
        # and the counter says how many; the log says that it happens and on which version.
        now = time.monotonic()
        if now - self._last_output_log >= 10.0:
            self._last_output_log = now
            log.warning("model %s/%s: %s; answered with an error (storefront_model_output_errors_total "
                        "counts every one)", model.name, model.version, what)

    @staticmethod
    def deadline_of(context) -> float | None:
        """The gRPC deadline on the time.monotonic() clock, or None."""
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining
