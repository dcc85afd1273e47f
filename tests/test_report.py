"""The learning report: the learner's real decisions rendered as a chart and a page, with the
prequential metrics of what was served and a marker per published version."""
import json

import numpy as np

from tests.fraud_fixtures import TRAIN_ROWS, bootstrap_small_fraud
from trainer import report
from trainer.learner import Examples, LearnerConfig


def test_rounds_report_prequential_metrics_and_the_report_marks_versions(tmp_path):
    registry, learner, data = bootstrap_small_fraud(tmp_path, LearnerConfig(min_events=100, epochs=1))
    start = TRAIN_ROWS + 10_000
    for r in range(2):
        X, y = data.X[start + r * 3000:start + (r + 1) * 3000], data.y[start + r * 3000:start + (r + 1) * 3000]
        served = learner.model.predict(learner.net, X)  # what the serving version answered
        learner.add(Examples(X, y, served, np.arange(r * 3000 + 1, (r + 1) * 3000 + 1, dtype=np.int64)))
        entry = learner.round({"offset": (r + 1) * 3000, "pending": []})
        assert entry["decision"] in ("published", "refused", "deferred")  # every round reports what was served
        preq = entry["prequential"]
        assert preq["window_rows"] == min((r + 1) * 3000, learner.config.prequential_window)
        assert 0.0 <= preq["roc_auc"] <= 1.0 and preq["roc_auc"] > 0.8  # real scores of real labels
    png, html = report.write_report(learner.decisions.path, tmp_path / "reports", "fraud")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    page = html.read_text()
    assert "data:image/png;base64," in page and "bootstrap" in page and 'http-equiv="refresh"' in page
    versions = [e["version"] for e in learner.decisions.read() if e.get("version")]
    assert f"<td>{versions[-1]}</td>" in page


def test_a_torn_last_line_is_skipped_and_no_decisions_means_no_report(tmp_path):
    log = tmp_path / "decisions" / "pricing.jsonl"
    assert report.write_report(log, tmp_path / "reports", "pricing") is None
    log.parent.mkdir()
    entry = {"time": 1.0e9, "decision": "bootstrap", "version": "1", "prequential": {}}
    log.write_text(json.dumps(entry) + "\n" + '{"time": 1.0e9, "decis')
    assert len(report.read_decisions(log)) == 1
    assert report.write_all(tmp_path) == [tmp_path / "reports" / "pricing.png", tmp_path / "reports" / "pricing.html"]
