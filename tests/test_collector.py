"""The feedback collector on a real grpc.aio server over loopback, writing a real SQLite log.

Clients send FeedbackBatch messages and read AckBatch messages; every record is acked on its own."""
from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from bench.ingest import fraud_outcome, fraud_served
from protos.feedback.v1 import feedback_pb2 as fb
from shared.feedback.records import feedback_outcome
from protos.feedback.v1 import feedback_pb2_grpc as fb_grpc
from shared.feedback import FeedbackClient, encode_batch
from trainer.collector import SERVICE_NAME, FeedbackCollector, add_collector, split_batch
from trainer.eventlog import SqliteEventLog

T = 1.7e9


class Harness:
    """The real collector and SQLite log on a real server on a free loopback port (plaintext, or
    with `credentials`: TLS/mTLS, and then `channel`/`stub` are not usable: clients bring theirs)."""

    def __init__(self, path: Path, credentials: grpc.ServerCredentials | None = None, **options) -> None:
        self.log = SqliteEventLog(path)
        self.path = path
        self.collector = FeedbackCollector(self.log, **options)
        self.server = grpc.aio.server()
        self.service = add_collector(self.server, self.collector)
        self.port = (self.server.add_secure_port("127.0.0.1:0", credentials) if credentials
                     else self.server.add_insecure_port("127.0.0.1:0"))
        self.address = f"127.0.0.1:{self.port}"
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> "Harness":
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = fb_grpc.FeedbackStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(1.0)
        await self.collector.close()
        self.log.close()

    async def send(self, records, on_ack=None, batch: int = 64, messages: list | None = None) -> list[fb.Ack]:
        """One stream: write the records in batches of `batch`, read every ack (concurrently),
        return the acks (flattened; the AckBatch messages go to `messages` when given)."""
        call = self.stub.Stream()

        async def writer():
            for i in range(0, len(records), batch):
                await call.write(fb.FeedbackBatch(records=records[i:i + batch]))
            await call.done_writing()

        task = asyncio.get_running_loop().create_task(writer())
        acks = []
        async for message in call:
            assert 0 < len(message.acks) <= 1024
            if messages is not None:
                messages.append(message)
            for ack in message.acks:
                acks.append(ack)
                if on_ack is not None:
                    on_ack(ack)
        await task
        assert await call.code() == grpc.StatusCode.OK
        return acks


def served(n: int, prefix: str = "r") -> list[fb.FeedbackRecord]:
    return [fraud_served(f"{prefix}-{i}", f"{prefix}-p{i}", T + i) for i in range(n)]


async def test_acks_only_after_commit(tmp_path: Path):
    """Every ack the client gets names a record that another connection already reads from the file."""
    path = tmp_path / "events.db"
    records = served(600)
    checked = []
    async with Harness(path) as h:
        outside = sqlite3.connect(path)  # an independent reader: sees committed data only

        def on_ack(ack: fb.Ack) -> None:
            assert ack.status == fb.ACK_STATUS_STORED, ack
            row = outside.execute("SELECT COUNT(*) FROM events WHERE record_id = ?", (ack.record_id,)).fetchone()
            checked.append(row[0])

        acks = await h.send(records, on_ack)
        outside.close()
        assert len(acks) == len(records)  # one ack per record, not per batch
        assert h.service == SERVICE_NAME == "storefront.feedback.v1.Feedback"
        assert sorted(a.record_id for a in acks) == sorted(r.record_id for r in records)
        assert checked == [1] * len(records)
        assert h.log.count() == len(acks) == h.collector.stored
        assert h.collector.batches < len(records)  # grouped into fewer transactions
        stored = {e.record_id: e.record for e in h.log.read(0, 1000)}
        assert stored["r-17"] == records[17]


async def test_duplicates_are_acked_duplicate(tmp_path: Path):
    records = served(50)
    async with Harness(tmp_path / "events.db") as h:
        first = await h.send(records)
        # A client resending on a new stream after a failure, plus the same record twice in one stream
        # and in one batch.
        again = await h.send(records[:20] + [records[0]], batch=32)
        assert {a.status for a in first} == {fb.ACK_STATUS_STORED}
        assert [a.status for a in again] == [fb.ACK_STATUS_DUPLICATE] * 21
        assert h.log.count() == 50
        assert h.collector.duplicates == 21


async def test_bad_records_are_rejected_and_the_stream_goes_on(tmp_path: Path):
    wrong_domain = fraud_outcome("bad-2", "p1", T)
    wrong_domain.domain = "pricing"
    records = [fraud_served("ok-1", "p1", T), fb.FeedbackRecord(record_id="bad-1", domain="fraud"),
               wrong_domain, fraud_outcome("ok-2", "p1", T + 3), fb.FeedbackRecord(domain="fraud")]
    before = REGISTRY.get_sample_value("storefront_trainer_records_total",
                                       {"domain": "fraud", "kind": "unknown", "result": "rejected"}) or 0
    async with Harness(tmp_path / "events.db") as h:
        acks = {a.record_id: a for a in await h.send(records)}
        assert acks["ok-1"].status == acks["ok-2"].status == fb.ACK_STATUS_STORED
        assert acks["bad-1"].status == fb.ACK_STATUS_REJECTED and "payload" in acks["bad-1"].message
        assert acks["bad-2"].status == fb.ACK_STATUS_REJECTED and "outcome.domain_outcome: packs" in acks["bad-2"].message
        assert acks[""].status == fb.ACK_STATUS_REJECTED and "record_id" in acks[""].message
        assert [e.record_id for e in h.log.read(0, 10)] == ["ok-1", "ok-2"]
        assert h.collector.rejected == 3
    after = REGISTRY.get_sample_value("storefront_trainer_records_total",
                                      {"domain": "fraud", "kind": "unknown", "result": "rejected"})
    assert after == before + 1  # "bad-1" named its domain but had no payload


