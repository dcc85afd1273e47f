"""The load-test command against the real fraud service (closed and open loop) and a V2 endpoint;
the load generator's accounting on a plain coroutine target."""
import asyncio
import json

import grpc
import pytest

from ops import loadgen, loadtest
from tests.fraud_fixtures import bootstrap_small_fraud
from tests.loop_harness import Loop


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("loadtest")
    bootstrap_small_fraud(root)
    lp = Loop(root).start()
    yield lp
    assert lp.stop() == (0, 0)


@pytest.mark.parametrize("mode", [["-c", "8"], ["--rate", "200"]])
def test_fraud_scenario_reports_latencies_and_writes_json_and_chart(suite, tmp_path, mode, capsys):
    rc = loadtest.main(["fraud", "--target", f"127.0.0.1:{suite.fraud_port}", *mode, "-d", "3", "--warmup", "1",
                        "--rows", "500", "--label-delay-s", "0.2", "--out", str(tmp_path)])
    assert rc == 0
    (js,) = tmp_path.glob("*.json")
    (png,) = tmp_path.glob("*.png")
    result = json.loads(js.read_text())
    assert result["errors"] == {} and result["ok"] > 100
    assert result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["p999_ms"] <= result["max_ms"]
    assert len(result["per_second"]) == 3 and sum(r["ok"] for r in result["per_second"]) == result["ok"]
    if "--rate" in mode:  # open loop: about rate x duration arrivals
        assert 300 <= result["ok"] + result["dropped_by_client"] <= 900
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "| fraud |" in capsys.readouterr().out


def test_v2_scenario_drives_any_kserve_endpoint(suite, tmp_path):
    rc = loadtest.main(["v2", "--target", f"127.0.0.1:{suite.fraud_port}", "--model", "fraud", "-c", "4", "-d", "2",
                        "--warmup", "0.5", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["ok"] > 50 and result["mode"] == "closed"


def _unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")


async def test_the_open_loop_starts_every_scheduled_call_and_counts_failures_by_code():
    started: list[int] = []

    async def call(i: int):
        started.append(i)
        await asyncio.sleep(0)
        if i % 4 == 0:
            raise _unavailable()
        return i

    rec = await loadgen.generate(call, duration=1.0, warmup=0.25, rate=80, poisson=False)
    out = loadgen.summary(rec)
    assert 79 <= rec.sent <= 81  # every arrival of the window was sent, on schedule or late
    assert 99 <= len(started) <= 101  # and those of the warm-up: 1.25 s x 80/s in all
    assert out["ok"] + sum(out["errors"].values()) == rec.sent and set(out["errors"]) == {"UNAVAILABLE"}
    assert sum(rec.warmup_errors.values()) >= 1 and out["dropped_by_client"] == 0
    assert sum(r["ok"] for r in loadgen.per_second(rec)) == out["ok"]


async def test_the_closed_loop_keeps_its_workers_busy_and_reports_what_the_client_cost():
    in_flight, most = [0], [0]

    async def call(i: int):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        await asyncio.sleep(0.001)
        in_flight[0] -= 1
        return i

    seen: list[float] = []
    rec = await loadgen.generate(call, duration=0.5, concurrency=6, on_response=lambda r, at: seen.append(at))
    out = loadgen.summary(rec)
    assert most[0] == 6 and out["ok"] == len(seen) > 0 and out["errors"] == {}
    assert out["p50_ms"] <= out["p99_ms"] <= out["max_ms"]
    client = loadgen.client_summary(rec)
    assert client["client_cpu_us_per_req"] > 0 and client["client_loop_lag_max_ms"] >= 0


async def test_an_outcome_report_is_sent_again_after_a_transport_failure_and_never_after_a_refusal(capsys):
    """Outcomes are idempotent (a repeat is answered as a duplicate): a report that failed in
    transport is retried; one the service refused is not, and the failure is printed."""
    def failing(codes):
        calls = []

        async def send():
            calls.append(1)
            if len(calls) <= len(codes):
                raise grpc.aio.AioRpcError(codes[len(calls) - 1], grpc.aio.Metadata(), grpc.aio.Metadata(), "no")
            return "ok"
        return send, calls

    send, calls = failing([grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE])
    assert await loadgen.report_outcome(send, backoff_s=0.0) and len(calls) == 3
    send, calls = failing([grpc.StatusCode.NOT_FOUND])
    assert not await loadgen.report_outcome(send, backoff_s=0.0) and len(calls) == 1
    send, calls = failing([grpc.StatusCode.UNAVAILABLE] * 3)
    assert not await loadgen.report_outcome(send, attempts=3, backoff_s=0.0) and len(calls) == 3
    assert capsys.readouterr().err.count("ReportOutcome failed") == 2
