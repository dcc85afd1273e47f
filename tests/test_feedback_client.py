"""The feedback client against a fake trainer on a real loopback port, with real spool files."""
from __future__ import annotations

import asyncio
import logging
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from protos.feedback.v1 import feedback_pb2
from shared.feedback.records import feedback_outcome
from protos.fraud.v1 import fraud_pb2
from shared.feedback import MAX_BATCH_BYTES, FeedbackClient, SpoolLockedError, encode_batch, read_spool, tensor_to_numpy
from shared.feedback.records import served_record
from shared.feedback.spool import row_bytes
from shared.feedback.spool_legacy import SEGMENT_MAGIC, SEGMENT_SUFFIX
from tests.conftest import free_port
from tests.fake_trainer import FakeTrainer

FAST = dict(reconnect_backoff_s=(0.02, 0.1))


def make_client(port: int, spool: Path, **kw) -> FeedbackClient:
    args = dict(domain="fraud", spool_dir=spool, **FAST)
    args.update(kw)
    return FeedbackClient(f"127.0.0.1:{port}", **args)


def served(client: FeedbackClient, i: int) -> None:
    x = np.full((1, 30), i, dtype=np.float32)
    y = np.array([[i / 1000]], dtype=np.float32)
    req = fraud_pb2.ScoreTransactionRequest(transaction_id=f"t{i}", amount=float(i))
    assert client.record_served(f"p{i}", "fraud", "v1", {"features": x}, {"probability": y}, request=req,
                                served_at=1_700_000_000.0 + i)


def outcome(i: int) -> feedback_pb2.Outcome:
    return feedback_outcome(fraud_pb2.FraudOutcome(prediction_id=f"p{i}"), 1_700_000_100.0 + i, 1_700_000_100.0 + i)


def on_disk(spool: Path) -> list[str]:
    """The record ids in the spool's database on disk (read beside the client, read-only)."""
    return [rid for rid, _ in read_spool(spool)]


async def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def trainer():
    t = FakeTrainer(free_port())
    await t.start()
    yield t
    await t.stop()


@pytest.fixture
async def trainer_down():
    """A trainer object on a free port, not started."""
    t = FakeTrainer(free_port())
    yield t
    await t.stop()


def prediction_ids(trainer: FakeTrainer) -> list[str]:
    return [r.served.prediction_id or r.outcome.prediction_id for r in trainer.stored.values()]


async def test_records_flow_and_are_acked(trainer, tmp_path):
    c = make_client(trainer.port, tmp_path / "spool")
    c.start()
    for i in range(100):
        served(c, i)
        assert c.record_outcome(outcome(i))
    assert await c.flush(10)
    st = c.stats()
    assert st["recorded"] == 200 and st["sent"] == 200 and st["stored"] == 200
    assert st["spooled"] == 0 and st["dropped"] == 0 and st["pending"] == 0 and st["connected"] == 1
    assert len(trainer.stored) == 200 and trainer.duplicates == 0
    # In order, record ids unique per process start, contents exactly as served.
    ids = list(trainer.stored)
    assert ids == [f"{c.instance_id}-{n:012d}" for n in range(1, 201)]
    first = trainer.stored[ids[0]]
    assert first.domain == "fraud" and first.served.prediction_id == "p0"
    assert first.served.model.name == "fraud" and first.served.model.version == "v1"
    assert first.served.served_at == 1_700_000_000.0
    np.testing.assert_array_equal(tensor_to_numpy(first.served.inputs[0]), np.zeros((1, 30), np.float32))
    assert first.served.inputs[0].name == "features" and first.served.inputs[0].datatype == "FP32"
    req = fraud_pb2.ScoreTransactionRequest()
    assert first.served.request.Unpack(req) and req.transaction_id == "t0"
    label = fraud_pb2.FraudOutcome()
    assert trainer.stored[ids[1]].outcome.domain_outcome.Unpack(label) and label.prediction_id == "p0"
    assert REGISTRY.get_sample_value("storefront_feedback_connected", {"domain": "fraud"}) == 1
    assert REGISTRY.get_sample_value("storefront_feedback_acked_total",
                                     {"domain": "fraud", "status": "stored"}) >= 200
    await c.stop()
    assert REGISTRY.get_sample_value("storefront_feedback_connected", {"domain": "fraud"}) == 0
    assert on_disk(tmp_path / "spool") == []


