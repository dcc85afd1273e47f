"""The trainer's durable event log: every FeedbackRecord the collector acknowledged, in order.
Long file: one SQLite log whose appends, reads and retention share its connections, its write lock and its schema.

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
- Domains: the log knows no domain itself. It validates each record against the domain
  plug-in its name registers (trainer/plugins.py; `domains`, default the built-in ones): a
  record of an unknown domain, or one packing another outcome / request / response type than
  its plug-in declares, is REJECTED.
- Outcome identity: for each outcome the log stores its identity key (`TrainerDomain.outcome_key`:
  the domain, the prediction id and the identity fields its plug-in names, e.g. fraud
  (prediction_id, is_fraud)). The joiner emits only the first occurrence (lowest offset) of
  each key, which is a pure function of the log: stable across restarts and replays.
- Outcome slot (`TrainerDomain.outcome_slot`): what one label is about. Where the plug-in says
  the latest outcome wins (fraud: a chargeback later reversed), one slot per prediction; else
  the outcome's identity (recommender: each item and event). `outcomes_for` returns every
  outcome of some predictions so the joiner can keep the latest of each slot.
- Consumer offsets: a named consumer stores the offset it has processed up to, with a small
  JSON document (`commit_offset` / `committed`).

Payloads are stored exactly as serialized protobuf bytes (when the collector hands over the
bytes it received, those very bytes, so fields a newer sender added survive).

Retention (`SqliteEventLog.retain`, run periodically by the trainer off its event loop). An event
may go only when no consumer can still need it. Per domain, the *safe offset* is the lowest of
its consumers' committed offsets (a consumer's meta may name its "domain"; one naming none reads
every domain), lowered below any outcome its meta lists as "pending" (an outcome the joiner has
read but whose prediction has not arrived) and to its "served_offset" (served predictions whose
label window is still open: the joiner derives labels from them, e.g. the recommender's
impressions, once it has passed; the size cap must not take them, nor their outcomes, first). A domain no consumer ever committed has safe offset
0: nothing of it goes except under the hard size cap. At or below the safe offset:
- a served prediction goes once no outcome can still count for it: served_at is older than the
  domain's label window plus `slack_s` (outcomes delivered late, e.g. from a client's spool);
  or, in the `learned_domains` (one label per prediction, as each plug-in declares), as soon as one of its
  outcomes was processed (a later correction of that label then finds no prediction and is
  counted unmatched: the price of not keeping every transaction for the 14-day fraud window);
- an outcome goes once its served prediction is gone (or never came): while the prediction is
  kept, its outcomes are kept too, since the joiner recognises a resent outcome (duplicate) or a
  correction (latest wins) by the outcomes stored before it;
- anything older than `max_age_s` (received) goes;
- over `max_bytes`, the oldest events at or below the safe offsets go, whatever their window;
- over `hard_max_bytes`, the oldest events go even above the safe offsets: labels or predictions
  no consumer has processed are lost, so this is logged at WARNING and counted (reason hard_cap).
Deletes run in transactions of `batch_rows` rows (the collector's appends interleave); the freed
pages are then returned to the file system with incremental vacuum (auto_vacuum=INCREMENTAL; a log
created before that setting is converted once with VACUUM), so the file really shrinks.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge

from protos.feedback.v1 import feedback_pb2 as fb
from trainer.plugins import NAME as DOMAIN_NAME, Domains, TrainerDomain, default_domains

log = logging.getLogger(__name__)

LOG_BYTES = Gauge("storefront_trainer_eventlog_bytes", "Size of the event log's files on disk (database + WAL), bytes")
LOG_ROWS = Gauge("storefront_trainer_eventlog_rows", "Events stored in the event log", ["domain", "kind"])
LOG_DELETED = Counter("storefront_trainer_eventlog_deleted_total",
                      "Events deleted by retention, by domain and reason (window, learned, processed, age, size, "
                      "hard_cap: the last one includes events no consumer had processed)", ["domain", "reason"])

STORED = fb.ACK_STATUS_STORED
DUPLICATE = fb.ACK_STATUS_DUPLICATE
REJECTED = fb.ACK_STATUS_REJECTED

SERVED = "served"
OUTCOME = "outcome"
KINDS = (SERVED, OUTCOME)

MAX_RECORD_ID = 256       # feedback.proto: record_id 1..256 characters
MAX_PREDICTION_ID = 64    # common.proto: prediction_id at most 64 characters

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
    domain: str = ""         # the domain's registered name; "" when unknown (rejected)
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


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """What `SqliteEventLog.retain` may delete (see the module docstring)."""
    windows: dict[str, float]                 # label window per domain, seconds (the joiner's)
    slack_s: float = 600.0                    # kept beyond the window for outcomes delivered late
    learned_domains: frozenset[str] = frozenset()  # prediction goes once its label is processed (plug-ins say which)
    max_age_s: float = 0.0                    # 0 = no age limit
    max_bytes: int = 0                        # pages in use; oldest processed events go beyond it; 0 = none
    hard_max_bytes: int = 0                   # beyond it even unprocessed events go (counted); 0 = none
    batch_rows: int = 5000                    # rows per delete transaction
    reclaim_always: bool = False              # give free pages back even when this pass deleted nothing

    def validate(self, known: Iterable[str] | None = None) -> None:
        """ValueError naming the problem; `known`: the domain names learned_domains may name."""
        if self.slack_s < 0 or self.max_age_s < 0 or self.max_bytes < 0 or self.hard_max_bytes < 0:
            raise ValueError("retention: slack_s, max_age_s, max_bytes, hard_max_bytes must be >= 0")
        if self.batch_rows < 1:
            raise ValueError("retention: batch_rows must be >= 1")
        if self.hard_max_bytes and self.max_bytes and self.hard_max_bytes < self.max_bytes:
            raise ValueError("retention: hard_max_bytes must be >= max_bytes (or 0)")
        unknown = set(self.learned_domains) - set(known) if known is not None else set()
        if unknown:
            raise ValueError(f"retention: unknown learned domain(s) {sorted(unknown)}; known: {sorted(known)}")


def consumer_limit(offset: int, meta: dict[str, Any]) -> int:
    """The offset at or below which a consumer committed at `offset` with `meta` needs nothing:
    lowered below any outcome it lists as "pending" (read, still waiting for its prediction) and
    to its "served_offset" (served predictions above it still await the labels their plug-in
    derives once the label window has passed: the recommender's impressions, and the outcomes
    that say which items were not clicked)."""
    limit = offset
    pending = [int(o) for o in meta.get("pending") or () if isinstance(o, (int, float))]
    if pending:
        limit = min(limit, min(pending) - 1)
    served = meta.get("served_offset")
    if isinstance(served, (int, float)) and not isinstance(served, bool):
        limit = min(limit, int(served))
    return limit


@dataclass(frozen=True, slots=True)
class RetentionReport:
    deleted: dict[tuple[str, str], int]       # (domain, reason) -> events deleted
    dropped_unprocessed: int                  # of those, deleted by the hard cap (maybe unprocessed)
    bytes_before: int                         # database + WAL on disk
    bytes_after: int
    rows_after: int
    safe_offsets: dict[str, tuple[int, str]]  # domain -> (offset, the consumer holding it)
    pages_reclaimed: int
    seconds: float

    @property
    def total_deleted(self) -> int:
        return sum(self.deleted.values())


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


# (record_id, domain, kind, prediction_id, event_time, outcome_key, payload)
_Row = tuple[str, str, str, str, float, "str | None", bytes]


def prepare(item: fb.FeedbackRecord | bytes, domains: Domains) -> _Row | AppendResult:
    """Validate one record against its domain's plug-in: the row to store, or a REJECTED
    AppendResult naming the field."""
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
    dname = rec.domain
    plugin: TrainerDomain | None = domains.get(dname)
    if plugin is None:
        if not dname:
            return AppendResult(rid, REJECTED, "domain: required")
        if not DOMAIN_NAME.match(dname):
            return AppendResult(rid, REJECTED, f"domain: {dname[:40]!r} is not a domain name ([a-z][a-z0-9_]{{0,31}})")
        return AppendResult(rid, REJECTED, f"domain: {dname!r} is not a domain this trainer knows ({', '.join(domains)})")
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
                problem = _check_any(s.request, plugin.request_type_name, "served.request")
            if not problem and s.HasField("response"):
                problem = _check_any(s.response, plugin.response_type_name, "served.response")
        kind = SERVED
    else:
        o = rec.outcome
        pid = o.prediction_id
        event_time = o.occurred_at
        if not pid or len(pid) > MAX_PREDICTION_ID:
            problem = f"outcome.prediction_id: required, 1..{MAX_PREDICTION_ID} characters"
        elif not _finite_positive(event_time):
            problem = "outcome.occurred_at: required, finite and > 0"
        elif not _finite_positive(o.received_at):
            problem = "outcome.received_at: required, finite and > 0"
        elif not o.HasField("domain_outcome"):
            problem = f"outcome.domain_outcome: required (a packed {plugin.outcome_type_name})"
        else:
            try:
                message = plugin.unpack_outcome(o)
            except ValueError as e:
                problem = f"outcome.domain_outcome: {e}"
            else:
                if message.prediction_id != pid:
                    problem = "outcome.domain_outcome.prediction_id: must equal outcome.prediction_id"
                else:
                    key = plugin.outcome_key(pid, message)
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


def append_unique(records: Sequence[fb.FeedbackRecord | bytes], domains: Domains,
                  store: Callable[[list[_Row]], list[AppendResult]]) -> list[AppendResult]:
    """What every EventLog's append_batch does around its own write: validate each record
    (`prepare`; a rejection is answered here), hand the first copy of each record_id in the batch
    to `store` (which stores those not stored before and returns their results in order), and
    answer a later copy in the same batch DUPLICATE at the first copy's offset."""
    results: list[AppendResult | None] = [None] * len(records)
    rows: list[tuple[int, _Row]] = []
    first_in_batch: dict[str, int] = {}
    later_copies: list[tuple[int, _Row]] = []  # the same record_id again in this batch
    for i, item in enumerate(records):
        prepared = prepare(item, domains)
        if isinstance(prepared, AppendResult):
            results[i] = prepared
        elif prepared[0] in first_in_batch:
            later_copies.append((i, prepared))
        else:
            first_in_batch[prepared[0]] = len(rows)
            rows.append((i, prepared))
    if rows:
        for (i, _), result in zip(rows, store([r for _, r in rows])):
            results[i] = result
    for i, (rid, dname, kind, *_) in later_copies:
        first = results[rows[first_in_batch[rid]][0]]
        results[i] = AppendResult(rid, DUPLICATE, offset=first.offset, domain=dname, kind=kind)
    return results  # type: ignore[return-value]


