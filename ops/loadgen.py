"""The load generator every load test and benchmark runs: workers firing calls at a target.

A *call* is `async (i) -> response`: the i-th request of a scenario (a ScoreTransaction, a
Recommend, a ModelInfer...). `generate` fires calls for a warm-up, then a measured window of
`duration` seconds, in one of two modes:

- closed loop (`concurrency=N`): N workers, each sends, awaits the answer, sends again;
- open loop (`rate=R`): calls start at arrival times whatever the answers do (Poisson arrivals,
  or a fixed schedule with `poisson=False`), at most `max_in_flight` outstanding (arrivals
  beyond that are counted as `dropped_by_client`). A latency counts from the scheduled
  arrival, so a client or server falling behind shows in the figures instead of hiding (no
  coordinated omission).

A call counts in the window when it started inside it; failures are counted by gRPC status
code (during the warm-up separately). The returned `Recorder` holds every measured latency
with its start offset (so `per_second` can chart it), this process's CPU over the window and
how long its event loop stalled (a starved client inflates every latency it measures).
`window(t_start, t_end)` runs beside the load, told the window's edges on the
time.perf_counter() clock, to measure (server CPU) or act (publish a version) exactly there.
"""
from __future__ import annotations

import asyncio
import collections
import random
import resource
import sys
import time
from typing import Any, Awaitable, Callable

import grpc
import numpy as np

Call = Callable[[int], Awaitable[object]]
# window(t_start, t_end) -> awaitable; both times on the time.perf_counter() clock
Window = Callable[[float, float], Awaitable[Any]]
# on_response(response, seconds after the window opened when it came back), for measured calls
OnResponse = Callable[[object, float], None]

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
UNAVAILABLE_BACKOFF_S = 0.01  # a closed-loop worker does not spin on a server that is gone


