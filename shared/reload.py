"""Hot reload: watch a model's CURRENT pointer in the registry and swap in new versions.

Polling (default every 0.5 s) rather than inotify: it works the same on a local folder and
on a shared network volume, and reading one small file is cheap. A new version is loaded
beside the old one in a worker thread (the event loop keeps serving), validated by the
ModelLoader, then swapped. A pointer that moves back to the previous version (a rollback)
swaps instantly: it is still loaded.

A refused version is logged with its reason, counted, and remembered with a fingerprint of
its folder (lstat of the folder and its files: no hashing on the poll path); the old
version keeps serving. It is tried again only when there is a reason to expect a different
answer: its files changed (an operator repaired them), or the pointer moved away from it
and back (an operator asked for it again, e.g. after fixing what the service depends on).
Retries of one version are spaced by an exponential backoff (retry_min_s doubling up to
retry_max_s), so a flapping pointer or a folder being rewritten cannot turn into a loop of
expensive loads; the memory of refusals is bounded (max_refusals, oldest forgotten first).

An unreadable CURRENT (corrupt JSON, a link, an I/O error) leaves the loaded version
serving; it is logged and counted in storefront_registry_errors_total once per distinct
state (the same broken file is not reported on every poll), and
storefront_registry_pointer_unreadable is 1 until the pointer reads again.

Lease: the reloader keeps <model>/.serving/<instance> in the registry naming the versions
this process holds (serving, previous: kept loaded for instant rollback, loading), so that
registry gc never deletes them, however far this process lags behind CURRENT. It is written
before a load starts and after every swap, refreshed every lease_refresh_s (gc ignores a
lease older than its TTL, 5 min by default: refresh well within it), and removed on stop. A
lease that cannot be written is logged once per distinct error and counted
(storefront_registry_errors_total{reason="lease_write"}); serving goes on regardless.

Canary (with `follow_canary`): the registry's CANARY pointer names a candidate to serve beside
the champion (shared/registry: mode "canary" with a share of request keys, or "shadow"). It is
loaded and validated exactly like a champion (same loader, same refusal memory and backoff:
load beside, then swap), held in `canary` (a Canary: the LoadedModel and the pointer's
CanaryState) and leased as "canary". A refused candidate, an unreadable CANARY, or none, leave
`canary` None: the champion answers everything (a bad candidate never fails a request). A mode
or share change of the same version applies at once, without a reload. When the candidate is
promoted (CURRENT names it), the loaded canary becomes the champion without loading it again.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Callable

from prometheus_client import Gauge

from shared import metrics
from shared.registry import CanaryState, ModelRegistry, RegistryError, default_instance
from shared.runtime.model import LoadedModel, ModelHandle, ModelLoader, ModelRejected

log = logging.getLogger(__name__)

CANARY_SHARE = Gauge("storefront_canary_share", "Share of request keys the canary version of a model answers in "
                     "this process (0: no canary, or a shadow, which answers none)", ["model"])
CANARY_VERSION = Gauge("storefront_canary_version", "The candidate version served beside the champion (0: none), "
                       "by mode (canary, shadow)", ["model", "mode"])


@dataclasses.dataclass(frozen=True)
class Canary:
    """A loaded candidate and how it meets traffic (the CANARY pointer it was loaded for)."""

    model: LoadedModel
    state: CanaryState

    @property
    def mode(self) -> str:
        return self.state.mode

    @property
    def share(self) -> float:
        return self.state.share


@dataclasses.dataclass
class Refusal:
    """Why a version was refused, what its folder looked like then, and when it may be retried."""

    reason: str
    fingerprint: tuple
    attempts: int
    retry_at: float  # clock() before which it is not loaded again, whatever changed
    rearmed: bool = False  # the files changed or the pointer came back since the last attempt


class HotReloader:
    def __init__(self, registry: ModelRegistry, handle: ModelHandle, loader: ModelLoader,
                 poll_interval_s: float = 0.5, *, retry_min_s: float = 2.0, retry_max_s: float = 300.0,
                 max_refusals: int = 64, clock: Callable[[], float] = time.monotonic,
                 instance: str | None = None, lease_refresh_s: float = 30.0, follow_canary: bool = False) -> None:
        self.registry = registry
        self.handle = handle
        self.loader = loader
        self.poll_interval_s = poll_interval_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.max_refusals = max_refusals
        self.clock = clock
        self.refusals: dict[str, Refusal] = {}  # version -> refusal, oldest first
        self._pointer_seen: str | None = None  # the version CURRENT named at the last readable poll
        self._pointer_error: str | None = None  # the last pointer problem reported (None: readable)
        self._task: asyncio.Task[None] | None = None
        self.instance = instance or default_instance()  # this process's lease file name
        self.lease_refresh_s = lease_refresh_s  # <= 0: no lease (gc then relies on CURRENT, age, last N)
        self._lease_due = -float("inf")  # clock() at which the lease is refreshed next
        self._lease_error: str | None = None  # the last lease write problem reported
        self._leased = False  # a lease was written (stop removes it)
        self.follow_canary = follow_canary
        self.canary: Canary | None = None  # the candidate served beside the champion (None: none)
        self._canary_seen: str | None = None  # the version CANARY named at the last readable poll
        self._canary_error: str | None = None  # the last CANARY problem reported
        # One check at a time: the watcher's own loop and a direct caller (start-up, an operator
        # hook, a test) must not load the same version twice or write leases out of order.
        self._checking = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.handle.name

    @property
    def refused(self) -> dict[str, str]:
        """version -> reason, for the versions refused and not (yet) loaded since."""
        return {v: r.reason for v, r in self.refusals.items()}

    async def check_once(self) -> LoadedModel | None:
        """Load and swap in the version CURRENT names, if it is new. Returns the new model."""
        async with self._checking:
            model = await self._check()
            if self.follow_canary:
                await self._check_canary()
            await self._refresh_lease()  # a no-op until the refresh is due
            return model

    async def _check(self) -> LoadedModel | None:
        version = self._read_pointer()
        if version is None:
            return None
        arrived = version != self._pointer_seen
        self._pointer_seen = version
        current = self.handle.current
        if current is not None and current.version == version:
            return None
        kept = self.handle.loaded(version)
        if kept is not None:
            self.refusals.pop(version, None)
            self._swap(kept, "rollback")
            await self._refresh_lease(force=True)
            return kept
        canary = self.canary
        if canary is not None and canary.model.version == version:
            # promoted: the candidate is loaded, validated and warm; it becomes the champion as is
            self.refusals.pop(version, None)
            self._set_canary(None, "promoted to champion")
            self._swap(canary.model, "promoted")
            await self._refresh_lease(force=True)
            return canary.model
        refusal = self.refusals.get(version)
        if refusal is not None and not self._may_retry(version, refusal, arrived):
            return None
        # Taken before loading: a change made while the load runs is then seen as a change.
        fingerprint = self.registry.fingerprint(self.name, version)
        # Leased before loading: gc must not delete the folder while it is read (a lagging
        # replica may be loading a version CURRENT has long moved past).
        await self._refresh_lease(loading=version, force=True)
        try:
            model = await asyncio.to_thread(self.loader.from_registry, self.registry, self.name, version)
        except ModelRejected as e:
            self._refuse(version, fingerprint, e, refusal)
            return None
        self.refusals.pop(version, None)
        self._swap(model, "loaded")
        await self._refresh_lease(force=True)
        return model

    async def _check_canary(self) -> None:
        """Follow CANARY (see the module doc): load a new candidate beside the champion, apply a
        mode/share change, or drop the candidate when the pointer is gone, unreadable or names
        the champion."""
        try:
            state = self.registry.canary(self.name)
        except RegistryError as e:
            error = str(e)
            if error != self._canary_error:  # once per distinct state, not every poll
                self._canary_error = error
                metrics.REGISTRY_ERRORS.labels(self.name, e.reason).inc()
                log.error("model %s: cannot read the CANARY pointer (%s): serving the champion only: %s",
                          self.name, e.reason, e)
            self._set_canary(None, "CANARY unreadable")
            return
        if self._canary_error is not None:
            self._canary_error = None
            log.info("model %s: the CANARY pointer reads again", self.name)
        current = self.handle.current
        if state is None or current is None or state.version == current.version:
            self._canary_seen = state.version if state is not None else None
            self._set_canary(None, "no canary" if state is None else
                             "no champion loaded" if current is None else "it is the champion")
            return
        arrived = state.version != self._canary_seen
        self._canary_seen = state.version
        held = self.canary
        if held is not None and held.model.version == state.version:
            if held.state != state:  # same version, new mode or share: no reload
                self._set_canary(Canary(held.model, state), "pointer changed")
            return
        model = self.handle.loaded(state.version)  # e.g. the previous champion, still warm
        if model is None:
            refusal = self.refusals.get(state.version)
            if refusal is not None and not self._may_retry(state.version, refusal, arrived):
                self._set_canary(None, f"version {state.version} refused")
                return
            fingerprint = self.registry.fingerprint(self.name, state.version)
            await self._refresh_lease(loading=state.version, force=True)
            try:
                model = await asyncio.to_thread(self.loader.from_registry, self.registry, self.name, state.version)
            except ModelRejected as e:
                self._refuse(state.version, fingerprint, e, refusal)
                self._set_canary(None, f"version {state.version} refused")
                return
            self.refusals.pop(state.version, None)
            metrics.RELOADS.labels(self.name, "canary_loaded").inc()
        # the pointer may have moved while the candidate loaded: the next poll sees it
        self._set_canary(Canary(model, state), "loaded")
        await self._refresh_lease(force=True)

    def _set_canary(self, canary: Canary | None, why: str) -> None:
        old = self.canary
        if old is None and canary is None:
            return
        self.canary = canary
        CANARY_SHARE.labels(self.name).set(canary.share if canary is not None and canary.mode == "canary" else 0.0)
        for mode in ("canary", "shadow"):
            on = canary is not None and canary.mode == mode
            CANARY_VERSION.labels(self.name, mode).set(int(canary.model.version) if on else 0)
        if canary is None:
            log.info("model %s: candidate %s no longer served beside the champion (%s)", self.name,
                     old.model.version, why)
        else:
            log.info("model %s: candidate %s served beside champion %s as %s%s (%s)", self.name,
                     canary.model.version, self.handle.current.version if self.handle.current else "none",
                     canary.mode, f", share {canary.share:g}" if canary.mode == "canary" else "", why)

    def _read_pointer(self) -> str | None:
        try:
            version = self.registry.current_version(self.name)
        except RegistryError as e:
            state = str(e)
            if state != self._pointer_error:  # once per distinct state: the poll would repeat it forever
                self._pointer_error = state
                metrics.REGISTRY_ERRORS.labels(self.name, e.reason).inc()
                metrics.POINTER_UNREADABLE.labels(self.name).set(1)
                current = self.handle.current
                log.error("model %s: cannot read the registry pointer (%s), still serving %s: %s", self.name,
                          e.reason, current.version if current else "nothing", e)
            return None
        if self._pointer_error is not None:
            self._pointer_error = None
            metrics.POINTER_UNREADABLE.labels(self.name).set(0)
            log.info("model %s: the registry pointer reads again (version %s)", self.name, version)
        return version

    def _may_retry(self, version: str, refusal: Refusal, arrived: bool) -> bool:
        if not refusal.rearmed:
            if arrived:
                refusal.rearmed = True
            elif self.registry.fingerprint(self.name, version) != refusal.fingerprint:
                refusal.rearmed = True
            else:
                return False  # same files, same request: the same answer
        # Rearmed stays set while the backoff runs, so the retry happens once it has passed.
        return self.clock() >= refusal.retry_at

    def _refuse(self, version: str, fingerprint: tuple, e: ModelRejected, previous: Refusal | None) -> None:
        attempts = previous.attempts + 1 if previous is not None else 1
        backoff = min(self.retry_max_s, self.retry_min_s * 2 ** (attempts - 1))
        self.refusals.pop(version, None)  # re-inserted last: the bound below forgets the oldest
        self.refusals[version] = Refusal(str(e), fingerprint, attempts, self.clock() + backoff)
        while len(self.refusals) > self.max_refusals:
            del self.refusals[next(iter(self.refusals))]
        metrics.RELOADS.labels(self.name, "refused").inc()
        cause = e.__cause__
        if isinstance(cause, RegistryError):  # the registry's own problems (links, checksums) by reason
            metrics.REGISTRY_ERRORS.labels(self.name, cause.reason).inc()
        current = self.handle.current
        log.error("model %s: refused version %s (attempt %d, next retry only if its files change or the "
                  "pointer moves back, not before %.0f s), still serving %s: %s", self.name, version, attempts,
                  backoff, current.version if current else "nothing", e)

    def _swap(self, model: LoadedModel, result: str) -> None:
        old = self.handle.swap(model)
        metrics.RELOADS.labels(self.name, result).inc()
        metrics.set_model_info(self.name, model.version, model.provider)
        log.info("model %s: now serving version %s on %s (was %s)", self.name, model.version, model.provider,
                 old.version if old else "nothing")

    async def _refresh_lease(self, loading: str | None = None, force: bool = False) -> None:
        """Write this process's lease (see the module doc) when due or forced. Never raises."""
        if self.lease_refresh_s <= 0 or not force and self.clock() < self._lease_due:
            return
        current, previous = self.handle.current, self.handle.previous
        canary = self.canary
        held = {"serving": current.version if current else None,
                "previous": previous.version if previous else None, "loading": loading,
                "canary": canary.model.version if canary is not None else None}
        if not any(held.values()):
            return  # holds nothing: nothing to protect
        self._lease_due = self.clock() + self.lease_refresh_s
        try:
            await asyncio.to_thread(self.registry.write_lease, self.name, self.instance, held)
        except (RegistryError, OSError) as e:
            state = f"{type(e).__name__}: {e}"
            if state != self._lease_error:  # once per distinct problem, not every refresh
                self._lease_error = state
                metrics.REGISTRY_ERRORS.labels(self.name, "lease_write").inc()
                log.warning("model %s: cannot write the serving lease %s (registry gc may then delete versions "
                            "this process holds once they are old enough): %s", self.name, self.instance, state)
            return
        self._leased = True
        if self._lease_error is not None:
            self._lease_error = None
            log.info("model %s: serving lease %s written again", self.name, self.instance)

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
        if self._leased:
            # A clean stop holds nothing any more; after a crash the lease just goes stale (TTL).
            try:
                await asyncio.to_thread(self.registry.remove_lease, self.name, self.instance)
            except (RegistryError, OSError) as e:
                log.warning("model %s: cannot remove the serving lease %s: %s", self.name, self.instance, e)
            self._leased = False
