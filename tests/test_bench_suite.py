"""bench.suite: a step's output, command, date and machine become its BENCHMARKS.md section,
and the README's figures are regenerated from the results."""
import json
import shutil
import sys

from bench import headline, suite


def test_a_step_is_recorded_and_assembled_into_the_document(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "SECTIONS", tmp_path / "sections")
    monkeypatch.setattr(suite, "DOC", tmp_path / "docs" / "BENCHMARKS.md")
    step = suite.Step("serving", "Serving title", ("-c", "print('| c | req/s |'); print('|---|---|'); print('| 32 | 2,982 |')"),
                      "what it measures")
    monkeypatch.setattr(suite, "STEPS", [step, suite.Step("loop", "never run", ("-c", "pass"), "x")])
    monkeypatch.setattr(suite, "BY_NAME", {"serving": step})
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- figures:begin -->\n<!-- figures:end -->\n\nmore\n")
    monkeypatch.setattr(suite, "README", readme)
    assert suite.run_step(step, python=sys.executable) == 0
    meta = json.loads((tmp_path / "sections" / "serving.json").read_text())
    assert meta["exit_status"] == 0 and meta["machine"]["cpu_count"] >= 1
    doc = suite.build_doc()
    assert "## Serving title" in doc and "| 32 | 2,982 |" in doc and "command: `python -c" in doc
    assert "never run" not in doc  # a step never run has no section
    assert suite.main(["--docs-only"]) == 0 and (tmp_path / "docs" / "BENCHMARKS.md").read_text() == doc
    assert readme.read_text() == f"# x\n\n<!-- figures:begin -->\n{headline.table()}<!-- figures:end -->\n\nmore\n"


def test_the_readme_figures_follow_the_results_a_run_wrote(tmp_path, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(headline.RESULTS, results)
    fraud_serving = json.loads((results / "fraud_serving.json").read_text())
    fraud_serving.update(p99_ratio=1.111, date="2031-01-02T03:04:05Z", feedback_off={"p99_ratio": 0.951})
    (results / "fraud_serving.json").write_text(json.dumps(fraud_serving))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- figures:begin -->\n<!-- figures:end -->\n")
    monkeypatch.setattr(suite, "README", readme)
    monkeypatch.setattr(suite, "RESULTS", results)
    monkeypatch.setattr(suite, "DOC", tmp_path / "BENCHMARKS.md")
    assert suite.main(["--docs-only"]) == 0
    row = next(line for line in readme.read_text().splitlines() if "ScoreTransaction" in line)
    assert "| 1.11x (feedback off: 0.95x) | <= 1.2x (met) | 2031-01-02 |" in row


def test_a_failing_step_is_recorded_with_its_exit_status(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "SECTIONS", tmp_path / "sections")
    step = suite.Step("loop", "Loop", ("-c", "import sys; print('partial'); sys.exit(3)"), "x")
    monkeypatch.setattr(suite, "STEPS", [step])
    assert suite.run_step(step, python=sys.executable) == 3
    assert "exit 3" in suite.build_doc()