def self_cpu_s() -> float:
    """User + system CPU seconds this process has used so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Recorder:
    """What one run measured: latencies, failures, client CPU and event-loop lag."""

    def __init__(self, start: float, duration: float | None = None, on_response: OnResponse | None = None) -> None:
        self.start = start  # the window opens here (time.perf_counter() clock)
        self.duration = duration
        self.on_response = on_response
        self.samples: list[tuple[float, float]] = []  # (start offset s, latency s) of measured successes
        self.errors: collections.Counter[str] = collections.Counter()
        self.warmup_errors: collections.Counter[str] = collections.Counter()
        self.dropped_by_client = 0
        self.sent = 0  # open loop: calls started inside the window
        self.send_lag_max_s = 0.0  # open loop: how far behind its schedule the sender started a call, at most
        self.client_cpu_s: float | None = None
        self.loop_lag_max_s = 0.0
        self.window_result: Any = None

    def ok(self, t0: float, latency: float, response: object = None) -> None:
        self.samples.append((t0 - self.start, latency))
        if self.on_response is not None:
            self.on_response(response, t0 + latency - self.start)

    def error(self, code: str, measured: bool = True) -> None:
        (self.errors if measured else self.warmup_errors)[code] += 1


async def _timed(call: Call, i: int, rec: Recorder, measure: bool, scheduled: float | None = None) -> str:
    """One call; its status code name. Open loop: latency counts from the scheduled arrival."""
    t0 = time.perf_counter() if scheduled is None else scheduled
    try:
        response = await call(i)
    except grpc.aio.AioRpcError as e:
        rec.error(e.code().name, measure)
        return e.code().name
    if measure:
        rec.ok(t0, time.perf_counter() - t0, response)
    return "OK"


async def closed_loop(call: Call, concurrency: int, duration: float, warmup: float, rec: Recorder,
                      stop: asyncio.Event | None = None) -> None:
    """`concurrency` workers from now until the window closes (or `stop` is set); the warm-up is
    the time until the window opens at rec.start (`warmup` says how long that is, as open_loop
    takes it)."""
    t_end = rec.start + duration

    async def worker(w: int) -> None:
        i = w
        while (now := time.perf_counter()) < t_end and not (stop is not None and stop.is_set()):
            if await _timed(call, i, rec, now >= rec.start) == "UNAVAILABLE":
                await asyncio.sleep(UNAVAILABLE_BACKOFF_S)
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))


async def open_loop(call: Call, rate: float, duration: float, warmup: float, rec: Recorder,
                    max_in_flight: int, seed: int = 0, poisson: bool = True) -> None:
    """Arrivals at `rate` per second from warm-up start to the window's end; every call that is
    due starts, even when the sender is behind."""
    rng = random.Random(seed)
    t_end = rec.start + duration
    in_flight: set[asyncio.Task] = set()
    next_t, i = rec.start - warmup, 0
    while next_t < t_end:
        delay = next_t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        measured = next_t >= rec.start
        if len(in_flight) >= max_in_flight:
            if measured:
                rec.dropped_by_client += 1
        else:
            rec.send_lag_max_s = max(rec.send_lag_max_s, time.perf_counter() - next_t)
            task = asyncio.ensure_future(_timed(call, i, rec, measured, scheduled=next_t))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            if measured:
                rec.sent += 1
        i += 1
        next_t += rng.expovariate(rate) if poisson else 1.0 / rate
    if in_flight:
        await asyncio.gather(*in_flight)


async def _watch_window(rec: Recorder, duration: float, window: Window | None,
                        stop: asyncio.Event | None = None) -> None:
    """At the window's edges: this process's CPU; in between, the event loop's longest stall
    (how late a 5 ms sleep wakes up) and `window`, whose result lands in rec.window_result.
    A `stop` set inside the window closes it there (rec.duration becomes what ran)."""
    t_start, t_end = rec.start, rec.start + duration
    await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
    cpu_a = self_cpu_s()
    task = asyncio.ensure_future(window(t_start, t_end)) if window is not None else None
    while (now := time.perf_counter()) < t_end:
        if stop is not None and stop.is_set():
            rec.duration = now - t_start
            break
        await asyncio.sleep(min(0.005, t_end - now))
        rec.loop_lag_max_s = max(rec.loop_lag_max_s, time.perf_counter() - now - 0.005)
    rec.client_cpu_s = self_cpu_s() - cpu_a
    if task is not None:
        rec.window_result = await task


async def _print_progress(rec: Recorder, duration: float, label: str) -> None:
    while True:
        await asyncio.sleep(1.0)
        now = time.perf_counter() - rec.start
        if now < 0:
            print(f"[{label}] warming up ({-now:.0f} s left)", file=sys.stderr)
            continue
        recent = [s[1] for s in rec.samples if s[0] >= now - 1]
        p99 = f"{np.percentile(recent, 99) * 1e3:.1f} ms" if recent else "-"
        print(f"[{label}] {now:5.0f}/{duration:.0f} s  {len(recent)} req/s  p99 {p99}  "
              f"errors {sum(rec.errors.values())}", file=sys.stderr)


async def generate(call: Call, *, duration: float, warmup: float = 0.0, concurrency: int = 1, rate: float = 0.0,
                   max_in_flight: int = 10_000, poisson: bool = True, seed: int = 0, window: Window | None = None,
                   on_response: OnResponse | None = None, progress_label: str | None = None,
                   stop: asyncio.Event | None = None) -> Recorder:
    """Closed loop at `concurrency` (rate 0) or open loop at `rate`; see the module doc.
    progress_label: print req/s, p99 and errors to stderr every second under that label.
    stop (closed loop): set it (from `window`, say, once what it waits for happened) to end the
    load early; `duration` is then the longest it runs."""
    if duration <= 0 or warmup < 0 or concurrency < 1 or rate < 0 or max_in_flight < 1:
        raise ValueError("need duration > 0, warmup >= 0, concurrency >= 1, rate >= 0, max_in_flight >= 1")
    if stop is not None and rate:
        raise ValueError("stop ends a closed loop; an open loop runs its schedule")
    rec = Recorder(time.perf_counter() + warmup, duration, on_response)
    helpers = [asyncio.ensure_future(_watch_window(rec, duration, window, stop))]
    if progress_label:
        helpers.append(asyncio.ensure_future(_print_progress(rec, duration, progress_label)))
    try:
        await (open_loop(call, rate, duration, warmup, rec, max_in_flight, seed, poisson) if rate
               else closed_loop(call, concurrency, duration, warmup, rec, stop))
        await helpers[0]
    finally:  # a failed load leaves no task behind
        for task in helpers:
            task.cancel()
    return rec


# ---- summaries
def percentile_ms(latencies_s: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(latencies_s, q)) * 1e3, 3) if latencies_s.size else None


def latency_summary(latencies_s: list[float] | np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/p99.9, mean and max, in milliseconds, of latencies given in seconds."""
    lat = np.asarray(latencies_s, dtype=np.float64)
    return {"p50_ms": percentile_ms(lat, 50), "p90_ms": percentile_ms(lat, 90), "p99_ms": percentile_ms(lat, 99),
            "p999_ms": percentile_ms(lat, 99.9), "mean_ms": round(float(lat.mean()) * 1e3, 3) if lat.size else None,
            "max_ms": round(float(lat.max()) * 1e3, 3) if lat.size else None}


