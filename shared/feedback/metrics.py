"""The feedback client's Prometheus metrics (label domain: the short domain name, see domains.py)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

from protos.feedback.v1 import feedback_pb2

BUFFERED = Gauge("storefront_feedback_buffered", "Feedback records waiting in memory to be sent", ["domain"])
IN_FLIGHT = Gauge("storefront_feedback_in_flight", "Feedback records sent and not yet acknowledged", ["domain"])
SPOOLED = Counter("storefront_feedback_spooled_total", "Feedback records written to the disk spool", ["domain"])
SENT = Counter("storefront_feedback_sent_total", "Feedback records written to the trainer stream (resends included)",
               ["domain"])
ACKED = Counter("storefront_feedback_acked_total", "Acks from the trainer by status (stored, duplicate, rejected)",
                ["domain", "status"])
DROPPED = Counter("storefront_feedback_dropped_total",
                  "Feedback records lost, by reason: spool_full (buffer and spool both full), "
                  "invalid (could not be built), closed (recorded after stop)", ["domain", "reason"])
SPOOL_BYTES = Gauge("storefront_feedback_spool_bytes",
                    "Bytes the spooled records take in the spool database (acknowledged ones until deleted)",
                    ["domain"])
CONNECTED = Gauge("storefront_feedback_connected", "1 while a stream to the trainer is open", ["domain"])

ACK_LABEL = {
    feedback_pb2.ACK_STATUS_STORED: "stored",
    feedback_pb2.ACK_STATUS_DUPLICATE: "duplicate",
    feedback_pb2.ACK_STATUS_REJECTED: "rejected",
}
