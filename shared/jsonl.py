"""Line-safe JSONL: the catalog journal's format, shared by its writer (the recommender) and
its readers (the recommender itself, the trainer).

A record is one JSON object on one line ending in b"\\n". It is written with ensure_ascii:
every non-ASCII character is escaped, so no record holds a byte sequence that some reader
would take for a line break (str.splitlines() also splits on U+2028, U+2029, U+0085, \\x1c..
\\x1e, \\v, \\f: a title holding one of those, written raw, came back as two broken lines).
Lines are split on b"\\n" only, for the same reason, and for files written by someone else.

Reading never fails on one line: a line that is not UTF-8, not JSON or not an object is
skipped, logged and counted (storefront_catalog_journal_skipped_lines_total{reader}), so one
bad append can't stop a reader or a restart.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, TypeVar

from shared.metrics import JOURNAL_SKIPPED_LINES

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_LOGGED = 200  # characters of a skipped line shown in the log


def dumps_line(record: dict[str, Any]) -> str:
    """One record as a journal line (ASCII only, no raw line separators), newline included."""
    return json.dumps(record, ensure_ascii=True, allow_nan=False) + "\n"


def complete_lines(data: bytes) -> tuple[list[bytes], int]:
    """The complete lines of `data` (split on b"\\n" only) and the bytes they take: a last
    line without its newline (a writer mid-append, or a crash) is left out."""
    end = data.rfind(b"\n") + 1
    return data[:end].split(b"\n")[:-1], end


def read_records(data: bytes, source: str, reader: str,
                 convert: Callable[[dict[str, Any]], T] = lambda d: d,  # type: ignore[assignment,return-value]
                 first_line: int = 1) -> tuple[list[T], int]:
    """Parse the complete lines of `data` (bytes of a JSONL file) into records.

    convert(dict) -> record may raise ValueError/KeyError/TypeError to refuse a line. Blank
    lines are ignored; any other unreadable line is skipped, logged (naming `source` and the
    line number counted from `first_line`) and counted under `reader`. Returns (records,
    bytes consumed: a torn last line is left for the next read)."""
    lines, end = complete_lines(data)
    out: list[T] = []
    for n, raw in enumerate(lines, start=first_line):
        if not raw.strip():
            continue
        try:
            d = json.loads(raw.decode("utf-8"))
            if not isinstance(d, dict):
                raise TypeError(f"a line must be a JSON object, got {type(d).__name__}")
            out.append(convert(d))
        except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError) as e:  # Unicode/JSONDecodeError are ValueErrors
            JOURNAL_SKIPPED_LINES.labels(reader).inc()
            shown = raw[:MAX_LOGGED].decode("utf-8", errors="replace")
            log.warning("%s: skipping unreadable line %d (%s): %r%s", source, n, e, shown,
                        " ..." if len(raw) > MAX_LOGGED else "")
    return out, end