def summary(rec: Recorder, duration: float | None = None) -> dict[str, Any]:
    """ok, req/s, latency percentiles (ms), errors by code, dropped_by_client of the window."""
    duration = duration if duration is not None else rec.duration
    n = len(rec.samples)
    return {"ok": n, "rps": round(n / duration, 1), **latency_summary([s[1] for s in rec.samples]),
            "errors": dict(rec.errors), "dropped_by_client": rec.dropped_by_client}


def client_summary(rec: Recorder) -> dict[str, Any]:
    """What the client itself cost and suffered over the window (read it before trusting latencies)."""
    n, cpu = len(rec.samples), rec.client_cpu_s or 0.0
    return {"client_cpu_us_per_req": round(cpu / n * 1e6, 1) if n else None,
            "client_cpu_pct": round(100 * cpu / rec.duration, 1),
            "client_loop_lag_max_ms": round(max(0.0, rec.loop_lag_max_s) * 1e3, 1),
            "warmup_errors": dict(rec.warmup_errors)}


def per_second(rec: Recorder, duration: float | None = None) -> list[dict]:
    """ok, p50 and p99 of each second of the window, by when the calls started."""
    duration = duration if duration is not None else rec.duration
    by_second: dict[int, list[float]] = collections.defaultdict(list)
    for offset, latency in rec.samples:
        by_second[int(offset)].append(latency)
    rows = []
    for sec in range(int(np.ceil(duration))):
        lat = np.asarray(by_second.get(sec, []))
        rows.append({"second": sec, "ok": int(lat.size), "p50_ms": percentile_ms(lat, 50),
                     "p99_ms": percentile_ms(lat, 99)})
    return rows


# An outcome report that failed in transport (the connection, or the call cancelled under it) is
# sent again: outcomes are idempotent (the service answers a repeat as a duplicate), which is how
# a storefront backend should report them. Once in a full test run on 2 busy cores one of these
# reports ended CANCELLED with no cause in our code, and its click never reached the trainer.
OUTCOME_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def report_outcome(send: Callable[[], Awaitable[object]], attempts: int = 3, backoff_s: float = 0.1) -> bool:
    """await send() (one ReportOutcome call) up to `attempts` times while it fails with an
    OUTCOME_RETRY_CODES status, the waits doubling from backoff_s; any other failure, or the
    last, is printed. True once it was answered."""
    for attempt in range(attempts):
        try:
            await send()
            return True
        except grpc.aio.AioRpcError as e:
            if e.code() not in OUTCOME_RETRY_CODES or attempt == attempts - 1:
                print(f"[loadtest] ReportOutcome failed: {e.code().name}: {e.details()}", file=sys.stderr)
                return False
            await asyncio.sleep(backoff_s * 2 ** attempt)
    return False


class Later:
    """Follow-up calls a scenario schedules after a response (an outcome reported after a label
    delay), awaited at the end so none is lost when the load stops."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def __call__(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks)
