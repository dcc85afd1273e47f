"""The trainer's durable event log: every FeedbackRecord the collector acknowledged, in order.

`EventLog` is the interface the collector, the joiner and the learner use; `SqliteEventLog` is
the embedded default (one SQLite file, WAL mode, synchronous=FULL). A distributed log (Redis
Streams with consumer groups) can implement the same interface for deployments beyond one host.

Model
-----
- An event is one stored FeedbackRecord with an *offset*: a positive integer, strictly increasing
  in append order, never reused (offset 0 means "before the first event"). A reader that has
  seen offset N never later sees a new event at an offset <= N (writes are serialized and a
  reader only sees committed transactions), so "read after my offset" never misses an event.
- Idempotency: `record_id` is unique. Appending a record whose id is stored already stores
  nothing and reports DUPLICATE; the client may forget it (feedback.proto).
- Validation: a malformed record is REJECTED with a message naming the field; it never raises
  and never affects the other records of its batch.
- Group commit: `append_batch` stores a whole batch in one transaction, with one fsync.
- Outcome identity: for each outcome the log stores its identity key (`outcome_key`, from the
  domain contracts: fraud (prediction_id, is_fraud); recommender (prediction_id, item_id,
  event); pricing every field). The joiner emits only the first occurrence (lowest offset) of
  each key, which is a pure function of the log: stable across restarts and replays.
- Outcome slot (`outcome_slot`): what one label is about, where the domain contract says the
  latest outcome wins: fraud and pricing one slot per prediction (a chargeback later reversed,
  a sale later refunded: "the trainer uses the one with the latest occurred_at"); recommender
  (prediction_id, item_id, event), the same as its identity. `outcomes_for` returns every
  outcome of some predictions so the joiner can keep the latest of each slot.
- Consumer offsets: a named consumer stores the offset it has processed up to, with a small
  JSON document (`commit_offset` / `committed`).

Payloads are stored exactly as serialized protobuf bytes (when the collector hands over the
bytes it received, those very bytes, so fields a newer sender added survive).
"""
from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

from google.protobuf.message import DecodeError

from protos.feedback.v1 import feedback_pb2 as fb

STORED = fb.ACK_STATUS_STORED
DUPLICATE = fb.ACK_STATUS_DUPLICATE
REJECTED = fb.ACK_STATUS_REJECTED

SERVED = "served"
OUTCOME = "outcome"
KINDS = (SERVED, OUTCOME)

# Domain enum value -> the name used in the log, in metrics and in the joiner's windows.
DOMAIN_NAMES = {fb.DOMAIN_FRAUD: "fraud", fb.DOMAIN_RECOMMENDER: "recommender", fb.DOMAIN_PRICING: "pricing"}
DOMAINS = tuple(DOMAIN_NAMES.values())

MAX_RECORD_ID = 256       # feedback.proto: record_id 1..256 characters
MAX_PREDICTION_ID = 64    # common.proto: prediction_id at most 64 characters

# The Outcome oneof member and the packed request / response types each domain must use.
_OUTCOME_FIELD = {fb.DOMAIN_FRAUD: "fraud", fb.DOMAIN_RECOMMENDER: "recommendation", fb.DOMAIN_PRICING: "pricing"}
_REQUEST_TYPE = {fb.DOMAIN_FRAUD: "storefront.fraud.v1.ScoreTransactionRequest",
                 fb.DOMAIN_RECOMMENDER: "storefront.recommender.v1.RecommendRequest",
                 fb.DOMAIN_PRICING: "storefront.pricing.v1.QuoteRequest"}
_RESPONSE_TYPE = {fb.DOMAIN_FRAUD: "storefront.fraud.v1.ScoreTransactionResponse",
                  fb.DOMAIN_RECOMMENDER: "storefront.recommender.v1.RecommendResponse",
                  fb.DOMAIN_PRICING: "storefront.pricing.v1.QuoteResponse"}
# Element size in bytes of each KServe V2 datatype (BYTES: variable, length-prefixed).
_ELEMENT_SIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2,
                 "INT32": 4, "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8, "BYTES": 0}

