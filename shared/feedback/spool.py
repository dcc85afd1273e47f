"""The feedback client's disk spool: records not yet acknowledged by the trainer, kept across
outages and restarts, in one SQLite database per client.

    <spool_dir>/.lock             flock'd by the one client using the folder (SpoolLockedError otherwise)
    <spool_dir>/spool.sqlite3     table records(seq INTEGER PRIMARY KEY, record_id TEXT UNIQUE, payload BLOB)
    <spool_dir>/spool.sqlite3-wal SQLite's write-ahead log (and -shm, its index)

- Order: seq is the append order; replay reads oldest first.
- Idempotent by record id: appending a record_id the spool already holds keeps the one copy.
- Durability: `append` commits without fsync (it may run on the prediction path); `sync`
  fsyncs the log once for everything appended before it (group commit), and a caller that
  needs its record on disk (outcome_ack_durable) calls it after its append. A crash or power
  loss mid-write loses at most the transactions not yet synced: SQLite's log frames carry
  chained checksums, so recovery stops at the first torn frame and keeps every transaction
  committed before it.
- Bounded: `bytes` counts what the rows take (record id twice, for the row and its index
  entry, the payload and ROW_OVERHEAD); an append that would take it over max_bytes stops
  there and the caller drops, counts and logs the rest. Acknowledged rows are deleted at the
  next `sync` (acknowledgements are kept in memory until then: after a crash they are replayed
  and the trainer answers DUPLICATE); once the spool is empty its files shrink back. The files
  take up to checkpoint_bytes (max_bytes/8, 16 MiB at most) more: the log between checkpoints.
- Segments (*.fbspool) of the custom format this replaced are imported once on open (see
  spool_legacy.py) and deleted only once their records are synced here.
- A database found damaged is set aside (renamed *.damaged-<time>, never deleted), what can
  still be read from it is copied to a fresh one, and the rest is counted as lost and logged
  (spool_recovery.py).
"""
from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

from shared.feedback.framing import BATCH_FRAMING
from shared.feedback.spool_legacy import SEGMENT_SUFFIX, read_segment
from shared.feedback.spool_recovery import copy_readable, damaged, set_aside, torn_log_bytes

log = logging.getLogger(__name__)

DB_NAME = "spool.sqlite3"
LOCK_NAME = ".lock"
# What a row takes beyond its record id (stored twice: row and UNIQUE index) and payload: the
# cell headers, seq (as rowid and in the index) and cell pointers. An estimate on the safe side:
# bench/spool.py measured 283 bytes on disk per 223-byte served record (row_bytes: 297).
ROW_OVERHEAD = 24

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL UNIQUE,
    payload BLOB NOT NULL
)"""


def row_bytes(record_id: str, payload: bytes) -> int:
    return 2 * len(record_id) + len(payload) + ROW_OVERHEAD


class SpoolLockedError(RuntimeError):
    pass


def _checkpointer(path: Path) -> sqlite3.Connection:
    """A second connection that only checkpoints, so a checkpoint never holds the writer's."""
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        _configure(db)
    except BaseException:
        db.close()
        raise
    return db


