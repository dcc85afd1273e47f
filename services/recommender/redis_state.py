"""The recommender's online state on Redis, shared by every replica (the Redis mode of issue 14).

In the embedded default each replica keeps in process (history.UserHistory and the adapter's
RecentPredictions) a user's recent interactions, their purchased items, and which user a
prediction id was served to. Behind a load balancer that breaks: a click reported to replica B
never reaches the history replica A ranks with, and an outcome for a prediction A served cannot
find its user on B. These classes keep the same state in Redis, with the same methods and the
same answers as the in-process classes, as coroutines (a network read cannot run on the event
loop without stalling every request); what one replica records, every replica reads on its next
call: there is no cache in front.

Keys (the user id, or the prediction id, is the hash tag: one user's two keys share a Cluster
slot, so one script updates both atomically):

    storefront:reco:user:{<user>}:recent   list, most recent first, at most max_recent
    storefront:reco:user:{<user>}:bought   sorted set, score = server time of the last purchase
                                           (microseconds), at most max_purchased (oldest dropped)
    storefront:reco:pred:{<prediction>}    string: the user id, expires after prediction_ttl_s
    storefront:reco:seeded:<sha256>        a users.npz already seeded (by any replica)

Bounds: per user as in process (max_recent, max_purchased, oldest dropped first); across users
by time instead of by count: a user's keys expire `ttl_s` after their last interaction (the
in-process class evicts the least recently active user past max_users; a shared store cannot
count users cheaply, and an expiry is the same rule measured in time). A prediction id is
remembered for `prediction_ttl_s` (default: the recommender's 1 h label window plus the
trainer's 10 min retention slack: an outcome later than that is not joined anyway). Run the
server with a maxmemory and `maxmemory-policy volatile-lru` so a burst evicts the oldest
state instead of refusing writes.

Every write is one script or one SET, so a client retry after a lost reply repeats at most one
interaction; purchases are a set, so a repeated purchase changes nothing.

The catalog journal (RedisCatalogJournal, below) replaces the catalog's JSONL file: a hash of
every item (what a starting replica loads) and a capped stream of upserts (what the other
replicas follow with a blocking read). Its keys have no TTL, so `volatile-lru` never evicts them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from redis.asyncio import Redis

from services.recommender.catalog_records import ItemRecord
from services.recommender.history import MAX_RECENT
from shared.jsonl import read_records

PREFIX = "storefront:reco"
DEFAULT_HISTORY_TTL_S = 30 * 86400.0
DEFAULT_PREDICTION_TTL_S = 3600.0 + 600.0

# KEYS: recent, bought. ARGV: item, purchase (1/0), max_recent, max_purchased, ttl_ms.
_RECORD = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[3]) - 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local max_purchased = tonumber(ARGV[4])
if ARGV[2] == '1' and max_purchased > 0 then
  -- the server's clock orders purchases the same way for every replica; the score is built as a
  -- string (seconds .. microseconds) because Lua would print a number with 14 digits only
  local now = redis.call('TIME')
  redis.call('ZADD', KEYS[2], now[1] .. string.format('%06d', tonumber(now[2])), ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -max_purchased - 1)
end
-- the user's two keys live and expire together
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"""

# KEYS: recent, bought. ARGV: ttl_ms, n, then n items oldest first (recent tail), then the
# purchased items oldest first. Seeds only a user the store does not know yet (what the service
# saw is newer than any training file). Seeded purchases score 1..k: older than any live one.
_SEED = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
  return 0
end
local n = tonumber(ARGV[2])
-- LPUSH and ZADD in slices: unpack() of a long table overflows Lua's C stack (about 8000 values);
-- oldest first, so the newest ends at the head
for first = 3, 2 + n, 1000 do
  redis.call('LPUSH', KEYS[1], unpack(ARGV, first, math.min(first + 999, 2 + n)))
