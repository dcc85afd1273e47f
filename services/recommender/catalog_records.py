"""The recommender catalog's line format: one item (ItemRecord) per JSON line, as the journal,
a model version's catalog.jsonl and a catalog feed write it (services.recommender.catalog
keeps the catalog itself), and the file helpers that read and write such files."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable

from shared.domain import check_id, finite
from shared.errors import InvalidArgument
from shared.jsonl import dumps_line

log = logging.getLogger(__name__)

MAX_ITEM_ID_CHARS = 128
MAX_DEPARTMENT_CHARS = 64  # an item's department and each department a Recommend names


@dataclasses.dataclass(frozen=True)
class ItemRecord:
    item_id: str
    title: str
    category: str
    price: float
    department: str = ""

    def to_json(self) -> str:
        """One journal line without its newline (ASCII-escaped: see shared.jsonl); the default
        department is left out, so lines of default-department items read as before."""
        line = {"item_id": self.item_id, "title": self.title, "category": self.category, "price": self.price}
        if self.department:
            line["department"] = self.department
        return dumps_line(line)[:-1]

    @classmethod
    def from_json(cls, d: Any) -> "ItemRecord":
        """A record from a parsed line; ValueError/TypeError for anything that is not an item
        (a JSON fragment such as `5`, a title that is not a string, ...), so the reader skips
        the line instead of failing on it."""
        if not isinstance(d, dict):
            raise TypeError(f"a catalog line must be a JSON object, got {type(d).__name__}")
        item_id, title, category = d.get("item_id"), d.get("title"), d.get("category") or ""
        department = d.get("department") or ""
        if isinstance(item_id, int) and not isinstance(item_id, bool):
            item_id = str(item_id)  # numeric ids from a feed: the id is their decimal form
        if not isinstance(item_id, str) or not isinstance(title, str) or not isinstance(category, str) \
                or not isinstance(department, str):
            raise TypeError("item_id, title, category and department must be strings")
        if not item_id or not title:
            raise ValueError("item_id and title are required")
        price = d.get("price", 0.0)
        if isinstance(price, bool) or not isinstance(price, (int, float)):
            raise TypeError(f"price must be a number, got {type(price).__name__}")
        try:
            price = float(price)
        except OverflowError:  # a huge JSON integer
            raise ValueError("price is out of range") from None
        if not math.isfinite(price) or price < 0:
            raise ValueError(f"price must be finite and >= 0, got {price}")
        return cls(item_id, title, category, price, department)


def items_of_request(request, max_items: int, title_max_chars: int, category_max_chars: int) -> list[ItemRecord]:
    """The items of an UpsertItemsRequest, validated. Bounded: items per call, and title/category lengths (a title's encoder cost grows
    with its length up to 128 tokens: ~60 ms of CPU at 1,000 characters)."""
    n = len(request.items)
    if not 1 <= n <= max_items:
        raise InvalidArgument(f"items must hold 1..{max_items} items, got {n}")
    out, seen = [], set()
    for i, it in enumerate(request.items):
        check_id(it.item_id, f"items[{i}].item_id", MAX_ITEM_ID_CHARS)
        check_id(it.title, f"items[{i}].title", title_max_chars)
        if not it.title.strip():
            raise InvalidArgument(f"items[{i}].title is blank")
        check_id(it.category, f"items[{i}].category", category_max_chars, required=False)
        check_id(it.department, f"items[{i}].department", MAX_DEPARTMENT_CHARS, required=False)
        price = finite(it.price, f"items[{i}].price")
        if price < 0:
            raise InvalidArgument(f"items[{i}].price must be >= 0, got {price}")
        if it.item_id in seen:
            raise InvalidArgument(f"items[{i}].item_id {it.item_id!r} appears twice")
        seen.add(it.item_id)
        out.append(ItemRecord(it.item_id, it.title, it.category, float(price), it.department))
    return out


def read_jsonl(path: str | os.PathLike[str]) -> list[ItemRecord]:
    """Items of a catalog JSONL file (a model version's catalog.jsonl: an artifact, so strict);
    a torn last line (crash mid-append) is skipped with a warning, any other bad line is an
    error naming the line. Split on b"\n" only, as shared.jsonl does (see there why)."""
    out: list[ItemRecord] = []
    lines = Path(path).read_bytes().split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(ItemRecord.from_json(json.loads(line.decode("utf-8"))))
        except (ValueError, KeyError, TypeError) as e:
            if i == len(lines) - 1:
                log.warning("catalog %s: skipping a torn last line: %s", path, e)
                continue
            raise ValueError(f"{path}:{i + 1}: bad catalog line: {e}") from e
    return out


def write_jsonl(path: str | os.PathLike[str], items: Iterable[ItemRecord], fsync: bool = False) -> None:
    with open(path, "w", encoding="ascii") as f:
        for it in items:
            f.write(it.to_json() + "\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