def check_commit(consumer: str, offset: int) -> None:
    """The arguments of EventLog.commit_offset, checked the same way by every log."""
    if not consumer:
        raise ValueError("consumer name required")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")


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

    def __init__(self, path: str | Path, *, domains: Domains | None = None, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.domains = default_domains() if domains is None else domains
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
        if not w.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
            # A new file: free pages can be given back without rewriting the whole file (retain()).
            # Must come before anything is written (WAL mode included); older logs are converted by retain().
            w.execute("PRAGMA auto_vacuum=INCREMENTAL")
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
        return append_unique(records, self.domains, self._store)

    def _store(self, rows: list[_Row]) -> list[AppendResult]:
        """Store the rows whose record_id is not stored yet, in one transaction."""
        received_at = time.time()
        ids = [r[0] for r in rows]
        results: list[AppendResult] = []
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
                for rid, dname, kind, pid, event_time, key, payload in rows:
                    old = existing.get(rid)
                    if old is not None:
                        results.append(AppendResult(rid, DUPLICATE, offset=old, domain=dname, kind=kind))
                        continue
                    offset += 1
                    insert.append((offset, rid, dname, kind, pid, event_time, received_at, key, payload))
                    results.append(AppendResult(rid, STORED, offset=offset, domain=dname, kind=kind))
                if insert:
                    conn.executemany(
                        "INSERT INTO events (offset, record_id, domain, kind, prediction_id, event_time, "
                        "received_at, outcome_key, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", insert)
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise
        return results

    def commit_offset(self, consumer: str, offset: int, meta: dict[str, Any] | None = None) -> None:
        check_commit(consumer, offset)
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

    # ------------------------------------------------------------ retention

    def disk_bytes(self) -> int:
        """The log's files on disk: the database and its WAL (what a disk fills with)."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total

    def live_bytes(self) -> int:
        """Bytes of the database's pages in use (the file size less its free pages): what size
        limits compare with, since freed pages are reused before the file grows."""
        conn = self._reader()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * page_size

    def rows_by_kind(self) -> dict[tuple[str, str], int]:
        """(domain, kind) -> events stored."""
        return {(d, k): n for d, k, n in self._reader().execute(
            "SELECT domain, kind, COUNT(*) FROM events GROUP BY domain, kind")}

    def domain_names(self) -> list[str]:
        """The domains of the plug-ins and every domain that has events stored (a domain whose plug-in
        is no longer loaded still has its events retained by the same rules)."""
        stored = [r[0] for r in self._reader().execute("SELECT DISTINCT domain FROM events")]
        return list(dict.fromkeys([*self.domains, *sorted(stored)]))

    def safe_offsets(self) -> dict[str, tuple[int, str]]:
        """domain -> (offset at or below which every consumer of the domain is done, the consumer
        that holds it lowest). See the module docstring; 0 when no consumer committed."""
        names = self.domain_names()
        safe: dict[str, tuple[int, str]] = {}
        for consumer, offset, meta in self._reader().execute("SELECT consumer, offset, meta FROM consumer_offsets"):
            doc = json.loads(meta) if meta else {}
            doc = doc if isinstance(doc, dict) else {}
            limit = consumer_limit(int(offset), doc)
            domains = (doc["domain"],) if doc.get("domain") in names else names
            for d in domains:
                if d not in safe or limit < safe[d][0]:
                    safe[d] = (max(0, limit), consumer)
        return {d: safe.get(d, (0, "")) for d in names}

    def _delete(self, offsets: list[int], batch_rows: int) -> int:
        """Delete these events in transactions of batch_rows (the writer lock is released between
        them, so the collector's appends go on). Returns how many were deleted."""
        deleted = 0
        for i in range(0, len(offsets), batch_rows):
            part = offsets[i:i + batch_rows]
            with self._write_lock:
                conn = self._writer
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for chunk in _chunks(part):
                        deleted += conn.execute(f"DELETE FROM events WHERE offset IN ({_marks(len(chunk))})",
                                                chunk).rowcount
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback(conn)
                    raise
        return deleted

    def _delete_counted(self, rows: list[tuple[int, str, str]], batch_rows: int, tally: dict) -> int:
        """rows: (offset, domain, reason); deletes them and counts each (domain, reason)."""
        if not rows:
            return 0
        n = self._delete([r[0] for r in rows], batch_rows)
        for _, d, reason in rows:
            tally[(d, reason)] = tally.get((d, reason), 0) + 1
        return n

    def _oldest(self, n: int, bounds: dict[str, int] | None) -> list[tuple[int, str]]:
        """The n oldest events (offset, domain); with bounds, only those at or below their
        domain's bound."""
        if bounds is None:
            return list(self._reader().execute("SELECT offset, domain FROM events ORDER BY offset LIMIT ?", (n,)))
        terms, args = [], []
        for d, bound in bounds.items():
            if bound > 0:
                terms.append("(domain = ? AND offset <= ?)")
                args += [d, bound]
        if not terms:
            return []
        return list(self._reader().execute(
            f"SELECT offset, domain FROM events WHERE {' OR '.join(terms)} ORDER BY offset LIMIT ?", (*args, n)))

    def _shrink_to(self, limit: int, bounds: dict[str, int] | None, reason: str, policy: "RetentionPolicy",
                   tally: dict) -> int:
        """Delete oldest events (within bounds) until the pages in use fit `limit` bytes."""
        deleted = 0
        for _ in range(64):  # each pass frees about what is over; a few passes converge
            over = self.live_bytes() - limit
            if over <= 0:
                break
            rows = self._reader().execute("SELECT COUNT(*) FROM events").fetchone()[0]
            if not rows:
                break
            # the average event's share of the pages in use (payload, indexes, b-tree slack)
            per_row = max(1, (over + limit) // rows)
            victims = self._oldest(max(1, min(policy.batch_rows * 4, -(-over // per_row))), bounds)
            if not victims:
                break
            n = self._delete_counted([(o, d, reason) for o, d in victims], policy.batch_rows, tally)
            deleted += n
            if n == 0:
                break
        return deleted

    def _reclaim(self, pages_per_step: int = 2048) -> int:
        """Give free pages back to the file system (the file shrinks). Converts a log created
        without auto_vacuum=INCREMENTAL once, with VACUUM (rewrites the file: seconds per GB,
        appends wait meanwhile). Returns the pages given back."""
        w = self._writer
        mode = w.execute("PRAGMA auto_vacuum").fetchone()[0]
        before = self._reader().execute("PRAGMA page_count").fetchone()[0]
        if mode != 2:  # 0 NONE or 1 FULL: switching to INCREMENTAL takes effect only with a VACUUM
            t0 = time.perf_counter()
            with self._write_lock:
                w.execute("PRAGMA auto_vacuum=INCREMENTAL")
                w.execute("VACUUM")
            log.info("event log %s converted to auto_vacuum=INCREMENTAL (VACUUM in %.1f s)", self.path,
                     time.perf_counter() - t0)
        else:
            while True:
                with self._write_lock:
                    free = w.execute("PRAGMA freelist_count").fetchone()[0]
                    if free == 0:
                        break
                    # in steps, so appends are never held up for long. executescript: sqlite3_exec steps
                    # the pragma to its end (execute() would step once: one page, one fsync).
                    try:
                        w.executescript(f"BEGIN IMMEDIATE; PRAGMA incremental_vacuum({min(free, pages_per_step)}); "
                                        "COMMIT;")
                    except BaseException:
                        self._rollback(w)
                        raise
        with self._write_lock:
            # copy the WAL into the database and truncate it (a vacuum's pages went through it).
            # Without waiting: a reader in the middle of a read just leaves it to the next pass
            # (then the WAL is cut back to journal_size_limit when it restarts).
            w.execute("PRAGMA busy_timeout=0")
            try:
                w.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.OperationalError:
                pass
            finally:
                w.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        after = self._reader().execute("PRAGMA page_count").fetchone()[0]
        return max(0, before - after)

    def retain(self, policy: "RetentionPolicy", now: float | None = None) -> "RetentionReport":
        """One retention pass (see the module docstring). Blocking: run it off the event loop."""
        t0 = time.perf_counter()
        now = time.time() if now is None else now
        bytes_before = self.disk_bytes()
        safe = self.safe_offsets()
        bounds = {d: s for d, (s, _) in safe.items()}
        tally: dict[tuple[str, str], int] = {}
        reader = self._reader()
        age_cut = now - policy.max_age_s if policy.max_age_s > 0 else None
        for d in bounds:
            bound = bounds[d]
            if bound <= 0:
                continue
            window_cut = now - policy.windows.get(d, max(policy.windows.values(), default=0.0)) - policy.slack_s
            learned = d in policy.learned_domains
            # served predictions no outcome can still count for (the reason names the first rule that holds);
            # never one with an outcome stored above the bound: that label is not processed yet, and after
            # a restart the joiner needs its prediction to learn it (only the hard cap drops such events)
            served = list(reader.execute(
                "SELECT offset, CASE WHEN event_time < ? THEN 'window' "
                "WHEN ? IS NOT NULL AND received_at < ? THEN 'age' ELSE 'learned' END "
                "FROM events s WHERE domain = ? AND kind = 'served' AND offset <= ? AND ("
                " event_time < ? OR (? IS NOT NULL AND received_at < ?) OR (? AND EXISTS ("
                "  SELECT 1 FROM events o WHERE o.prediction_id = s.prediction_id AND o.kind = 'outcome' "
                "  AND o.domain = s.domain AND o.offset <= ?))) AND NOT EXISTS ("
                "  SELECT 1 FROM events u WHERE u.prediction_id = s.prediction_id AND u.kind = 'outcome' "
                "  AND u.domain = s.domain AND u.offset > ?) ORDER BY offset",
                (window_cut, age_cut, age_cut, d, bound, window_cut, age_cut, age_cut, int(learned), bound, bound)))
            self._delete_counted([(o, d, r) for o, r in served], policy.batch_rows, tally)
            # processed outcomes whose prediction is gone (just now, earlier, or never came)
            outcomes = list(reader.execute(
                "SELECT offset, CASE WHEN ? IS NOT NULL AND received_at < ? THEN 'age' ELSE 'processed' END "
                "FROM events o WHERE domain = ? AND kind = 'outcome' AND offset <= ? AND ("
                " (? IS NOT NULL AND received_at < ?) OR NOT EXISTS ("
                "  SELECT 1 FROM events s WHERE s.prediction_id = o.prediction_id AND s.kind = 'served' "
                "  AND s.domain = o.domain)) ORDER BY offset",
                (age_cut, age_cut, d, bound, age_cut, age_cut)))
            self._delete_counted([(o, d, r) for o, r in outcomes], policy.batch_rows, tally)
        if policy.max_bytes > 0:
            self._shrink_to(policy.max_bytes, bounds, "size", policy, tally)
        dropped = 0
        if policy.hard_max_bytes > 0 and self.live_bytes() > policy.hard_max_bytes:
            before = {k: v for k, v in tally.items()}
            self._shrink_to(policy.hard_max_bytes, None, "hard_cap", policy, tally)
            dropped = sum(v - before.get(k, 0) for k, v in tally.items() if k[1] == "hard_cap")
            if dropped:
                log.warning("event log over its hard cap of %d bytes: dropped the %d oldest events, some of them not "
                            "processed by every consumer yet (safe offsets %s); raise retention_hard_max_bytes or "
                            "find the consumer that is behind", policy.hard_max_bytes, dropped,
                            {d: s for d, s in safe.items()})
        deleted = sum(tally.values())
        reclaimed = self._reclaim() if deleted or policy.reclaim_always else 0
        for (d, reason), n in tally.items():
            LOG_DELETED.labels(d, reason).inc(n)
        rows = self.rows_by_kind()
        for d in bounds:
            for k in KINDS:
                LOG_ROWS.labels(d, k).set(rows.get((d, k), 0))
        bytes_after = self.disk_bytes()
        LOG_BYTES.set(bytes_after)
        return RetentionReport(deleted=tally, dropped_unprocessed=dropped, bytes_before=bytes_before,
                               bytes_after=bytes_after, rows_after=sum(rows.values()), safe_offsets=safe,
                               pages_reclaimed=reclaimed, seconds=time.perf_counter() - t0)

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
