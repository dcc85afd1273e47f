"""`trainer replay run` against a real fraud service (in-process, real gRPC, a model the real
learner trained on real data): short progress lines, and a per-event file to cut windows from."""
import asyncio
import csv
import json

import numpy as np
import pytest

from services.fraud.main import FraudSettings, make_app
from tests.fraud_fixtures import bootstrap_small_fraud
from trainer.domains.fraud import FEATURES
from trainer.replay import EVENT_FIELDS, main as replay_main, read_events, run_fraud

EVENTS = 120
FIRST_ROW = 40_000  # past the rows the fixture's model trained on


@pytest.fixture(scope="module")
def fraud_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    registry, _, data = bootstrap_small_fraud(root)
    return root, registry, data


def write_events(path, data, first, n):
    """Real transactions as replay events; label delays vary so labels arrive out of request order."""
    rows = np.arange(first, first + n)
    frauds = np.flatnonzero(data.y[first + n:] == 1)[:5] + first + n  # a few frauds, after the others
    rows = np.concatenate([rows, frauds])
    with open(path, "w") as f:
        for k, i in enumerate(rows):
            ts = 1.7e9 + k
            request = {"transactionId": f"cc-{i}", "amount": float(data.X[i, -1]), "timestamp": ts,
                       "features": {name: float(v) for name, v in zip(FEATURES, data.X[i, :-1])}}
            f.write(json.dumps({"ts": ts, "domain": "fraud", "request": request,
                                "outcome": {"delay_s": float(k % 7) * 3.0,
                                            "label": {"is_fraud": bool(data.y[i]), "source": "chargeback"}}}) + "\n")
    return {f"cc-{i}": int(data.y[i]) for i in rows}


@pytest.fixture
async def fraud_target(fraud_world):
    root, registry, data = fraud_world
    s = FraudSettings(host="127.0.0.1", port=0, metrics_port=0, registry_dir=str(registry.root), trainer_target="",
                      spool_dir=str(root / "spool"), poll_interval_s=0.05, grace_s=1.0, log_format="text")
    app = make_app(s)
    await app.start()
    try:
        yield app.address, data
    finally:
        await app.stop()


async def test_replay_writes_one_row_per_event_and_short_progress_lines(fraud_target, tmp_path, capsys):
    target, data = fraud_target
    events = tmp_path / "events.jsonl"
    labels = write_events(events, data, FIRST_ROW, EVENTS)
    out = tmp_path / "per-event.csv"
    stats = await asyncio.to_thread(run_fraud, events, target, 0.0, 25, 10.0, out)
    printed = capsys.readouterr().out
    progress = [line for line in printed.splitlines() if line.startswith("[replay] labels=")]
    assert len(progress) == len(labels) // 25
    for line in progress:  # short and of bounded size: no dict of versions on each line
        assert "versions" not in line and " version=1" in line and "rate=" in line and len(line) < 200
    assert f"[replay] done: labels={len(labels)}" in printed and "versions_served=1 (1..1)" in printed

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == EVENT_FIELDS
    assert len(rows) == len(labels) == len(stats.y)
    assert {r["transaction_id"]: int(r["label"]) for r in rows} == labels
    assert len({r["prediction_id"] for r in rows}) == len(rows) and all(r["prediction_id"] for r in rows)
    assert {r["model_version"] for r in rows} == {"1"}
    scores = np.array([float(r["score"]) for r in rows])
    assert np.all((scores >= 0) & (scores <= 1))
    # the rows carry what prequential scoring used: same scores, same labels, in the same order
    np.testing.assert_allclose(scores, stats.p, rtol=1e-6)
    # label order differs from request order (delays vary), and event_ts lets a reader restore it
    ts = [float(r["event_ts"]) for r in rows]
    assert ts != sorted(ts)
    by_time = [r["transaction_id"] for r in sorted(rows, key=lambda r: float(r["event_ts"]))]
    assert by_time == [e["request"]["transactionId"] for e in read_events(events)]


async def test_replay_cli_writes_jsonl_when_asked(fraud_target, tmp_path, capsys):
    target, data = fraud_target
    events = tmp_path / "events.jsonl"
    labels = write_events(events, data, FIRST_ROW + 500, 30)
    out = tmp_path / "per-event.jsonl"
    code = await asyncio.to_thread(replay_main, ["run", "--domain", "fraud", "--events", str(events), "--target",
                                                 target, "--report-every", "10", "--events-out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(labels) and set(rows[0]) == set(EVENT_FIELDS)
    assert {r["transaction_id"]: r["label"] for r in rows} == labels
    assert f"{len(labels)} events written to {out}" in capsys.readouterr().out
