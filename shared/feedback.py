"""Feedback client: streams what a service served, and what happened next, to the trainer.

Every service owns one `FeedbackClient`. The prediction path calls `record_served` /
`record_outcome`: they build and serialize one `FeedbackRecord` (a few microseconds),
append it to a bounded in-memory buffer and return; they never block on the network or
on fsync and never raise. A background asyncio task keeps one bidirectional
`Feedback.Stream` to the trainer open (protos/feedback/v1/feedback.proto):

    record_* -> buffer (deque, max_buffer) --(stream of FeedbackBatch)--> trainer
                   |  full, or trainer away                 | AckBatch: one Ack per record_id
                   v                                        v
                spool (disk segments, max_spool_bytes)   in-flight map (max_in_flight)

- Records are sent in order, in batches: each stream message (FeedbackBatch) carries
  whatever is ready, up to batch_max records and max_batch_bytes (the sender never waits
  to fill a batch; one record alone goes at once). A batch is built from the records'
  serialized bytes as they are (the wire framing of `repeated FeedbackRecord` is that of
  `repeated bytes`), so nothing is serialized twice.
- Each record stays in the in-flight map until its own Ack arrives (acks come in
  AckBatch messages, in any order and grouped in any way; they are matched by
  record_id). STORED and DUPLICATE forget it; REJECTED forgets it, counts it and logs
  the trainer's message.
- When the stream breaks or the trainer is unreachable, every in-flight and buffered
  record is appended to the spool, in order, and the task reconnects with exponential
  backoff (with jitter). While the trainer stays away, new records keep going to the
  spool (group-committed: one fsync per batch).
- After a reconnect the spool is replayed first, in order, then the buffer. Resent
  records keep their record_id; the trainer stores each record_id once
  (ACK_STATUS_DUPLICATE), so a resend never reaches training twice.
- `stop()` sends what it can and waits for acks (flush_timeout_s), then spools the rest;
  the next process on the same spool_dir replays it.

Spool format (one folder per client; a lock file refuses a second client on it)::

    <spool_dir>/<segment no, 12 digits>.fbspool   segments, numbered in write order
      b"FBSPOOL1"                                  file magic and format version
      frame*                                       append-only
    frame = <u16 0xFB5B> <u32 body_len> <u16 id_len> <u32 crc32(first 8 header bytes + body)>
            body = record_id (utf-8, id_len bytes) + serialized FeedbackRecord

A segment is closed at ~max_spool_bytes/8 (16 MiB at most) and deleted once every frame
in it is acknowledged, so the spool holds what is unacknowledged plus the acknowledged
part of the few segments still holding unacknowledged frames, and never more than
max_spool_bytes (beyond that, records are dropped, counted and logged at ERROR).
Acknowledgements are kept in memory only: after a crash, a partly acknowledged segment
is replayed whole and the trainer answers DUPLICATE for what it already has. On startup
every segment is scanned; a torn final frame (crash mid-write) or a corrupt one ends
that segment's readable part and is counted and logged; the frames before it are
replayed.

Identity: the trainer's collector accepts records only from a service it can name (trainer
settings `feedback_tokens`, `tls_client_ca`): the client sends its service's token as gRPC
metadata (`TOKEN_METADATA`, the `metadata` argument) and/or a client certificate whose CN is
its domain (`channel_credentials`, see `client_credentials`). A refused client gets
UNAUTHENTICATED / PERMISSION_DENIED, logs it at ERROR and keeps spooling until fixed.

Delivery contract of an outcome (what a service's ReportOutcome answer promises):
- default (`record_outcome`): the outcome is in this process's memory buffer when the RPC
  answers; it reaches the spool's disk within ~`spool_interval_s` (20 ms) only while the
  trainer is unreachable, and otherwise leaves over the stream and is forgotten once the
  trainer acks it as stored. A kill -9 (or power loss) of the service loses what is buffered or
  in flight and not yet acked: at most ~max_in_flight + max_buffer records, in practice the last
  few milliseconds of outcomes. A clean stop (SIGTERM) loses nothing: `stop()` flushes or spools.
- durable (`record_outcome_durable`, service setting `outcome_ack_durable`): the outcome is
  appended to the spool and fsync'd before the RPC answers, so an answered outcome survives
  kill -9 and power loss of the service (it is replayed at the next start on the same
  spool_dir). Costs one fsync per outcome call (concurrent calls share none): use it when a
  caller cannot resend (no outbox of its own).
In both modes a resend after a crash is harmless: the trainer de-duplicates by outcome identity.

Ordering: records reach the trainer in the order they were recorded, except that after
a buffer overflow (trainer slower than the service) followed by a stream break, the
records that were in flight at the break are resent after the ones that overflowed.
The trainer's joiner matches by prediction_id, so it does not depend on order.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import itertools
import logging
import os
import random
import struct
import threading
import time
import uuid
import weakref
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import grpc
import numpy as np
from google.protobuf.message import Message
from prometheus_client import Counter, Gauge

from protos.feedback.v1 import feedback_pb2

log = logging.getLogger(__name__)

STREAM_METHOD = "/storefront.feedback.v1.Feedback/Stream"
# gRPC metadata key carrying a service's feedback token (the trainer's collector checks it).
TOKEN_METADATA = "x-storefront-feedback-token"


def read_secret(value: str) -> str:
    """A secret setting: the value itself, or '@<path>' for the file's contents (stripped), which
    keeps the secret out of process listings and environment dumps."""
    value = value or ""
    if value.startswith("@"):
        return Path(value[1:]).read_text().strip()
    return value.strip()


def client_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """TLS credentials to the trainer from PEM files: the CA that signed its certificate, and
    this service's client certificate and key when the trainer requires mTLS (its CN names the
    domain, e.g. CN=fraud)."""
    if bool(cert) != bool(key):
        raise ValueError("a client certificate and its key go together")
    return grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes(),
                                        private_key=Path(key).read_bytes() if key else None,
                                        certificate_chain=Path(cert).read_bytes() if cert else None)

# feedback.proto: a FeedbackBatch holds at most 1024 records and 4 MiB serialized.
MAX_BATCH_RECORDS = 1024
MAX_BATCH_BYTES = 4 << 20
_BATCH_FRAMING = 8  # > the framing of one record in a batch: 1 tag byte + a varint length (<= 5 bytes)

# ---- metrics (label domain: fraud, recommender, pricing) ----
BUFFERED = Gauge("storefront_feedback_buffered", "Feedback records waiting in memory to be sent", ["domain"])
IN_FLIGHT = Gauge("storefront_feedback_in_flight", "Feedback records sent and not yet acknowledged", ["domain"])
SPOOLED = Counter("storefront_feedback_spooled_total", "Feedback records written to the disk spool", ["domain"])
SENT = Counter("storefront_feedback_sent_total", "Feedback records written to the trainer stream (resends included)",
               ["domain"])
ACKED = Counter("storefront_feedback_acked_total", "Acks from the trainer by status (stored, duplicate, rejected)",
                ["domain", "status"])
DROPPED = Counter("storefront_feedback_dropped_total",
                  "Feedback records lost, by reason: spool_full (buffer and spool both full), "
                  "invalid (could not be built), closed (recorded after stop)", ["domain", "reason"])
SPOOL_BYTES = Gauge("storefront_feedback_spool_bytes", "Bytes of spool segments on disk", ["domain"])
CONNECTED = Gauge("storefront_feedback_connected", "1 while a stream to the trainer is open", ["domain"])

_ACK_LABEL = {
    feedback_pb2.ACK_STATUS_STORED: "stored",
    feedback_pb2.ACK_STATUS_DUPLICATE: "duplicate",
    feedback_pb2.ACK_STATUS_REJECTED: "rejected",
}

# V2 datatype names of numpy dtypes (native byte order); strings and bytes are BYTES.
_V2_OF_NUMPY = {np.dtype(k): v for k, v in {
    np.bool_: "BOOL", np.uint8: "UINT8", np.uint16: "UINT16", np.uint32: "UINT32", np.uint64: "UINT64",
    np.int8: "INT8", np.int16: "INT16", np.int32: "INT32", np.int64: "INT64",
    np.float16: "FP16", np.float32: "FP32", np.float64: "FP64"}.items()}

_NUMPY_OF_V2 = {v: k for k, v in _V2_OF_NUMPY.items()}


def domain_value(domain: int | str) -> int:
    """A feedback_pb2.Domain value from the value itself, its name, or the short name ("fraud")."""
    if isinstance(domain, str):
        name = domain.upper()
        if not name.startswith("DOMAIN_"):
            name = "DOMAIN_" + name
        try:
            value = feedback_pb2.Domain.Value(name)
        except ValueError:
            raise ValueError(f"unknown domain {domain!r}") from None
    else:
        value = int(domain)
        if value not in feedback_pb2.Domain.values():
            raise ValueError(f"unknown domain {domain!r}")
    if value == feedback_pb2.DOMAIN_UNSPECIFIED:
        raise ValueError("domain must not be DOMAIN_UNSPECIFIED")
    return value


def fill_tensor(t: feedback_pb2.Tensor, name: str, value) -> None:
    """One tensor as it was fed to / returned by the model (V2 raw layout, little endian)."""
    a = np.asarray(value)
    t.name = name
    t.shape.extend(a.shape)
    if a.dtype.kind in "OSU":  # BYTES: 4-byte little-endian length, then the bytes, per element
        parts = []
        for v in a.reshape(-1).tolist():
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        t.datatype = "BYTES"
        t.raw_data = b"".join(parts)
        return
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    t.datatype = _V2_OF_NUMPY[a.dtype]  # KeyError (-> record refused) for dtypes V2 has no name for
    t.raw_data = a.tobytes()


def tensor_to_numpy(t: feedback_pb2.Tensor) -> np.ndarray:
    """The inverse of fill_tensor, for numeric tensors (what the trainer and tests need)."""
    dtype = _NUMPY_OF_V2[t.datatype].newbyteorder("<")
    return np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.shape))


# ---------------------------------------------------------------------------------------
# Spool
# ---------------------------------------------------------------------------------------

SEGMENT_MAGIC = b"FBSPOOL1"
SEGMENT_SUFFIX = ".fbspool"
FRAME_MAGIC = 0xFB5B
_HEAD = struct.Struct("<HIHI")  # magic, body length, id length, crc32(first 8 header bytes + body)
LOCK_NAME = ".lock"


class ShadowRecord:
    """What a shadow version computed for a served request (see ServedPrediction.shadow)."""

    __slots__ = ("version", "inputs", "outputs", "score", "latency_ms")

    def __init__(self, version: str, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                 score: float, latency_ms: float) -> None:
        self.version = version
        self.inputs = inputs
        self.outputs = outputs
        self.score = score
        self.latency_ms = latency_ms


class SpoolLockedError(RuntimeError):
    pass


class _Segment:
    __slots__ = ("no", "path", "end", "disk", "count", "acked", "fd", "writable")

    def __init__(self, no: int, path: Path) -> None:
        self.no = no
        self.path = path
        self.end = len(SEGMENT_MAGIC)  # end of the readable (valid) frames
        self.disk = 0  # bytes on disk (end plus any torn tail)
        self.count = 0  # frames in it
        self.acked: set[int] = set()  # offsets of frames acknowledged (or rejected)
        self.fd: int | None = None
        self.writable = False


def _frame(record_id: str, payload: bytes) -> bytes:
    rid = record_id.encode()
    body = rid + payload
    head8 = struct.pack("<HIH", FRAME_MAGIC, len(body), len(rid))
    return head8 + struct.pack("<I", zlib.crc32(body, zlib.crc32(head8))) + body


class Spool:
    """Append-only, crash-safe segments of (record_id, serialized FeedbackRecord) on disk.

    Thread-safe: record_* may spill into it from the prediction path while the sender
    reads and acknowledges from the event loop. Writes are plain unbuffered appends;
    `sync()` fsyncs what was written since the last call (group commit).
    """

    def __init__(self, directory: str | Path, max_bytes: int, segment_bytes: int | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.segment_bytes = segment_bytes or max(4096, min(16 << 20, self.max_bytes // 8))
        self._lock = threading.Lock()
        self._lock_fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLockedError(f"feedback spool {self.dir} is in use by another client (another process or "
                                   "worker on the same folder?): give every process its own spool_dir") from None
        self._segs: dict[int, _Segment] = {}  # insertion order == segment order
        self._active: _Segment | None = None
        self._dirty: set[int] = set()  # segment numbers written since the last sync
        self._dir_dirty = False
        self.bytes = 0
        self.pending = 0  # frames not acknowledged
        self.torn = 0  # frames found torn or corrupt at startup
        self.torn_bytes = 0
        self.write_errors = 0
        self.lost = 0  # frames lost to a segment that became unreadable after startup
        self.closed = False
        self._next_no = 1
        self._scan()

    # ---- startup ----
    def _scan(self) -> None:
        paths = sorted(p for p in self.dir.iterdir() if p.name.endswith(SEGMENT_SUFFIX))
        for path in paths:
            try:
                no = int(path.name[: -len(SEGMENT_SUFFIX)])
                self._next_no = max(self._next_no, no + 1)
                data = path.read_bytes()
            except (ValueError, OSError) as e:
                log.error("feedback spool: cannot read %s (%s); leaving it alone", path, e)
                continue
            seg = _Segment(no, path)
            seg.disk = len(data)
            if not data.startswith(SEGMENT_MAGIC):
                if data and not SEGMENT_MAGIC.startswith(data):
                    log.error("feedback spool: %s is not a spool segment (bad magic); leaving it alone", path)
                    continue
                path.unlink(missing_ok=True)  # created, crashed before its header was complete
                continue
            off, n = len(SEGMENT_MAGIC), len(data)
            view = memoryview(data)
            problem = None
            while off < n:
                if n - off < _HEAD.size:
                    problem = "torn frame header"
                    break
                magic, body_len, id_len, crc = _HEAD.unpack_from(data, off)
                if magic != FRAME_MAGIC or id_len > body_len:
                    problem = "bad frame header"
                    break
                if n - off - _HEAD.size < body_len:
                    problem = "torn frame"
                    break
                body = view[off + _HEAD.size: off + _HEAD.size + body_len]
                if zlib.crc32(body, zlib.crc32(view[off: off + 8])) != crc:
                    problem = "checksum mismatch"
                    break
                off += _HEAD.size + body_len
                seg.count += 1
            seg.end = off
            if problem:
                self.torn += 1
                self.torn_bytes += n - off
                where = "final frame" if path == paths[-1] else "frame"
                log.warning("feedback spool: %s in %s at byte %d (%s; %d bytes skipped, likely a crash mid-write); "
                            "replaying the %d frames before it", where, path.name, off, problem, n - off, seg.count)
            if seg.count == 0:
                path.unlink(missing_ok=True)
                continue
            self._segs[no] = seg
            self.bytes += seg.disk
            self.pending += seg.count
        if self._segs:
            log.info("feedback spool %s: %d records (%d bytes) from a previous run to replay",
                     self.dir, self.pending, self.bytes)

    # ---- writing ----
    def room(self, nbytes: int) -> bool:
        return self.bytes + nbytes <= self.max_bytes

    def _new_segment(self) -> _Segment:
        no = self._next_no
        self._next_no += 1
        seg = _Segment(no, self.dir / f"{no:012d}{SEGMENT_SUFFIX}")
        fd = os.open(seg.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            _write_all(fd, SEGMENT_MAGIC)
        except OSError:
            os.close(fd)
            seg.path.unlink(missing_ok=True)
            raise
        seg.fd, seg.writable = fd, True
        seg.disk = seg.end = len(SEGMENT_MAGIC)
        self.bytes += seg.disk
        self._segs[no] = seg
        self._dir_dirty = True
        return seg

    def _close_active(self) -> None:
        seg, self._active = self._active, None
        if seg is not None:
            seg.writable = False  # fd stays open for reading (and the pending sync) until deleted
            self._maybe_delete(seg)

    def append(self, entries: Sequence[tuple[str, bytes]]) -> int:
        """Append entries in order; returns how many were written (a prefix of entries).

        Stops at the first entry that does not fit under max_bytes or on a write error.
        """
        if not entries:
            return 0
        with self._lock:
            if self.closed:
                return 0
            written = 0
            chunk: list[bytes] = []
            chunk_frames = 0
            chunk_bytes = 0
            seg = self._active
            try:
                for rid, payload in entries:
                    frame = _frame(rid, payload)
                    extra = len(frame) + (0 if seg is not None and seg.end + chunk_bytes < self.segment_bytes
                                          else len(SEGMENT_MAGIC))
                    if self.bytes + chunk_bytes + extra > self.max_bytes:
                        break
                    if seg is None or seg.end + chunk_bytes >= self.segment_bytes:
                        if seg is not None:
                            self._write_chunk(seg, chunk, chunk_frames)
                            written += chunk_frames
                            chunk, chunk_frames, chunk_bytes = [], 0, 0
                            self._close_active()
                        seg = self._active = self._new_segment()
                    chunk.append(frame)
                    chunk_frames += 1
                    chunk_bytes += len(frame)
                if chunk:
                    self._write_chunk(seg, chunk, chunk_frames)
                    written += chunk_frames
            except OSError as e:
                self.write_errors += 1
                log.error("feedback spool: write to %s failed (%s); %d of %d records not spooled",
                          self.dir, e, len(entries) - written, len(entries))
                self._close_active()
            return written

    def _write_chunk(self, seg: _Segment, chunk: list[bytes], frames: int) -> None:
        data = b"".join(chunk)
        try:
            _write_all(seg.fd, data)
        except OSError:
            try:  # leave no half frame in the middle of a segment
                os.ftruncate(seg.fd, seg.end)
            except OSError:
                pass
            raise
        seg.end += len(data)
        seg.disk = seg.end
        seg.count += frames
        self.bytes += len(data)
        self.pending += frames
        self._dirty.add(seg.no)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty) or self._dir_dirty

    def sync(self) -> bool:
        """fsync every segment written since the last call (and the folder for new ones); False
        when an fsync failed (logged)."""
        with self._lock:
            fds = []
            for no in self._dirty:
                seg = self._segs.get(no)
                if seg is not None and seg.fd is not None:
                    fds.append(os.dup(seg.fd))
            self._dirty.clear()
            dir_dirty, self._dir_dirty = self._dir_dirty, False
        ok = True
        for fd in fds:  # outside the lock: record_* may append meanwhile
            try:
                os.fsync(fd)
            except OSError as e:
                ok = False
                log.error("feedback spool: fsync failed: %s", e)
            finally:
                os.close(fd)
        if dir_dirty:
            try:
                dfd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError as e:
                ok = False
                log.error("feedback spool: fsync of %s failed: %s", self.dir, e)
        return ok

    # ---- reading and acknowledging ----
    def first_cursor(self) -> list[int]:
        with self._lock:
            first = next(iter(self._segs), self._next_no)
            return [first, len(SEGMENT_MAGIC)]

    def read(self, cursor: list[int], limit: int,
             max_bytes: int | None = None) -> list[tuple[str, bytes, tuple[int, int]]]:
        """Up to limit unacknowledged frames from cursor on (cursor advances): (rid, payload, (seg, offset)).

        With max_bytes, stops before a frame whose payload (plus its framing in a FeedbackBatch)
        would take the payloads read over max_bytes; the first frame is always read."""
        out: list[tuple[str, bytes, tuple[int, int]]] = []
        nbytes = 0
        with self._lock:
            if self.closed:
                return out
            while len(out) < limit:
                seg = self._segs.get(cursor[0])
                if seg is None:
                    later = [no for no in self._segs if no > cursor[0]]
                    if not later:
                        break
                    cursor[0], cursor[1] = later[0], len(SEGMENT_MAGIC)
                    continue
                if cursor[1] >= seg.end:
                    later = [no for no in self._segs if no > seg.no]
                    if not later:
                        break
                    cursor[0], cursor[1] = later[0], len(SEGMENT_MAGIC)
                    continue
                off = cursor[1]
                try:
                    if seg.fd is None:
                        seg.fd = os.open(seg.path, os.O_RDONLY)
                    head = os.pread(seg.fd, _HEAD.size, off)
                    _, body_len, id_len, _ = _HEAD.unpack(head)
                    if max_bytes is not None and out and off not in seg.acked:
                        if nbytes + body_len - id_len + _BATCH_FRAMING > max_bytes:
                            break  # cursor stays on this frame
                    body = os.pread(seg.fd, body_len, off + _HEAD.size) if off not in seg.acked else b""
                    if off not in seg.acked:
                        if len(body) != body_len:
                            raise ValueError(f"short read: {len(body)} of {body_len} bytes")
                        rid = body[:id_len].decode()
                except (OSError, ValueError, struct.error) as e:
                    # Changed under us (never by this class): give up its rest rather than
                    # failing every replay of the spool on it.
                    self._give_up_tail(seg, off, e)
                    continue
                cursor[1] = off + _HEAD.size + body_len
                if off in seg.acked:
                    continue
                out.append((rid, body[id_len:], (seg.no, off)))
                nbytes += body_len - id_len + _BATCH_FRAMING
        return out

    def _give_up_tail(self, seg: _Segment, off: int, e: Exception) -> None:
        before, pos = 0, len(SEGMENT_MAGIC)
        try:  # frames before off were read (they are in flight or acknowledged): keep them
            while pos < off:
                _, body_len, _, _ = _HEAD.unpack(os.pread(seg.fd, _HEAD.size, pos))
                pos += _HEAD.size + body_len
                before += 1
        except (OSError, ValueError, TypeError, struct.error):
            pos = -1
        if pos == off:
            acked_after = {a for a in seg.acked if a >= off}
            lost = seg.count - before - len(acked_after)
            seg.acked -= acked_after
            seg.count, seg.end = before, off
        else:  # cannot tell: all of it goes (acks still to come for it are ignored)
            lost = seg.count - len(seg.acked)
            seg.count = len(seg.acked)
            seg.end = off
        log.error("feedback spool: %s became unreadable at byte %d (%s); %d unacknowledged records in it are lost",
                  seg.path, off, e, lost)
        self.lost += lost
        self.pending -= lost
        if seg is self._active:
            self._active = None
            seg.writable = False
        if pos != off:
            self._segs.pop(seg.no, None)
            self._delete(seg)
        else:
            self._maybe_delete(seg)

    def ack(self, where: tuple[int, int]) -> None:
        """Forget one frame (acknowledged or rejected); a segment goes once all of it is."""
        with self._lock:
            seg = self._segs.get(where[0])
            if seg is None or where[1] in seg.acked:
                return
            seg.acked.add(where[1])
            self.pending -= 1
            if len(seg.acked) >= seg.count:
                if seg is self._active:
                    self._active = None
                    seg.writable = False
                self._maybe_delete(seg)

    def _maybe_delete(self, seg: _Segment) -> None:
        if seg.writable or len(seg.acked) < seg.count:
            return
        self._segs.pop(seg.no, None)
        self._delete(seg)

    def _delete(self, seg: _Segment) -> None:
        self._dirty.discard(seg.no)
        if seg.fd is not None:
            os.close(seg.fd)
            seg.fd = None
        try:
            seg.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("feedback spool: cannot delete %s: %s", seg.path, e)
        self.bytes -= seg.disk
        self._dir_dirty = True

    def close(self) -> None:
        self.sync()
        with self._lock:
            if self.closed:
                return
            self.closed = True
            for seg in self._segs.values():
                if seg.fd is not None:
                    os.close(seg.fd)
                    seg.fd = None
            self._active = None
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)


def _record_head(n: int) -> bytes:
    """The framing of one n-byte serialized record in a FeedbackBatch: tag of field 1
    (length-delimited) and the varint length. Record bytes follow as they are."""
    if n < 0x80:
        return bytes((0x0A, n))
    if n < 0x4000:
        return bytes((0x0A, (n & 0x7F) | 0x80, n >> 7))
    out = bytearray(b"\x0a")
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_batch(payloads: Sequence[bytes]) -> bytes:
    """A serialized FeedbackBatch from already serialized FeedbackRecords, without parsing or
    re-serializing them: `repeated FeedbackRecord records = 1` is framed like `repeated bytes`."""
    parts: list[bytes] = []
    for p in payloads:
        parts.append(_record_head(len(p)))
        parts.append(p)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]


# ---------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------

class _StreamBroken(Exception):
    pass


class FeedbackClient:
    """Streams served predictions and outcomes to the trainer; see the module docstring, in
    particular the delivery contract: `record_outcome` returns once the outcome is in memory
    (lost on kill -9 until acked or spooled), `record_outcome_durable` once it is fsync'd in the
    spool (survives kill -9). Identity towards the trainer: `metadata` carries the service's
    token ((TOKEN_METADATA, token)) and `channel_credentials` its TLS client certificate."""

    def __init__(self, target: str, *, domain: int | str, spool_dir: str | Path, instance_id: str | None = None,
                 max_buffer: int = 10000, max_in_flight: int = 2000, max_spool_bytes: int = 256 << 20,
                 batch_max: int = 256, max_batch_bytes: int = MAX_BATCH_BYTES, reconnect_backoff_s: tuple[float, float] = (0.2, 5.0),
                 channel_credentials: grpc.ChannelCredentials | None = None,
                 channel_options: Sequence[tuple[str, object]] = (), metadata: Sequence[tuple[str, str]] = (),
                 ack_timeout_s: float = 30.0, spool_interval_s: float = 0.02, batch_linger_s: float = 0.005,
                 max_record_bytes: int = MAX_BATCH_BYTES - _BATCH_FRAMING) -> None:
        if max_buffer < 1 or max_in_flight < 1 or batch_max < 1:
            raise ValueError("max_buffer, max_in_flight and batch_max must be >= 1")
        if batch_max > MAX_BATCH_RECORDS or not 0 < max_batch_bytes <= MAX_BATCH_BYTES:
            raise ValueError(f"batch_max must be <= {MAX_BATCH_RECORDS} and max_batch_bytes in 1..{MAX_BATCH_BYTES} "
                             "(feedback.proto's limits on a FeedbackBatch)")
        if max_record_bytes > max_batch_bytes - _BATCH_FRAMING:
            raise ValueError(f"max_record_bytes must leave room for the framing in a batch: at most "
                             f"max_batch_bytes - {_BATCH_FRAMING} = {max_batch_bytes - _BATCH_FRAMING}")
        lo, hi = reconnect_backoff_s
        if not 0 < lo <= hi:
            raise ValueError(f"reconnect_backoff_s must be (min, max) with 0 < min <= max, got {reconnect_backoff_s}")
        self.target = target
        self.domain = domain_value(domain)
        self.domain_label = feedback_pb2.Domain.Name(self.domain)[len("DOMAIN_"):].lower()
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
        self._m_acked = {s: ACKED.labels(d, label) for s, label in _ACK_LABEL.items()}

    # ---- the prediction path ----
    def record_served(self, prediction_id: str, model_name: str, model_version: str,
                      inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                      request: Message | None = None, response: Message | None = None,
                      served_at: float | None = None, shadow: "ShadowRecord | None" = None) -> bool:
        """Queue one served prediction. Never blocks, never raises; False when it was dropped.
        shadow: what a shadow version computed for the same request (ServedPrediction.shadow)."""
        try:
            rid = f"{self.instance_id}-{next(self._seq):012d}"
            rec = feedback_pb2.FeedbackRecord(record_id=rid, domain=self.domain)
            s = rec.served
            s.prediction_id = prediction_id
            s.model.name = model_name
            s.model.version = model_version
            s.served_at = served_at or time.time()
            for name, value in inputs.items():
                fill_tensor(s.inputs.add(), name, value)
            for name, value in outputs.items():
                fill_tensor(s.outputs.add(), name, value)
            if request is not None:
                s.request.Pack(request)
            if response is not None:
                s.response.Pack(response)
            if shadow is not None:
                sh = s.shadow
                sh.model.name = model_name
                sh.model.version = shadow.version
                for name, value in shadow.inputs.items():
                    fill_tensor(sh.inputs.add(), name, value)
                for name, value in shadow.outputs.items():
                    fill_tensor(sh.outputs.add(), name, value)
                sh.score = shadow.score
                sh.latency_ms = shadow.latency_ms
            payload = rec.SerializeToString()
            if len(payload) > self.max_record_bytes:
                raise ValueError(f"record is {len(payload)} bytes, more than max_record_bytes={self.max_record_bytes}")
        except Exception as e:  # never into the prediction path
            return self._invalid("served prediction", prediction_id, e)
        return self._enqueue(rid, payload)

    def _outcome_record(self, outcome: feedback_pb2.Outcome) -> tuple[str, bytes] | None:
        try:
            rid = f"{self.instance_id}-{next(self._seq):012d}"
            payload = feedback_pb2.FeedbackRecord(record_id=rid, domain=self.domain,
                                                  outcome=outcome).SerializeToString()
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
        self._set_wake()  # the sender reads new spool frames on its next turn
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

    # ---- background task ----
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
        if self._credentials is not None:
            return grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
        return grpc.aio.insecure_channel(self.target, options=self._options)

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
                if self.batch_linger_s > 0 and 0 < len(self._buffer) < room and not self._stopping:
                    await asyncio.sleep(self.batch_linger_s)
                # One FeedbackBatch: whatever is ready, spool first.
                max_bytes = self.max_batch_bytes
                batch = self.spool.read(cursor, room, max_bytes)
                if not batch:
                    buf = self._buffer
                    nbytes = 0
                    while len(batch) < room:
                        try:
                            rid, payload = buf.popleft()
                        except IndexError:
                            break
                        nbytes += len(payload) + _BATCH_FRAMING
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
                    parts.append(_record_head(len(payload)))
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
