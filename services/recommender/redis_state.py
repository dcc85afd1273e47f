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
"""
from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import numpy as np
from redis.asyncio import Redis

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

    def __init__(self, client: Redis, max_recent: int = 64, max_purchased: int = 1000, *,
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