end
if n > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
local scored = {}
for i = 3 + n, #ARGV do
  scored[#scored + 1] = i - 2 - n
  scored[#scored + 1] = ARGV[i]
  if #scored == 1000 then
    redis.call('ZADD', KEYS[2], unpack(scored))
    scored = {}
  end
end
if #scored > 0 then
  redis.call('ZADD', KEYS[2], unpack(scored))
end
if 2 + n < #ARGV then
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return 1
"""


def user_keys(user_id: str, prefix: str = PREFIX) -> tuple[str, str]:
    base = f"{prefix}:user:{{{user_id}}}"
    return base + ":recent", base + ":bought"


def prediction_key(prediction_id: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:pred:{{{prediction_id}}}"


class RedisUserHistory:
    """history.UserHistory on Redis: recent(), purchased(), record(), seed_npz() with the same
    arguments and answers, awaited. One object per process; every replica sees every record."""

    def __init__(self, client: Redis, max_recent: int = MAX_RECENT, max_purchased: int = 1000, *,
                 ttl_s: float = DEFAULT_HISTORY_TTL_S, prefix: str = PREFIX, seed_batch: int = 500) -> None:
        if max_recent < 1 or max_purchased < 0 or ttl_s <= 0 or seed_batch < 1:
            raise ValueError("max_recent must be >= 1, max_purchased >= 0, ttl_s > 0, seed_batch >= 1")
        self.client = client
        self.max_recent, self.max_purchased = max_recent, max_purchased
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.prefix = prefix
        self.seed_batch = seed_batch
        self._record = client.register_script(_RECORD)
        self._seed = client.register_script(_SEED)

    async def recent(self, user_id: str, n: int | None = None) -> list[str]:
        """The user's most recent interactions, most recent first (at most n)."""
        if n is not None and n <= 0:
            return []
        return await self.client.lrange(user_keys(user_id, self.prefix)[0], 0, -1 if n is None else n - 1)

    async def purchased(self, user_id: str) -> list[str]:
        """The user's purchased items, oldest purchase first (a repeat purchase counts as new)."""
        return await self.client.zrange(user_keys(user_id, self.prefix)[1], 0, -1)

    async def user_state(self, user_id: str, n: int | None = None) -> tuple[list[str], list[str]]:
        """recent(user_id, n) and purchased(user_id) in one round trip, from one moment (what a
        Recommend reads)."""
        recent_key, bought_key = user_keys(user_id, self.prefix)
        if n is not None and n <= 0:
            return [], await self.purchased(user_id)
        async with self.client.pipeline(transaction=True) as pipe:
            recent, bought = await pipe.lrange(recent_key, 0, -1 if n is None else n - 1) \
                .zrange(bought_key, 0, -1).execute()
        return recent, bought

    async def contains(self, user_id: str) -> bool:
        return await self.client.exists(*user_keys(user_id, self.prefix)) > 0

    async def record(self, user_id: str, item_id: str, purchase: bool) -> None:
        """One interaction (click, add to cart, or purchase when `purchase`) just now."""
        await self._record(keys=list(user_keys(user_id, self.prefix)),
                           args=[item_id, 1 if purchase else 0, self.max_recent, self.max_purchased, self.ttl_ms])

    async def seed_npz(self, path: str | os.PathLike[str]) -> int:
        """Add the users of a users.npz (user_ids, indptr CSR, item_ids oldest first) that the
        store does not know yet; users it knows keep what the service saw (newer). A file is
        seeded once for all replicas (marked by its content digest; two replicas starting
        together may both seed it, with the same result). Returns the number of users added."""
        digest, (user_ids, indptr, item_ids) = await asyncio.to_thread(_read_users_npz, path)
        marker = f"{self.prefix}:seeded:{digest}"
        if await self.client.exists(marker):
            return 0
        users = user_ids.astype(str).tolist()
        added = 0
        for start in range(0, len(users), self.seed_batch):
            async with self.client.pipeline(transaction=False) as pipe:
                for i in range(start, min(start + self.seed_batch, len(users))):
                    seq = item_ids[indptr[i]:indptr[i + 1]].astype(str).tolist()
                    recent = seq[-self.max_recent:]
                    bought = list(dict.fromkeys(reversed(seq)))[:self.max_purchased][::-1] if self.max_purchased else []
                    await self._seed(keys=list(user_keys(users[i], self.prefix)),
                                     args=[self.ttl_ms, len(recent), *recent, *bought], client=pipe)
                added += sum(await pipe.execute())
        # the marker lives as long as what it seeded could
        await self.client.set(marker, len(users), px=self.ttl_ms)
        return added


def _read_users_npz(path: str | os.PathLike[str]) -> tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with np.load(path, allow_pickle=False) as z:
        user_ids, indptr, item_ids = z["user_ids"], z["indptr"], z["item_ids"]
    if len(indptr) != len(user_ids) + 1 or (len(indptr) and indptr[-1] != len(item_ids)):
        raise ValueError(f"{path}: indptr does not match user_ids/item_ids")
    return digest, (user_ids, indptr, item_ids)


class RedisPredictionMemory:
    """The adapter's RecentPredictions on Redis: prediction id -> user id, so an outcome reported
    to any replica finds the user a prediction served by any replica was for. add() and get(),
    awaited; an entry expires after ttl_s instead of being pushed out by newer ones."""

    def __init__(self, client: Redis, ttl_s: float = DEFAULT_PREDICTION_TTL_S, *, prefix: str = PREFIX) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.client = client
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.prefix = prefix

    async def add(self, prediction_id: str, user_id: str) -> None:
        await self.client.set(prediction_key(prediction_id, self.prefix), user_id, px=self.ttl_ms)

    async def add_many(self, pairs: list[tuple[str, str]]) -> None:
        """Several (prediction id, user id) in one round trip (a batch of answers)."""
        if not pairs:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for prediction_id, user_id in pairs:
                pipe.set(prediction_key(prediction_id, self.prefix), user_id, px=self.ttl_ms)
            await pipe.execute()

    async def get(self, prediction_id: str) -> str | None:
        return await self.client.get(prediction_key(prediction_id, self.prefix))


# ---- the catalog journal ----
# KEYS: items (hash), log (stream), seq (counter). ARGV: maxlen, n, then n (item_id, line) pairs.
# One upsert: every item into the hash and one stream entry with all its lines, atomically.
_APPEND = """
local n = tonumber(ARGV[2])
for first = 3, 2 + 2 * n, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, first, math.min(first + 999, 2 + 2 * n)))
end
local lines = {}
for i = 4, 2 + 2 * n, 2 do
  lines[#lines + 1] = ARGV[i]
end
local seq = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'seq', seq, 'items', table.concat(lines, '\\n'))
return seq
"""

# KEYS: items, log, seq. ARGV: maxlen, n, pairs. Fills an empty catalog only (the first replica of
# a model version wins; a catalog that has items keeps them). The entry asks followers to reload
# (a whole catalog is no stream entry to replay line by line).
_SEED_CATALOG = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local n = tonumber(ARGV[2])
for first = 3, 2 + 2 * n, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, first, math.min(first + 999, 2 + 2 * n)))
end
local seq = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'seq', seq, 'reload', 1)
return seq
"""


@dataclasses.dataclass(frozen=True)
class CatalogPosition:
    """Where a replica is in the catalog's change stream: the last entry it applied and that
    entry's sequence number (a gap in the numbers means entries were trimmed unread)."""
    stream_id: str = "0-0"
    seq: int = 0


