"""The trainer's feedback endpoint: storefront.feedback.v1.Feedback/Stream (bidirectional).
Long file: one servicer whose streams, group committer and ack writers share buffers and backpressure state.

Every serving replica keeps one stream open and sends FeedbackBatch messages (each up to 1024
records); the collector answers one Ack per record, in AckBatch messages, only after the record
is durably in the event log (or known to be there).

How a record travels:
1. Each stream has a reader task that takes batches off the wire as raw bytes and splits each
   into its records' bytes with a private message type (`repeated bytes records = 1`, which is
   wire-identical to FeedbackBatch's `repeated FeedbackRecord records = 1`): no FeedbackRecord
   is decoded on the event loop; the log parses and validates each one, and stores the very
   bytes received. The records go to the stream's buffer. A batch whose framing does not
   decode at all gets one REJECTED Ack with an empty record_id; the stream goes on.
2. One committer task per collector drains the buffers of *all* streams, up to `max_batch`
   records, and hands them to `append_batch` on a dedicated writer thread: one transaction and
   one fsync for the whole group (group commit). A group smaller than max_batch waits
   `linger_s` (1 ms) for more first; and while the writer thread commits, the loop keeps
   reading, so the next group builds up. Fewer, larger transactions cost less CPU per record
   (on a 2-CPU machine: 16 records per commit without linger, hundreds with 1 ms).
   A group is made of records, not batches: one client batch may be split over two groups, and
   one group holds records of many batches and streams.
3. After the commit returns, each stream's acks go to its writer coroutine, which writes one
   Ack per record (STORED / DUPLICATE / REJECTED with the field named), as AckBatch messages of
   at most 1024 acks: the acks of one group, merged with those of any later groups already
   committed. Writing acks of one group overlaps with committing the next.

Backpressure: a stream holds at most `max_inflight_per_stream` records read but not yet acked
(plus the rest of the batch that reached the bound); at that bound its reader stops reading,
so HTTP/2 flow control slows the sender down.

Identity: what enters training must come from a service the trainer can name. At the start of
each stream the collector identifies the client, in this order:
- tokens configured (`tokens`, trainer setting `feedback_tokens`: service domain -> shared
  secret): the stream must carry one of them in the `x-storefront-feedback-token` metadata
  (compared in constant time): missing -> UNAUTHENTICATED, unknown -> UNAUTHENTICATED. The
  stream may then send records of the token's domain only. Under mTLS as well, a client
  certificate whose CN is a domain name must name that same domain (else PERMISSION_DENIED);
- no tokens, a client certificate (the server requires mTLS): its CN must be the name of a
  domain this trainer knows (its plug-ins, trainer/plugins.py: "fraud", ...), the one domain
  the stream may send; any other CN -> PERMISSION_DENIED;
- neither: only loopback peers (127.0.0.0/8, ::1, Unix sockets) are accepted, for every domain
  (one machine, `make up` without configuration; the trainer logs a warning at start); any
  other peer -> UNAUTHENTICATED.
A record of a domain the stream may not send is REJECTED (ack message names the domain) and
never stored; the stream goes on. Every refusal is counted in
storefront_trainer_feedback_refused_total{reason}.

Errors: when the log cannot be written (disk full, I/O error, database locked beyond the busy
timeout) every stream whose records were in the failed group ends with UNAVAILABLE; nothing of
that group was stored or acked, the clients resend it later. A malformed record only gets a
REJECTED ack; its stream goes on.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import logging
import time
from typing import Any, AsyncIterator, Mapping

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge, Histogram

from protos.feedback.v1 import feedback_pb2 as fb
from shared.feedback import TOKEN_METADATA
from shared.ratelimit import is_loopback_peer
from trainer.eventlog import REJECTED, AppendResult, EventLog
from trainer.plugins import default_domains

log = logging.getLogger(__name__)

SERVICE_NAME = fb.DESCRIPTOR.services_by_name["Feedback"].full_name  # storefront.feedback.v1.Feedback

MAX_ACKS_PER_MESSAGE = 1024  # feedback.proto: an AckBatch holds at most 1024 acks


def _raw_batch_class():
    """A private twin of FeedbackBatch with `repeated bytes records = 1`: the same wire format,
    so parsing it yields each record's bytes exactly as received, without decoding them. Kept
    in a private descriptor pool, so it clashes with nothing in the default one."""
    f = descriptor_pb2.FileDescriptorProto(name="trainer/collector_raw_batch.proto",
                                           package="storefront.trainer.collector", syntax="proto3")
    m = f.message_type.add(name="RawFeedbackBatch")
    m.field.add(name="records", number=fb.FeedbackBatch.RECORDS_FIELD_NUMBER,
                type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("storefront.trainer.collector.RawFeedbackBatch"))


_RawFeedbackBatch = _raw_batch_class()


def split_batch(raw: bytes) -> list[bytes]:
    """The serialized records of a serialized FeedbackBatch, byte for byte. DecodeError when the
    batch's framing is broken."""
    return list(_RawFeedbackBatch.FromString(raw).records)