_SQL_CHUNK = 500  # host parameters per IN (...) list


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What happened to one record of `append_batch`, in the order the records were given."""
    record_id: str
    status: int              # STORED, DUPLICATE or REJECTED (feedback.v1.AckStatus values)
    message: str = ""        # why it was rejected, naming the field; empty otherwise
    offset: int | None = None  # where it is stored (STORED, DUPLICATE); None when REJECTED
    domain: str = ""         # "fraud" | "recommender" | "pricing"; "" when unknown (rejected)
    kind: str = ""           # "served" | "outcome"; "" when unknown (rejected)


class LogEntry:
    """One stored event. `record` parses the payload on first use."""
    __slots__ = ("offset", "record_id", "domain", "kind", "prediction_id", "event_time", "received_at",
                 "payload", "_record")

    def __init__(self, offset: int, record_id: str, domain: str, kind: str, prediction_id: str,
                 event_time: float, received_at: float, payload: bytes) -> None:
        self.offset = offset
        self.record_id = record_id
        self.domain = domain
        self.kind = kind
        self.prediction_id = prediction_id
        self.event_time = event_time    # served_at of a served prediction, occurred_at of an outcome
        self.received_at = received_at  # when the log stored it (trainer clock), Unix seconds
        self.payload = payload          # the serialized FeedbackRecord
        self._record: fb.FeedbackRecord | None = None

    @property
    def record(self) -> fb.FeedbackRecord:
        if self._record is None:
            self._record = fb.FeedbackRecord.FromString(self.payload)
        return self._record

    def __repr__(self) -> str:
        return (f"LogEntry(offset={self.offset}, record_id={self.record_id!r}, domain={self.domain!r}, "
                f"kind={self.kind!r}, prediction_id={self.prediction_id!r}, event_time={self.event_time})")


@runtime_checkable
class EventLog(Protocol):
    """A durable, ordered, idempotent log of FeedbackRecords. One writer, many readers."""

    def append_batch(self, records: Sequence[fb.FeedbackRecord | bytes]) -> list[AppendResult]:
        """Store the valid, new records durably, all in one atomic commit; one result per record,
        in order. Raises only when the log itself cannot be written (then nothing is stored)."""
        ...

    def read(self, after_offset: int, limit: int, domain: str | None = None, kind: str | None = None,
             upto: int | None = None) -> list[LogEntry]:
        """Events with after_offset < offset (<= upto when given), oldest first, at most limit."""
        ...

    def get(self, offsets: Iterable[int]) -> list[LogEntry]:
        """The events at these offsets (those that exist), oldest first."""
        ...

    def end_offset(self) -> int:
        """Offset of the newest event; 0 when the log is empty."""
        ...

    def count(self, domain: str | None = None, kind: str | None = None) -> int:
        ...

    def served_for(self, prediction_ids: Iterable[str], domain: str | None = None) -> dict[str, LogEntry]:
        """The served prediction of each prediction id that has one (the first stored)."""
        ...

    def first_outcome_offsets(self, keys: Iterable[str]) -> dict[str, int]:
        """For each outcome identity key that is stored, the lowest offset it is stored at."""
        ...

    def outcomes_for(self, prediction_ids: Iterable[str], domain: str, upto: int | None = None) -> list[LogEntry]:
        """Every outcome of these predictions in `domain` (at offsets <= upto when given), oldest first."""
        ...

    def commit_offset(self, consumer: str, offset: int, meta: dict[str, Any] | None = None) -> None:
        """Durably record that `consumer` has processed everything up to `offset`."""
        ...

    def committed(self, consumer: str) -> tuple[int, dict[str, Any] | None]:
        """(offset, meta) last committed by `consumer`; (0, None) when it never committed."""
        ...

    def close(self) -> None:
        ...


# ---------------------------------------------------------------- validation and identity

def _finite_positive(x: float) -> bool:
    return x > 0 and x != math.inf  # NaN fails `x > 0`


def _check_tensor(t: fb.Tensor, path: str) -> str | None:
    if not t.name:
        return f"{path}.name: required"
    size = _ELEMENT_SIZE.get(t.datatype)
    if size is None:
        return f"{path}.datatype: unknown datatype {t.datatype[:32]!r}"
    n = 1
    for d in t.shape:
        if d < 0:
            return f"{path}.shape: dimensions must be >= 0, got {list(t.shape)}"
        n *= d
    raw = t.raw_data
    if size:
        if len(raw) != n * size:
            return f"{path}.raw_data: {len(raw)} bytes, shape {list(t.shape)} of {t.datatype} needs {n * size}"
        return None
    pos, count, end = 0, 0, len(raw)  # BYTES: 4-byte little-endian length, then the bytes
    while pos < end:
        if pos + 4 > end:
            return f"{path}.raw_data: truncated BYTES element length"
        pos += 4 + int.from_bytes(raw[pos:pos + 4], "little")
        count += 1
    if pos != end or count != n:
        return f"{path}.raw_data: BYTES contents do not hold the {n} elements shape {list(t.shape)} needs"
    return None


def _check_any(a, expected: str, path: str) -> str | None:
    type_name = a.type_url.rsplit("/", 1)[-1]
    if type_name != expected:
        return f"{path}: packs {type_name[:128]!r}, this domain sends {expected!r}"
    return None


def outcome_key(domain: int, outcome: fb.Outcome) -> str:
    """The identity of an outcome as its domain contract defines it (for duplicates):
    fraud (prediction_id, is_fraud); recommender (prediction_id, item_id, event);
    pricing every field. `outcome` must hold the domain's message."""
    pid = outcome.prediction_id
    if domain == fb.DOMAIN_FRAUD:
        return f"fraud\x1f{pid}\x1f{int(outcome.fraud.is_fraud)}"
    if domain == fb.DOMAIN_RECOMMENDER:
        r = outcome.recommendation
        return f"recommender\x1f{pid}\x1f{r.item_id}\x1f{int(r.event)}"
    p = outcome.pricing
    return f"pricing\x1f{pid}\x1f{int(p.sold)}\x1f{p.units}\x1f{p.price!r}\x1f{p.occurred_at!r}"


