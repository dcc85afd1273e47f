"""The feedback collector on a real grpc.aio server over loopback, writing a real SQLite log."""
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
from protos.feedback.v1 import feedback_pb2_grpc as fb_grpc
from trainer.collector import SERVICE_NAME, FeedbackCollector, add_collector
from trainer.eventlog import SqliteEventLog

T = 1.7e9


class Harness:
    def __init__(self, path: Path, **options) -> None:
        self.log = SqliteEventLog(path)
        self.path = path
        self.collector = FeedbackCollector(self.log, **options)
        self.server = grpc.aio.server()
        self.service = add_collector(self.server, self.collector)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> "Harness":
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = fb_grpc.FeedbackStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(1.0)
        await self.collector.close()
        self.log.close()

    async def send(self, records, on_ack=None) -> list[fb.Ack]:
        """One stream: write every record, read every ack (concurrently), return the acks."""
        call = self.stub.Stream()

        async def writer():
            for r in records:
                await call.write(r)
            await call.done_writing()

        task = asyncio.get_running_loop().create_task(writer())
        acks = []
        async for ack in call:
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
        # A client resending on a new stream after a failure, plus the same record twice in one stream.
        again = await h.send(records[:20] + [records[0]])
        assert {a.status for a in first} == {fb.ACK_STATUS_STORED}
        assert [a.status for a in again] == [fb.ACK_STATUS_DUPLICATE] * 21
        assert h.log.count() == 50
        assert h.collector.duplicates == 21


async def test_bad_records_are_rejected_and_the_stream_goes_on(tmp_path: Path):
    wrong_domain = fraud_outcome("bad-2", "p1", T)
    wrong_domain.domain = fb.DOMAIN_PRICING
    records = [fraud_served("ok-1", "p1", T), fb.FeedbackRecord(record_id="bad-1", domain=fb.DOMAIN_FRAUD),
               wrong_domain, fraud_outcome("ok-2", "p1", T + 3), fb.FeedbackRecord(domain=fb.DOMAIN_FRAUD)]
    before = REGISTRY.get_sample_value("storefront_trainer_records_total",
                                       {"domain": "fraud", "kind": "unknown", "result": "rejected"}) or 0
    async with Harness(tmp_path / "events.db") as h:
        acks = {a.record_id: a for a in await h.send(records)}
        assert acks["ok-1"].status == acks["ok-2"].status == fb.ACK_STATUS_STORED
        assert acks["bad-1"].status == fb.ACK_STATUS_REJECTED and "payload" in acks["bad-1"].message
        assert acks["bad-2"].status == fb.ACK_STATUS_REJECTED and "outcome.fraud" in acks["bad-2"].message
        assert acks[""].status == fb.ACK_STATUS_REJECTED and "record_id" in acks[""].message
        assert [e.record_id for e in h.log.read(0, 10)] == ["ok-1", "ok-2"]
        assert h.collector.rejected == 3
    after = REGISTRY.get_sample_value("storefront_trainer_records_total",
                                      {"domain": "fraud", "kind": "unknown", "result": "rejected"})
    assert after == before + 1  # "bad-1" named its domain but had no payload


async def test_undecodable_bytes_are_rejected(tmp_path: Path):
    async with Harness(tmp_path / "events.db") as h:
        raw = h.channel.stream_stream("/storefront.feedback.v1.Feedback/Stream", request_serializer=None,
                                      response_deserializer=fb.Ack.FromString)
        call = raw()
        await call.write(b"\xff\xff\xff\xff")
        await call.write(fraud_served("ok", "p", T).SerializeToString())
        await call.done_writing()
        acks = [a async for a in call]
        assert await call.code() == grpc.StatusCode.OK
        assert [(a.record_id, a.status) for a in acks] == [("", fb.ACK_STATUS_REJECTED), ("ok", fb.ACK_STATUS_STORED)]
        assert "FeedbackRecord" in acks[0].message


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
                for r in records:
                    await call.write(r)
                await call.done_writing()

            task = asyncio.get_running_loop().create_task(writer())
            acks = [a async for a in call]
            await task
        assert len(acks) == 200
        assert max(log.groups) <= 16  # never more than the bound read ahead of the acks
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
            await call.write(fraud_served("a", "pa", T))
            first = await call.read()
            assert (first.record_id, first.status) == ("a", fb.ACK_STATUS_STORED)
            await call.write(fraud_served("b", "pb", T))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "event log" in e.value.details()
            # The collector keeps serving: once the disk recovers, a new stream works.
            log.ok = 10
            call = stub.Stream()
            await call.write(fraud_served("b", "pb", T))
            await call.done_writing()
            assert [(a.record_id, a.status) async for a in call] == [("b", fb.ACK_STATUS_STORED)]
        assert log.count() == 2
    finally:
        await server.stop(1.0)
        await collector.close()
        log.close()


async def test_client_cancel_leaves_the_collector_serving(tmp_path: Path):
    async with Harness(tmp_path / "events.db") as h:
        call = h.stub.Stream()
        for r in served(20, prefix="c"):
            await call.write(r)
        call.cancel()
        await asyncio.sleep(0.1)
        # Whatever was committed before the cancel is there; a resend gets STORED or DUPLICATE.
        acks = await h.send(served(20, prefix="c"))
        assert {a.status for a in acks} <= {fb.ACK_STATUS_STORED, fb.ACK_STATUS_DUPLICATE}
        assert h.log.count() == 20