async def test_out_of_order_acks_and_in_flight_bound(trainer, tmp_path):
    trainer.ack_delay_s = (0.0, 0.03)
    c = make_client(trainer.port, tmp_path / "spool", max_in_flight=16, batch_max=4)
    c.start()
    for i in range(300):
        served(c, i)
    assert await c.flush(20)
    assert len(trainer.stored) == 300 and trainer.duplicates == 0
    assert trainer.max_unacked <= 16
    assert c.stats()["stored"] == 300
    await c.stop()


async def test_trainer_down_at_start_spools_then_replays_in_order(trainer_down, tmp_path):
    spool = tmp_path / "spool"
    c = make_client(trainer_down.port, spool)
    c.start()
    for i in range(200):
        served(c, i)
    await wait_for(lambda: c.stats()["spooled"] == 200, what="records spooled")
    assert c.stats()["buffered"] == 0 and c.spool.pending == 200 and len(on_disk(spool)) == 200
    assert c.stats()["connected"] == 0
    for i in range(200, 250):  # more while still down
        served(c, i)
    await trainer_down.start()  # the trainer comes up on the same port
    for i in range(250, 300):
        served(c, i)
    assert await c.flush(15)
    assert prediction_ids(trainer_down) == [f"p{i}" for i in range(300)]  # replayed in order, then new
    assert len(trainer_down.stored) == 300 and trainer_down.duplicates == 0
    await wait_for(lambda: on_disk(spool) == [], what="acknowledged records deleted")
    assert c.stats()["spool_pending"] == 0 and c.stats()["spool_bytes"] == 0
    await c.stop()


async def test_stream_broken_mid_flight_loses_nothing_stores_each_once(trainer, tmp_path):
    trainer.ack_delay_s = (0.0, 0.02)
    trainer.drop_after = 150  # record 150 is stored, its ack and the delayed ones never arrive
    c = make_client(trainer.port, tmp_path / "spool", max_in_flight=64)
    c.start()
    for i in range(400):
        served(c, i)
        if i % 50 == 0:
            await asyncio.sleep(0.005)
    assert await c.flush(20)
    st = c.stats()
    assert st["stream_failures"] >= 1 and st["sessions"] >= 2
    assert len(trainer.stored) == 400  # nothing lost
    assert sorted(prediction_ids(trainer), key=lambda p: int(p[1:])) == [f"p{i}" for i in range(400)]
    assert len(trainer.received) > 400 and trainer.duplicates >= 1  # resent, answered DUPLICATE
    assert st["duplicate"] == trainer.duplicates and st["stored"] + st["duplicate"] == 400
    assert st["pending"] == 0
    await wait_for(lambda: on_disk(tmp_path / "spool") == [], what="acknowledged records deleted")
    await c.stop()


async def test_trainer_restart_while_streaming(trainer, tmp_path):
    c = make_client(trainer.port, tmp_path / "spool")
    c.start()
    for i in range(100):
        served(c, i)
    assert await c.flush(10)
    await trainer.stop()
    for i in range(100, 200):
        served(c, i)
    await wait_for(lambda: c.stats()["spool_pending"] == 100, what="spooled while down")
    await trainer.start()
    assert await c.flush(15)
    assert prediction_ids(trainer) == [f"p{i}" for i in range(200)]
    await c.stop()


async def test_client_restart_replays_spool(trainer_down, tmp_path):
    spool = tmp_path / "spool"
    c1 = make_client(trainer_down.port, spool)
    c1.start()
    for i in range(120):
        served(c1, i)
    await c1.stop(flush_timeout_s=0.3)  # trainer down: everything left goes to the spool
    assert c1.spool.pending == 120 and len(on_disk(spool)) == 120
    first_ids = [f"{c1.instance_id}-{n:012d}" for n in range(1, 121)]

    c2 = make_client(trainer_down.port, spool)  # a new process on the same spool
    assert c2.instance_id != c1.instance_id
    assert c2.spool.pending == 120 and c2.stats()["pending"] == 120
    await trainer_down.start()
    c2.start()
    for i in range(120, 130):
        served(c2, i)
    assert await c2.flush(15)
    assert list(trainer_down.stored)[:120] == first_ids  # the old ids, in order, then the new records
    assert prediction_ids(trainer_down) == [f"p{i}" for i in range(130)]
    assert trainer_down.duplicates == 0
    await c2.stop()
    assert on_disk(spool) == []