def raw_stream(h: Harness):
    return h.channel.stream_stream("/storefront.feedback.v1.Feedback/Stream", request_serializer=None,
                                   response_deserializer=fb.AckBatch.FromString)()


async def test_undecodable_bytes_are_rejected(tmp_path: Path):
    async with Harness(tmp_path / "events.db") as h:
        call = raw_stream(h)
        ok = fraud_served("ok", "p", T).SerializeToString()
        # A batch of two records (wire-built, as the client does): garbage bytes, then a good record.
        await call.write(encode_batch([b"\xff\xff\xff\xff", ok]))
        await call.done_writing()
        acks = [a for m in [m async for m in call] for a in m.acks]
        assert await call.code() == grpc.StatusCode.OK
        assert sorted((a.record_id, a.status) for a in acks) == [("", fb.ACK_STATUS_REJECTED),
                                                                   ("ok", fb.ACK_STATUS_STORED)]
        assert "FeedbackRecord" in next(a for a in acks if not a.record_id).message


async def test_undecodable_batch_is_rejected_and_the_stream_goes_on(tmp_path: Path):
    async with Harness(tmp_path / "events.db") as h:
        call = raw_stream(h)
        await call.write(b"\xff\xff\xff\xff")  # not even a batch's framing
        await call.write(b"")  # an empty batch: ignored, no ack
        await call.write(encode_batch([fraud_served("ok", "p", T).SerializeToString()]))
        await call.done_writing()
        acks = [a for m in [m async for m in call] for a in m.acks]
        assert await call.code() == grpc.StatusCode.OK
        assert sorted((a.record_id, a.status) for a in acks) == [("", fb.ACK_STATUS_REJECTED),
                                                                   ("ok", fb.ACK_STATUS_STORED)]
        assert "FeedbackBatch" in next(a for a in acks if not a.record_id).message
        assert h.log.count() == 1 and h.collector.rejected == 1


async def test_records_are_stored_byte_for_byte(tmp_path: Path):
    """The collector splits batches without decoding the records: the log keeps the very bytes
    sent, including a field this trainer does not know (a newer sender's)."""
    newer = fraud_outcome("new-1", "p1", T).SerializeToString() + b"\xa2\x06\x03abc"  # field 100, "abc"
    plain = fraud_served("old-1", "p1", T).SerializeToString()
    async with Harness(tmp_path / "events.db") as h:
        call = raw_stream(h)
        await call.write(encode_batch([plain, newer]))
        await call.done_writing()
        acks = [a for m in [m async for m in call] for a in m.acks]
        assert {(a.record_id, a.status) for a in acks} == {("old-1", fb.ACK_STATUS_STORED),
                                                           ("new-1", fb.ACK_STATUS_STORED)}
        assert [e.payload for e in h.log.read(0, 10)] == [plain, newer]
    assert split_batch(encode_batch([plain, newer])) == [plain, newer]
    assert fb.FeedbackBatch.FromString(encode_batch([plain, newer])).records[0].record_id == "old-1"


async def test_acks_are_split_into_messages_of_at_most_1024(tmp_path: Path):
    records = served(3000, prefix="big")
    messages: list[fb.AckBatch] = []
    # One group of 3000 (a long linger lets all three batches in): its acks leave in three messages.
    async with Harness(tmp_path / "events.db", max_batch=4096, linger_s=0.2) as h:
        acks = await h.send(records, batch=1000, messages=messages)
        assert sorted(a.record_id for a in acks) == sorted(r.record_id for r in records)
        assert {a.status for a in acks} == {fb.ACK_STATUS_STORED}
        assert max(len(m.acks) for m in messages) == 1024 and len(messages) >= 3
        assert h.collector.batches == 1


async def test_many_streams_share_group_commits(tmp_path: Path):
    async with Harness(tmp_path / "events.db") as h:
        results = await asyncio.gather(*(h.send(served(300, prefix=f"s{k}")) for k in range(4)))
        assert [len(r) for r in results] == [300] * 4
        assert all(a.status == fb.ACK_STATUS_STORED for r in results for a in r)
        assert h.log.count() == 1200 == h.collector.stored
        assert h.collector.batches < 1200


