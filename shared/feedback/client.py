"""FeedbackClient: the service side of the feedback stream (see the package docstring for the
design: buffer, in-flight map, spool, replay, and the delivery contract of an outcome)."""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Mapping, Sequence

import grpc
import numpy as np
from google.protobuf.message import Message

from protos.feedback.v1 import feedback_pb2
from shared.feedback.domains import domain_label, domain_value
from shared.feedback.framing import BATCH_FRAMING, MAX_BATCH_BYTES, MAX_BATCH_RECORDS
from shared.feedback.metrics import (ACK_LABEL, ACKED, BUFFERED, CONNECTED, DROPPED, IN_FLIGHT, SENT, SPOOL_BYTES,
                                     SPOOLED)
from shared.feedback.records import ShadowRecord, outcome_record, served_record
from shared.feedback.sender import StreamSender
from shared.feedback.spool import Spool

log = logging.getLogger(__name__)


class FeedbackClient(StreamSender):
    """Streams served predictions and outcomes to the trainer; see the package docstring, in
    particular the delivery contract: `record_outcome` returns once the outcome is in memory
    (lost on kill -9 until acked or spooled), `record_outcome_durable` once it is fsync'd in the
    spool (survives kill -9). Identity towards the trainer: `metadata` carries the service's
    token ((TOKEN_METADATA, token)) and `channel_credentials` its TLS client certificate."""

    def __init__(self, target: str, *, domain: str, spool_dir: str | Path, instance_id: str | None = None,
                 max_buffer: int = 10000, max_in_flight: int = 2000, max_spool_bytes: int = 256 << 20,
                 batch_max: int = 256, max_batch_bytes: int = MAX_BATCH_BYTES, reconnect_backoff_s: tuple[float, float] = (0.2, 5.0),
                 channel_credentials: grpc.ChannelCredentials | None = None,
                 channel_options: Sequence[tuple[str, object]] = (), metadata: Sequence[tuple[str, str]] = (),
                 ack_timeout_s: float = 30.0, spool_interval_s: float = 0.02, batch_linger_s: float = 0.02,
                 max_record_bytes: int = MAX_BATCH_BYTES - BATCH_FRAMING) -> None:
        if max_buffer < 1 or max_in_flight < 1 or batch_max < 1:
            raise ValueError("max_buffer, max_in_flight and batch_max must be >= 1")
        if batch_max > MAX_BATCH_RECORDS or not 0 < max_batch_bytes <= MAX_BATCH_BYTES:
            raise ValueError(f"batch_max must be <= {MAX_BATCH_RECORDS} and max_batch_bytes in 1..{MAX_BATCH_BYTES} "
                             "(feedback.proto's limits on a FeedbackBatch)")
        if max_record_bytes > max_batch_bytes - BATCH_FRAMING:
            raise ValueError(f"max_record_bytes must leave room for the framing in a batch: at most "
                             f"max_batch_bytes - {BATCH_FRAMING} = {max_batch_bytes - BATCH_FRAMING}")
        lo, hi = reconnect_backoff_s
        if not 0 < lo <= hi:
            raise ValueError(f"reconnect_backoff_s must be (min, max) with 0 < min <= max, got {reconnect_backoff_s}")
        self.target = target
        self.domain = domain_value(domain)
        self.domain_label = domain_label(self.domain)
        # Unique per process start: a record_id is never reused for other contents, even after
        # a restart. A caller-given instance_id must be just as unique.
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.max_buffer = max_buffer
        self.max_in_flight = max_in_flight
        self.batch_max = batch_max  # most records per FeedbackBatch (and per spool write on overflow)
        self.max_batch_bytes = max_batch_bytes  # most bytes per FeedbackBatch
        self.backoff_min_s, self.backoff_max_s = float(lo), float(hi)
        self.ack_timeout_s = ack_timeout_s
        self.spool_interval_s = spool_interval_s
        if batch_linger_s < 0:
            raise ValueError("batch_linger_s must be >= 0")
        self.batch_linger_s = batch_linger_s
        # Larger records are refused up front: the trainer's gRPC receive limit (4 MiB by
        # default) would end the stream on them again and again after every replay. A record
        # must fit alone in a batch.
        self.max_record_bytes = max_record_bytes
        self._credentials = channel_credentials
        self._options = [("grpc.initial_reconnect_backoff_ms", int(lo * 1000)),
                         ("grpc.min_reconnect_backoff_ms", int(lo * 1000)),
                         ("grpc.max_reconnect_backoff_ms", int(hi * 1000)), *channel_options]
        self._metadata = tuple(metadata)

        self.spool = Spool(spool_dir, max_spool_bytes)
        self._seq = itertools.count(1)
        self._buffer: collections.deque[tuple[str, bytes]] = collections.deque()
        # record_id -> (payload, spool position or None when it came from the buffer, monotonic send time)
        self._in_flight: dict[str, tuple[bytes, tuple[int, int] | None, float]] = {}
        self._overflow_lock = threading.Lock()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stopping = False
        self._closed = False
        self._connected = False

        self.n_recorded = 0
        self.n_sent = 0
        self.n_stored = 0
        self.n_duplicate = 0
        self.n_rejected = 0
        self.n_spooled = 0
        self.n_dropped = 0
        self.n_invalid = 0
        self.n_sessions = 0
        self.n_connects = 0
        self._failures = 0
        self.n_stream_failures = 0
        self._drop_logged_at = 0.0
        self._invalid_logged_at = 0.0
        self._reject_logged_at = 0.0
        self._refused_logged_at = 0.0

        d = self.domain_label
        ref = weakref.ref(self)
        BUFFERED.labels(d).set_function(lambda: len(c._buffer) if (c := ref()) is not None else 0)
        IN_FLIGHT.labels(d).set_function(lambda: len(c._in_flight) if (c := ref()) is not None else 0)
        SPOOL_BYTES.labels(d).set_function(lambda: c.spool.bytes if (c := ref()) is not None else 0)
        CONNECTED.labels(d).set(0)
        self._m_spooled = SPOOLED.labels(d)
        self._m_sent = SENT.labels(d)
        self._m_acked = {s: ACKED.labels(d, label) for s, label in ACK_LABEL.items()}

    # ---- the prediction path ----
    def record_served(self, prediction_id: str, model_name: str, model_version: str,
                      inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                      request: Message | None = None, response: Message | None = None,
                      served_at: float | None = None, shadow: ShadowRecord | None = None) -> bool:
        """Queue one served prediction. Never blocks, never raises; False when it was dropped.
        shadow: what a shadow version computed for the same request (ServedPrediction.shadow)."""
        try:
            rid = f"{self.instance_id}-{next(self._seq):012d}"
            payload = served_record(rid, self.domain, prediction_id, model_name, model_version, inputs, outputs,
                                    request, response, served_at, shadow)
            if len(payload) > self.max_record_bytes:
                raise ValueError(f"record is {len(payload)} bytes, more than max_record_bytes={self.max_record_bytes}")
        except Exception as e:  # never into the prediction path
            return self._invalid("served prediction", prediction_id, e)
        return self._enqueue(rid, payload)

    def _outcome_record(self, outcome: feedback_pb2.Outcome) -> tuple[str, bytes] | None:
        try:
            rid = f"{self.instance_id}-{next(self._seq):012d}"
            payload = outcome_record(rid, self.domain, outcome)
            if len(payload) > self.max_record_bytes:
                raise ValueError(f"record is {len(payload)} bytes, more than max_record_bytes={self.max_record_bytes}")
        except Exception as e:
            self._invalid("outcome", getattr(outcome, "prediction_id", "?"), e)
            return None
        return rid, payload

    def record_outcome(self, outcome: feedback_pb2.Outcome) -> bool:
        """Queue one outcome in memory. Never blocks, never raises; False when it was dropped.
        True means buffered, not yet durable (see the class docstring)."""
        built = self._outcome_record(outcome)
        return built is not None and self._enqueue(*built)

    async def record_outcome_durable(self, outcome: feedback_pb2.Outcome) -> bool:
        """Append one outcome to the spool and fsync it (in a thread), then let the sender take it
        from there. True only once it is on disk: it then survives kill -9 of this process (the
        next client on the spool_dir replays it). False when it could not be built, the spool is
        full, or the write or fsync failed (the caller answers RESOURCE_EXHAUSTED)."""
        if self._closed:
            self._drop(1, "closed")
            return False
        built = self._outcome_record(outcome)
        if built is None:
            return False

        def write() -> bool:
            with self._overflow_lock:
                written = self.spool.append([built])
            return written == 1 and self.spool.sync()

        if not await asyncio.to_thread(write):
            if not self.spool.room(len(built[1]) + 64):
                self._drop(1, "spool_full")
            return False
        self.n_recorded += 1
        self.n_spooled += 1
        self._m_spooled.inc()
        self._set_wake()  # the sender reads new spool rows on its next turn
        return True

    @property
    def accepting(self) -> bool:
        """False when the buffer and the spool are both full (answer RESOURCE_EXHAUSTED)."""
        return not self._closed and (len(self._buffer) < self.max_buffer or self.spool.room(64 << 10))

    def _invalid(self, what: str, prediction_id: str, e: Exception) -> bool:
        try:
            self.n_invalid += 1
            DROPPED.labels(self.domain_label, "invalid").inc()
            now = time.monotonic()
            if self.n_invalid <= 10 or now - self._invalid_logged_at >= 5.0:
                self._invalid_logged_at = now
                log.error("feedback: cannot build a record for %s %s (%d so far): %s: %s", what, prediction_id,
                          self.n_invalid, type(e).__name__, e)
        except Exception:
            pass
        return False

    def _enqueue(self, rid: str, payload: bytes) -> bool:
        if self._closed:
            self._drop(1, "closed")
            return False
        buf = self._buffer
        if len(buf) >= self.max_buffer and not self._overflow():
            self._drop(1, "spool_full")
            return False
        buf.append((rid, payload))
        self.n_recorded += 1
        wake = self._wake
        if wake is not None and not wake.is_set():
            if threading.get_ident() == self._loop_thread:
                wake.set()
            else:
                try:
                    self._loop.call_soon_threadsafe(wake.set)
                except RuntimeError:  # loop closed
                    pass
        return True

    def _overflow(self) -> bool:
        """Buffer full: move its oldest batch to the spool (keeps order: the spool is older)."""
        with self._overflow_lock:
            buf = self._buffer
            if len(buf) < self.max_buffer:
                return True
            batch = []
            for _ in range(min(self.batch_max, len(buf))):
                try:
                    batch.append(buf.popleft())
                except IndexError:
                    break
            written = self.spool.append(batch)
            if written:
                self.n_spooled += written
                self._m_spooled.inc(written)
            for entry in reversed(batch[written:]):
                buf.appendleft(entry)
            return len(buf) < self.max_buffer

    def _drop(self, n: int, reason: str) -> None:
        self.n_dropped += n
        DROPPED.labels(self.domain_label, reason).inc(n)
        now = time.monotonic()
        if now - self._drop_logged_at >= 5.0:
            self._drop_logged_at = now
            why = ("recorded after stop()" if reason == "closed" else
                   f"the trainer at {self.target} is unreachable or slow and the spool {self.spool.dir} is full "
                   f"({self.spool.bytes} of {self.spool.max_bytes} bytes)")
            log.error("feedback: DROPPED %d record(s) (%s); %d dropped so far by this client: %s", n, reason,
                      self.n_dropped, why)

    # ---- lifecycle ----
    def start(self) -> None:
        """Start the background sender on the running event loop."""
        if self._task is not None:
            return
        if self._closed:
            raise RuntimeError("feedback client is stopped")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._wake.set()
        self._task = self._loop.create_task(self._run(), name=f"feedback-{self.domain_label}")
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("feedback: sender task died; records now only buffer and spool until restart",
                      exc_info=task.exception())

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Send what is left and wait for acks (up to flush_timeout_s), spool the rest, close."""
        if self._closed:
            return
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            self._set_wake()
            await asyncio.wait({task}, timeout=max(0.0, flush_timeout_s))
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        self._closed = True
        self._requeue_unacked()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self.spool.close()
        self._set_connected(False)
        left = self.spool.pending
        if left:
            log.warning("feedback: stopped with %d record(s) spooled in %s; they are replayed at the next start",
                        left, self.spool.dir)
        else:
            log.info("feedback: stopped, everything acknowledged")

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every record so far is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.pending:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    @property
    def pending(self) -> int:
        """Records not yet acknowledged: buffered, in flight, or in the spool."""
        from_buffer = sum(1 for v in list(self._in_flight.values()) if v[1] is None)
        return len(self._buffer) + from_buffer + self.spool.pending

    @property
    def connected(self) -> bool:
        return self._connected

    def stats(self) -> dict[str, int]:
        return {
            "recorded": self.n_recorded, "sent": self.n_sent, "acked": self.n_stored + self.n_duplicate,
            "stored": self.n_stored, "duplicate": self.n_duplicate, "rejected": self.n_rejected,
            "spooled": self.n_spooled, "dropped": self.n_dropped, "invalid": self.n_invalid,
            "buffered": len(self._buffer), "in_flight": len(self._in_flight), "pending": self.pending,
            "spool_pending": self.spool.pending, "spool_bytes": self.spool.bytes, "spool_torn": self.spool.torn,
            "spool_lost": self.spool.lost,
            "connected": int(self._connected), "sessions": self.n_sessions, "connects": self.n_connects,
            "stream_failures": self.n_stream_failures,
        }
