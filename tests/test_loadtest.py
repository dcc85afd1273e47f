"""The load-test command against the real fraud service (closed and open loop) and a V2 endpoint."""
import json

import pytest

from ops import loadtest
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
