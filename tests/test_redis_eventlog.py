"""RedisEventLog beyond the interface tests of tests/test_eventlog.py (which run on both logs):
what is Redis's own. A real redis-server (tests/redis_server.py), appendfsync always.

- every record the writer was told is stored survives a kill -9 of redis-server, exactly once,
  with dense offsets (one script per batch: nothing half-written);
- size limits in the log's own units (payload bytes plus a per-event overhead), oldest processed
  first, the hard cap counting what it drops; the index keys follow every delete;
- concurrent writers in two processes share one offset sequence.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ingest import fraud_outcome, fraud_served
from protos.feedback.v1 import feedback_pb2 as fb
from tests.redis_server import RedisServer, redis_server  # noqa: F401 (a fixture)
from trainer.eventlog import STORED, RetentionPolicy
from trainer.eventlog_redis import EVENT_OVERHEAD, RedisEventLog

REPO = Path(__file__).resolve().parents[1]
T = 1.7e9
WINDOWS = {"fraud": 14 * 86400.0, "recommender": 3600.0, "pricing": 86400.0}

WRITER = r"""
import sys
from bench.ingest import fraud_outcome, fraud_served
from trainer.eventlog import DUPLICATE, STORED
from trainer.eventlog_redis import RedisEventLog
log = RedisEventLog(sys.argv[1])
prefix, start = sys.argv[2], int(sys.argv[3])
i = start
while True:
    batch = [fraud_served(f"{prefix}-{k}", f"p-{k}", 1.7e9 + k) for k in range(i, i + 7)]
    batch.append(fraud_outcome(f"{prefix}-o{i}", f"p-{i}", 1.7e9 + i + 5))
    if i > start:
        batch.append(fraud_served(f"{prefix}-{i - 1}", f"p-{i - 1}", 1.7e9 + i - 1))  # a resend
    try:
        results = log.append_batch(batch)
    except Exception as e:  # the server is gone: nothing of this batch was acknowledged
        print("ERROR", type(e).__name__, flush=True)
        sys.exit(3)
    assert all(r.status in (STORED, DUPLICATE) for r in results), results
    print(" ".join(r.record_id for r in results), flush=True)
    i += 7
