"""Feedback client: streams what a service served, and what happened next, to the trainer.

Every service owns one `FeedbackClient`. The prediction path calls `record_served` /
`record_outcome`: they build and serialize one `FeedbackRecord` (a few microseconds),
append it to a bounded in-memory buffer and return; they never block on the network or
on fsync and never raise. A background asyncio task keeps one bidirectional
`Feedback.Stream` to the trainer open (protos/feedback/v1/feedback.proto):

    record_* -> buffer (deque, max_buffer) --(stream of FeedbackBatch)--> trainer
                   |  full, or trainer away                 | AckBatch: one Ack per record_id
                   v                                        v
                spool (SQLite on disk, max_spool_bytes)   in-flight map (max_in_flight)

- Records are sent in order, in batches: each stream message (FeedbackBatch) carries
  whatever is ready, up to batch_max records and max_batch_bytes (the sender never waits
  to fill a batch; one record alone goes at once). A batch is built from the records'
  serialized bytes as they are (the wire framing of `repeated FeedbackRecord` is that of
  `repeated bytes`), so nothing is serialized twice.
- Each record stays in the in-flight map until its own Ack arrives (acks come in
  AckBatch messages, in any order and grouped in any way; they are matched by
  record_id). STORED and DUPLICATE forget it; REJECTED forgets it, counts it and logs
  the trainer's message.
- When the stream breaks or the trainer is unreachable, every in-flight and buffered
  record is appended to the spool, in order, and the task reconnects with exponential
  backoff (with jitter). While the trainer stays away, new records keep going to the
  spool (group-committed: one fsync per batch).
- After a reconnect the spool is replayed first, in order, then the buffer. Resent
  records keep their record_id; the trainer stores each record_id once
  (ACK_STATUS_DUPLICATE), so a resend never reaches training twice.
- `stop()` sends what it can and waits for acks (flush_timeout_s), then spools the rest;
  the next process on the same spool_dir replays it.

Spool (spool.py): records not yet acknowledged, in a SQLite database, one folder per client
(a lock refuses a second client on it), bounded by max_spool_bytes (beyond that, records are
dropped, counted and logged at ERROR), replayed oldest first after a restart; a crash
mid-write loses only what was not yet synced, never a record before it.

Identity: the trainer's collector accepts records only from a service it can name (trainer
settings `feedback_tokens`, `tls_client_ca`): the client sends its service's token as gRPC
metadata (`TOKEN_METADATA`, the `metadata` argument) and/or a client certificate whose CN is
its domain (`channel_credentials`, see `client_credentials`). A refused client gets
UNAUTHENTICATED / PERMISSION_DENIED, logs it at ERROR and keeps spooling until fixed.

Delivery contract of an outcome (what a service's ReportOutcome answer promises):
- default (`record_outcome`): the outcome is in this process's memory buffer when the RPC
  answers; it reaches the spool's disk within ~`spool_interval_s` (20 ms) only while the
  trainer is unreachable, and otherwise leaves over the stream and is forgotten once the
  trainer acks it as stored. A kill -9 (or power loss) of the service loses what is buffered or
  in flight and not yet acked: at most ~max_in_flight + max_buffer records, in practice the last
  few milliseconds of outcomes. A clean stop (SIGTERM) loses nothing: `stop()` flushes or spools.
- durable (`record_outcome_durable`, service setting `outcome_ack_durable`): the outcome is
  appended to the spool and fsync'd before the RPC answers, so an answered outcome survives
  kill -9 and power loss of the service (it is replayed at the next start on the same
  spool_dir). Costs at most one fsync per outcome call (concurrent calls share one): use it
  when a caller cannot resend (no outbox of its own).
In both modes a resend after a crash is harmless: the trainer de-duplicates by outcome identity.

Ordering: records reach the trainer in the order they were recorded, except that after
a buffer overflow (trainer slower than the service) followed by a stream break, the
records that were in flight at the break are resent after the ones that overflowed.
The trainer's joiner matches by prediction_id, so it does not depend on order.

Modules: client.py (FeedbackClient: the prediction path and lifecycle), sender.py (its
background stream task), spool.py (with spool_recovery.py, and spool_legacy.py: the former
format, imported once), framing.py (FeedbackBatch framing), records.py (building records),
tensors.py (tensor encoding, shared with the trainer), domains.py (the record's domain and its
metric label), identity.py (token and TLS credentials), metrics.py.
"""
from shared.feedback.client import FeedbackClient
from shared.feedback.domains import domain_label, domain_value
from shared.feedback.framing import MAX_BATCH_BYTES, MAX_BATCH_RECORDS, STREAM_METHOD, encode_batch
from shared.feedback.identity import TOKEN_METADATA, client_credentials, read_secret
from shared.feedback.records import ShadowRecord
from shared.feedback.spool import Spool, SpoolLockedError, read_spool
from shared.feedback.tensors import fill_tensor, tensor_to_numpy

__all__ = ["FeedbackClient", "MAX_BATCH_BYTES", "MAX_BATCH_RECORDS", "STREAM_METHOD", "ShadowRecord", "Spool",
           "SpoolLockedError", "TOKEN_METADATA", "client_credentials", "domain_label", "domain_value", "encode_batch",
           "fill_tensor", "read_secret", "read_spool", "tensor_to_numpy"]
