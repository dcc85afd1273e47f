"""The event log on Redis Streams: the `EventLog` interface of trainer/eventlog.py, for trainers
on several hosts (DESIGN.md "Beyond one host", issue 14). Same model, same answers as
`SqliteEventLog`: integer offsets in append order, idempotent by record id, the same validation
(`prepare`), the same consumer offsets and the same retention rules (see trainer/eventlog.py).

Keys (one hash tag per log, `{<name>}`, so every key of a log sits in one Cluster slot and one
script may touch them all):

    storefront:log:{<name>}:stream     the events: stream entry id `0-<offset>`, fields r (record id),
                                       d (domain), k (kind), p (prediction id), t (event time),
                                       a (received at), o (outcome identity key, "" for none), b (payload)
    storefront:log:{<name>}:seq        counter: the last offset handed out (never reused)
    storefront:log:{<name>}:ids        hash record id -> offset (idempotency)
    storefront:log:{<name>}:served     hash prediction id -> offsets of its served records ("3 17")
    storefront:log:{<name>}:outcomes   hash "<domain>\\x1f<prediction id>" -> offsets of its outcomes
    storefront:log:{<name>}:okeys      hash outcome identity key -> offsets it is stored at
    storefront:log:{<name>}:counts     hash "<domain>\\x1f<kind>" -> events; "\\x1fbytes" -> bytes stored
    storefront:log:{<name>}:consumers  hash consumer -> {"offset", "meta", "updated"} (JSON)

Offsets: the stream's ids are explicit, `0-<offset>`, with the offset from the INCR counter in
the same script as the XADD, so offsets are dense in append order, the stream's own order is the
offsets' order, and `read(after)` is one XRANGE from `0-<after + 1>`. A reader never misses an
event: each append is one script, and Redis runs scripts one at a time.

Atomicity and durability: one batch is one Lua script (the duplicate check, the counter, the XADD
and every index key of every record), so a batch is stored whole or not at all *as far as any
reader and the AOF can tell* (a script's writes go to the AOF as one MULTI/EXEC block; a server
killed mid-script replays none of it). `append_batch` returns after the script's reply; with the
server's `appendfsync always` (what the trainer's Redis must run) Redis writes and fsyncs the AOF
before it sends any reply of that event-loop turn, so an acknowledged record is on disk. With
`everysec` a server crash may lose the last second of acknowledged records: the durability is
the server's fsync policy, as the issue asks. (WAITAOF, which would let the client demand the
fsync, is Redis 7.2; the test server is 6.2.)

Retention runs the SQLite log's rules (trainer/eventlog.py) over the stream: per domain, below
every consumer's committed offset and beyond the label windows; deleting an event is a script
that XDELs it and removes it from every index key. Sizes are the bytes of the stored payloads
plus a fixed per-event overhead (`EVENT_OVERHEAD`), counted as events come and go: what
`max_bytes` / `hard_max_bytes` compare with (Redis memory, not a file).

Threads: the client is redis-py's blocking client (a connection pool, thread-safe), because the
log is called where the SQLite log is: the collector's writer thread, the joiners' and the
retention's worker threads.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterable, Sequence

from protos.feedback.v1 import feedback_pb2 as fb
from trainer.eventlog import (DUPLICATE, KINDS, LOG_BYTES, LOG_DELETED, LOG_ROWS, OUTCOME, SERVED, STORED,
                              AppendResult, LogEntry, RetentionPolicy, RetentionReport, append_unique,
                              check_commit, consumer_limit)
from trainer.plugins import Domains, default_domains

log = logging.getLogger(__name__)

PREFIX = "storefront:log"
EVENT_OVERHEAD = 160  # bytes per event besides its payload: fields, stream node and index entries (approximate)
_SEP = "\x1f"
_BYTES = _SEP + "bytes"
_PAGE = 2048  # stream entries per XRANGE while scanning

_LIB = """
local function add_offset(h, f, off)
  local cur = redis.call('HGET', h, f)
  if cur then redis.call('HSET', h, f, cur .. ' ' .. off) else redis.call('HSET', h, f, off) end