_DOMAIN_FIELD = fb.FeedbackRecord.DESCRIPTOR.fields_by_name["domain"].number
_RECORD_ID_FIELD = fb.FeedbackRecord.DESCRIPTOR.fields_by_name["record_id"].number

_STATUS_NAME = {fb.ACK_STATUS_STORED: "stored", fb.ACK_STATUS_DUPLICATE: "duplicate",
                fb.ACK_STATUS_REJECTED: "rejected"}

RECORDS = Counter("storefront_trainer_records_total",
                  "Feedback records received by the collector, by domain, kind and result "
                  "(stored, duplicate, rejected); domain/kind 'unknown' when a rejected record did not say",
                  ["domain", "kind", "result"])
APPEND_BATCH = Histogram("storefront_trainer_append_batch_size", "Records per event-log transaction",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
APPEND_LATENCY = Histogram("storefront_trainer_append_latency_seconds",
                           "Time to append one group to the event log (validation, insert, commit + fsync)",
                           buckets=(0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
                                    0.512, 1.024, 2.048, 4.096))
BATCH_RECORDS = Histogram("storefront_trainer_feedback_batch_records", "Records per FeedbackBatch received",
                          buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048))
APPEND_ERRORS = Counter("storefront_trainer_append_errors_total",
                        "Groups the event log could not store (their streams ended UNAVAILABLE)")
STREAMS = Gauge("storefront_trainer_feedback_streams", "Feedback streams open now")
INFLIGHT = Gauge("storefront_trainer_records_inflight", "Records read from streams and not yet acknowledged")
REFUSED = Counter("storefront_trainer_feedback_refused_total",
                  "Feedback refused for want of identity: streams (missing_token, bad_token, not_loopback, "
                  "unknown_certificate, certificate_mismatch) and records (wrong_domain, unreadable_domain)",
                  ["reason"])


def record_head(raw: bytes) -> tuple[str, str] | None:
    """(record_id, domain) of a serialized FeedbackRecord, read off the wire without decoding the
    payload (a few top-level fields). Like protobuf parsing, the last occurrence of a field wins.
    None when the top-level framing does not parse."""
    rid, domain = "", ""
    pos, n = 0, len(raw)
    try:
        while pos < n:
            tag, pos = _varint(raw, pos)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _, pos = _varint(raw, pos)
            elif wire == 2:
                length, pos = _varint(raw, pos)
                if pos + length > n:
                    return None
                if field == _RECORD_ID_FIELD:
                    rid = raw[pos:pos + length].decode()
                elif field == _DOMAIN_FIELD:
                    domain = raw[pos:pos + length].decode()
                pos += length
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:  # groups: a FeedbackRecord has none
                return None
            if field == 0 or pos > n:
                return None
    except (IndexError, UnicodeDecodeError):
        return None
    return rid, domain