async def test_stop_flushes_and_spools_the_unacked(trainer, tmp_path):
    spool = tmp_path / "spool"
    c = make_client(trainer.port, spool)
    c.start()
    for i in range(50):
        served(c, i)
    await c.stop(flush_timeout_s=5)  # trainer up: stop waits for every ack
    assert len(trainer.stored) == 50 and on_disk(spool) == []

    trainer.silent = True  # stores but never acks: stop times out and spools the rest
    c = make_client(trainer.port, spool)
    c.start()
    for i in range(50, 100):
        served(c, i)
    await c.stop(flush_timeout_s=0.5)
    assert c.spool.pending == 50 and len(trainer.stored) == 100

    trainer.silent = False
    c = make_client(trainer.port, spool)
    c.start()
    assert await c.flush(10)
    assert trainer.duplicates == 50 and len(trainer.stored) == 100  # resent, stored once
    await c.stop()
    assert on_disk(spool) == []


def write_legacy_segment(path: Path, frames: list[tuple[str, bytes]]) -> None:
    """A segment of the spool format before SQLite (shared/feedback/spool_legacy.py), written
    from its documented layout, as an older version left it on disk."""
    parts = [SEGMENT_MAGIC]
    for rid, payload in frames:
        body = rid.encode() + payload
        head8 = struct.pack("<HIH", 0xFB5B, len(body), len(rid))
        parts += [head8, struct.pack("<I", zlib.crc32(body, zlib.crc32(head8))), body]
    path.write_bytes(b"".join(parts))


def served_payload(i: int, rid: str) -> bytes:
    return served_record(rid, "fraud", f"p{i}", "fraud", "v1",
                         {"features": np.full((1, 30), i, dtype=np.float32)}, {"probability": np.zeros((1, 1))})


async def test_legacy_segments_are_imported_once_torn_final_frame_skipped(trainer_down, tmp_path, caplog):
    spool = tmp_path / "spool"
    spool.mkdir()
    write_legacy_segment(spool / f"{1:012d}{SEGMENT_SUFFIX}", [(f"old-{i}", served_payload(i, f"old-{i}"))
                                                               for i in range(10)])
    last = spool / f"{2:012d}{SEGMENT_SUFFIX}"
    write_legacy_segment(last, [(f"old-{i}", served_payload(i, f"old-{i}")) for i in range(10, 20)])
    last.write_bytes(last.read_bytes()[:-7])  # a crash in the middle of writing the last frame
    (spool / f"{3:012d}{SEGMENT_SUFFIX}").write_bytes(b"not a segment")  # not ours: left alone

    with caplog.at_level(logging.WARNING, logger="shared.feedback"):
        c2 = make_client(trainer_down.port, spool)
    assert c2.spool.pending == 19 and c2.stats()["spool_torn"] == 1
    assert any("torn" in r.getMessage() for r in caplog.records)
    assert any("not a spool segment" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in spool.glob("*" + SEGMENT_SUFFIX)) == [f"{3:012d}{SEGMENT_SUFFIX}"]
    assert on_disk(spool) == [f"old-{i}" for i in range(19)]
    await trainer_down.start()
    c2.start()
    served(c2, 100)
    assert await c2.flush(10)
    assert prediction_ids(trainer_down) == [f"p{i}" for i in range(19)] + ["p100"]
    await c2.stop()
    assert on_disk(spool) == []


async def test_legacy_import_interrupted_is_imported_again_once(trainer_down, tmp_path):
    """A crash after the import committed, before the segment was deleted: the next open imports it
    again and the record ids already there are kept once."""
    spool = tmp_path / "spool"
    spool.mkdir()
    frames = [(f"old-{i}", served_payload(i, f"old-{i}")) for i in range(5)]
    write_legacy_segment(spool / f"{1:012d}{SEGMENT_SUFFIX}", frames)
    make_client(trainer_down.port, spool).spool.close()
    write_legacy_segment(spool / f"{1:012d}{SEGMENT_SUFFIX}", frames)  # as if never deleted
    c = make_client(trainer_down.port, spool)
    assert c.spool.pending == 5 and on_disk(spool) == [rid for rid, _ in frames]
    c.spool.close()


