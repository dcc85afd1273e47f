"""A small in-test stand-in for the trainer's Feedback service (protos/feedback/v1).

A real grpc.aio server on a loopback port, speaking the batched contract: FeedbackBatch
in, AckBatch out, one Ack per record. Records are "stored" in a dict by record_id (which
survives `stop()` / `start()` on the same port, like a durable event log), acked STORED or
DUPLICATE, and every record received is also kept in arrival order; `batches` keeps the
number of records of every FeedbackBatch received. Switches:

- ack_delay_s: (min, max) seconds before each ack; random in between -> out-of-order acks,
  each in its own AckBatch. Without a delay the acks of a batch leave together in one
  AckBatch, or (split_acks) each in its own.
- merge_acks: hold acks back until this many are waiting, then send them all in one AckBatch
  (acks of several batches merged; a partial lot goes out 20 ms after its first ack).
- drop_after: abort the stream (UNAVAILABLE) once this many more records have arrived
  (counted record by record, also inside a batch); with store_before_drop the last one is
  stored but never acked (the nasty case: the client must resend it and the trainer must
  answer DUPLICATE).
- reject: a predicate on the record returning a message -> ACK_STATUS_REJECTED.
- silent: read and store records but never ack them.
"""
from __future__ import annotations

import asyncio
import random
from typing import Callable

import grpc

from protos.feedback.v1 import feedback_pb2, feedback_pb2_grpc


class FakeTrainer(feedback_pb2_grpc.FeedbackServicer):
    def __init__(self, port: int) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.server: grpc.aio.Server | None = None
        self.stored: dict[str, feedback_pb2.FeedbackRecord] = {}  # insertion order = store order
        self.received: list[str] = []  # every record_id received, resends included
        self.batches: list[int] = []  # records per FeedbackBatch received
        self.batch_bytes: list[int] = []  # serialized size of every FeedbackBatch received
        self.duplicates = 0
        self.rejected: list[str] = []
        self.streams = 0
        self.ack_delay_s: tuple[float, float] = (0.0, 0.0)
        self.drop_after: int | None = None
        self.store_before_drop = True
        self.reject: Callable[[feedback_pb2.FeedbackRecord], str | None] | None = None
        self.silent = False
        self.split_acks = False
        self.merge_acks = 0
        self.max_unacked = 0  # most records received on one stream and not yet acked

    async def start(self) -> None:
        self.server = grpc.aio.server()
        feedback_pb2_grpc.add_FeedbackServicer_to_server(self, self.server)
        bound = self.server.add_insecure_port(self.address)
        assert bound == self.port, f"could not bind {self.address}"
        await self.server.start()

    async def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None

    def _store(self, rec: feedback_pb2.FeedbackRecord) -> feedback_pb2.Ack:
        if self.reject is not None:
            why = self.reject(rec)
            if why:
                self.rejected.append(rec.record_id)
                return feedback_pb2.Ack(record_id=rec.record_id, status=feedback_pb2.ACK_STATUS_REJECTED, message=why)
        if rec.record_id in self.stored:
            self.duplicates += 1
            return feedback_pb2.Ack(record_id=rec.record_id, status=feedback_pb2.ACK_STATUS_DUPLICATE)
        self.stored[rec.record_id] = rec
        return feedback_pb2.Ack(record_id=rec.record_id, status=feedback_pb2.ACK_STATUS_STORED)

    async def Stream(self, request_iterator, context):
        self.streams += 1
        acks: asyncio.Queue = asyncio.Queue()  # lists of Acks, a StatusCode, or `ended`
        unacked = 0
        ended = object()

        async def ack_later(ack: feedback_pb2.Ack) -> None:
            lo, hi = self.ack_delay_s
            await asyncio.sleep(random.uniform(lo, hi))
            await acks.put([ack])

        async def read_all() -> None:
            nonlocal unacked
            try:
                async for batch in request_iterator:
                    self.batches.append(len(batch.records))
                    self.batch_bytes.append(batch.ByteSize())
                    now: list[feedback_pb2.Ack] = []
                    for rec in batch.records:
                        self.received.append(rec.record_id)
                        if self.drop_after is not None:
                            self.drop_after -= 1
                            if self.drop_after <= 0:
                                self.drop_after = None
                                if self.store_before_drop:
                                    self._store(rec)  # stored, but the ack never leaves
                                if now:
                                    await acks.put(now)
                                await acks.put(grpc.StatusCode.UNAVAILABLE)
                                return
                        ack = self._store(rec)
                        if self.silent:
                            continue
                        unacked += 1
                        self.max_unacked = max(self.max_unacked, unacked)
                        if self.ack_delay_s[1] > 0:
                            tasks.add(asyncio.create_task(ack_later(ack)))
                        elif self.split_acks:
                            await acks.put([ack])
                        else:
                            now.append(ack)
                    if now:
                        await acks.put(now)
            finally:
                await acks.put(ended)

        def message(lot: list[feedback_pb2.Ack]) -> feedback_pb2.AckBatch:
            nonlocal unacked
            unacked -= len(lot)
            return feedback_pb2.AckBatch(acks=lot)

        tasks: set[asyncio.Task] = set()
        reader = asyncio.create_task(read_all())
        held: list[feedback_pb2.Ack] = []
        try:
            while True:
                if held:
                    try:
                        item = await asyncio.wait_for(acks.get(), 0.02)
                    except TimeoutError:
                        yield message(held)
                        held = []
                        continue
                else:
                    item = await acks.get()
                if item is ended:
                    await asyncio.gather(*tasks)
                    while not acks.empty():
                        rest = acks.get_nowait()
                        if isinstance(rest, list):
                            held += rest
                    if held:
                        yield message(held)
                    return
                if isinstance(item, grpc.StatusCode):
                    context.set_code(item)
                    context.set_details("fake trainer dropped the stream")
                    return
                if self.merge_acks:
                    held += item
                    if len(held) >= self.merge_acks:
                        yield message(held)
                        held = []
                    continue
                yield message(item)
        finally:
            reader.cancel()
            for t in tasks:
                t.cancel()
