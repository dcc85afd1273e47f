"""README.md: short, its figures generated from the committed results, its links alive."""
import json
import re
import shutil
from pathlib import Path

import pytest

from bench import headline
from ops import generated

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_the_readme_figures_are_what_the_committed_results_say():
    assert headline.main(["--check"]) == 0, "run: python -m bench.headline --write"
    body = generated.block(README.read_text(), headline.BLOCK)
    assert body == headline.table() and body.count("\n") >= 10  # a row per claim, not an empty block


def test_a_changed_result_makes_the_readme_stale(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(headline.RESULTS, results)
    serving = json.loads((results / "serving.json").read_text())
    swap = next(r for r in serving["results"] if r["model"] == "twotower" and r["target"] == "server-hot-swap")
    swap["p99_vs_steady"] = 9.87
    (results / "serving.json").write_text(json.dumps(serving))
    table = headline.table(results)
    assert "9.87x" in table and table != headline.table()
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text())
    assert not generated.is_fresh(readme, headline.BLOCK, table)
    generated.write_block(readme, headline.BLOCK, table)
    assert generated.is_fresh(readme, headline.BLOCK, table)


def test_every_figure_row_names_its_run_and_section():
    doc = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    for row in headline.rows():
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row.date), row
        assert f'<a id="{row.section}"></a>' in doc, f"docs/BENCHMARKS.md has no section {row.section}"


def test_the_readme_is_short_and_says_how_to_run_and_test():
    text = README.read_text()
    assert len(text.encode()) < 10_000
    assert "make up" in text and "make test" in text  # .ci/run runs `make test`
    assert re.search(r"`make test`\s+takes\s+[^.]*?\b(minutes?|min)\b", text), "say how long `make test` takes"


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_lead_to_files_and_anchors_that_exist(doc):
    path = ROOT / doc
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{doc}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            text = dest.read_text()
            headings = {_anchor(h) for h in re.findall(r"(?m)^#+ (.+)$", text)}
            ids = set(re.findall(r'<a id="([^"]+)"></a>', text))
            assert anchor in headings | ids, f"{doc}: link to {target}: no such anchor"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_new_recommender_protocol_replaces_the_earlier_ones_row(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(headline.RESULTS, results)
    (results / "recommender.json").write_text(json.dumps({"date": "2026-01-01", "targets": {}}))  # unreadable if used
    (results / "eval_recommender.json").write_text(json.dumps({"date": "2031-01-01T00:00:00+00:00", "comparison": {
        "all": {"strongest_baseline": "tifu-knn", "model_hr@10": 0.5, "baseline_hr@10": 0.45, "ratio": 1.11,
                "target_ratio": 1.1, "met": True}}}))
    (row,) = [r for r in headline.rows(results) if r.section == "eval-recommender"]
    assert row.measured == "0.500 / 0.450 (1.110x)" and row.date == "2031-01-01" and "tifu-knn" in row.what
