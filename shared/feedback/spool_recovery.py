"""What the SQLite spool does with what a crash or a damaged disk left behind: the length of a
torn log tail, and a damaged database set aside with what still reads copied out of it."""
from __future__ import annotations

import os
import sqlite3
import struct
import time
from pathlib import Path

_WAL_HEADER, _WAL_FRAME_HEADER = 32, 24  # sqlite.org/fileformat.html: the write-ahead log
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def damaged(e: sqlite3.Error) -> bool:
    """Whether an error says the database file is not (or no longer) a readable database."""
    return (getattr(e, "sqlite_errorcode", 0) & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def torn_log_bytes(db_path: Path) -> int:
    """Bytes at the end of db_path's log past its last whole frame: a write cut by a crash (SQLite
    drops that transaction when it opens the log; the ones before it stay). 0 when none."""
    wal = Path(f"{db_path}-wal")
    try:
        size = wal.stat().st_size
        with wal.open("rb") as f:
            head = f.read(_WAL_HEADER)
    except FileNotFoundError:
        return 0
    if len(head) < _WAL_HEADER:
        return 0  # created, nothing written yet
    page_size = struct.unpack(">I", head[8:12])[0]
    return (size - _WAL_HEADER) % (_WAL_FRAME_HEADER + page_size)


def set_aside(db_path: Path) -> Path:
    """Rename a damaged database and its log to <name>.damaged-<unix time>: kept, never deleted."""
    aside = db_path.with_name(f"{db_path.name}.damaged-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        try:
            os.replace(f"{db_path}{suffix}", f"{aside}{suffix}")
        except FileNotFoundError:
            pass
    return aside


def copy_readable(aside: Path, db: sqlite3.Connection, first_seq: int) -> tuple[int, str | None]:
    """Copy the rows of the damaged database aside that still read, oldest first, into db (seq
    renumbered from first_seq); (rows copied, why it stopped or None)."""
    copied = 0
    try:
        src = sqlite3.connect(f"file:{aside}?mode=ro", uri=True)
        try:
            rows = src.execute("SELECT record_id, payload FROM records ORDER BY seq")
            while chunk := rows.fetchmany(256):
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT OR IGNORE INTO records VALUES (?, ?, ?)",
                               ((first_seq + copied + i, rid, payload) for i, (rid, payload) in enumerate(chunk)))
                db.execute("COMMIT")
                copied += len(chunk)
        finally:
            src.close()
    except sqlite3.Error as e:
        if db.in_transaction:
            db.execute("ROLLBACK")
        return copied, str(e)
    return copied, None
