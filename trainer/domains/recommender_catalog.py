"""Recommender domain, trainer side: the services' catalog as the trainer reads it, so it learns
the title/category/price of items it has never seen.

`CatalogJournal` reads the service's catalog journal (JSONL, appended on every UpsertItems);
`RedisCatalogReader` reads the catalog the replicas share on Redis (the Redis mode). Both
apply the service's rules for a line, so a line the service skips is skipped here too.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from shared.jsonl import read_records

log = logging.getLogger(__name__)


class CatalogJournal:
    """Incremental reader of the service's catalog journal (JSONL: item_id, title, category,
    price; the last line of an item wins). `read_new()` returns the records appended since
    the last call; a truncated or replaced file is read again from the start. A line that is
    cut short (a writer mid-append) is left for the next call; a malformed line is skipped."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._pos = 0
        self._inode: int | None = None

    def read_new(self) -> list[dict[str, Any]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if st.st_ino != self._inode or st.st_size < self._pos:
            self._pos, self._inode = 0, st.st_ino
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        # the service's own reader (shared.jsonl): split on b"\n" only, an unreadable line
        # skipped, logged and counted, so both sides see exactly the same items
        out, end = read_records(data, f"catalog journal {self.path} (from byte {self._pos})", "trainer",
                                _journal_record)
        self._pos += end
        return out


class RedisCatalogReader:
    """Incremental reader of the services' shared catalog in the Redis mode (the recommender's
    redis_url: services.recommender.redis_state.RedisCatalogJournal writes it), with
    CatalogJournal's `read_new()`: the items upserted since the last call. Keys (the service's
    layout; tests/test_recommender_replicas.py reads what the service writes):

        storefront:reco:{catalog}:items   hash item_id -> journal line
        storefront:reco:{catalog}:log     stream, one entry per upsert: its sequence number and lines
        storefront:reco:{catalog}:seq     counter: the last sequence number

    The first call reads the whole hash (with the stream position, in one transaction); later
    calls read the stream entries after that position. A gap in the sequence numbers (entries
    trimmed unread from the capped stream) or a seed entry: the whole hash again (the model's
    upsert of known items changes nothing). Redis unreachable: logged, nothing returned, the
    same changes read at the next call. Blocking client: runs in the learner's thread."""

    def __init__(self, url: str = "", password_file: str = "", *, client=None, prefix: str = "storefront:reco") -> None:
        if client is None:
            from shared.redis_conn import redis_sync_client

            client = redis_sync_client(url, password_file, decode_responses=True)
        self.client = client
        base = f"{prefix}:{{catalog}}"
        self.items_key, self.log_key, self.seq_key = base + ":items", base + ":log", base + ":seq"
        self._stream_id, self._seq = "0-0", 0  # seq 0: nothing read yet

    def read_new(self) -> list[dict[str, Any]]:
        from redis.exceptions import RedisError

        try:
            seq = int(self.client.get(self.seq_key) or 0)
            if seq == self._seq:
                return []
            if self._seq:
                lines, last, expect = [], None, self._seq + 1
                for entry_id, fields in self.client.xrange(self.log_key, min=f"({self._stream_id}"):
                    if int(fields.get("seq", 0)) != expect or "reload" in fields:
                        break
                    lines.append(fields.get("items", ""))
                    last, expect = entry_id, expect + 1
                else:
                    if last is not None:
                        self._stream_id, self._seq = last, expect - 1
                        return self._parse(lines, f"catalog stream {self.log_key}")
            with self.client.pipeline(transaction=True) as pipe:
                items, last_entry, seq = pipe.hgetall(self.items_key).xrevrange(self.log_key, count=1) \
                    .get(self.seq_key).execute()
        except RedisError as e:
            log.warning("recommender: the shared catalog could not be read (%s); retried at the next round", e)
            return []
        self._stream_id, self._seq = (last_entry[0][0] if last_entry else "0-0"), int(seq or 0)
        return self._parse([items[k] for k in sorted(items)], f"catalog hash {self.items_key}")

    @staticmethod
    def _parse(lines: list[str], source: str) -> list[dict[str, Any]]:
        text = "\n".join(line for line in lines if line)
        if not text:
            return []
        # the file journal's reader: an unreadable line is skipped, logged and counted
        out, _ = read_records((text + "\n").encode("utf-8"), source, "trainer", _journal_record)
        return out


def _journal_record(r: dict[str, Any]) -> dict[str, Any]:
    """The service's rules for a journal line (services.recommender.catalog.ItemRecord), so a
    line it skips is skipped here too, and a bad price never reaches the item tables."""
    if not r.get("item_id") or not isinstance(r.get("title", ""), str) \
            or not isinstance(r.get("category") or "", str):
        raise ValueError("a catalog line needs an item_id, a string title and a string category")
    price = r.get("price", 0.0)
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(float(price)) \
            or price < 0:
        raise ValueError(f"price must be a finite number >= 0, got {price!r}")
    return r
