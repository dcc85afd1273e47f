"""Asyncio micro-batcher: merge concurrent requests into one ONNX Runtime run.

Each request brings its inputs (batch axis first) and an absolute deadline. Worker
coroutines take requests off a bounded queue, merge those with the same non-batch shapes
up to `max_batch_size` rows, and run them in a worker thread: ORT releases the GIL, so
the event loop keeps receiving requests while a batch runs, and the next batch forms by
itself under load (no waiting needed). `max_queue_delay_us` adds an optional wait for
more rows when the queue is short, for models where bigger batches pay off.

- Queue full: ResourceExhausted at once (the caller sees RESOURCE_EXHAUSTED).
- Deadline passed while queued: the request is dropped before running (DEADLINE_EXCEEDED).
- Every request in a batch is answered by the same model version, which is returned.
- One bad request fails only itself: when a merged run of several requests raises (e.g. an
  index outside an embedding table that validation did not catch), each of its requests is
  re-run alone in the executor, so the others get their answers and only the ones that
  fail alone get the error. Logged once per split and counted (storefront_batch_splits_total,
  storefront_batch_isolated_failures_total). A failing run costs its requests one extra
  run each; a model that fails on every input fails each request alone, as it would unbatched.
- Shared (unbatched) inputs: a request may carry `shared` inputs that have no batch axis,
  e.g. a recommender's catalog matrix item_vectors [N, D]. They are fed once per session
  run, never concatenated, and requests merge only when they carry the very same array
  objects (their id() is part of the merge key: a catalog snapshot is one object, so every
  request against the same snapshot can share a run). Such inputs are usually derived from
  one model version (vectors computed by that version's item tower), so the request also
  pins the LoadedModel it was prepared with (`model=`): it runs on that version even if a
  hot swap happened meanwhile (the old version stays alive while a request references it).
  Requests whose batched inputs differ in inner shape never merge either: a service that
  wants them to should pad variable-length inputs to a few bucket widths.
- Cheap models run on the event loop itself: when a request's rows are expected to run in
  under `inline_below_us` (a moving average of run time per row), the hand-off to a worker thread and back costs more than the
  run (the MLP of the peer benchmark runs in ~15 us), so it is skipped; and a request that
  finds the queue empty then runs at once in its own coroutine, with no queue and no
  future (merging rows into one run saves nothing when a run costs microseconds).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np

from shared import metrics
from shared.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from shared.runtime.model import LoadedModel, ModelHandle

log = logging.getLogger(__name__)


class _Pending:
    __slots__ = ("feeds", "shared", "model", "rows", "key", "deadline", "future")

    def __init__(self, feeds, shared, model, rows, key, deadline, future):
        self.feeds = feeds
        self.shared = shared  # unbatched inputs, fed once per run (None: none)
        self.model = model  # the LoadedModel this request must run on (None: the live one)
        self.rows = rows
        self.key = key
        self.deadline = deadline
        self.future = future


def merge_key(feeds: Mapping[str, np.ndarray], shared: Mapping[str, np.ndarray] | None,
              model: LoadedModel | None) -> tuple:
    """Requests with equal keys can run as one batch: same inner shapes of every batched input,
    the very same shared array objects, and the same pinned model (or none)."""
    key = tuple(a.shape[1:] for a in feeds.values())
    if shared:
        key += tuple((name, id(a)) for name, a in shared.items())
    if model is not None:
        key += (id(model),)
    return key


class MicroBatcher:
    def __init__(
        self,
        handle: ModelHandle,
        *,
        max_batch_size: int = 64,
        max_queue_delay_us: int = 0,
        max_queue_size: int = 1024,
        workers: int = 1,
        inline_below_us: int = 200,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or workers < 1 or max_queue_delay_us < 0:
            raise ValueError("max_batch_size, max_queue_size and workers must be >= 1, the delay >= 0")
        self.handle = handle
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self.workers = workers
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"ort-{handle.name}")
        self._depth = metrics.QUEUE_DEPTH.labels(handle.name)
        self._batch_hist = metrics.BATCH_SIZE.labels(handle.name)
        self._closed = False
        self.inline_below_s = inline_below_us / 1e6
        self._run_s_per_row = float("inf")  # unknown until measured: start in a worker thread

    # ---- lifecycle ----
    def start(self) -> None:
        if self._tasks:
            return
        self._wakeup = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker(), name=f"batcher-{self.handle.name}-{i}")
                       for i in range(self.workers)]

    async def stop(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks = []
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(Unavailable("server is shutting down"))
        self._depth.set(0)
        self._executor.shutdown(wait=True)

    # ---- request side ----
    async def infer(self, feeds: Mapping[str, np.ndarray], rows: int,
                    deadline: float | None = None, *, shared: Mapping[str, np.ndarray] | None = None,
                    model: LoadedModel | None = None) -> tuple[list[np.ndarray], LoadedModel]:
        """Outputs for these rows (in signature order) and the model version that computed them.

        feeds (batch axis first) must already be validated against the model's signature;
        deadline is on the time.monotonic() clock. shared: inputs without a batch axis, fed
        once per run and never concatenated (see the module docstring). model: run on this
        version rather than the live one (the version the shared inputs were made for).
        """
        if self._closed or not self._tasks:
            raise Unavailable("server is shutting down")
        if self._run_s_per_row * rows < self.inline_below_s and not self._queue:
            return self._run_now(feeds, shared, model, rows, deadline)
        if len(self._queue) >= self.max_queue_size:
            metrics.DROPPED.labels(self.handle.name, "queue_full").inc()
            raise ResourceExhausted(
                f"model {self.handle.name!r}: batch queue is full ({self.max_queue_size} requests waiting); retry later"
            )
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(feeds, shared, model, rows, merge_key(feeds, shared, model), deadline, fut))
        self._depth.set(len(self._queue))
        self._wakeup.set()
        return await fut

    def _run_now(self, feeds: Mapping[str, np.ndarray], shared: Mapping[str, np.ndarray] | None,
                 pinned: LoadedModel | None, rows: int, deadline: float | None) -> tuple[list[np.ndarray], LoadedModel]:
        model = pinned or self.handle.current
        if model is None:
            raise Unavailable(f"model {self.handle.name!r} is not loaded yet")
        started = time.perf_counter()
        if deadline is not None and deadline <= time.monotonic():
            metrics.DROPPED.labels(self.handle.name, "deadline").inc()
            raise DeadlineExceeded("deadline passed before the model ran")
        outputs = model.run({**feeds, **shared} if shared else feeds)
        self._observe_run(time.perf_counter() - started, rows)
        self._batch_hist.observe(rows)
        return outputs, model

    def _observe_run(self, took: float, rows: int) -> None:
        per_row = took / max(rows, 1)
        avg = self._run_s_per_row
        self._run_s_per_row = per_row if avg == float("inf") else 0.9 * avg + 0.1 * per_row

    # ---- worker side ----
    def _take_batch(self) -> list[_Pending]:
        """Pop the head request and every later one that can join it, up to max rows."""
        now = time.monotonic()
        batch: list[_Pending] = []
        rows = 0
        key = None
        leftovers: list[_Pending] = []
        q = self._queue
        while q:
            p = q.popleft()
            if p.future.done():  # cancelled by the client while queued
                continue
            if p.deadline is not None and p.deadline <= now:
                metrics.DROPPED.labels(self.handle.name, "deadline").inc()
                p.future.set_exception(DeadlineExceeded("deadline passed while the request was queued"))
                continue
            if key is None:
                key = p.key
            elif p.key != key or rows + p.rows > self.max_batch_size:
                leftovers.append(p)
                if rows + p.rows > self.max_batch_size and p.key == key:
                    break
                continue
            batch.append(p)
            rows += p.rows
            if rows >= self.max_batch_size:
                break
        if leftovers:
            q.extendleft(reversed(leftovers))
        self._depth.set(len(q))
        return batch

    @property
    def queued(self) -> int:
        """Requests waiting for a run now."""
        return len(self._queue)

    def _queued_rows(self) -> int:
        return sum(p.rows for p in self._queue)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup
        while True:
            if not self._queue:
                wakeup.clear()
                await wakeup.wait()
            if self.max_queue_delay_s > 0 and self.max_batch_size > 1:
                # Short queue: give other requests a moment to arrive and join.
                until = loop.time() + self.max_queue_delay_s
                while self._queued_rows() < self.max_batch_size and loop.time() < until:
                    await asyncio.sleep(0 if until - loop.time() < 0.0005 else 0.0002)
            else:
                await asyncio.sleep(0)  # let requests already received this tick join
            batch = self._take_batch()
            if not batch:
                continue
            model = batch[0].model or self.handle.current  # every request of a batch pins the same one
            if model is None:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(Unavailable(f"model {self.handle.name!r} is not loaded yet"))
                continue
            try:
                rows = sum(p.rows for p in batch)
                started = time.perf_counter()
                if self._run_s_per_row * rows < self.inline_below_s:
                    outputs = _run_batch(model, batch)
                else:
                    outputs = await loop.run_in_executor(self._executor, _run_batch, model, batch)
                self._observe_run(time.perf_counter() - started, rows)
            except Exception as e:
                if len(batch) > 1:  # find the culprit(s): re-run each request alone
                    await self._run_alone(loop, model, batch, e)
                    continue
                log.exception("model %s/%s: run of 1 request failed", model.name, model.version)
                if not batch[0].future.done():
                    batch[0].future.set_exception(e)
                continue
            self._batch_hist.observe(rows)
            start = 0
            for p in batch:
                end = start + p.rows
                if not p.future.done():
                    if len(batch) == 1:
                        p.future.set_result((outputs, model))
                    else:
                        p.future.set_result(([y[start:end] for y in outputs], model))
                start = end


    async def _run_alone(self, loop: asyncio.AbstractEventLoop, model: LoadedModel, batch: list[_Pending],
                         error: Exception) -> None:
        """After a merged run of batch failed with error: run each request by itself (in the
        executor, concurrently up to its workers) and answer each with its own result."""
        metrics.BATCH_SPLITS.labels(self.handle.name).inc()
        now = time.monotonic()
        alive = []
        for p in batch:
            if p.future.done():
                continue
            if p.deadline is not None and p.deadline <= now:
                metrics.DROPPED.labels(self.handle.name, "deadline").inc()
                p.future.set_exception(DeadlineExceeded("deadline passed before the model ran"))
                continue
            alive.append(p)
        results = await asyncio.gather(*(loop.run_in_executor(self._executor, _run_batch, model, [p]) for p in alive),
                                       return_exceptions=True)
        failed = 0
        for p, result in zip(alive, results):
            if isinstance(result, BaseException):
                failed += 1
                if not p.future.done():
                    p.future.set_exception(result)
            else:
                self._batch_hist.observe(p.rows)
                if not p.future.done():
                    p.future.set_result((result, model))
        if failed:
            metrics.BATCH_ISOLATED_FAILURES.labels(self.handle.name).inc(failed)
        # One line per split (not per request): the merged error says what failed.
        log.warning("model %s/%s: a merged run of %d requests failed (%s: %s); re-ran them one by one: "
                    "%d failed alone, %d answered", model.name, model.version, len(batch), type(error).__name__,
                    str(error)[:500], failed, len(alive) - failed)


def _run_batch(model: LoadedModel, batch: Sequence[_Pending]) -> list[np.ndarray]:
    shared = batch[0].shared  # the same objects for every request of the batch (merge key)
    if len(batch) == 1:
        return model.run({**batch[0].feeds, **shared} if shared else batch[0].feeds)
    names = batch[0].feeds.keys()
    feeds = {n: np.concatenate([p.feeds[n] for p in batch], axis=0) for n in names}
    if shared:
        feeds.update(shared)
    outputs = model.run(feeds)
    rows = sum(p.rows for p in batch)
    for name, y in zip(model.output_names, outputs):
        if y.ndim == 0 or y.shape[0] != rows:
            raise RuntimeError(f"output {name!r} has no batch axis (shape {y.shape}); serve this model with max_batch_size=1")
    return outputs