"""


def test_every_acknowledged_record_survives_a_kill9_of_redis(tmp_path: Path):
    """A writer appends while redis-server is killed with SIGKILL, twice; every record the
    writer was told is stored is there after each restart, exactly once, offsets dense."""
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    acked: list[str] = []
    start = 0
    try:
        for round_, lines_before_kill in enumerate((5, 30)):
            child = subprocess.Popen([sys.executable, "-c", WRITER, server.url, f"w{round_}", str(start)], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
            try:
                for _ in range(lines_before_kill):
                    line = child.stdout.readline()
                    assert line and not line.startswith("ERROR"), child.stderr.read()
                    acked += line.split()
                server.kill()  # the writer is mid-batch: its script either ran (and is in the AOF) or not
                rest, _ = child.communicate(timeout=60)
            finally:
                if child.poll() is None:
                    child.send_signal(signal.SIGKILL)
                    child.wait(30)
            acked += [rid for line in rest.splitlines() if not line.startswith("ERROR") for rid in line.split()]
            assert child.returncode == 3, rest
            server.start()
            start += 7 * (lines_before_kill + 50)
        with RedisEventLog(server.url) as lg:
            entries = lg.read(0, 10**6)
            stored = [e.record_id for e in entries]
            assert len(stored) == len(set(stored))
            assert set(acked) <= set(stored), sorted(set(acked) - set(stored))[:10]
            assert [e.offset for e in entries] == list(range(1, len(entries) + 1))  # nothing half-written
            assert lg.count() == len(entries) and lg.end_offset() == len(entries)
            assert len(set(acked)) > 2 * 30
    finally:
        server.stop()


def _fill(log: RedisEventLog, n: int, pad: int = 3000) -> None:
    big = fb.Tensor(name="pad", datatype="UINT8", shape=[pad], raw_data=b"\x07" * pad)
    for b in range(0, n, 500):
        recs = []
        for i in range(b, min(b + 500, n)):
            r = fraud_served(f"s{i}", f"p{i}", T + i)
            r.served.inputs.append(big)
            recs.append(r)
        log.append_batch(recs)


def test_size_limits_and_the_index_keys_follow_every_delete(redis_server):  # noqa: F811
    with RedisEventLog(redis_server.url) as log:
        _fill(log, 2000)
        per_event = log.live_bytes() / 2000
        assert per_event > 3000 + EVENT_OVERHEAD // 2
        log.append_batch([fraud_outcome(f"o{i}", f"p{i}", T + 5000) for i in range(1500, 1510)])
        log.commit_offset("learner-fraud", 1000, {"domain": "fraud"})
        # soft limit far below what is stored: only the 1000 processed events may go
        report = log.retain(RetentionPolicy(windows=WINDOWS, max_bytes=1_000_000), now=T + 10)
        assert report.deleted == {("fraud", "size"): 1000} and report.dropped_unprocessed == 0
        assert log.read(0, 1)[0].offset == 1001
        assert report.bytes_after < report.bytes_before * 0.55
        # deleted events are gone from every index: their ids may be stored again (as in SQLite),
        # their predictions have no served record
        assert log.served_for(["p5", "p1500"]).keys() == {"p1500"}
        assert log.client.hlen(log.ids) == 1010
        # the hard cap goes further, oldest first, and says how much unprocessed it dropped
        report = log.retain(RetentionPolicy(windows=WINDOWS, max_bytes=1_000_000, hard_max_bytes=2_000_000),
                            now=T + 10)
        assert report.dropped_unprocessed > 0 and report.deleted[("fraud", "hard_cap")] == report.dropped_unprocessed
        assert log.live_bytes() <= 2_000_000
        kept = [e.offset for e in log.read(0, 10**6)]
        assert kept == list(range(kept[0], 2011))  # the newest stayed, in one piece
        assert log.count() == len(kept) == log.client.xlen(log.stream)
        # an outcome kept its identity index only while stored
        outcomes = log.outcomes_for([f"p{i}" for i in range(1500, 1510)], "fraud")
        assert [e.offset for e in outcomes] == [o for o in range(2001, 2011) if o >= kept[0]]
        assert log.append_batch([fraud_served("s3", "p3", T)])[0].status == STORED  # its old copy is gone


def test_writers_in_two_processes_share_one_offset_sequence(redis_server):  # noqa: F811
    """Two collectors (trainer replicas) append to one log at once: offsets stay dense and unique,
    and a record both send is stored once."""
    code = r"""
import sys
from bench.ingest import fraud_served
from trainer.eventlog_redis import RedisEventLog
log = RedisEventLog(sys.argv[1])
for b in range(15):
    res = log.append_batch([fraud_served(f"{sys.argv[2]}-{b}-{i}", f"p{b}-{i}", 1.7e9) for i in range(20)]
                           + [fraud_served(f"both-{b}", f"pb{b}", 1.7e9)])
    print(" ".join(f"{r.record_id}={r.offset}:{r.status}" for r in res), flush=True)
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, redis_server.url, name], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for name in ("a", "b")]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    seen: dict[str, set[int]] = {}
    for out, _ in outputs:
        for item in out.split():
            rid, _, rest = item.partition("=")
            offset, _, status = rest.partition(":")
            seen.setdefault(rid, set()).add(int(offset))
    assert all(len(offsets) == 1 for offsets in seen.values())  # a record has one offset, whoever sent it
    with RedisEventLog(redis_server.url) as log:
        entries = log.read(0, 10**6)
        assert [e.offset for e in entries] == list(range(1, 2 * 15 * 20 + 15 + 1))
        assert {e.record_id: e.offset for e in entries} == {rid: min(o) for rid, o in seen.items()}


@pytest.mark.parametrize("name", ["", "a{b}", "two words"])
def test_log_names_must_fit_a_hash_tag(name):
    with pytest.raises(ValueError):
        RedisEventLog("redis://127.0.0.1:1/0", name=name)