def outcome_slot(domain: int, outcome: fb.Outcome) -> str:
    """What one label is about (the latest outcome of a slot wins; see the module docstring)."""
    pid = outcome.prediction_id
    if domain == fb.DOMAIN_RECOMMENDER:
        r = outcome.recommendation
        return f"recommender\x1f{pid}\x1f{r.item_id}\x1f{int(r.event)}"
    return f"{DOMAIN_NAMES.get(domain, domain)}\x1f{pid}"


# (record_id, domain, kind, prediction_id, event_time, outcome_key, payload)
_Row = tuple[str, str, str, str, float, "str | None", bytes]


def prepare(item: fb.FeedbackRecord | bytes) -> _Row | AppendResult:
    """Validate one record: the row to store, or a REJECTED AppendResult naming the field."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        payload = bytes(item)
        try:
            rec = fb.FeedbackRecord.FromString(payload)
        except DecodeError:
            return AppendResult("", REJECTED, "not a serialized storefront.feedback.v1.FeedbackRecord")
    else:
        rec = item
        payload = b""
    rid = rec.record_id
    if not rid:
        return AppendResult("", REJECTED, "record_id: required")
    if len(rid) > MAX_RECORD_ID:
        return AppendResult(rid[:MAX_RECORD_ID], REJECTED,
                            f"record_id: {len(rid)} characters, at most {MAX_RECORD_ID}")
    dom = rec.domain
    dname = DOMAIN_NAMES.get(dom)
    if dname is None:
        return AppendResult(rid, REJECTED, "domain: required" if dom == 0 else f"domain: unknown value {dom}")
    which = rec.WhichOneof("payload")
    if which is None:
        return AppendResult(rid, REJECTED, "payload: exactly one of served, outcome is required", domain=dname)
    problem = None
    key = None
    if which == "served":
        s = rec.served
        pid = s.prediction_id
        event_time = s.served_at
        if not pid or len(pid) > MAX_PREDICTION_ID:
            problem = f"served.prediction_id: required, 1..{MAX_PREDICTION_ID} characters"
        elif not s.model.name or not s.model.version:
            problem = "served.model: name and version are required"
        elif not _finite_positive(event_time):
            problem = "served.served_at: required, finite and > 0"
        else:
            for i, t in enumerate(s.inputs):
                problem = _check_tensor(t, f"served.inputs[{i}]")
                if problem:
                    break
            if not problem:
                for i, t in enumerate(s.outputs):
                    problem = _check_tensor(t, f"served.outputs[{i}]")
                    if problem:
                        break
            if not problem and s.HasField("request"):
                problem = _check_any(s.request, _REQUEST_TYPE[dom], "served.request")
            if not problem and s.HasField("response"):
                problem = _check_any(s.response, _RESPONSE_TYPE[dom], "served.response")
        kind = SERVED
    else:
        o = rec.outcome
        pid = o.prediction_id
        event_time = o.occurred_at
        member = o.WhichOneof("outcome")
        if not pid or len(pid) > MAX_PREDICTION_ID:
            problem = f"outcome.prediction_id: required, 1..{MAX_PREDICTION_ID} characters"
        elif not _finite_positive(event_time):
            problem = "outcome.occurred_at: required, finite and > 0"
        elif not _finite_positive(o.received_at):
            problem = "outcome.received_at: required, finite and > 0"
        elif member is None:
            problem = f"outcome: the domain outcome ({_OUTCOME_FIELD[dom]}) is required"
        elif member != _OUTCOME_FIELD[dom]:
            problem = f"outcome.{member}: does not match domain {fb.Domain.Name(dom)}"
        elif getattr(o, member).prediction_id != pid:
            problem = f"outcome.{member}.prediction_id: must equal outcome.prediction_id"
        else:
            key = outcome_key(dom, o)
        kind = OUTCOME
    if problem:
        return AppendResult(rid, REJECTED, problem, domain=dname, kind=kind)
    return (rid, dname, kind, pid, event_time, key, payload or rec.SerializeToString())


# ---------------------------------------------------------------- SQLite

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    offset        INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id     TEXT NOT NULL UNIQUE,
    domain        TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('served', 'outcome')),
    prediction_id TEXT NOT NULL,
    event_time    REAL NOT NULL,
    received_at   REAL NOT NULL,
    outcome_key   TEXT,
    payload       BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_prediction ON events (prediction_id, kind);
CREATE INDEX IF NOT EXISTS events_by_outcome_key ON events (outcome_key) WHERE outcome_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS consumer_offsets (
    consumer TEXT PRIMARY KEY,
    offset   INTEGER NOT NULL,
    updated  REAL NOT NULL,
    meta     TEXT
);
"""
_COLUMNS = "offset, record_id, domain, kind, prediction_id, event_time, received_at, payload"


