"""Prometheus metrics of the serving runtime. Names and labels are documented in the README."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter("storefront_requests_total", "RPCs handled, by method and status code", ["method", "code"])
LATENCY = Histogram("storefront_request_latency_seconds", "RPC latency in the server, by method and status code",
                    ["method", "code"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("storefront_batch_size", "Rows per session run", ["model"], buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("storefront_queue_depth", "Requests waiting in the micro-batcher", ["model"])
DROPPED = Counter("storefront_requests_dropped_total", "Requests dropped before running, by reason",
                  ["model", "reason"])
MODEL_INFO = Gauge("storefront_model_info", "1 for the version being served, with its provider",
                   ["model", "version", "provider"])
RELOADS = Counter("storefront_model_reloads_total", "Hot-reload attempts by result (loaded, refused, rollback)",
                  ["model", "result"])


def set_model_info(model: str, version: str, provider: str) -> None:
    # Exactly one series per model is 1: clear the old version's series first.
    for labels in list(MODEL_INFO._metrics):  # prometheus_client keeps children keyed by label tuple
        if labels[0] == model:
            MODEL_INFO.remove(*labels)
    MODEL_INFO.labels(model, version, provider).set(1)
