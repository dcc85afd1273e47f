"""Per-user recent interactions and purchased items, kept in process and bounded.

What the user tower reads (`recent`: the items a user most recently clicked, put in the
cart or bought, most recent first; a repeat counts again, as in the trainer's training rows,
so serving sees the history shape the model learned from) and what exclude_purchased leaves out
(`purchased`). Seeded from a model version's users.npz (the interactions the model was
trained on: Ta Feng purchase lines, so every seeded interaction counts as a purchase) and
updated from reported outcomes while serving.

Bounded three ways: at most `max_users` users (least recently active evicted first), at
most `max_recent` recent items and `max_purchased` purchased items per user (oldest
dropped first). Thread-safe (the loader thread seeds while the event loop serves).

This is the embedded default: one process, lost on restart except what the next model
version's users.npz carries. Several replicas share it through Redis instead (the redis_url
setting: services.recommender.redis_state.RedisUserHistory, same answers).

RecentPredictions maps the ids of recent predictions to their user, so an outcome updates the
right user's history (on Redis: RedisPredictionMemory).
"""
from __future__ import annotations

import collections
import os
import threading
from pathlib import Path

import numpy as np

# recent interactions kept per user by default: the history the current trainer's versions read
# (trainer.domains.recommender_data.HISTORY_LEN, their manifest's history_len); a version that
# reads more than the setting keeps gets a warning at load (services.recommender.adapter)
MAX_RECENT = 128


class _User:
    __slots__ = ("recent", "purchased")

    def __init__(self) -> None:
        self.recent: collections.deque[str] = collections.deque()  # last = most recent
        self.purchased: collections.OrderedDict[str, None] = collections.OrderedDict()


class UserHistory:
    def __init__(self, max_users: int = 200_000, max_recent: int = MAX_RECENT, max_purchased: int = 1000) -> None:
        if max_users < 1 or max_recent < 1 or max_purchased < 0:
            raise ValueError("max_users and max_recent must be >= 1, max_purchased >= 0")
        self.max_users, self.max_recent, self.max_purchased = max_users, max_recent, max_purchased
        self._users: collections.OrderedDict[str, _User] = collections.OrderedDict()  # last = most recently active
        self._lock = threading.Lock()
        self.seeded_from: set[str] = set()  # users.npz files already read (one per model version)

    def __len__(self) -> int:
        with self._lock:
            return len(self._users)

    def __contains__(self, user_id: str) -> bool:
        with self._lock:
            return user_id in self._users

    def recent(self, user_id: str, n: int | None = None) -> list[str]:
        """The user's most recent interactions, most recent first (at most n)."""
        with self._lock:
            u = self._users.get(user_id)
            if u is None:
                return []
            items = reversed(u.recent)
            if n is None:
                return list(items)
            out = []
            for it in items:
                if len(out) >= n:
                    break
                out.append(it)
            return out

    def purchased(self, user_id: str) -> list[str]:
        with self._lock:
            u = self._users.get(user_id)
            return [] if u is None else list(u.purchased)

    def record(self, user_id: str, item_id: str, purchase: bool) -> None:
        """One interaction (click, add to cart, or purchase when `purchase`) just now."""
        with self._lock:
            u = self._user(user_id)
            u.recent.append(item_id)
            if len(u.recent) > self.max_recent:
                u.recent.popleft()
            if purchase and self.max_purchased:
                self._push(u.purchased, item_id, self.max_purchased)

    def _user(self, user_id: str) -> _User:
        u = self._users.get(user_id)
        if u is None:
            u = self._users[user_id] = _User()
            if len(self._users) > self.max_users:
                self._users.popitem(last=False)
        else:
            self._users.move_to_end(user_id)
        return u

    @staticmethod
    def _push(d: collections.OrderedDict, item_id: str, bound: int) -> None:
        d[item_id] = None
        d.move_to_end(item_id)
        if len(d) > bound:
            d.popitem(last=False)

    def seed_npz(self, path: str | os.PathLike[str]) -> int:
        """Add the users of a users.npz (user_ids, indptr CSR, item_ids oldest first) that this
        history does not know yet; users it knows keep what the service saw (newer). Each file
        is read once. Returns the number of users added."""
        key = os.fspath(Path(path).resolve())
        if key in self.seeded_from:
            return 0
        with np.load(path, allow_pickle=False) as z:
            user_ids, indptr, item_ids = z["user_ids"], z["indptr"], z["item_ids"]
        if len(indptr) != len(user_ids) + 1 or (len(indptr) and indptr[-1] != len(item_ids)):
            raise ValueError(f"{path}: indptr does not match user_ids/item_ids")
        users = user_ids.astype(str).tolist()
        with self._lock:
            fresh = [i for i, user in enumerate(users) if user not in self._users]
        fresh = fresh[: max(0, self.max_users - len(self))]
        # only the new users' items become Python strings: a new version mostly repeats known
        # users, and converting every line would hold the GIL (and stall serving) for long
        added = 0
        with self._lock:
            for i in fresh:
                user = users[i]
                if user in self._users or len(self._users) >= self.max_users:
                    continue
                u = _User()
                seq = item_ids[indptr[i]:indptr[i + 1]].astype(str).tolist()
                u.recent.extend(seq[-self.max_recent:])
                if self.max_purchased:
                    for it in seq:
                        self._push(u.purchased, it, self.max_purchased)
                # seeded users go to the least recently active end: live users outrank them
                self._users[user] = u
                self._users.move_to_end(user, last=False)
                added += 1
        self.seeded_from.add(key)
        return added


class RecentPredictions:
    """prediction_id -> user_id of recent predictions (bounded), so an outcome can update
    the right user's history."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._users: collections.OrderedDict[str, str] = collections.OrderedDict()

    def add(self, prediction_id: str, user_id: str) -> None:
        self._users[prediction_id] = user_id
        if len(self._users) > self.capacity:
            self._users.popitem(last=False)

    def get(self, prediction_id: str) -> str | None:
        return self._users.get(prediction_id)