end
local function remove_offset(h, f, off)
  local cur = redis.call('HGET', h, f)
  if not cur then return end
  local keep = {}
  for tok in string.gmatch(cur, '%S+') do
    if tok ~= off then keep[#keep + 1] = tok end
  end
  if #keep == 0 then redis.call('HDEL', h, f) else redis.call('HSET', h, f, table.concat(keep, ' ')) end
end
"""

# KEYS: stream seq ids served outcomes okeys counts; ARGV: received_at, overhead, then 7 per record.
# Batch-level commands where one serves the whole batch (one HMGET for the duplicate check, one
# INCRBY for the offsets, one HSET for the ids, one HINCRBY per domain and kind): a record costs
# its XADD and one or two HSETNX.
_APPEND = _LIB + """
local n = (#ARGV - 2) / 7
local ids = {}
for r = 1, n do ids[r] = ARGV[3 + (r - 1) * 7] end
local old = {}
for i = 1, n, 1000 do  -- in parts: unpack() has a stack limit of a few thousand values
  local part = redis.call('HMGET', KEYS[3], unpack(ids, i, math.min(i + 999, n)))
  for j = 1, #part do old[#old + 1] = part[j] end
end
local fresh = 0
for r = 1, n do if not old[r] then fresh = fresh + 1 end end
local out = {}
if fresh == 0 then
  for r = 1, n do out[r] = -tonumber(old[r]) end
  return out
end
local off = redis.call('INCRBY', KEYS[2], fresh) - fresh
local id_pairs = {}
local counts = {}
local bytes = 0
for r = 1, n do
  if old[r] then
    out[r] = -tonumber(old[r])
  else
    local i = 3 + (r - 1) * 7
    local rid, dom, kind, pid, okey, payload = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+5], ARGV[i+6]
    off = off + 1
    redis.call('XADD', KEYS[1], '0-' .. off, 'r', rid, 'd', dom, 'k', kind, 'p', pid, 't', ARGV[i+4],
               'a', ARGV[1], 'o', okey, 'b', payload)
    id_pairs[#id_pairs + 1] = rid
    id_pairs[#id_pairs + 1] = off
    if kind == 'served' then
      if redis.call('HSETNX', KEYS[4], pid, off) == 0 then add_offset(KEYS[4], pid, off) end
    else
      local f = dom .. '\\31' .. pid
      if redis.call('HSETNX', KEYS[5], f, off) == 0 then add_offset(KEYS[5], f, off) end
      if okey ~= '' and redis.call('HSETNX', KEYS[6], okey, off) == 0 then add_offset(KEYS[6], okey, off) end
    end
    local c = dom .. '\\31' .. kind
    counts[c] = (counts[c] or 0) + 1
    bytes = bytes + string.len(payload) + tonumber(ARGV[2])
    out[r] = off
  end
end
for i = 1, #id_pairs, 2000 do redis.call('HSET', KEYS[3], unpack(id_pairs, i, math.min(i + 1999, #id_pairs))) end
for c, k in pairs(counts) do redis.call('HINCRBY', KEYS[7], c, k) end
redis.call('HINCRBY', KEYS[7], '\\31bytes', bytes)
return out
"""

# KEYS as _APPEND; ARGV: overhead, then offsets. Returns how many existed (and were deleted).
_DELETE = _LIB + """
local deleted = 0
for i = 2, #ARGV do
  local off = ARGV[i]
  local id = '0-' .. off
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #e > 0 then
    local f = e[1][2]
    local m = {}
    for j = 1, #f, 2 do m[f[j]] = f[j + 1] end
    redis.call('XDEL', KEYS[1], id)
    if redis.call('HGET', KEYS[3], m['r']) == off then redis.call('HDEL', KEYS[3], m['r']) end
    if m['k'] == 'served' then
      remove_offset(KEYS[4], m['p'], off)
    else
      remove_offset(KEYS[5], m['d'] .. '\\31' .. m['p'], off)
      if m['o'] ~= '' then remove_offset(KEYS[6], m['o'], off) end
    end
    redis.call('HINCRBY', KEYS[7], m['d'] .. '\\31' .. m['k'], -1)
    redis.call('HINCRBY', KEYS[7], '\\31bytes', -(string.len(m['b']) + tonumber(ARGV[1])))
    deleted = deleted + 1
  end
end
return deleted
"""


def _offsets(value: bytes | None) -> list[int]:
    return [int(t) for t in value.split()] if value else []


def _entry(stream_id: bytes, f: dict[bytes, bytes]) -> LogEntry:
    return LogEntry(int(stream_id.split(b"-", 1)[1]), f[b"r"].decode(), f[b"d"].decode(), f[b"k"].decode(),
                    f[b"p"].decode(), float(f[b"t"]), float(f[b"a"]), f[b"b"])


class RedisEventLog:
    """The event log on Redis Streams (see the module docstring). `client`: a blocking redis-py
    client with bytes replies (`shared.redis_conn.redis_sync_client`); or give `url`."""

    def __init__(self, url: str = "", *, password_file: str = "", domains: Domains | None = None,
                 name: str = "events", client=None) -> None:
        if not name or any(c in name for c in "{} \n"):
            raise ValueError(f"log name must be non-empty without braces or spaces, got {name!r}")
        if client is None:
            from shared.redis_conn import redis_sync_client

            client = redis_sync_client(url, password_file)
        self.client = client
        self.url = url
        self.name = name
        self.domains = default_domains() if domains is None else domains
        base = f"{PREFIX}:{{{name}}}"
        self.stream, self.seq, self.ids = f"{base}:stream", f"{base}:seq", f"{base}:ids"
        self.served_key, self.outcomes_key, self.okeys = f"{base}:served", f"{base}:outcomes", f"{base}:okeys"
        self.counts, self.consumers = f"{base}:counts", f"{base}:consumers"
        self._keys = [self.stream, self.seq, self.ids, self.served_key, self.outcomes_key, self.okeys, self.counts]
        self._append = client.register_script(_APPEND)
        self._delete_script = client.register_script(_DELETE)
        self._closed = False

    # ------------------------------------------------------------ writing

    def append_batch(self, records: Sequence[fb.FeedbackRecord | bytes]) -> list[AppendResult]:
        return append_unique(records, self.domains, self._store)

    def _store(self, rows: list[tuple]) -> list[AppendResult]:
        """Store the rows whose record_id is not stored yet: one script, atomic (see _APPEND)."""
        args: list[Any] = [repr(time.time()), EVENT_OVERHEAD]
        for rid, dname, kind, pid, event_time, key, payload in rows:
            args += [rid, dname, kind, pid, repr(float(event_time)), key or "", payload]
        offsets = self._append(keys=self._keys, args=args)
        return [AppendResult(rid, STORED if int(off) > 0 else DUPLICATE, offset=abs(int(off)), domain=dname, kind=kind)
                for (rid, dname, kind, *_), off in zip(rows, offsets)]

    def commit_offset(self, consumer: str, offset: int, meta: dict[str, Any] | None = None) -> None:
        check_commit(consumer, offset)
        doc = json.dumps({"offset": int(offset), "meta": meta, "updated": time.time()}, separators=(",", ":"),
                         sort_keys=True)
        self.client.hset(self.consumers, consumer, doc)

    # ------------------------------------------------------------ reading

    def _range(self, start: int, end: int | None, count: int) -> list[LogEntry]:
        """Entries with start <= offset (<= end), at most count."""
        hi = "+" if end is None else f"0-{end}"
        return [_entry(i, f) for i, f in self.client.xrange(self.stream, f"0-{max(1, start)}", hi, count=count)]

    def read(self, after_offset: int, limit: int, domain: str | None = None, kind: str | None = None,
             upto: int | None = None) -> list[LogEntry]:
        if limit <= 0 or (upto is not None and upto <= after_offset):
            return []
        out: list[LogEntry] = []
        pos = int(after_offset)
        page = limit if domain is None and kind is None else max(limit, _PAGE)
        while len(out) < limit:
            got = self._range(pos + 1, upto, page)
            if not got:
                break
            out += [e for e in got if (domain is None or e.domain == domain) and (kind is None or e.kind == kind)]
            pos = got[-1].offset
            if len(got) < page:
                break
        return out[:limit]

    def get(self, offsets: Iterable[int]) -> list[LogEntry]:
        wanted = sorted({int(o) for o in offsets if int(o) > 0})
        out: list[LogEntry] = []
        for i in range(0, len(wanted), 500):
            pipe = self.client.pipeline(transaction=False)
            for o in wanted[i:i + 500]:
                pipe.xrange(self.stream, f"0-{o}", f"0-{o}")
            for got in pipe.execute():
                out += [_entry(sid, f) for sid, f in got]
        return out

    def end_offset(self) -> int:
        last = self.client.xrevrange(self.stream, "+", "-", count=1)
        return int(last[0][0].split(b"-", 1)[1]) if last else 0

    def _counts(self) -> dict[tuple[str, str], int]:
        out = {}
        for field, n in self.client.hgetall(self.counts).items():
            d, _, k = field.decode().partition(_SEP)
            if d and int(n):
                out[(d, k)] = int(n)
        return out

    def count(self, domain: str | None = None, kind: str | None = None) -> int:
        return sum(n for (d, k), n in self._counts().items()
                   if (domain is None or d == domain) and (kind is None or k == kind))

    def _hmget(self, key: str, fields: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for i in range(0, len(fields), 1000):
            out += self.client.hmget(key, fields[i:i + 1000])
        return out

    def served_for(self, prediction_ids: Iterable[str], domain: str | None = None) -> dict[str, LogEntry]:
        wanted = list(dict.fromkeys(prediction_ids))
        if not wanted:
            return {}
        lists = self._hmget(self.served_key, wanted)
        offsets = [o for v in lists for o in _offsets(v)] if domain is not None else \
            [_offsets(v)[0] for v in lists if v]
        out: dict[str, LogEntry] = {}
        for e in self.get(offsets):  # oldest first: the first stored wins
            if (domain is None or e.domain == domain) and e.prediction_id not in out:
                out[e.prediction_id] = e
        return out

    def first_outcome_offsets(self, keys: Iterable[str]) -> dict[str, int]:
        wanted = list(dict.fromkeys(keys))
        return {k: min(_offsets(v)) for k, v in zip(wanted, self._hmget(self.okeys, wanted)) if v}

    def outcomes_for(self, prediction_ids: Iterable[str], domain: str, upto: int | None = None) -> list[LogEntry]:
        wanted = list(dict.fromkeys(prediction_ids))
        if not wanted:
            return []
        lists = self._hmget(self.outcomes_key, [f"{domain}{_SEP}{p}" for p in wanted])
        offsets = [o for v in lists for o in _offsets(v) if upto is None or o <= upto]
        return self.get(offsets)

    def committed(self, consumer: str) -> tuple[int, dict[str, Any] | None]:
        raw = self.client.hget(self.consumers, consumer)
        if raw is None:
            return 0, None
        doc = json.loads(raw)
        return int(doc["offset"]), doc.get("meta")

    # ------------------------------------------------------------ retention

    def live_bytes(self) -> int:
        """Bytes the events take: their payloads plus EVENT_OVERHEAD each (what size limits compare with)."""
        return int(self.client.hget(self.counts, _BYTES) or 0)

    disk_bytes = live_bytes  # the log's footprint (Redis memory and its AOF grow with it)

    def rows_by_kind(self) -> dict[tuple[str, str], int]:
        return self._counts()

    def domain_names(self) -> list[str]:
        stored = sorted({d for d, _ in self._counts()})
        return list(dict.fromkeys([*self.domains, *stored]))

    def safe_offsets(self) -> dict[str, tuple[int, str]]:
        """As SqliteEventLog.safe_offsets (trainer/eventlog.py)."""
        names = self.domain_names()
        safe: dict[str, tuple[int, str]] = {}
        for consumer, raw in sorted(self.client.hgetall(self.consumers).items()):
            doc = json.loads(raw)
            meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
            limit = consumer_limit(int(doc["offset"]), meta)
            domains = (meta["domain"],) if meta.get("domain") in names else names
            for d in domains:
                if d not in safe or limit < safe[d][0]:
                    safe[d] = (max(0, limit), consumer.decode())
        return {d: safe.get(d, (0, "")) for d in names}

    def _scan(self, upto: int | None):
        """Every event at or below upto (all when None), oldest first, a page at a time."""
        pos = 0
        while True:
            got = self._range(pos + 1, upto, _PAGE)
            yield from got
            if len(got) < _PAGE:
                return
            pos = got[-1].offset

    def _delete(self, offsets: list[int], batch_rows: int) -> int:
        deleted = 0
        step = max(1, min(batch_rows, 1000))  # one script blocks the server: keep each short
        for i in range(0, len(offsets), step):
            deleted += int(self._delete_script(keys=self._keys, args=[EVENT_OVERHEAD, *offsets[i:i + step]]))
        return deleted

    def _delete_counted(self, rows: list[tuple[int, str, str]], batch_rows: int, tally: dict) -> int:
        if not rows:
            return 0
        n = self._delete([r[0] for r in rows], batch_rows)
        for _, d, reason in rows:
            tally[(d, reason)] = tally.get((d, reason), 0) + 1
        return n

    def _shrink_to(self, limit: int, bounds: dict[str, int] | None, reason: str, policy: RetentionPolicy,
                   tally: dict) -> None:
        """Delete the oldest events (within bounds) until what is stored fits `limit` bytes."""
        over = self.live_bytes() - limit
        if over <= 0:
            return
        victims: list[tuple[int, str, str]] = []
        freed = 0
        top = None if bounds is None else max(bounds.values(), default=0)
        if top == 0:
            return
        for e in self._scan(top):
            if bounds is not None and e.offset > bounds.get(e.domain, 0):
                continue
            victims.append((e.offset, e.domain, reason))
            freed += len(e.payload) + EVENT_OVERHEAD
            if freed >= over:
                break
        self._delete_counted(victims, policy.batch_rows, tally)

    def retain(self, policy: RetentionPolicy, now: float | None = None) -> RetentionReport:
        """One retention pass with SqliteEventLog.retain's rules. Blocking: run it off the event loop."""
        t0 = time.perf_counter()
        now = time.time() if now is None else now
        bytes_before = self.live_bytes()
        safe = self.safe_offsets()
        bounds = {d: s for d, (s, _) in safe.items()}
        tally: dict[tuple[str, str], int] = {}
        age_cut = now - policy.max_age_s if policy.max_age_s > 0 else None
        for d, bound in bounds.items():
            if bound <= 0:
                continue
            window_cut = now - policy.windows.get(d, max(policy.windows.values(), default=0.0)) - policy.slack_s
            learned = d in policy.learned_domains
            served = [e for e in self._scan(bound) if e.domain == d and e.kind == SERVED]
            outs = self._hmget(self.outcomes_key, [f"{d}{_SEP}{e.prediction_id}" for e in served])
            victims = []
            for e, listed in zip(served, outs):
                offs = _offsets(listed)
                if any(o > bound for o in offs):
                    continue  # a label not processed yet: after a restart the joiner needs this prediction
                if e.event_time < window_cut:
                    victims.append((e.offset, d, "window"))
                elif age_cut is not None and e.received_at < age_cut:
                    victims.append((e.offset, d, "age"))
                elif learned and offs:
                    victims.append((e.offset, d, "learned"))
            self._delete_counted(victims, policy.batch_rows, tally)
            outcomes = [e for e in self._scan(bound) if e.domain == d and e.kind == OUTCOME]
            lists = self._hmget(self.served_key, [e.prediction_id for e in outcomes])
            served_domains = {x.offset: x.domain for x in self.get(o for v in lists for o in _offsets(v))}
            victims = []
            for e, listed in zip(outcomes, lists):
                if age_cut is not None and e.received_at < age_cut:
                    victims.append((e.offset, d, "age"))
                elif not any(served_domains.get(o) == d for o in _offsets(listed)):
                    victims.append((e.offset, d, "processed"))
            self._delete_counted(victims, policy.batch_rows, tally)
        if policy.max_bytes > 0:
            self._shrink_to(policy.max_bytes, bounds, "size", policy, tally)
        dropped = 0
        if policy.hard_max_bytes > 0 and self.live_bytes() > policy.hard_max_bytes:
            before = dict(tally)
            self._shrink_to(policy.hard_max_bytes, None, "hard_cap", policy, tally)
            dropped = sum(v - before.get(k, 0) for k, v in tally.items() if k[1] == "hard_cap")
            if dropped:
                log.warning("event log over its hard cap of %d bytes: dropped the %d oldest events, some of them not "
                            "processed by every consumer yet (safe offsets %s); raise retention_hard_max_bytes or "
                            "find the consumer that is behind", policy.hard_max_bytes, dropped, safe)
        for (d, reason), n in tally.items():
            LOG_DELETED.labels(d, reason).inc(n)
        rows = self.rows_by_kind()
        for d in bounds:
            for k in KINDS:
                LOG_ROWS.labels(d, k).set(rows.get((d, k), 0))
        bytes_after = self.live_bytes()
        LOG_BYTES.set(bytes_after)
        return RetentionReport(deleted=tally, dropped_unprocessed=dropped, bytes_before=bytes_before,
                               bytes_after=bytes_after, rows_after=sum(rows.values()), safe_offsets=safe,
                               pages_reclaimed=0, seconds=time.perf_counter() - t0)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.client.close()

    def __enter__(self) -> "RedisEventLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisEventLog({self.name!r})"