async def test_spool_limit_drops_are_counted_and_logged(trainer_down, tmp_path, caplog):
    spool = tmp_path / "spool"
    c = make_client(trainer_down.port, spool, max_buffer=10, batch_max=5, max_spool_bytes=20_000)
    with caplog.at_level(logging.ERROR, logger="shared.feedback"):
        kept = 0
        for i in range(500):  # never started: the buffer overflows into the spool, then the spool fills
            x = np.full((1, 30), i, dtype=np.float32)
            kept += c.record_served(f"p{i}", "fraud", "v1", {"features": x}, {"probability": x[:, :1]})
    st = c.stats()
    assert st["dropped"] > 0 and kept == 500 - st["dropped"]
    assert st["spooled"] + st["buffered"] == kept
    assert 0 < st["spool_bytes"] <= 20_000
    assert not c.accepting
    assert REGISTRY.get_sample_value("storefront_feedback_dropped_total",
                                     {"domain": "fraud", "reason": "spool_full"}) >= st["dropped"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "DROPPED" in errors[0] and "dropped so far" in errors[0]
    await c.stop(flush_timeout_s=0.2)
    # Nothing kept is lost: the next client replays exactly the kept records, in order.
    await trainer_down.start()
    c2 = make_client(trainer_down.port, spool, max_spool_bytes=20_000)
    c2.start()
    assert await c2.flush(10)
    stored = prediction_ids(trainer_down)
    assert len(stored) == c.spool.pending and len(stored) + c.stats()["dropped"] == 500
    assert stored == sorted(stored, key=lambda p: int(p[1:]))
    await c2.stop()


async def test_record_is_fast_while_trainer_down(trainer_down, tmp_path):
    c = make_client(trainer_down.port, tmp_path / "spool")
    c.start()
    await asyncio.sleep(0.05)  # let the first connection attempt fail
    x = np.random.default_rng(0).random((1, 30), dtype=np.float32)
    y = np.array([[0.5]], dtype=np.float32)
    req = fraud_pb2.ScoreTransactionRequest(transaction_id="t", amount=12.5)
    t0 = time.perf_counter()
    for i in range(10_000):
        c.record_served(f"p{i}", "fraud", "v1", {"features": x}, {"probability": y}, request=req)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"10,000 record_served took {elapsed:.3f} s"
    await wait_for(lambda: c.stats()["spooled"] == 10_000, what="everything spooled")
    assert c.stats()["dropped"] == 0
    await c.stop(flush_timeout_s=0.1)


async def test_rejected_records_are_counted_logged_and_forgotten(trainer, tmp_path, caplog):
    trainer.reject = lambda rec: "served.prediction_id: bad" if rec.served.prediction_id == "p3" else None
    c = make_client(trainer.port, tmp_path / "spool")
    c.start()
    with caplog.at_level(logging.ERROR, logger="shared.feedback"):
        for i in range(10):
            served(c, i)
        assert await c.flush(10)
    st = c.stats()
    assert st["rejected"] == 1 and st["stored"] == 9 and st["pending"] == 0
    assert any("REJECTED" in r.getMessage() and "served.prediction_id: bad" in r.getMessage() for r in caplog.records)
    await c.stop()


async def test_record_never_raises(tmp_path):
    c = make_client(free_port(), tmp_path / "spool")
    assert c.record_served("p", "m", "v", {"x": np.array([object()], dtype=object)}, {}) in (True, False)
    assert c.record_served("p", "m", "v", {"x": np.zeros(2, dtype=np.complex64)}, {}) is False
    assert c.record_served("p", "m", "v", None, {}) is False  # type: ignore[arg-type]
    assert c.record_outcome("not an outcome") is False  # type: ignore[arg-type]
    big = np.zeros((1, 1000), np.float32)
    c.max_record_bytes = 2000  # larger records would break the stream after every replay
    assert c.record_served("p", "m", "v", {"x": big}, {}) is False
    assert c.stats()["invalid"] >= 4
    await c.stop(flush_timeout_s=0)
    assert c.record_outcome(outcome(1)) is False  # after stop: counted, not raised


async def test_second_client_on_same_spool_is_refused(tmp_path):
    c = make_client(free_port(), tmp_path / "spool")
    with pytest.raises(SpoolLockedError):
        make_client(free_port(), tmp_path / "spool")
    await c.stop(flush_timeout_s=0)
    make_client(free_port(), tmp_path / "spool").spool.close()


async def test_overflow_while_connected_keeps_order_and_loses_nothing(trainer, tmp_path):
    trainer.ack_delay_s = (0.001, 0.004)  # a slow trainer: the buffer overflows into the spool
    c = make_client(trainer.port, tmp_path / "spool", max_buffer=20, batch_max=8, max_in_flight=8)
    c.start()
    for i in range(300):
        served(c, i)
    assert c.stats()["spooled"] > 0
    assert await c.flush(20)
    assert prediction_ids(trainer) == [f"p{i}" for i in range(300)]
    assert trainer.duplicates == 0
    await wait_for(lambda: on_disk(tmp_path / "spool") == [], what="acknowledged records deleted")
    await c.stop()


async def test_spool_bytes_track_the_rows_and_files_shrink_once_drained(trainer_down, tmp_path):
    spool = tmp_path / "spool"
    c = make_client(trainer_down.port, spool, max_spool_bytes=256 << 10)
    c.start()
    for i in range(200):
        served(c, i)
    await wait_for(lambda: c.stats()["spooled"] == 200, what="records spooled")
    assert c.stats()["spool_bytes"] == sum(row_bytes(rid, payload) for rid, payload in read_spool(spool))
    assert REGISTRY.get_sample_value("storefront_feedback_spool_bytes", {"domain": "fraud"}) == c.stats()["spool_bytes"]
    assert REGISTRY.get_sample_value("storefront_feedback_spooled_total", {"domain": "fraud"}) >= 200
    full = sum(p.stat().st_size for p in spool.iterdir())
    assert full >= c.stats()["spool_bytes"]
    await trainer_down.start()
    assert await c.flush(15)
    assert prediction_ids(trainer_down) == [f"p{i}" for i in range(200)]
    await wait_for(lambda: on_disk(spool) == [] and c.stats()["spool_bytes"] == 0, what="acknowledged rows deleted")
    await wait_for(lambda: sum(p.stat().st_size for p in spool.iterdir()) < full // 2, what="files shrunk back")
    await c.stop()


async def test_ack_timeout_breaks_a_silent_stream(trainer, tmp_path):
    trainer.silent = True
    c = make_client(trainer.port, tmp_path / "spool", ack_timeout_s=0.2)
    c.start()
    for i in range(20):
        served(c, i)
    await wait_for(lambda: c.stats()["stream_failures"] >= 1, what="ack timeout")
    trainer.silent = False
    assert await c.flush(15)
    assert len(trainer.stored) == 20 and c.stats()["stored"] + c.stats()["duplicate"] == 20
    await c.stop()


async def test_record_from_other_threads(trainer, tmp_path):
    c = make_client(trainer.port, tmp_path / "spool")
    c.start()

    def work(base: int) -> None:
        for i in range(base, base + 200):
            served(c, i)

    await asyncio.gather(*(asyncio.to_thread(work, b) for b in (0, 1000, 2000)))
    assert await c.flush(10)
    assert len(trainer.stored) == 600 and c.stats()["recorded"] == 600
    assert len({r.record_id for r in trainer.stored.values()}) == 600
    await c.stop()


async def test_damaged_spool_is_set_aside_and_the_client_carries_on(trainer_down, tmp_path, caplog):
    spool = tmp_path / "spool"
    c = make_client(trainer_down.port, spool)
    for i in range(30):
        served(c, i)
    await c.stop()
    db = spool / "spool.sqlite3"
    data = db.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    damaged = data[:page] + bytes(range(256)) * ((len(data) - page) // 256)  # every page after the schema
    db.write_bytes(damaged)
    with caplog.at_level(logging.ERROR, logger="shared.feedback"):
        c = make_client(trainer_down.port, spool)
    assert any("damaged" in r.getMessage() for r in caplog.records)
    aside = list(spool.glob("spool.sqlite3.damaged-*"))
    assert [p.read_bytes() for p in aside if not p.name.endswith(("-wal", "-shm"))] == [damaged]  # kept as found
    assert c.spool.pending == 0  # nothing readable in it: not retried on every start
    await trainer_down.start()
    c.start()
    served(c, 100)
    assert await c.flush(10)
    assert prediction_ids(trainer_down) == ["p100"]
    await c.stop()
    assert on_disk(spool) == []


async def test_backlog_goes_in_full_batches_live_records_at_once(trainer, tmp_path):
    c = make_client(trainer.port, tmp_path / "spool", batch_max=64)
    for i in range(300):  # recorded before start: buffered
        served(c, i)
    c.start()
    assert await c.flush(10)
    assert sum(trainer.batches) == 300 and max(trainer.batches) == 64 and len(trainer.batches) <= 8
    assert c.stats()["sent"] == 300 and c.stats()["stored"] == 300
    # One record with nothing else ready is sent at once, alone: the sender never waits to fill a batch.
    t0 = time.monotonic()
    served(c, 300)
    assert await c.flush(5)
    assert time.monotonic() - t0 < 0.5 and trainer.batches[-1] == 1
    assert prediction_ids(trainer) == [f"p{i}" for i in range(301)]
    await c.stop()


async def test_batches_stay_under_max_batch_bytes_buffer_and_spool(trainer_down, tmp_path):
    c = make_client(trainer_down.port, tmp_path / "spool", max_batch_bytes=2000, max_record_bytes=1500)
    c.start()
    for i in range(100):  # trainer down: these go to the spool and are replayed from it
        served(c, i)
    await wait_for(lambda: c.stats()["spooled"] == 100, what="records spooled")
    await c.stop(flush_timeout_s=0)
    c = make_client(trainer_down.port, tmp_path / "spool", max_batch_bytes=2000, max_record_bytes=1500)
    for i in range(100, 200):  # these wait in the buffer
        served(c, i)
    await trainer_down.start()
    c.start()
    assert await c.flush(10)
    assert prediction_ids(trainer_down) == [f"p{i}" for i in range(200)]
    assert max(trainer_down.batch_bytes) <= 2000 and max(trainer_down.batches) > 1
    assert len(trainer_down.batches) >= 200 * 316 // 2000  # records are 316 bytes: split by bytes, not count
    await c.stop()


@pytest.mark.parametrize("mode", ["split", "merged"])
async def test_acks_split_or_merged_across_batches(trainer, tmp_path, mode):
    if mode == "split":
        trainer.split_acks = True  # every ack of a batch in its own AckBatch
    else:
        trainer.merge_acks = 50  # acks of several batches in one AckBatch
    c = make_client(trainer.port, tmp_path / "spool", batch_max=8, max_in_flight=64)
    c.start()
    for i in range(400):
        served(c, i)
        if i % 37 == 0:
            await asyncio.sleep(0.002)
    assert await c.flush(10)
    st = c.stats()
    assert st["stored"] == 400 and st["pending"] == 0 and st["in_flight"] == 0
    assert max(trainer.batches) <= 8 and trainer.duplicates == 0 and trainer.max_unacked <= 64
    await c.stop()


def test_batch_limits_are_checked(tmp_path):
    with pytest.raises(ValueError, match="batch_max"):
        make_client(free_port(), tmp_path / "a", batch_max=1025)
    with pytest.raises(ValueError, match="max_batch_bytes"):
        make_client(free_port(), tmp_path / "b", max_batch_bytes=MAX_BATCH_BYTES + 1)
    with pytest.raises(ValueError, match="max_record_bytes"):
        make_client(free_port(), tmp_path / "c", max_batch_bytes=1000, max_record_bytes=1000)
    c = make_client(free_port(), tmp_path / "d")
    assert c.max_record_bytes + 8 <= c.max_batch_bytes == MAX_BATCH_BYTES  # a record always fits alone
    c.spool.close()


def test_encode_batch_is_a_feedback_batch():
    recs = [feedback_pb2.FeedbackRecord(record_id=f"r{i}", domain="fraud",
                                        outcome=outcome(i)) for i in range(3)]
    big = feedback_pb2.FeedbackRecord(record_id="big", domain="fraud")
    big.served.inputs.add(name="x", datatype="UINT8", shape=[1, 70000], raw_data=bytes(70000))  # 3-byte varint
    recs.append(big)
    raw = encode_batch([r.SerializeToString() for r in recs])
    assert raw == feedback_pb2.FeedbackBatch(records=recs).SerializeToString()
    assert list(feedback_pb2.FeedbackBatch.FromString(raw).records) == recs
    assert encode_batch([]) == b""
