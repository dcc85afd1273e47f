"""bench.suite: a step's output, command, date and machine become its BENCHMARKS.md section."""
import json
import sys

from bench import suite


def test_a_step_is_recorded_and_assembled_into_the_document(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "SECTIONS", tmp_path / "sections")
    monkeypatch.setattr(suite, "DOC", tmp_path / "docs" / "BENCHMARKS.md")
    step = suite.Step("serving", "Serving title", ("-c", "print('| c | req/s |'); print('|---|---|'); print('| 32 | 2,982 |')"),
                      "what it measures")
    monkeypatch.setattr(suite, "STEPS", [step, suite.Step("loop", "never run", ("-c", "pass"), "x")])
    monkeypatch.setattr(suite, "BY_NAME", {"serving": step})
    assert suite.run_step(step, python=sys.executable) == 0
    meta = json.loads((tmp_path / "sections" / "serving.json").read_text())
    assert meta["exit_status"] == 0 and meta["machine"]["cpu_count"] >= 1
    doc = suite.build_doc()
    assert "## Serving title" in doc and "| 32 | 2,982 |" in doc and "command: `python -c" in doc
    assert "never run" not in doc  # a step never run has no section
    assert suite.main(["--docs-only"]) == 0 and (tmp_path / "docs" / "BENCHMARKS.md").read_text() == doc


def test_a_failing_step_is_recorded_with_its_exit_status(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "SECTIONS", tmp_path / "sections")
    step = suite.Step("loop", "Loop", ("-c", "import sys; print('partial'); sys.exit(3)"), "x")
    monkeypatch.setattr(suite, "STEPS", [step])
    assert suite.run_step(step, python=sys.executable) == 3
    assert "exit 3" in suite.build_doc()
