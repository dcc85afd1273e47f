"""Per-domain learning report: prequential metrics over time, a marker at every published version.

    python -m trainer report [--workdir var/trainer]     # render every domain's report now

(and print the click calibration per version of the domains that report it: the recommender)

The trainer refreshes `<workdir>/reports/<model>.png` and `<model>.html` after learning
rounds (at most every `report_interval_s`), from the decision log the learner writes
(`<workdir>/decisions/<model>.jsonl`: one entry per bootstrap, published or refused round).
Top panel: the serving model's prequential metrics (each label scored by the version that
served it, before it was learned) over the learner's recent window; green lines mark the
versions published, red crosses the candidates the gate refused, orange bands the spans the
drift detector (trainer/drift.py) reported drift (rounds with "drift": true), triangles the canary
decisions on live labels (trainer/canary.py: promoted up, rolled back or timed out down; the page
lists them one per line). Bottom panel: the gate's
holdout metric, candidate against serving. The HTML page embeds the chart, lists the latest
decisions with their figures and reasons, and reloads itself every 10 s.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

MAX_LINES = 4  # prequential metrics drawn per chart (the first ones the domain reports)


def read_decisions(path: Path) -> list[dict[str, Any]]:
    """The decision log's entries; a torn last line (crash mid-write) is skipped."""
    out = []
    if not Path(path).exists():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _series(entries: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Every numeric prequential metric as a (time, value) series."""
    series: dict[str, list[tuple[float, float]]] = {}
    for e in entries:
        for k, v in (e.get("prequential") or {}).items():
            if k == "window_rows" or not isinstance(v, (int, float)) or v != v:
                continue
            series.setdefault(k, []).append((e["time"], float(v)))
    return series


def _metric_series(series: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    """The rates (all values in [0, 1]): counts (rows, frauds: whole numbers) and losses (their
    own axis) are left out."""
    rates = {k: s for k, s in series.items() if "loss" not in k and all(0.0 <= v <= 1.0 for _, v in s)
             and not all(v == int(v) for _, v in s)}
    return dict(list(rates.items())[:MAX_LINES])


def _loss_series(series: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    return {k: s for k, s in series.items() if "loss" in k}


def drift_spans(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spans of consecutive rounds that ran in drift: start and end time (the first round
    out of drift, or the last round while it lasts), rounds, and the detector's figures at
    the start and at the end."""
    spans: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for e in entries:
        if "drift" not in e:  # the bootstrap: no detector yet
            continue
        det = e.get("drift_detector") or {}
        if e["drift"]:
            if current is None:
                current = {"start": e["time"], "end": e["time"], "rounds": 0, "ongoing": True,
                           "reference_loss": det.get("reference_loss"), "peak_recent_loss": det.get("recent_loss")}
                spans.append(current)
            current["end"] = e["time"]
            current["rounds"] += 1
            rl = det.get("recent_loss")
            if rl is not None and (current["peak_recent_loss"] is None or rl > current["peak_recent_loss"]):
                current["peak_recent_loss"] = rl
            current["labels_in_drift"] = det.get("labels_in_drift")
        elif current is not None:
            current.update(end=e["time"], ongoing=False, recovered_loss=det.get("recent_loss"))
            current = None
    return spans


def render_png(model: str, entries: Sequence[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = entries[0]["time"] if entries else 0.0

    def minutes(t: float) -> float:
        return (t - t0) / 60.0

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=(3, 2))
    series = _series(entries)
    for name, points in _metric_series(series).items():
        top.plot([minutes(t) for t, _ in points], [v for _, v in points], marker=".", label=name)
    published = [e for e in entries if e.get("decision") in ("published", "bootstrap") and e.get("version")]
    for e in published:
        for ax in (top, bottom):
            ax.axvline(minutes(e["time"]), color="tab:green", alpha=0.35, linewidth=1)
    for e in published[-12:]:  # label the newest ones; older labels would overlap
        top.annotate(f"v{e['version']}", (minutes(e["time"]), 1.0), xycoords=("data", "axes fraction"),
                     fontsize=7, color="tab:green", rotation=90, va="top", ha="right")
    for i, span in enumerate(drift_spans(entries)):
        for ax in (top, bottom):
            ax.axvspan(minutes(span["start"]), minutes(span["end"]), color="tab:orange", alpha=0.18,
                       label="drift" if ax is top and i == 0 else None)
    refused = [e for e in entries if e.get("decision") == "refused"]
    if refused:
        top.scatter([minutes(e["time"]) for e in refused], [0.02] * len(refused), marker="x", color="tab:red",
                    transform=top.get_xaxis_transform(), label="refused candidate", zorder=3)
    for verdict, marker, color in (("canary_promoted", "^", "tab:green"), ("canary_rolled_back", "v", "tab:red"),
                                   ("canary_timeout", "v", "tab:gray")):
        hits = [e for e in entries if e.get("decision") == verdict]
        if hits:
            top.scatter([minutes(e["time"]) for e in hits], [0.06] * len(hits), marker=marker, color=color,
                        transform=top.get_xaxis_transform(), label=verdict.replace("_", " "), zorder=3)
    losses = _loss_series(series)
    if losses:
        right = top.twinx()
        for name, points in losses.items():
            right.plot([minutes(t) for t, _ in points], [v for _, v in points], linestyle="--", color="tab:gray",
                       label=name)
        right.set_ylabel(", ".join(losses) + " (dashed)")
    top.set_ylabel("prequential (served version)")
    top.set_title(f"{model}: learning report - {len(published)} versions, {len(refused)} refused")
    if top.get_legend_handles_labels()[0]:
        top.legend(loc="lower left", fontsize=8)
    rounds = [e for e in entries if "candidate" in e and "serving" in e]
    if rounds:
        metric = rounds[-1].get("gate_metric", "gate metric")
        xs = [minutes(e["time"]) for e in rounds]
        bottom.plot(xs, [e["candidate"] for e in rounds], marker=".", label=f"candidate {metric}")
        bottom.plot(xs, [e["serving"] for e in rounds], marker=".", label=f"serving {metric}", alpha=0.7)
        bottom.legend(loc="lower left", fontsize=8)
    bottom.set_ylabel("gate holdout")
    bottom.set_xlabel("minutes since the first decision")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def render_html(model: str, entries: Sequence[dict[str, Any]], png: bytes, latest: int = 30) -> str:
    rows = []
    for e in reversed(entries[-latest:]):
        preq = e.get("prequential") or {}
        first = next(((k, v) for k, v in preq.items() if k != "window_rows"), ("", None))
        rows.append("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in (
            dt.datetime.fromtimestamp(e["time"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            e.get("decision"), e.get("version"), e.get("new_labels", e.get("bootstrap_rows")),
            {True: "yes", False: "no"}.get(e.get("drift"), ""),
            e.get("gate_metric"), e.get("candidate"), e.get("serving"),
            f"{first[0]} {_fmt(first[1])}" if first[0] else "", "; ".join(e.get("reasons") or ()))) + "</tr>")
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    img = base64.b64encode(png).decode()
    head = "".join(f"<th>{h}</th>" for h in ("time (UTC)", "decision", "version", "labels", "drift", "gate metric",
                                             "candidate", "serving", "prequential", "reasons"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>{html.escape(model)} learning report</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}</style></head>
<body><h1>{html.escape(model)}: learning report</h1>
<p>Updated {now}; {len(entries)} decisions. Prequential metrics: each label scored by the version that served it.</p>
{_drift_html(entries)}
{_canary_html(entries)}
{_calibration_html(entries)}
<img alt="learning report chart" src="data:image/png;base64,{img}">
<h2>Latest decisions</h2><table><tr>{head}</tr>{''.join(rows)}</table></body></html>
"""


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _drift_html(entries: Sequence[dict[str, Any]]) -> str:
    spans = drift_spans(entries)
    if not spans:
        return "<p>No drift reported.</p>"
    items = []
    for s in spans:
        end = "ongoing" if s["ongoing"] else f"until {_utc(s['end'])} UTC"
        items.append(f"<li>from {_utc(s['start'])} UTC, {end}: {s['rounds']} rounds in drift; pre-drift loss "
                     f"{html.escape(_fmt(s['reference_loss']))}, peak recent loss {html.escape(_fmt(s['peak_recent_loss']))}"
                     + (f", back to {html.escape(_fmt(s.get('recovered_loss')))}" if not s["ongoing"] else "") + "</li>")
    return f"<h2>Drift</h2><ul>{''.join(items)}</ul>"


CALIBRATION_KEYS = ("mean_served_click_p", "click_rate", "click_ece")  # RecommenderModel.prequential_metrics
GATE_CALIBRATION_KEYS = ("mean_click_p", "click_rate", "click_ece")  # RecommenderModel.report_metrics


def calibration_rows(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per published version of a domain that reports click calibration (the recommender): on the
    gate's window when it was published, its mean click probability, the observed click rate and
    the expected calibration error; served, the same figures of the prequential window at the
    last round that ended while it was the newest published version (the round that publishes its
    successor included; each label scored by the version that served it, so the window's first
    rows may be its predecessor's; none before a round ended). Empty when the domain reports none."""
    rows: list[dict[str, Any]] = []
    for e in entries:
        if e.get("kind") == "canary":
            continue
        # a round's prequential window was served before the round ended: by the version newest
        # until then, whatever the round decided (the version it publishes has served nothing yet)
        preq = e.get("prequential") or {}
        if rows and all(preq.get(k) is not None for k in CALIBRATION_KEYS):
            rows[-1].update({f"served_{k}": preq[k] for k in CALIBRATION_KEYS})
            rows[-1]["served_rows"] = preq.get("window_rows")
        metrics = e.get("metrics") or {}
        if e.get("version") is not None and e.get("decision") in ("bootstrap", "published"):
            rows.append({"version": str(e["version"]), "published": e["time"],
                         **{f"gate_{k}": metrics.get(k) for k in GATE_CALIBRATION_KEYS}})
    has = lambda r: any(r.get(f"gate_{k}") is not None for k in GATE_CALIBRATION_KEYS) or "served_click_ece" in r  # noqa: E731
    return [r for r in rows if has(r)]


def calibration_table(entries: Sequence[dict[str, Any]], latest: int = 30) -> list[str]:
    """calibration_rows as a Markdown table, oldest version first (what `python -m trainer
    report`, the demo and the recommend load test print); empty when the domain reports none."""
    rows = calibration_rows(entries)[-latest:]
    if not rows:
        return []
    out = ["| version | published (UTC) | served: mean click p | served: click rate | served: ECE | served rows "
           "| gate window: mean click p | gate window: click rate | gate window: ECE |", "|---" * 9 + "|"]
    for r in rows:
        cells = (r["version"], _utc(r["published"]), r.get("served_mean_served_click_p"), r.get("served_click_rate"),
                 r.get("served_click_ece"), r.get("served_rows"), r.get("gate_mean_click_p"), r.get("gate_click_rate"),
                 r.get("gate_click_ece"))
        out.append("| " + " | ".join(_fmt(c) or "-" for c in cells) + " |")
    return out


def print_calibration(workdir: Path, out=None) -> bool:
    """Print each domain's click calibration table (calibration_table) from the decision logs
    under workdir; False when no domain has one."""
    import sys

    out = out or sys.stdout
    found = False
    for decisions in sorted((Path(workdir) / "decisions").glob("*.jsonl")):
        table = calibration_table(read_decisions(decisions))
        if table:
            found = True
            print(f"{decisions.stem}: click calibration per version (served: the prequential window of the last round "
                  "while it was the newest; gate window: when it was published)", file=out)
            print("\n".join(table), file=out, flush=True)
    return found


def _calibration_html(entries: Sequence[dict[str, Any]]) -> str:
    rows = calibration_rows(entries)
    if not rows:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("version", "published (UTC)", "served: mean click p", "served: click rate",
                                             "served: ECE", "served rows", "gate window: mean click p",
                                             "gate window: click rate", "gate window: ECE"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in (
        r["version"], _utc(r["published"]), r.get("served_mean_served_click_p"), r.get("served_click_rate"),
        r.get("served_click_ece"), r.get("served_rows"), r.get("gate_mean_click_p"), r.get("gate_click_rate"),
        r.get("gate_click_ece"))) + "</tr>" for r in reversed(rows[-30:]))
    return ("<h2>Click calibration per version</h2><p>Mean click probability against the observed click rate "
            "(shown items, clicked or not) and the expected calibration error (10 bins).</p>"
            f"<table><tr>{head}</tr>{body}</table>")


def canary_lines(entries: Sequence[dict[str, Any]]) -> list[str]:
    """One line per canary decision on live labels (trainer/canary.py): when, which version against
    which champion, how it met traffic, the verdict, the labels it rested on and the first reason."""
    out = []
    for e in entries:
        if e.get("kind") != "canary":
            continue
        ev = e.get("canary") or {}
        arms = ", ".join(f"{arm} {v.get('labels')} labels/{v.get('positives')} positives"
                         for arm, v in (ev.get("arms") or {}).items())
        mode = e.get("mode", "canary") + (f" {e.get('share'):g}" if e.get("mode") == "canary" and e.get("share") else "")
        out.append(f"{_utc(e['time'])} UTC: version {e.get('version')} ({mode}) vs champion {e.get('champion')}: "
                   f"{str(e.get('decision', '')).removeprefix('canary_').replace('_', ' ')} after "
                   f"{ev.get('elapsed_s', 0):.0f} s on {arms or 'no labels'}"
                   + (f"; {(e.get('reasons') or [''])[0]}" if e.get("reasons") else ""))
    return out


def _canary_html(entries: Sequence[dict[str, Any]]) -> str:
    lines = canary_lines(entries)
    if not lines:
        return "<p>No canary decided yet.</p>"
    return "<h2>Canary decisions (live labels)</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # a reader (browser, dashboard) never sees half a file


def write_report(decisions_path: Path, out_dir: Path, model: str) -> tuple[Path, Path] | None:
    """Render one model's report; None when it has no decisions yet."""
    entries = read_decisions(decisions_path)
    if not entries:
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = render_png(model, entries)
    png_path, html_path = out_dir / f"{model}.png", out_dir / f"{model}.html"
    _atomic_write(png_path, png)
    _atomic_write(html_path, render_html(model, entries, png).encode())
    return png_path, html_path


def write_all(workdir: Path) -> list[Path]:
    written = []
    for decisions in sorted((Path(workdir) / "decisions").glob("*.jsonl")):
        out = write_report(decisions, Path(workdir) / "reports", decisions.stem)
        if out:
            written += list(out)
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trainer report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="var/trainer")
    args = ap.parse_args(argv)
    written = write_all(Path(args.workdir))
    for p in written:
        print(p)
    if not written:
        print(f"no decisions under {args.workdir}/decisions yet")
    print_calibration(Path(args.workdir))
    return 0
