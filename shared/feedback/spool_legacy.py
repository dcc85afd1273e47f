"""Reading the spool segments of the custom format the SQLite spool replaced, so that records
a previous version left on disk are imported (spool.Spool, on open), not dropped.

    <spool_dir>/<segment no, 12 digits>.fbspool
      b"FBSPOOL1" frame*
    frame = <u16 0xFB5B> <u32 body_len> <u16 id_len> <u32 crc32(first 8 header bytes + body)>
            body = record_id (utf-8, id_len bytes) + serialized FeedbackRecord
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

SEGMENT_MAGIC = b"FBSPOOL1"
SEGMENT_SUFFIX = ".fbspool"
FRAME_MAGIC = 0xFB5B
FRAME_HEAD = struct.Struct("<HIHI")  # magic, body length, id length, crc32(first 8 header bytes + body)


def read_segment(path: Path) -> tuple[list[tuple[str, bytes]], str | None, int]:
    """(record_id, payload) of the segment's frames up to the first torn or corrupt one, what
    stopped the read (None when all of it read), and the bytes left unread. A file that is
    not a segment reads as ([], "not a spool segment", its size)."""
    data = path.read_bytes()
    if not data.startswith(SEGMENT_MAGIC):
        if SEGMENT_MAGIC.startswith(data):  # created, crashed before its header was complete
            return [], None, 0
        return [], "not a spool segment", len(data)
    frames: list[tuple[str, bytes]] = []
    off, n = len(SEGMENT_MAGIC), len(data)
    while off < n:
        if n - off < FRAME_HEAD.size:
            return frames, "torn frame header", n - off
        magic, body_len, id_len, crc = FRAME_HEAD.unpack_from(data, off)
        if magic != FRAME_MAGIC or id_len > body_len:
            return frames, "bad frame header", n - off
        body = data[off + FRAME_HEAD.size: off + FRAME_HEAD.size + body_len]
        if len(body) < body_len:
            return frames, "torn frame", n - off
        if zlib.crc32(body, zlib.crc32(data[off: off + 8])) != crc:
            return frames, "checksum mismatch", n - off
        frames.append((body[:id_len].decode(), body[id_len:]))
        off += FRAME_HEAD.size + body_len
    return frames, None, 0