def _configure(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode = WAL")
    # NORMAL, not FULL: FULL would fsync inside every commit, while the connection is held, i.e.
    # on the prediction path when the buffer overflows and on the event loop during an outage.
    # With NORMAL a commit only write()s to the log: safe from a process crash (kill -9) at once,
    # and from power loss after `sync`, which fsyncs the log file once for every commit before
    # it, outside the lock (group commit). NORMAL still fsyncs the log before a checkpoint copies
    # it into the database and the database after, so checkpoints never put synced data at risk.
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints run in sync() (a thread), not in a commit
    db.execute("PRAGMA journal_size_limit = 4194304")  # the log shrinks back to 4 MiB after a checkpoint
    db.execute(_SCHEMA)


class Spool:
    """(record_id, serialized FeedbackRecord) rows on disk, oldest first; see the module docstring.

    Thread-safe: record_* may spill into it from the prediction path while the sender reads and
    acknowledges from the event loop and `sync` runs in a thread.
    """

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / DB_NAME
        self.max_bytes = int(max_bytes)
        self.checkpoint_bytes = max(1 << 20, min(16 << 20, self.max_bytes // 8))  # log size that triggers one
        self._lock = threading.Lock()  # the connection, the counters and the acked set
        self._sync_lock = threading.Lock()  # one fsync (and checkpoint) at a time
        self._lock_fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLockedError(f"feedback spool {self.dir} is in use by another client (another process or "
                                   "worker on the same folder?): give every process its own spool_dir") from None
        self.bytes = 0  # what the rows in the table take (acknowledged ones until deleted)
        self.pending = 0  # rows not acknowledged
        self.torn = 0  # torn writes found at startup (log tail, legacy frames)
        self.torn_bytes = 0
        self.write_errors = 0
        self.lost = 0  # records lost to a damaged database
        self.closed = False
        self._acked: dict[int, int] = {}  # seq -> row bytes, acknowledged and not yet deleted
        self._base_seq = 1  # acks for rows below it (a database set aside) are ignored
        self._next_seq = 1
        self._written = 0  # appends committed so far (a generation number) ...
        self._synced = 0  # ... and how many of them an fsync covers
        self._dir_dirty = True  # the database and its log are new entries in the folder
        self._shrink = False  # the spool emptied: give the files' space back at the next sync
        try:
            self._check_torn_log()
            self._open()
            self._import_legacy()
        except BaseException:
            self._release_lock()
            raise
        if self.pending:
            log.info("feedback spool %s: %d records (%d bytes) from a previous run to replay",
                     self.dir, self.pending, self.bytes)

    # ---- startup ----
    def _check_torn_log(self) -> None:
        torn = torn_log_bytes(self.path)
        if torn:
            self.torn += 1
            self.torn_bytes += torn
            log.warning("feedback spool: torn write at the end of %s-wal (%d bytes, likely a crash mid-write); "
                        "the records committed before it are kept", self.path.name, torn)

    def _open(self) -> None:
        try:
            self._db = _connect(self.path)
            if self._db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
        except sqlite3.DatabaseError as e:
            if not damaged(e) and str(e) != "quick_check failed":
                raise
            self._set_aside(e)
        self._checkpointer = _checkpointer(self.path)
        self._count()

    def _count(self) -> None:
        n, nbytes, last = self._db.execute(
            "SELECT count(*), coalesce(sum(2 * length(record_id) + length(payload) + ?), 0), coalesce(max(seq), 0) "
            "FROM records", (ROW_OVERHEAD,)).fetchone()
        self.pending = n - len(self._acked)
        self.bytes = nbytes
        self._next_seq = max(self._next_seq, last + 1)

    def _set_aside(self, e: Exception) -> None:
        """A damaged database: set aside, what still reads copied to a fresh one (renumbered after
        every seq handed out, so acks of rows read from the old one are ignored)."""
        for conn in (getattr(self, "_db", None), getattr(self, "_checkpointer", None)):
            if conn is not None:
                conn.close()
        aside = set_aside(self.path)
        self._db = _connect(self.path)
        self._checkpointer = _checkpointer(self.path)
        self._base_seq = self._next_seq
        copied, stopped = copy_readable(aside, self._db, self._base_seq)
        self._next_seq += copied
        lost = max(0, self.pending - copied)
        self.lost += lost
        self._acked.clear()
        self._written += 1  # the fresh database needs an fsync
        self._dir_dirty = True
        log.error("feedback spool: %s is damaged or unreadable (%s); set aside as %s, %d records copied from it "
                  "to a fresh spool%s%s", self.path, e, aside.name, copied, f" ({stopped})" if stopped else "",
                  f", {lost} unacknowledged records lost" if lost else "")
        self._count()

    def _import_legacy(self) -> None:
        """Segments of the custom format this spool replaced: into the table once, then deleted."""
        for path in sorted(self.dir.glob("*" + SEGMENT_SUFFIX)):
            frames, problem, skipped = read_segment(path)
            if problem == "not a spool segment":
                log.error("feedback spool: %s is not a spool segment (bad magic); leaving it alone", path)
                continue
            if problem:
                self.torn += 1
                self.torn_bytes += skipped
                log.warning("feedback spool: %s in %s (%d bytes skipped, likely a crash mid-write); importing the "
                            "%d frames before it", problem, path.name, skipped, len(frames))
            if frames and self.append(frames) < len(frames):
                log.error("feedback spool: %s does not fit under the spool's limit; leaving it for a later start",
                          path.name)
                break
            if not self.sync():
                break
            path.unlink()
            self._dir_dirty = True
            log.info("feedback spool: imported %d records from %s (the former spool format)", len(frames), path.name)

    # ---- writing ----
    def room(self, nbytes: int) -> bool:
        return self.bytes + nbytes <= self.max_bytes

    def append(self, entries: Sequence[tuple[str, bytes]]) -> int:
        """Append entries in order; returns how many are in the spool (a prefix of entries).

        Stops at the first entry that does not fit under max_bytes; 0 on a write error (logged).
        Not durable until `sync`."""
        if not entries:
            return 0
        with self._lock:
            if self.closed:
                return 0
            rows: list[tuple[int, str, bytes]] = []
            nbytes = 0
            seq = self._next_seq
            for rid, payload in entries:
                n = row_bytes(rid, payload)
                if self.bytes + nbytes + n > self.max_bytes:
                    break
                rows.append((seq, rid, payload))
                seq += 1
                nbytes += n
            if not rows:
                return 0
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                inserted = db.executemany("INSERT OR IGNORE INTO records VALUES (?, ?, ?)", rows).rowcount
                db.execute("COMMIT")
            except sqlite3.Error as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                self.write_errors += 1
                log.error("feedback spool: write to %s failed (%s); %d records not spooled", self.path, e,
                          len(entries))
                if damaged(e):
                    self._set_aside(e)
                return 0
            self._next_seq = seq
            self._written += 1
            if inserted == len(rows):
                self.pending += len(rows)
                self.bytes += nbytes
            else:  # some record ids were already here (kept once): count from the table
                self._count()
            return len(rows)

    @property
    def dirty(self) -> bool:
        """Something for `sync` to do: appends to fsync, acknowledged rows to delete."""
        return self._written != self._synced or bool(self._acked) or self._dir_dirty or self._shrink

    def sync(self) -> bool:
        """Make every append so far durable (one fsync of the log for all of them) and delete the
        acknowledged rows; False when that failed (logged)."""
        with self._sync_lock:
            with self._lock:
                if self.closed:
                    return self._synced == self._written
                ok = self._delete_acked()
                target = self._written
                dir_dirty, self._dir_dirty = self._dir_dirty, False
                shrink, self._shrink = self._shrink and self.pending == 0, False
            # Outside the lock: appends go on meanwhile; an fsync begun after an append's commit
            # covers it, so `target` (read before the fsync) is what this one makes durable.
            if target != self._synced:
                try:
                    self._fsync(Path(f"{self.path}-wal"), missing_ok=True)
                    self._synced = target
                except OSError as e:
                    log.error("feedback spool: fsync of %s failed: %s", self.path, e)
                    ok = False
            if dir_dirty:
                try:
                    self._fsync(self.dir)
                except OSError as e:
                    self._dir_dirty = True
                    log.error("feedback spool: fsync of %s failed: %s", self.dir, e)
                    ok = False
            if ok:
                self._checkpoint(shrink)
            return ok

    def _fsync(self, path: Path, missing_ok: bool = False) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # no log: every commit is already checkpointed (and fsync'd) into the database
            if not missing_ok:
                raise
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _delete_acked(self) -> bool:
        """Under the lock: delete the acknowledged rows (no fsync: losing a delete means a duplicate)."""
        if not self._acked:
            return True
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            if self.pending == 0:
                db.execute("DELETE FROM records")
            else:
                db.executemany("DELETE FROM records WHERE seq = ?", ((s,) for s in self._acked))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            log.error("feedback spool: deleting acknowledged records from %s failed: %s", self.path, e)
            if damaged(e):
                self._set_aside(e)
            return False
        if self.pending == 0:
            self.bytes = 0
            self._shrink = True
        else:
            self.bytes -= sum(self._acked.values())
        self._acked.clear()
        return True

    def _checkpoint(self, shrink: bool) -> None:
        """Copy the log into the database once it is large, and give the space back once the spool
        is empty. On the second connection: a PASSIVE checkpoint never blocks the writer."""
        try:
            wal = os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            wal = 0
        try:
            if shrink:
                with self._lock:
                    if self.pending or self._acked or self.closed:
                        return
                    self._db.execute("VACUUM")  # of an empty table: rewrites a few pages
                self._checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            elif wal > self.checkpoint_bytes:
                self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as e:
            log.warning("feedback spool: checkpoint of %s failed (%s); retried at the next sync", self.path, e)

    # ---- reading and acknowledging ----
    def first_cursor(self) -> list[int]:
        """A replay cursor before the oldest row (read advances it)."""
        return [0]

    def read(self, cursor: list[int], limit: int,
             max_bytes: int | None = None) -> list[tuple[str, bytes, tuple[int, int]]]:
        """Up to limit unacknowledged rows after cursor, oldest first (cursor advances):
        (record_id, payload, where) with where = (seq, row bytes), what `ack` takes.

        With max_bytes, stops before a row whose payload (plus its framing in a FeedbackBatch)
        would take the payloads read over max_bytes; the first row is always read."""
        out: list[tuple[str, bytes, tuple[int, int]]] = []
        nbytes = 0
        with self._lock:
            if self.closed:
                return out
            acked = self._acked
            rows = self._db.execute("SELECT seq, record_id, payload FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (cursor[0], limit + len(acked)))
            try:
                for seq, rid, payload in rows:
                    if seq in acked:
                        cursor[0] = seq
                        continue
                    if len(out) >= limit:
                        break
                    if max_bytes is not None and out and nbytes + len(payload) + BATCH_FRAMING > max_bytes:
                        break  # cursor stays before this row
                    out.append((rid, payload, (seq, row_bytes(rid, payload))))
                    nbytes += len(payload) + BATCH_FRAMING
                    cursor[0] = seq
            except sqlite3.DatabaseError as e:
                if not damaged(e):
                    raise
                self._set_aside(e)
                cursor[0] = self._base_seq - 1
                return []
            finally:
                rows.close()  # ends the read transaction: checkpoints can complete
        return out

    def ack(self, where: tuple[int, int]) -> None:
        """Forget one row (acknowledged or rejected); it is deleted at the next sync."""
        seq, nbytes = where
        with self._lock:
            if seq < self._base_seq or seq in self._acked or self.closed:
                return
            self._acked[seq] = nbytes
            self.pending -= 1

    def close(self) -> None:
        self.sync()
        with self._sync_lock, self._lock:
            if self.closed:
                return
            self.closed = True
            self._checkpointer.close()
            self._db.close()  # the last connection: SQLite checkpoints the log into the database
            self._release_lock()

    def _release_lock(self) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)


def read_spool(directory: str | Path) -> list[tuple[str, bytes]]:
    """What a spool folder holds, oldest first (acknowledged rows not yet deleted included), read
    only: for inspection (and tests), also while a client uses the folder."""
    path = Path(directory) / DB_NAME
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT record_id, payload FROM records ORDER BY seq").fetchall()
    finally:
        db.close()