@dataclasses.dataclass(frozen=True)
class CatalogChanges:
    items: list[ItemRecord]  # in upsert order (a later line of the same item wins)
    position: CatalogPosition
    reload: bool  # the change cannot be replayed (a seed, or entries trimmed unread): load snapshot()


class RedisCatalogJournal:
    """The catalog journal on Redis, shared by every replica (the file journal's role in
    catalog.Catalog: what an upsert writes before it is applied, what a restart replays, what the
    other writers' follower reads), so an upsert on one replica is recommendable on every replica
    as soon as they read the stream (a blocking read: milliseconds).

        storefront:reco:{catalog}:items   hash item_id -> journal line (catalog_records.ItemRecord.to_json)
        storefront:reco:{catalog}:log     stream: one entry per upsert (its lines), capped near maxlen
        storefront:reco:{catalog}:seq     counter: every entry's sequence number

    The hash is the catalog (what a starting replica loads: no replay of history, no compaction
    to run); the stream is only the recent changes, for followers. An upsert writes both in one
    script; with `appendfsync always` it is on disk before the reply, as the fsync'd file journal
    was. A follower that fell behind the capped stream sees a gap in the sequence numbers and
    loads the hash again. Lines are read with the file journal's reader: an unreadable one is
    skipped, logged and counted, never fatal."""

    def __init__(self, client: Redis, *, prefix: str = PREFIX, maxlen: int = 10_000) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be >= 1")
        self.client = client
        base = f"{prefix}:{{catalog}}"
        self.items_key, self.log_key, self.seq_key = base + ":items", base + ":log", base + ":seq"
        self.maxlen = maxlen
        self._append = client.register_script(_APPEND)
        self._seed = client.register_script(_SEED_CATALOG)

    @staticmethod
    def _pairs(items: Sequence[ItemRecord]) -> list[str]:
        last = {it.item_id: it for it in items}  # one upsert names an item once: its last line
        return [v for it in last.values() for v in (it.item_id, it.to_json())]

    async def append(self, items: Sequence[ItemRecord]) -> int:
        """Write one upsert (ItemRecords); returns its sequence number."""
        pairs = self._pairs(items)
        if not pairs:
            raise ValueError("an upsert needs at least one item")
        return int(await self._append(keys=[self.items_key, self.log_key, self.seq_key],
                                      args=[self.maxlen, len(pairs) // 2, *pairs]))

    async def seed(self, items: Sequence[ItemRecord]) -> bool:
        """Fill an empty catalog (a model version's catalog.jsonl); False when it had items."""
        pairs = self._pairs(items)
        if not pairs:
            return False
        return bool(await self._seed(keys=[self.items_key, self.log_key, self.seq_key],
                                     args=[self.maxlen, len(pairs) // 2, *pairs]))

    async def snapshot(self) -> tuple[list[ItemRecord], CatalogPosition]:
        """Every item (sorted by id: rows are process-local, any order serves) and the position
        to follow from, read in one transaction so no change falls between them."""
        async with self.client.pipeline(transaction=True) as pipe:
            lines, last, seq = await pipe.hgetall(self.items_key).xrevrange(self.log_key, count=1) \
                .get(self.seq_key).execute()
        items = _parse_lines("\n".join(lines[k] for k in sorted(lines)), f"catalog {self.items_key}")
        position = CatalogPosition(last[0][0] if last else "0-0", int(seq or 0))
        return items, position

    async def changes(self, after: CatalogPosition, block_s: float = 1.0, count: int = 100) -> CatalogChanges:
        """The upserts after `after` (waiting up to block_s for one; none: an empty list at the
        same position)."""
        reply = await self.client.xread({self.log_key: after.stream_id}, count=count,
                                        block=max(1, round(block_s * 1000)) if block_s > 0 else None)
        items: list[ItemRecord] = []
        position = after
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                seq = int(fields.get("seq", 0))
                if seq != position.seq + 1 or "reload" in fields:
                    return CatalogChanges([], CatalogPosition(entry_id, seq), reload=True)
                items.extend(_parse_lines(fields.get("items", ""), f"catalog {self.log_key} entry {entry_id}"))
                position = CatalogPosition(entry_id, seq)
        return CatalogChanges(items, position, reload=False)


def _parse_lines(text: str, source: str) -> list[ItemRecord]:
    if not text:
        return []
    records, _ = read_records((text + "\n").encode("utf-8"), source, "recommender", ItemRecord.from_json)
    return records


class RedisOnlineState:
    """Everything a recommender replica keeps on Redis (the Redis mode: its redis_url setting):
    the user history, the prediction memory and the catalog journal, on one client that belongs
    to the service's event loop. The loader thread (ModelLoader.prepare: the catalog's first
    load, a version's users.npz) cannot use that client, whose connections are bound to the
    loop: `blocking()` runs a coroutine in the calling thread on a client of its own."""

    def __init__(self, url: str, password_file: str = "", *, max_recent: int = MAX_RECENT, max_purchased: int = 1000,
                 history_ttl_s: float = DEFAULT_HISTORY_TTL_S,
                 prediction_ttl_s: float = DEFAULT_PREDICTION_TTL_S) -> None:
        from shared.redis_conn import redis_client

        self.url, self.password_file = url, password_file
        self.max_recent, self.max_purchased, self.history_ttl_s = max_recent, max_purchased, history_ttl_s
        self.client = redis_client(url, password_file, client_name="recommender")  # connects on first use
        self.history = self._history(self.client)
        self.predictions = RedisPredictionMemory(self.client, prediction_ttl_s)
        self.journal = RedisCatalogJournal(self.client)

    def _history(self, client: Redis) -> RedisUserHistory:
        return RedisUserHistory(client, self.max_recent, self.max_purchased, ttl_s=self.history_ttl_s)

    def blocking(self, work):
        """await work(history, journal) on a client of this thread's own (for a thread outside the
        service's event loop); returns its result."""
        from shared.redis_conn import redis_client

        async def run():
            client = redis_client(self.url, self.password_file, client_name="recommender-loader")
            try:
                return await work(self._history(client), RedisCatalogJournal(client))
            finally:
                await client.aclose()

        return asyncio.run(run())

    async def close(self) -> None:
        await self.client.aclose()
