from prometheus_client import CollectorRegistry, generate_latest

from shared.metrics import RequestStats


def test_request_stats_export_counts_and_cumulative_buckets():
    stats = RequestStats(buckets=(0.001, 0.01, 0.1))
    registry = CollectorRegistry()
    registry.register(stats)
    ok = stats.series("ModelInfer", "OK")
    for seconds in (0.0005, 0.001, 0.005, 0.05, 2.0):
        stats.observe(ok, seconds)
    stats.observe(stats.series("ModelInfer", "INVALID_ARGUMENT"), 0.0001)
    text = generate_latest(registry).decode()
    assert 'storefront_requests_total{code="OK",method="ModelInfer"} 5.0' in text
    assert 'storefront_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"} 1.0' in text
    for le, n in (("0.001", 2), ("0.01", 3), ("0.1", 4), ("+Inf", 5)):
        assert f'storefront_request_latency_seconds_bucket{{code="OK",le="{le}",method="ModelInfer"}} {n}.0' in text
    assert 'storefront_request_latency_seconds_count{code="OK",method="ModelInfer"} 5.0' in text
    assert 'storefront_request_latency_seconds_sum{code="OK",method="ModelInfer"} 2.0565' in text
