"""FeedbackBatch framing: a batch is built from records' serialized bytes as they are (the
wire framing of `repeated FeedbackRecord` is that of `repeated bytes`), so nothing is
serialized twice."""
from __future__ import annotations

from typing import Sequence

STREAM_METHOD = "/storefront.feedback.v1.Feedback/Stream"

# feedback.proto: a FeedbackBatch holds at most 1024 records and 4 MiB serialized.
MAX_BATCH_RECORDS = 1024
MAX_BATCH_BYTES = 4 << 20
BATCH_FRAMING = 8  # > the framing of one record in a batch: 1 tag byte + a varint length (<= 5 bytes)


def record_head(n: int) -> bytes:
    """The framing of one n-byte serialized record in a FeedbackBatch: tag of field 1
    (length-delimited) and the varint length. Record bytes follow as they are."""
    if n < 0x80:
        return bytes((0x0A, n))
    if n < 0x4000:
        return bytes((0x0A, (n & 0x7F) | 0x80, n >> 7))
    out = bytearray(b"\x0a")
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_batch(payloads: Sequence[bytes]) -> bytes:
    """A serialized FeedbackBatch from already serialized FeedbackRecords, without parsing or
    re-serializing them: `repeated FeedbackRecord records = 1` is framed like `repeated bytes`."""
    parts: list[bytes] = []
    for p in payloads:
        parts.append(record_head(len(p)))
        parts.append(p)
    return b"".join(parts)
