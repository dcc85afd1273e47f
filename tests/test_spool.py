"""The SQLite feedback spool on its own: crashes mid-write (a real process killed, a log cut
short), idempotence by record id, the size bound and the durable group commit."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shared.feedback.spool import DB_NAME, Spool, read_spool, row_bytes

ROOT = Path(__file__).resolve().parents[1]

# A writer process: one transaction per record, a line on stdout once each is synced; it ends
# the way a crash does (os._exit: the database is never closed, the log stays as it is).
WRITER = """
import os, sys
from shared.feedback.spool import Spool
spool = Spool(sys.argv[1], 1 << 30)
n = int(sys.argv[2])
for i in range(n if n > 0 else 10**9):
    assert spool.append([(f"r{i}", b"%d" % i * 40)]) == 1
    assert spool.sync()
    print(i, flush=True)
os._exit(0)
"""


def writer(spool: Path, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(spool), str(n)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)


def record_ids(spool: Path) -> list[str]:
    return [rid for rid, _ in read_spool(spool)]


def test_kill_9_while_writing_keeps_every_synced_record_in_order(tmp_path):
    spool = tmp_path / "spool"
    proc = writer(spool, 0)  # writes until killed
    for line in proc.stdout:
        if int(line) == 200:  # record 200 is synced; the writer is busy with the next ones
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    s = Spool(spool, 1 << 30)
    try:
        ids = record_ids(spool)
        assert len(ids) >= 201 and ids == [f"r{i}" for i in range(len(ids))]  # a prefix: no gap, no torn row
        assert s.pending == len(ids)
        cursor = s.first_cursor()
        got = [rid for rid, payload, _ in s.read(cursor, 10_000)]
        assert got == ids and all(p == b"%d" % i * 40 for i, (_, p) in enumerate(read_spool(spool)))
    finally:
        s.close()


def cut_log(spool: Path, keep) -> int:
    wal = spool / f"{DB_NAME}-wal"
    data = wal.read_bytes()
    wal.write_bytes(data[:keep(len(data))])
    return len(data)


def test_torn_final_write_loses_only_that_record(tmp_path, caplog):
    spool = tmp_path / "spool"
    assert writer(spool, 20).wait() == 0
    cut_log(spool, lambda n: n - 7)  # the crash came in the middle of writing the last transaction
    with caplog.at_level(logging.WARNING, logger="shared.feedback"):
        s = Spool(spool, 1 << 30)
    try:
        assert s.pending == 19 and s.torn == 1 and s.torn_bytes > 0
        assert any("torn" in r.getMessage() for r in caplog.records)
        assert record_ids(spool) == [f"r{i}" for i in range(19)]
        assert s.append([("r19", b"again")]) == 1 and s.sync()  # writable again past the torn tail
        assert record_ids(spool)[-1] == "r19"
    finally:
        s.close()


def test_log_cut_anywhere_keeps_a_prefix(tmp_path):
    spool = tmp_path / "spool"
    assert writer(spool, 40).wait() == 0
    cut_log(spool, lambda n: n // 2 + 1000)
    s = Spool(spool, 1 << 30)
    try:
        ids = record_ids(spool)
        assert 0 < len(ids) < 40 and ids == [f"r{i}" for i in range(len(ids))] and s.pending == len(ids)
    finally:
        s.close()


def test_same_record_id_is_kept_once(tmp_path):
    s = Spool(tmp_path, 1 << 20)
    try:
        assert s.append([("a", b"1"), ("b", b"2")]) == 2
        assert s.append([("b", b"2"), ("c", b"3")]) == 2  # b is in the spool already: kept once
        assert record_ids(tmp_path) == ["a", "b", "c"]
        assert s.pending == 3 and s.bytes == sum(row_bytes(r, p) for r, p in read_spool(tmp_path))
    finally:
        s.close()


def test_size_bound_writes_a_prefix(tmp_path):
    one = row_bytes("r0", b"x" * 100)
    s = Spool(tmp_path, 3 * one + one // 2)
    try:
        assert s.append([(f"r{i}", b"x" * 100) for i in range(5)]) == 3
        assert not s.room(one) and s.bytes == 3 * one
        cursor = s.first_cursor()
        batch = s.read(cursor, 10)
        s.ack(batch[0][2])
        assert s.sync() and s.room(one)  # the acknowledged row is deleted at the sync: room again
        assert s.append([("r3", b"x" * 100)]) == 1 and s.read(cursor, 10)[0][0] == "r3"
    finally:
        s.close()


def test_acknowledged_rows_are_not_replayed_and_reopen_replays_the_rest(tmp_path):
    s = Spool(tmp_path, 1 << 20)
    assert s.append([(f"r{i}", b"p") for i in range(10)]) == 10
    for rid, _, where in s.read(s.first_cursor(), 4):
        s.ack(where)
    assert [rid for rid, _, _ in s.read(s.first_cursor(), 100)] == [f"r{i}" for i in range(4, 10)]
    s.close()
    s = Spool(tmp_path, 1 << 20)
    try:
        assert s.pending == 6 and [rid for rid, _, _ in s.read(s.first_cursor(), 100)] == [f"r{i}" for i in range(4, 10)]
    finally:
        s.close()


def test_concurrent_durable_appends_each_return_once_synced(tmp_path):
    s = Spool(tmp_path, 1 << 24)
    results: list[bool] = []

    def durable(base: int) -> None:
        for i in range(base, base + 50):
            results.append(s.append([(f"r{i}", b"p")]) == 1 and s.sync())

    threads = [threading.Thread(target=durable, args=(b,)) for b in (0, 100, 200, 300)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert results == [True] * 200 and not s.dirty
        assert sorted(record_ids(tmp_path)) == sorted(f"r{b + i}" for b in (0, 100, 200, 300) for i in range(50))
    finally:
        s.close()


@pytest.mark.parametrize("size", [0, 5])
def test_empty_or_partial_header_segment_of_the_old_format_is_removed(tmp_path, size):
    """A segment created by the former spool and cut before its 8-byte header was complete holds
    no record: it goes; the folder opens."""
    seg = tmp_path / f"{1:012d}.fbspool"
    seg.write_bytes(b"FBSPOOL1"[:size])
    s = Spool(tmp_path, 1 << 20)
    try:
        assert s.pending == 0 and not seg.exists()
    finally:
        s.close()
    assert os.listdir(tmp_path).count(DB_NAME) == 1
