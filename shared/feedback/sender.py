"""The background half of FeedbackClient: one bidirectional stream to the trainer at a time,
the spool replayed first then the buffer, acks matched by record_id, and between sessions
the outage (reconnect backoff with jitter while records are group-committed to the spool)."""
from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time

import grpc

from protos.feedback.v1 import feedback_pb2
from shared.channels import aio_channel
from shared.feedback.framing import BATCH_FRAMING, STREAM_METHOD, record_head
from shared.feedback.metrics import CONNECTED
from shared.feedback.spool import Spool

log = logging.getLogger(__name__)


class _StreamBroken(Exception):
    pass


class StreamSender:
    """Mixin holding FeedbackClient's sender task; the state it shares with the prediction path
    (buffer, in-flight map, spool, counters) is set up by FeedbackClient.__init__."""

    target: str
    domain_label: str
    spool: Spool
    batch_max: int
    max_in_flight: int
    max_batch_bytes: int
    backoff_min_s: float
    backoff_max_s: float
    ack_timeout_s: float
    spool_interval_s: float
    batch_linger_s: float
    _buffer: collections.deque[tuple[str, bytes]]
    _in_flight: dict[str, tuple[bytes, tuple[int, int] | None, float]]
    _overflow_lock: threading.Lock
    _wake: asyncio.Event | None
    _channel: grpc.aio.Channel | None
    _stopping: bool
    _connected: bool

    def _set_wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _wait_wake(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _set_connected(self, up: bool) -> None:
        if up != self._connected:
            self._connected = up
            CONNECTED.labels(self.domain_label).set(1 if up else 0)
            if up:
                self.n_connects += 1
                if self._failures or self.spool.pending:
                    log.info("feedback: connected to trainer %s%s; replaying %d spooled records first", self.target,
                             f" after {self._failures} failed attempts" if self._failures else "",
                             self.spool.pending)
                self._failures = 0

    def _nothing_pending(self) -> bool:
        return not self._buffer and not self._in_flight and self.spool.pending == 0

    def _new_channel(self) -> grpc.aio.Channel:
        # The target may name several trainer replicas: round_robin picks a live one for each new
        # stream. No gRPC retry policy here: this sender spools, reconnects with backoff and
        # replays by itself, and a retried stream held its sent messages in gRPC's retry buffer
        # while every replica was down: with the trainer stopped, the service stopped answering
        # (tests/test_loop_e2e.py test_trainer_down_under_traffic...).
        return aio_channel(self.target, self._credentials, self._options, max_attempts=1)

    async def _run(self) -> None:
        backoff = self.backoff_min_s
        while True:
            if self._stopping and self._nothing_pending():
                return
            connects_before = self.n_connects
            try:
                if self._channel is None:
                    self._channel = self._new_channel()
                await self._session()
                return  # only returns once stopping and drained
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.n_stream_failures += 1
                if self.n_connects > connects_before:  # it was up: start the backoff over
                    self._failures = 0
                    backoff = self.backoff_min_s
                self._failures += 1
                reason = _describe(e)
                refused = isinstance(e, grpc.aio.AioRpcError) and e.code() in _CONFIG_CODES
                if refused and (self._failures == 1 or time.monotonic() - self._refused_logged_at >= 60):
                    self._refused_logged_at = time.monotonic()
                    log.error("feedback: trainer %s refuses this client (%s): check TLS credentials and the "
                              "target; spooling to %s meanwhile", self.target, reason, self.spool.dir)
                elif self._failures == 1:
                    log.warning("feedback: stream to trainer %s failed (%s); spooling to %s and reconnecting "
                                "with backoff", self.target, reason, self.spool.dir)
                else:
                    log.debug("feedback: trainer %s still unreachable (%s), attempt %d", self.target, reason,
                              self._failures)
                # A fresh channel next time: our backoff, not the channel's, decides when to retry.
                channel, self._channel = self._channel, None
                if channel is not None:
                    await channel.close()
            if self._stopping:
                return
            delay = backoff * random.uniform(0.8, 1.2)
            backoff = min(self.backoff_max_s, backoff * 2)
            try:
                await self._outage(delay)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("feedback: spooling failed")
                await asyncio.sleep(self.backoff_min_s)

    async def _outage(self, delay: float) -> None:
        """Wait before reconnecting; meanwhile spool whatever is recorded (group commit)."""
        deadline = time.monotonic() + delay
        while not self._stopping:
            self._wake.clear()
            if self._buffer:
                self._spool_entries([])
            if self.spool.dirty:
                await asyncio.to_thread(self.spool.sync)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, self.spool_interval_s))
            if not self._buffer:
                await self._wait_wake(deadline - time.monotonic())

    def _spool_entries(self, first: list[tuple[str, bytes]]) -> None:
        """Append first, then everything buffered, to the spool; drop (loudly) what does not fit."""
        entries = first
        buf = self._buffer
        while True:
            try:
                entries.append(buf.popleft())
            except IndexError:
                break
        if not entries:
            return
        with self._overflow_lock:
            written = self.spool.append(entries)
        if written:
            self.n_spooled += written
            self._m_spooled.inc(written)
        if written < len(entries):
            self._drop(len(entries) - written, "spool_full")

    def _requeue_unacked(self) -> None:
        """After a break (or at stop): in-flight records from the buffer, then the buffer, to the spool."""
        first = [(rid, v[0]) for rid, v in self._in_flight.items() if v[1] is None]
        self._in_flight.clear()
        self._spool_entries(first)

    async def _session(self) -> None:
        self.n_sessions += 1
        call = self._channel.stream_stream(STREAM_METHOD, request_serializer=None,  # batches built by encode_batch
                                           response_deserializer=feedback_pb2.AckBatch.FromString)(
            metadata=self._metadata or None, wait_for_ready=False)
        reader = asyncio.get_running_loop().create_task(self._read_acks(call))
        cursor = self.spool.first_cursor()  # replay the spool first, in order, then the buffer
        try:
            while True:
                self._wake.clear()
                if reader.done():
                    reader.result()
                    raise _StreamBroken("trainer ended the stream")
                if not self._connected and self._channel.get_state() == grpc.ChannelConnectivity.READY:
                    self._set_connected(True)
                if self.spool.dirty:
                    await asyncio.to_thread(self.spool.sync)
                if self._in_flight:
                    oldest = next(iter(self._in_flight.values()))[2]
                    if time.monotonic() - oldest > self.ack_timeout_s:
                        raise _StreamBroken(f"no ack for {self.ack_timeout_s:g} s")
                room = min(self.batch_max, self.max_in_flight - len(self._in_flight))
                if room <= 0:
                    await self._wait_wake(0.1)
                    continue
                # Under live traffic records trickle in one per prediction; a message per record
                # costs both processes ~100 us of gRPC work, so wait a moment for more to share it.
                # (20 ms, the client's default: at 1,500 predictions/s the trainer spent 158 us of
                # CPU per record with 5 ms and 91 us with 20 ms, medians of 4 runs; the records
                # reach the trainer 15 ms later, against a freshness budget of a minute.)
                if self.batch_linger_s > 0 and 0 < len(self._buffer) < room and not self._stopping:
                    await asyncio.sleep(self.batch_linger_s)
                # One FeedbackBatch: whatever is ready, spool first.
                max_bytes = self.max_batch_bytes
                # (no query while the spool holds nothing unacknowledged: live traffic's case)
                batch = self.spool.read(cursor, room, max_bytes) if self.spool.pending else []
                if not batch:
                    buf = self._buffer
                    nbytes = 0
                    while len(batch) < room:
                        try:
                            rid, payload = buf.popleft()
                        except IndexError:
                            break
                        nbytes += len(payload) + BATCH_FRAMING
                        if nbytes > max_bytes and batch:
                            buf.appendleft((rid, payload))  # the next batch starts with it
                            break
                        batch.append((rid, payload, None))
                if not batch:
                    if self._stopping and self._nothing_pending():
                        return
                    await self._wait_wake(0.25)
                    continue
                now = time.monotonic()
                in_flight = self._in_flight
                parts: list[bytes] = []
                for rid, payload, where in batch:
                    in_flight[rid] = (payload, where, now)
                    parts.append(record_head(len(payload)))
                    parts.append(payload)
                message = b"".join(parts)
                del parts
                try:
                    async with asyncio.timeout(self.ack_timeout_s):  # a trainer that stops reading
                        await call.write(message)
                except Exception as e:
                    # A write racing the end of the call says little ("RPC already finished",
                    # INTERNAL); the call's own status (what the reader saw) says why.
                    await asyncio.wait({reader}, timeout=1.0)
                    if reader.done() and not reader.cancelled() and reader.exception() is not None:
                        raise reader.exception() from e
                    raise
                self.n_sent += len(batch)
                self._m_sent.inc(len(batch))
        finally:
            reader.cancel()
            call.cancel()
            self._set_connected(False)
            self._requeue_unacked()  # fsync'd by _outage (in a thread) or by stop()

    async def _read_acks(self, call) -> None:
        try:
            while True:
                batch = await call.read()
                if batch is grpc.aio.EOF:
                    raise _StreamBroken("trainer closed the stream")
                self._on_acks(batch.acks)
        finally:
            self._set_wake()

    def _on_acks(self, acks) -> None:
        """One AckBatch: each Ack forgets its own record (acks of one batch may be anywhere)."""
        in_flight = self._in_flight
        known = stored = duplicate = rejected = 0
        for ack in acks:
            rid = ack.record_id
            entry = in_flight.pop(rid, None)
            if entry is None:
                log.debug("feedback: ack for unknown record %s", rid)
                continue
            known += 1
            if entry[1] is not None:
                self.spool.ack(entry[1])
            status = ack.status
            if status == feedback_pb2.ACK_STATUS_STORED:
                stored += 1
            elif status == feedback_pb2.ACK_STATUS_DUPLICATE:
                duplicate += 1
            elif status == feedback_pb2.ACK_STATUS_REJECTED:
                rejected += 1
                self.n_rejected += 1
                now = time.monotonic()
                if now - self._reject_logged_at >= 1.0 or self.n_rejected <= 10:
                    self._reject_logged_at = now
                    log.error("feedback: trainer REJECTED record %s: %s (%d rejected so far)", rid,
                              ack.message or "no reason given", self.n_rejected)
            else:
                log.warning("feedback: ack with unexpected status %d for record %s; forgetting it", status, rid)
        if known and not self._connected:
            self._set_connected(True)
        if known:
            m = self._m_acked
            if stored:
                self.n_stored += stored
                m[feedback_pb2.ACK_STATUS_STORED].inc(stored)
            if duplicate:
                self.n_duplicate += duplicate
                m[feedback_pb2.ACK_STATUS_DUPLICATE].inc(duplicate)
            if rejected:
                m[feedback_pb2.ACK_STATUS_REJECTED].inc(rejected)
        if len(in_flight) < self.max_in_flight:
            self._set_wake()


_CONFIG_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED)


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__