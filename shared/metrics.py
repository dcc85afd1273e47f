"""Prometheus metrics of the serving runtime. Names and labels are documented in the README."""
from __future__ import annotations

import bisect
import threading

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)



class RequestStats:
    """Per (method, code): the RPC count and a latency histogram, on the hot path of every RPC.

    prometheus_client's Histogram takes a lock and walks its buckets in Python on every
    observation (~4 us, a measurable share of a ~350 us RPC); here an observation is one
    C bisect and two additions. Observations come from the event-loop thread only; the
    scrape thread reads under a lock taken only while a new series is added, and a scrape
    may see a count one observation ahead of the sum, which Prometheus tolerates.
    Exported as storefront_requests_total and storefront_request_latency_seconds.
    """

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = list(buckets)
        self._series: dict[tuple[str, str], list] = {}  # -> [bucket counts..., +Inf count, sum]
        self._lock = threading.Lock()

    def series(self, method: str, code: str) -> list:
        key = (method, code)
        s = self._series.get(key)
        if s is None:
            with self._lock:
                s = self._series.setdefault(key, [0] * (len(self.bounds) + 1) + [0.0])
        return s

    def observe(self, series: list, seconds: float) -> None:
        series[bisect.bisect_left(self.bounds, seconds)] += 1
        series[-1] += seconds

    def collect(self):
        with self._lock:
            items = [(k, list(v)) for k, v in self._series.items()]
        count = CounterMetricFamily("storefront_requests", "RPCs handled, by method and status code",
                                    labels=["method", "code"])
        hist = HistogramMetricFamily("storefront_request_latency_seconds",
                                     "RPC latency in the server, by method and status code", labels=["method", "code"])
        for (method, code), v in items:
            total = sum(v[:-1])
            count.add_metric([method, code], total)
            cumulative, buckets = 0, []
            for bound, n in zip(self.bounds, v):
                cumulative += n
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", total))
            hist.add_metric([method, code], buckets, v[-1])
        yield count
        yield hist


REQUEST_STATS = RequestStats()
REGISTRY.register(REQUEST_STATS)
BATCH_SIZE = Histogram("storefront_batch_size", "Rows per session run", ["model"], buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("storefront_queue_depth", "Requests waiting in the micro-batcher", ["model"])
DROPPED = Counter("storefront_requests_dropped_total", "Requests dropped before running, by reason",
                  ["model", "reason"])
MODEL_INFO = Gauge("storefront_model_info", "1 for the version being served, with its provider",
                   ["model", "version", "provider"])
BATCH_SPLITS = Counter("storefront_batch_splits_total",
                       "Merged session runs that failed and were re-run one request at a time, so that "
                       "only the failing request(s) fail", ["model"])
BATCH_ISOLATED_FAILURES = Counter("storefront_batch_isolated_failures_total",
                                  "Requests that failed when re-run alone after their merged batch failed",
                                  ["model"])
OUTPUT_ERRORS = Counter("storefront_model_output_errors_total",
                        "Requests answered with an error because the model's output for their rows was "
                        "not usable, by reason (nonfinite, out_of_range)", ["model", "reason"])
SHED = Counter("storefront_requests_shed_total",
               "RPCs refused RESOURCE_EXHAUSTED by admission control before running, by method and reason "
               "(concurrency: the server's max_concurrent_rpcs; adaptive_limit: the method's adaptive limit, "
               "storefront_admission_limit); also counted in storefront_requests_total", ["method", "reason"])
ADMISSION_LIMIT = Gauge("storefront_admission_limit",
                        "Adaptive concurrency limit of each unary method: its calls admitted at once before "
                        "RESOURCE_EXHAUSTED (reason adaptive_limit); shrinks while the method shows a standing "
                        "queue (see queue_delay_target_ms)", ["method"])
RELOADS = Counter("storefront_model_reloads_total", "Hot-reload attempts by result (loaded, refused, rollback)",
                  ["model", "result"])
JOURNAL_SKIPPED_LINES = Counter("storefront_catalog_journal_skipped_lines_total",
                                "Catalog journal lines skipped as unreadable (logged), by reader",
                                ["reader"])
REGISTRY_ERRORS = Counter("storefront_registry_errors_total",
                          "Registry problems a service met, by reason (pointer_corrupt, pointer_unreadable, "
                          "symlink, checksum, missing, unsafe_name, malformed...); an unreadable pointer "
                          "counts once per distinct state, not per poll", ["model", "reason"])
POINTER_UNREADABLE = Gauge("storefront_registry_pointer_unreadable",
                           "1 while the model's CURRENT pointer cannot be read (the loaded version keeps serving)",
                           ["model"])
REGISTRY_BYTES = Gauge("storefront_registry_bytes",
                       "Bytes of a model's registry folder (versions, pointers, leases), as the last registry "
                       "gc left it", ["model"])
REGISTRY_VERSIONS_REMOVED = Counter("storefront_registry_versions_removed_total",
                                    "Model versions deleted by registry gc", ["model"])
REGISTRY_GC = Counter("storefront_registry_gc_total",
                      "Registry gc runs by result: ok, or why it deleted nothing (busy, no_current, "
                      "pointer_corrupt, pins_corrupt, lease_unreadable, missing, io_error...)", ["model", "result"])
OUTCOMES_REJECTED = Counter("storefront_outcomes_rejected_total",
                            "Outcomes a service refused, by domain and reason (invalid, unknown_prediction, "
                            "rate_limited, queue_full)", ["domain", "reason"])


def set_model_info(model: str, version: str, provider: str) -> None:
    # Exactly one series per model is 1: clear the old version's series first.
    for labels in list(MODEL_INFO._metrics):  # prometheus_client keeps children keyed by label tuple
        if labels[0] == model:
            MODEL_INFO.remove(*labels)
    MODEL_INFO.labels(model, version, provider).set(1)