class SlowLog(SqliteEventLog):
    """The real log, with a slow disk: every commit takes 20 ms more. Remembers its group sizes."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.groups: list[int] = []

    def append_batch(self, records):
        self.groups.append(len(records))
        time.sleep(0.02)
        return super().append_batch(records)


async def test_backpressure_bounds_records_in_flight(tmp_path: Path):
    log = SlowLog(tmp_path / "events.db")
    collector = FeedbackCollector(log, max_inflight_per_stream=16)
    server = grpc.aio.server()
    add_collector(server, collector)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = fb_grpc.FeedbackStub(channel).Stream()
            records = served(200)

            async def writer():
                for i in range(0, len(records), 4):
                    await call.write(fb.FeedbackBatch(records=records[i:i + 4]))
                await call.done_writing()

            task = asyncio.get_running_loop().create_task(writer())
            acks = [a for m in [m async for m in call] for a in m.acks]
            await task
        assert len(acks) == 200
        assert max(log.groups) <= 16  # never more than the bound read ahead of the acks (batches of 4 fill it)
        assert sum(log.groups) == 200
    finally:
        await server.stop(1.0)
        await collector.close()
        log.close()


class BrokenLog(SqliteEventLog):
    """The real log on a disk that fails after `ok` commits."""

    def __init__(self, path, ok: int) -> None:
        super().__init__(path)
        self.ok = ok

    def append_batch(self, records):
        if self.ok <= 0:
            raise sqlite3.OperationalError("disk I/O error")
        self.ok -= 1
        return super().append_batch(records)


async def test_unavailable_when_the_log_cannot_be_written(tmp_path: Path):
    log = BrokenLog(tmp_path / "events.db", ok=1)
    collector = FeedbackCollector(log)
    server = grpc.aio.server()
    add_collector(server, collector)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = fb_grpc.FeedbackStub(channel)
            call = stub.Stream()
            await call.write(fb.FeedbackBatch(records=[fraud_served("a", "pa", T)]))
            first = await call.read()
            assert [(a.record_id, a.status) for a in first.acks] == [("a", fb.ACK_STATUS_STORED)]
            await call.write(fb.FeedbackBatch(records=[fraud_served("b", "pb", T), fraud_served("c", "pc", T)]))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "event log" in e.value.details()
            # The collector keeps serving: once the disk recovers, a new stream works.
            log.ok = 10
            call = stub.Stream()
            await call.write(fb.FeedbackBatch(records=[fraud_served("b", "pb", T), fraud_served("c", "pc", T)]))
            await call.done_writing()
            assert sorted((a.record_id, a.status) for m in [m async for m in call] for a in m.acks) == [
                ("b", fb.ACK_STATUS_STORED), ("c", fb.ACK_STATUS_STORED)]
        assert log.count() == 3
    finally:
        await server.stop(1.0)
        await collector.close()
        log.close()


async def test_client_cancel_leaves_the_collector_serving(tmp_path: Path):
    async with Harness(tmp_path / "events.db") as h:
        call = h.stub.Stream()
        records = served(20, prefix="c")
        for i in range(0, 20, 5):
            await call.write(fb.FeedbackBatch(records=records[i:i + 5]))
        call.cancel()
        await asyncio.sleep(0.1)
        # Whatever was committed before the cancel is there; a resend gets STORED or DUPLICATE.
        acks = await h.send(served(20, prefix="c"))
        assert {a.status for a in acks} <= {fb.ACK_STATUS_STORED, fb.ACK_STATUS_DUPLICATE}
        assert h.log.count() == 20


async def test_feedback_client_through_the_collector(tmp_path: Path):
    """The production path: the real FeedbackClient (batches built from its serialized records)
    into the real collector and log; a bad record is REJECTED, the others stored, all forgotten."""
    import numpy as np

    from protos.fraud.v1 import fraud_pb2

    async with Harness(tmp_path / "events.db") as h:
        client = FeedbackClient(f"127.0.0.1:{h.port}", domain="fraud", spool_dir=tmp_path / "spool", batch_max=64,
                                reconnect_backoff_s=(0.02, 0.1))
        x = np.zeros((1, 30), np.float32)
        for i in range(500):  # recorded before start: a backlog, sent in full batches
            assert client.record_served(f"p{i}", "fraud", "v1", {"features": x}, {"probability": x[:, :1]},
                                        served_at=T + i)
        mismatch = feedback_outcome(fraud_pb2.FraudOutcome(prediction_id="other"), T, T)
        mismatch.prediction_id = "p0"  # not the packed outcome's: REJECTED
        assert client.record_outcome(mismatch)
        client.start()
        assert await client.flush(15)
        for i in range(500, 520):  # live: whatever is ready goes at once
            assert client.record_served(f"p{i}", "fraud", "v1", {"features": x}, {"probability": x[:, :1]},
                                        served_at=T + i)
            await asyncio.sleep(0.001)
        assert await client.flush(15)
        st = client.stats()
        assert st["stored"] == 520 and st["rejected"] == 1 and st["pending"] == 0 and st["sent"] == 521
        assert h.log.count() == 520 == h.collector.stored and h.collector.rejected == 1
        stored = h.log.read(0, 1000)
        assert [e.prediction_id for e in stored] == [f"p{i}" for i in range(520)]
        await client.stop()