def _varint(b: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = b[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def parse_tokens(spec: str, known=None) -> dict[str, str]:
    """'fraud=<token>,pricing=<token>' (commas, spaces or newlines between) -> {domain: token}.
    A token is at least 16 characters; one token per domain; each domain one of `known`
    (default: the built-in domain plug-ins)."""
    known = tuple(default_domains() if known is None else known)
    out: dict[str, str] = {}
    for part in spec.replace("\n", ",").replace(" ", ",").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, token = part.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise ValueError(f"feedback token entry {name!r}: expected <domain>=<token> with domain one of {list(known)}")
        if len(token) < 16:
            raise ValueError(f"feedback token of {name}: at least 16 characters")
        if name in out:
            raise ValueError(f"feedback token of {name} given twice")
        out[name] = token
    return out


class LogUnavailable(Exception):
    """The event log could not store a group this stream's records were in."""


class _Stream:
    """One open Stream RPC: its buffer, its acks to write, its backpressure state."""
    __slots__ = ("buf", "queued", "inflight", "space", "acks", "reader_done", "peer", "domains")

    def __init__(self, peer: str, domains: frozenset[str] | None = None) -> None:
        self.buf: list[bytes] = []           # read, not yet handed to the committer
        self.queued = False                  # in the committer's ready queue
        self.inflight = 0                    # read and not yet acked
        self.space = asyncio.Event()         # set while inflight < bound
        self.space.set()
        self.acks: asyncio.Queue = asyncio.Queue()  # lists of AppendResult, None (wake-up) or an exception
        self.reader_done = False
        self.peer = peer
        self.domains = domains  # domain names this stream may send; None: any


class FeedbackCollector:
    """grpc.aio servicer of storefront.feedback.v1.Feedback. Register it with `add_collector`.

    log: where records go (its `append_batch` runs on one dedicated writer thread).
    max_batch: most records per transaction.
    max_inflight_per_stream: records one stream may have read but not acked (backpressure; a batch
      that crosses the bound is read whole, so the bound may be passed by less than one batch).
    linger_s: when a group is smaller than max_batch, wait this long for more before committing
      (0: commit at once; groups still form while the previous commit runs). It adds at most
      this much to an ack's latency.
    tokens: domain name ("fraud", ...; one of the log's domains) -> its service's feedback token; empty: no token identity (then a
      client certificate's CN, or else loopback only; see the module docstring).
    """

    def __init__(self, log: EventLog, *, max_batch: int = 512, max_inflight_per_stream: int = 4096,
                 linger_s: float = 0.001, tokens: Mapping[str, str] | None = None) -> None:
        if max_batch < 1 or max_inflight_per_stream < 1 or linger_s < 0:
            raise ValueError("max_batch and max_inflight_per_stream must be >= 1, linger_s >= 0")
        self.log = log
        self.max_batch = max_batch
        self.max_inflight = max_inflight_per_stream
        self.linger_s = linger_s
        self.domains = frozenset(getattr(log, "domains", None) or default_domains())
        unknown = set(tokens or ()) - self.domains
        if unknown:
            raise ValueError(f"tokens for unknown domain(s) {sorted(unknown)}; known: {sorted(self.domains)}")
        self._tokens = [(d, t.encode()) for d, t in (tokens or {}).items()]
        self.refused = 0  # streams and records refused for identity (totals since start)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eventlog-writer")
        self._ready: collections.deque[_Stream] = collections.deque()
        self._buffered = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # shutdown: new streams are refused and open ones end once what they read is acked
        self._draining = False
        self._open: dict[_Stream, asyncio.Task] = {}  # open streams and their reader tasks
        self._streams_ended: asyncio.Event | None = None
        self._series: dict[tuple[str, str, int], Any] = {}
        # Totals since start, for tests and logs (Prometheus has the labelled series).
        self.stored = 0
        self.duplicates = 0
        self.rejected = 0
        self.batches = 0

    # ------------------------------------------------------------ the committer

    def _ensure_committer(self) -> None:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("collector is closed")
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wake = asyncio.Event()
            self._ready.clear()
            self._buffered = 0
            self._task = loop.create_task(self._commit_loop(), name="feedback-committer")

    def _submit(self, st: _Stream, records: list[bytes]) -> None:
        st.buf += records
        self._buffered += len(records)
        if not st.queued:
            st.queued = True
            self._ready.append(st)
            self._wake.set()  # type: ignore[union-attr]

    def _take(self) -> tuple[list[bytes], list[tuple[_Stream, int]]]:
        """Up to max_batch buffered records, round-robin over the ready streams."""
        batch: list[bytes] = []
        owners: list[tuple[_Stream, int]] = []
        ready = self._ready
        while ready and len(batch) < self.max_batch:
            st = ready.popleft()
            room = self.max_batch - len(batch)
            if len(st.buf) <= room:
                taken, st.buf = st.buf, []
                st.queued = False
            else:
                taken, st.buf = st.buf[:room], st.buf[room:]
                ready.append(st)
            batch += taken
            owners.append((st, len(taken)))
        self._buffered -= len(batch)
        return batch, owners

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            if self.linger_s > 0 and self._buffered < self.max_batch:
                await asyncio.sleep(self.linger_s)
            batch, owners = self._take()
            if self._ready:
                wake.set()
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.log.append_batch, batch)
                if len(results) != len(batch):
                    raise RuntimeError(f"append_batch returned {len(results)} results for {len(batch)} records")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the log cannot be written: these streams end UNAVAILABLE
                APPEND_ERRORS.inc()
                log.error("event log append of %d records failed: %s", len(batch), e, exc_info=True)
                err = LogUnavailable(f"event log cannot be written: {type(e).__name__}")
                for st, _ in owners:
                    st.acks.put_nowait(err)
                continue
            i = 0
            for st, n in owners:
                st.acks.put_nowait(results[i:i + n])
                i += n
            self.batches += 1
            APPEND_LATENCY.observe(time.perf_counter() - t0)
            APPEND_BATCH.observe(len(batch))
            self._count(results)

    def _count(self, results: list[AppendResult]) -> None:
        tally: collections.Counter = collections.Counter((r.domain, r.kind, r.status) for r in results)
        for key, n in tally.items():
            series = self._series.get(key)
            if series is None:
                series = RECORDS.labels(key[0] or "unknown", key[1] or "unknown", _STATUS_NAME[key[2]])
                self._series[key] = series
            series.inc(n)
            if key[2] == fb.ACK_STATUS_STORED:
                self.stored += n
            elif key[2] == fb.ACK_STATUS_DUPLICATE:
                self.duplicates += n
            else:
                self.rejected += n

    # ------------------------------------------------------------ identity

    def identify(self, context: grpc.aio.ServicerContext) -> frozenset[str] | None:
        """The domain names this stream may send (None: any); Refused when it may send none."""
        cn = None
        try:
            names = (context.auth_context() or {}).get("x509_common_name")
        except Exception:
            names = None
        if names:
            cn = names[0].decode(errors="replace")
        if self._tokens:
            token = None
            for k, v in context.invocation_metadata() or ():
                if k == TOKEN_METADATA:
                    token = v.encode() if isinstance(v, str) else bytes(v)
            if token is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "missing_token",
                              f"feedback needs a service token ({TOKEN_METADATA} metadata)")
            domains = set()
            for domain, expected in self._tokens:  # every token compared: timing tells nothing
                if hmac.compare_digest(expected, token):
                    domains.add(domain)
            if not domains:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "bad_token", "unknown feedback token")
            if cn in self.domains and cn not in domains:
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, "certificate_mismatch",
                              f"the client certificate (CN={cn}) and the token name different services")
            return frozenset(domains)
        if cn is not None:
            if cn in self.domains:
                return frozenset((cn,))
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "unknown_certificate",
                          f"client certificate CN={cn[:64]!r} names no service; expected one of {sorted(self.domains)}")
        if is_loopback_peer(context.peer() or ""):
            return None
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "not_loopback",
                      "this trainer has no feedback tokens configured and accepts feedback only from loopback")

    def _check_domains(self, st: _Stream, records: list[bytes]) -> list[bytes]:
        """The records this stream may send; the others are acked REJECTED here, never stored."""
        allowed = st.domains
        if allowed is None:
            return records
        keep: list[bytes] = []
        bad: list[AppendResult] = []
        for raw in records:
            head = record_head(raw)
            if head is None:
                bad.append(AppendResult("", REJECTED, "not a serialized storefront.feedback.v1.FeedbackRecord"))
                REFUSED.labels("unreadable_domain").inc()
            elif head[1] not in allowed:
                name = head[1] if head[1] in self.domains else ""
                mine = ", ".join(sorted(allowed))
                bad.append(AppendResult(head[0][:256], REJECTED,
                                        f"domain: this stream is authenticated for {mine}, not "
                                        f"{head[1][:40]!r}", domain=name))
                REFUSED.labels("wrong_domain").inc()
            else:
                keep.append(raw)
        if bad:
            self.refused += len(bad)
            self._count(bad)
            st.inflight += len(bad)
            INFLIGHT.inc(len(bad))
            st.acks.put_nowait(bad)
        return keep

    # ------------------------------------------------------------ one stream

    async def _read(self, requests: AsyncIterator[bytes], st: _Stream) -> None:
        try:
            async for raw in requests:
                try:
                    records = split_batch(raw)
                except DecodeError:
                    # Not even the batch's framing decodes: no record_id to name. One REJECTED ack
                    # (nothing to store, so it needs no commit); the stream goes on.
                    bad = [AppendResult("", REJECTED, "not a serialized storefront.feedback.v1.FeedbackBatch")]
                    self._count(bad)
                    st.inflight += 1
                    INFLIGHT.inc()
                    st.acks.put_nowait(bad)
                    continue
                BATCH_RECORDS.observe(len(records))
                records = self._check_domains(st, records)
                n = len(records)
                if not n:
                    continue  # an empty batch is allowed and ignored
                self._submit(st, records)
                st.inflight += n
                INFLIGHT.inc(n)
                if st.inflight >= self.max_inflight:
                    st.space.clear()
                    await st.space.wait()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the stream broke (client reset): wake the writer, which ends the RPC
            st.acks.put_nowait(e)
            return
        st.reader_done = True
        st.acks.put_nowait(None)

    async def Stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the trainer is shutting down; send the records later")
        self._ensure_committer()
        try:
            domains = self.identify(context)
        except Refused as e:
            self.refused += 1
            REFUSED.labels(e.reason).inc()
            log.warning("feedback stream from %s refused (%s): %s", context.peer(), e.reason, e.message)
            await context.abort(e.code, e.message)
        st = _Stream(context.peer(), domains)
        STREAMS.inc()
        reader = asyncio.get_running_loop().create_task(self._read(requests, st))
        self._open[st] = reader
        write = context.write
        low_water = self.max_inflight // 2
        acks = st.acks
        carry: Any = None  # an item taken while merging, handled next
        try:
            while not (st.reader_done and st.inflight == 0):
                if carry is not None:
                    item, carry = carry, None
                else:
                    item = await acks.get()
                if item is None:
                    continue
                if isinstance(item, LogUnavailable):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
                if isinstance(item, BaseException):
                    log.info("feedback stream from %s broke: %s", st.peer, item)
                    return
                # Merge the acks of groups committed meanwhile into the same AckBatch messages.
                while len(item) < MAX_ACKS_PER_MESSAGE and not acks.empty():
                    more = acks.get_nowait()
                    if isinstance(more, list):
                        item = item + more
                    else:
                        carry = more
                        break
                for i in range(0, len(item), MAX_ACKS_PER_MESSAGE):
                    batch = fb.AckBatch()
                    add = batch.acks.add
                    for r in item[i:i + MAX_ACKS_PER_MESSAGE]:
                        if r.status == REJECTED:
                            add(record_id=r.record_id, status=r.status, message=r.message)
                        else:
                            add(record_id=r.record_id, status=r.status)
                    await write(batch.SerializeToString())
                st.inflight -= len(item)
                INFLIGHT.dec(len(item))
                if st.inflight <= low_water:
                    st.space.set()
            if self._draining:
                # everything this stream had read is acked; what its client sends next waits in
                # its spool until a trainer takes it (UNAVAILABLE: the client reconnects with backoff)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the trainer is shutting down; send the rest later")
        finally:
            reader.cancel()
            INFLIGHT.dec(st.inflight)  # records read but never acked (stream ended early)
            STREAMS.dec()
            self._open.pop(st, None)
            if not self._open and self._streams_ended is not None:
                self._streams_ended.set()

    # ------------------------------------------------------------ lifecycle

    def handler(self) -> grpc.GenericRpcHandler:
        """A generic handler for the Feedback service: FeedbackBatch messages arrive as raw bytes
        (split into records by `split_batch`; each validated and stored by the log as received),
        acks leave as serialized AckBatch messages."""
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Stream": grpc.stream_stream_rpc_method_handler(self.Stream),
        })

    async def stop_accepting(self, timeout_s: float = 10.0) -> bool:
        """Shutdown, first step: stop taking feedback. New streams are refused (UNAVAILABLE); the
        open ones stop reading, get the acks of every record they had read once it is stored
        (the committer keeps running), then end UNAVAILABLE, so their clients keep the rest in
        their spools. Returns whether every stream ended within timeout_s (those that did not
        end with the server's stop; their unacked records are resent too)."""
        self._draining = True
        self._streams_ended = asyncio.Event()
        for st, reader in list(self._open.items()):
            if not st.reader_done:
                reader.cancel()  # between batches: a batch read is always submitted whole
                st.reader_done = True
                st.acks.put_nowait(None)  # wake its writer: it ends once inflight is acked
        if not self._open:
            return True
        try:
            await asyncio.wait_for(self._streams_ended.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            log.warning("%d feedback stream(s) still open %.1f s after shutdown began", len(self._open), timeout_s)
            return False

    async def close(self) -> None:
        """Stop committing (after the group in progress finishes) and release the writer thread.
        Call it after the server stopped; the log itself stays open (its owner closes it)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)


def add_collector(server: grpc.aio.Server, log: EventLog | FeedbackCollector, **options: Any) -> str:
    """Register the Feedback service on `server`; returns its full service name (for health and
    reflection). `log` is an EventLog (a FeedbackCollector with `options` is made over it) or a
    FeedbackCollector you made yourself, to read its totals and `close()` it on shutdown."""
    collector = log if isinstance(log, FeedbackCollector) else FeedbackCollector(log, **options)
    server.add_generic_rpc_handlers((collector.handler(),))
    return SERVICE_NAME
