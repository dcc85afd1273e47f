"""The feedback client's disk spool: records not yet acknowledged by the trainer, kept across
outages and restarts.

Format (one folder per client; a lock file refuses a second client on it)::

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
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Sequence

from shared.feedback.framing import BATCH_FRAMING

log = logging.getLogger(__name__)

SEGMENT_MAGIC = b"FBSPOOL1"
SEGMENT_SUFFIX = ".fbspool"
FRAME_MAGIC = 0xFB5B
_HEAD = struct.Struct("<HIHI")  # magic, body length, id length, crc32(first 8 header bytes + body)
LOCK_NAME = ".lock"

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
                        if nbytes + body_len - id_len + BATCH_FRAMING > max_bytes:
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
                nbytes += body_len - id_len + BATCH_FRAMING
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