def _chunks(items: list, n: int = _SQL_CHUNK):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _filters(domain: str | None, kind: str | None) -> tuple[list[str], list]:
    """WHERE terms and their arguments for the optional domain and kind filters."""
    where, args = [], []
    if domain is not None:
        where.append("domain = ?")
        args.append(domain)
    if kind is not None:
        where.append("kind = ?")
        args.append(kind)
    return where, args


def _marks(n: int) -> str:
    return ",".join("?" * n)


class SqliteEventLog:
    """The embedded event log: one SQLite database file in WAL mode with synchronous=FULL, so a
    committed batch survives a process crash and a power cut. Safe for one writer thread plus
    any number of reader threads (each thread reads through its own connection, so readers never
    wait for the writer's fsync). Several processes may open the same file; writes serialize on
    SQLite's write lock (busy_timeout_s)."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_ms = int(busy_timeout_s * 1000)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._writer = self._connect()
        try:
            self._init_schema()
        except BaseException:
            self._writer.close()
            raise

    def _init_schema(self) -> None:
        w = self._writer
        w.execute("PRAGMA journal_mode=WAL")
        mode = w.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: cannot use WAL journal mode (got {mode})")
        # Keep the WAL file from growing without bound after a burst (it is reused after checkpoints).
        w.execute("PRAGMA journal_size_limit=67108864")
        if w.execute("PRAGMA user_version").fetchone()[0] == _SCHEMA_VERSION:
            return  # an existing log (maybe open in another process): no write lock needed
        with self._write_lock:
            w.execute("BEGIN IMMEDIATE")
            try:
                version = w.execute("PRAGMA user_version").fetchone()[0]
                if version > _SCHEMA_VERSION:
                    raise RuntimeError(f"{self.path}: schema version {version} is newer than this code's "
                                       f"({_SCHEMA_VERSION})")
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        w.execute(stmt)
                w.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                w.execute("COMMIT")
            except BaseException:
                self._rollback(w)
                raise

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self._busy_ms / 1000)
        conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise sqlite3.ProgrammingError("event log is closed")
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    # ------------------------------------------------------------ writing

    def append_batch(self, records: Sequence[fb.FeedbackRecord | bytes]) -> list[AppendResult]:
        results: list[AppendResult | None] = [None] * len(records)
        rows: list[tuple[int, _Row]] = []
        first_in_batch: dict[str, int] = {}
        later_copies: list[tuple[int, str]] = []  # same record_id twice in one batch
        for i, item in enumerate(records):
            prepared = prepare(item)
            if isinstance(prepared, AppendResult):
                results[i] = prepared
            elif prepared[0] in first_in_batch:
                later_copies.append((i, prepared[0]))
                results[i] = AppendResult(prepared[0], DUPLICATE, domain=prepared[1], kind=prepared[2])
            else:
                first_in_batch[prepared[0]] = len(rows)
                rows.append((i, prepared))
        if rows:
            received_at = time.time()
            ids = [r[0] for _, r in rows]
            with self._write_lock:
                conn = self._writer
                conn.execute("BEGIN IMMEDIATE")
                try:
                    existing: dict[str, int] = {}
                    for chunk in _chunks(ids):
                        existing.update(conn.execute(
                            f"SELECT record_id, offset FROM events WHERE record_id IN ({_marks(len(chunk))})", chunk))
                    offset = conn.execute(
                        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)").fetchone()[0]
                    insert = []
                    for i, (rid, dname, kind, pid, event_time, key, payload) in rows:
                        old = existing.get(rid)
                        if old is not None:
                            results[i] = AppendResult(rid, DUPLICATE, offset=old, domain=dname, kind=kind)
                            continue
                        offset += 1
                        insert.append((offset, rid, dname, kind, pid, event_time, received_at, key, payload))
                        results[i] = AppendResult(rid, STORED, offset=offset, domain=dname, kind=kind)
                    if insert:
                        conn.executemany(
                            "INSERT INTO events (offset, record_id, domain, kind, prediction_id, event_time, "
                            "received_at, outcome_key, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", insert)
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback(conn)
                    raise
            for i, rid in later_copies:
                first = results[rows[first_in_batch[rid]][0]]
                r = results[i]
                results[i] = AppendResult(rid, DUPLICATE, offset=first.offset, domain=r.domain, kind=r.kind)
        return results  # type: ignore[return-value]

    def commit_offset(self, consumer: str, offset: int, meta: dict[str, Any] | None = None) -> None:
        if not consumer:
            raise ValueError("consumer name required")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        doc = None if meta is None else json.dumps(meta, separators=(",", ":"), sort_keys=True)
        with self._write_lock:
            self._writer.execute(
                "INSERT INTO consumer_offsets (consumer, offset, updated, meta) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (consumer) DO UPDATE SET offset = excluded.offset, updated = excluded.updated, "
                "meta = excluded.meta", (consumer, int(offset), time.time(), doc))

    # ------------------------------------------------------------ reading

    @staticmethod
    def _entries(rows) -> list[LogEntry]:
        return [LogEntry(*row) for row in rows]

    def read(self, after_offset: int, limit: int, domain: str | None = None, kind: str | None = None,
             upto: int | None = None) -> list[LogEntry]:
        if limit <= 0:
            return []
        where, args = _filters(domain, kind)
        where.insert(0, "offset > ?")
        args.insert(0, int(after_offset))
        if upto is not None:
            where.append("offset <= ?")
            args.append(int(upto))
        args.append(int(limit))
        return self._entries(self._reader().execute(
            f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY offset LIMIT ?", args))

    def get(self, offsets: Iterable[int]) -> list[LogEntry]:
        wanted = sorted({int(o) for o in offsets})
        out: list[LogEntry] = []
        conn = self._reader()
        for chunk in _chunks(wanted):
            out += self._entries(conn.execute(
                f"SELECT {_COLUMNS} FROM events WHERE offset IN ({_marks(len(chunk))}) ORDER BY offset", chunk))
        return out

    def end_offset(self) -> int:
        return self._reader().execute("SELECT COALESCE(MAX(offset), 0) FROM events").fetchone()[0]

    def count(self, domain: str | None = None, kind: str | None = None) -> int:
        where, args = _filters(domain, kind)
        sql = "SELECT COUNT(*) FROM events" + (f" WHERE {' AND '.join(where)}" if where else "")
        return self._reader().execute(sql, args).fetchone()[0]

    def served_for(self, prediction_ids: Iterable[str], domain: str | None = None) -> dict[str, LogEntry]:
        wanted = list(dict.fromkeys(prediction_ids))
        out: dict[str, LogEntry] = {}
        conn = self._reader()
        for chunk in _chunks(wanted):
            sql = (f"SELECT {_COLUMNS} FROM events WHERE prediction_id IN ({_marks(len(chunk))}) "
                   f"AND kind = 'served'")
            args: list[Any] = list(chunk)
            if domain is not None:
                sql += " AND domain = ?"
                args.append(domain)
            for row in conn.execute(sql + " ORDER BY offset", args):
                if row[4] not in out:
                    out[row[4]] = LogEntry(*row)
        return out

    def first_outcome_offsets(self, keys: Iterable[str]) -> dict[str, int]:
        wanted = list(dict.fromkeys(keys))
        out: dict[str, int] = {}
        conn = self._reader()
        for chunk in _chunks(wanted):
            out.update(conn.execute(
                f"SELECT outcome_key, MIN(offset) FROM events WHERE outcome_key IN ({_marks(len(chunk))}) "
                f"GROUP BY outcome_key", chunk))
        return out

    def outcomes_for(self, prediction_ids: Iterable[str], domain: str, upto: int | None = None) -> list[LogEntry]:
        wanted = list(dict.fromkeys(prediction_ids))
        out: list[LogEntry] = []
        conn = self._reader()
        for chunk in _chunks(wanted):
            sql = (f"SELECT {_COLUMNS} FROM events WHERE prediction_id IN ({_marks(len(chunk))}) "
                   f"AND kind = 'outcome' AND domain = ?")
            args: list[Any] = [*chunk, domain]
            if upto is not None:
                sql += " AND offset <= ?"
                args.append(int(upto))
            out += self._entries(conn.execute(sql, args))
        out.sort(key=lambda e: e.offset)
        return out

    def committed(self, consumer: str) -> tuple[int, dict[str, Any] | None]:
        row = self._reader().execute("SELECT offset, meta FROM consumer_offsets WHERE consumer = ?",
                                     (consumer,)).fetchone()
        if row is None:
            return 0, None
        return row[0], (None if row[1] is None else json.loads(row[1]))

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close every connection. Call it when no thread uses the log any more."""
        if self._closed:
            return
        self._closed = True
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        with self._write_lock:
            self._writer.close()

    def __enter__(self) -> "SqliteEventLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqliteEventLog({str(self.path)!r})"
