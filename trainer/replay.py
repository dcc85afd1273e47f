"""Feed logged interactions through the live loop, as a storefront would.

    python -m trainer replay export --domain fraud --out var/fraud-events.jsonl [--rows 20000] [--label-delay-s 3600]
    python -m trainer replay run --domain fraud --events var/fraud-events.jsonl --target 127.0.0.1:50051 [--speed 60]
                                 [--events-out var/fraud-replay.csv]

Event file format (JSON Lines, one interaction per line, in time order):

    {"ts": 1700000000.0,                       event time of the request, Unix seconds
     "domain": "fraud",
     "request": {...},                          the domain request, protobuf JSON
                                                (fraud: ScoreTransactionRequest)
     "outcome": {"delay_s": 3600.0,             when the label arrives, seconds after ts
                 "label": {...}}}               the domain outcome without prediction_id
                                                (fraud: {"is_fraud": true, "source": "chargeback"})

`run` sends each request through the service's domain API at its time (scaled by --speed:
60 = an hour of events per minute; 0 = as fast as possible, keeping the event-time order
of requests and labels), reports each label through the outcome RPC once its delay has
passed (with the prediction_id the service returned), and prints prequential metrics as
it goes: every prediction is scored by the version serving at that moment, before its label
is learned. A progress line is short (labels, metrics so far, events scored, rate, the
version serving now); the full picture is in --events-out, one row per event (CSV, or JSON
Lines when the name ends in .jsonl), written when its label is reported:

    event_ts         the event's time (Unix seconds): sort on it to cut windows
    prediction_id    as the service returned it
    transaction_id   from the request
    model_version    the version that scored it
    score            the served fraud_probability
    label            1 fraud, 0 not

Rows come in label order (event time + label delay), not request order.
"""
from __future__ import annotations

import argparse
import csv
import heapq
import json
import sys
import time
from pathlib import Path
from typing import IO, Iterator

import grpc
import numpy as np
from google.protobuf import json_format

from protos.fraud.v1 import fraud_pb2, fraud_pb2_grpc


def export_fraud(out: Path, start_row: int | None, rows: int, label_delay_s: float, t0: float | None) -> int:
    """Write the creditcard stream the bootstrap did not train on as replayable events.

    The dataset's clock (seconds since its first transaction) is shifted so that the first
    exported event happens at t0 (default: so that the last one happens now)."""
    from trainer.domains.fraud_bootstrap import fraud_stream_rows
    from trainer.domains.fraud import FEATURES

    X, y, t = fraud_stream_rows()
    start = 0 if start_row is None else start_row
    stop = min(start + rows, len(y))
    if start >= stop:
        raise SystemExit(f"--start-row {start} is past the {len(y)} replayable rows")
    t0 = (time.time() - float(t[stop - 1] - t[start])) if t0 is None else t0
    t = t0 + (t - t[start])
    n = 0
    with open(out, "w") as f:
        for i in range(start, stop):
            req = fraud_pb2.ScoreTransactionRequest(transaction_id=f"cc-{i}", amount=float(X[i, -1]),
                                                    timestamp=float(t[i]),
                                                    features={k: float(v) for k, v in zip(FEATURES, X[i, :-1])})
            f.write(json.dumps({"ts": float(t[i]), "domain": "fraud",
                                "request": json_format.MessageToDict(req),
                                "outcome": {"delay_s": label_delay_s,
                                            "label": {"is_fraud": bool(y[i]), "source": "chargeback"}}}) + "\n")
            n += 1
    return n


def read_events(path: Path) -> Iterator[dict]:
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
                float(event["ts"])
                event["request"], event["outcome"]["label"]
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{lineno}: not a replay event ({e!r}); see `python -m trainer replay --help`")
            yield event


class Prequential:
    """Scores as served vs labels as they arrive."""

    def __init__(self, clock=time.monotonic) -> None:
        self.p: list[float] = []
        self.y: list[float] = []
        self.versions: dict[str, int] = {}  # version -> events it scored
        self.version = ""  # the version that scored the latest event
        self.scored = 0
        self.clock = clock
        self.t0 = clock()

    def served(self, version: str) -> None:
        self.versions[version] = self.versions.get(version, 0) + 1
        self.version = version
        self.scored += 1

    def add(self, p: float, y: bool) -> None:
        self.p.append(p)
        self.y.append(1.0 if y else 0.0)

    def line(self) -> str:
        """One short progress line: it is printed every --report-every labels, so nothing in it
        grows with the run (the per-version counts are in the final line and --events-out)."""
        from trainer.domains.fraud import pr_auc, recall_at_fpr

        y, p = np.array(self.y), np.array(self.p)
        rate = self.scored / max(self.clock() - self.t0, 1e-9)
        progress = f"scored={self.scored} rate={rate:.0f}/s version={self.version or '-'}"
        if y.sum() == 0:
            return f"labels={len(y)} frauds=0 {progress}"
        return (f"labels={len(y)} frauds={int(y.sum())} pr_auc={pr_auc(y, p):.4f} "
                f"recall@1%fpr={recall_at_fpr(y, p, 0.01):.3f} {progress}")

    def summary(self) -> str:
        """The final line: the progress line plus how many versions served, first and last."""
        if not self.versions:
            return self.line()
        names = sorted(self.versions, key=lambda v: (len(v), v))  # registry versions are integers
        return f"{self.line()} versions_served={len(names)} ({names[0]}..{names[-1]})"


EVENT_FIELDS = ("event_ts", "prediction_id", "transaction_id", "model_version", "score", "label")


class EventWriter:
    """--events-out: one row per event, CSV or (for a .jsonl name) JSON Lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.jsonl = path.suffix == ".jsonl"
        self._f: IO[str] = open(path, "w", newline="")
        self._csv = None if self.jsonl else csv.writer(self._f)
        if self._csv is not None:
            self._csv.writerow(EVENT_FIELDS)
        self.rows = 0

    def write(self, event_ts: float, prediction_id: str, transaction_id: str, model_version: str,
              score: float, label: bool) -> None:
        row = (event_ts, prediction_id, transaction_id, model_version, score, int(label))
        if self._csv is not None:
            self._csv.writerow(row)
        else:
            self._f.write(json.dumps(dict(zip(EVENT_FIELDS, row))) + "\n")
        self.rows += 1

    def close(self) -> None:
        self._f.close()


def run_fraud(events: Path, target: str, speed: float, report_every: int, timeout_s: float,
              events_out: Path | None = None) -> Prequential:
    channel = grpc.insecure_channel(target)
    stub = fraud_pb2_grpc.FraudStub(channel)
    stats = Prequential()
    writer = EventWriter(events_out) if events_out is not None else None
    # (label time, seq, prediction_id, label, served p, event time, transaction id, version)
    due: list[tuple[float, int, str, dict, float, float, str, str]] = []
    wall0 = time.monotonic()
    ev0: float | None = None
    seq = 0

    def wait_for(ev_time: float) -> None:
        if speed > 0:
            delay = wall0 + (ev_time - ev0) / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def send_due(until: float) -> None:
        while due and due[0][0] <= until:
            ev_time, _, pid, label, p, ts, tx, version = heapq.heappop(due)
            wait_for(ev_time)
            outcome = json_format.ParseDict(label, fraud_pb2.FraudOutcome())
            outcome.prediction_id = pid
            stub.ReportOutcome(outcome, timeout=timeout_s)
            stats.add(p, outcome.is_fraud)
            if writer is not None:
                writer.write(ts, pid, tx, version, p, outcome.is_fraud)
            if len(stats.y) % report_every == 0:
                print(f"[replay] {stats.line()}", flush=True)

    try:
        for event in read_events(events):
            ts = float(event["ts"])
            if ev0 is None:
                ev0 = ts
            send_due(ts)
            wait_for(ts)
            req = json_format.ParseDict(event["request"], fraud_pb2.ScoreTransactionRequest())
            resp = stub.ScoreTransaction(req, timeout=timeout_s)
            stats.served(resp.model.version)
            seq += 1
            heapq.heappush(due, (ts + float(event["outcome"].get("delay_s", 0.0)), seq, resp.prediction_id,
                                 event["outcome"]["label"], resp.fraud_probability, ts, req.transaction_id,
                                 resp.model.version))
        send_due(float("inf"))
    finally:
        # Rows already written stay readable if the run stops half way (a service down, ^C).
        if writer is not None:
            writer.close()
        channel.close()
    print(f"[replay] done: {stats.summary()}", flush=True)
    if writer is not None:
        print(f"[replay] {writer.rows} events written to {writer.path}", flush=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write real events (the part of the dataset bootstrap did not use)")
    e.add_argument("--domain", choices=["fraud"], required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--start-row", type=int, default=None, help="first row of the replay part (default 0)")
    e.add_argument("--rows", type=int, default=20_000)
    e.add_argument("--label-delay-s", type=float, default=3600.0)
    e.add_argument("--t0", type=float, default=None, help="Unix time of the first event (default: the last is now)")
    r = sub.add_parser("run", help="send events through the live service and report their outcomes")
    r.add_argument("--domain", choices=["fraud"], required=True)
    r.add_argument("--events", type=Path, required=True)
    r.add_argument("--target", default="127.0.0.1:50051", help="the domain service")
    r.add_argument("--speed", type=float, default=0.0, help="event seconds per wall second; 0 = no waiting")
    r.add_argument("--report-every", type=int, default=1000)
    r.add_argument("--timeout-s", type=float, default=10.0)
    r.add_argument("--events-out", type=Path, default=None,
                   help="write one row per event (event_ts, prediction_id, transaction_id, model_version, score, "
                        "label): CSV, or JSON Lines for a .jsonl name")
    args = ap.parse_args(argv)
    if args.cmd == "export":
        n = export_fraud(args.out, args.start_row, args.rows, args.label_delay_s, args.t0)
        print(f"wrote {n} events to {args.out}")
        return 0
    if args.speed < 0:
        ap.error("--speed must be >= 0")
    run_fraud(args.events, args.target, args.speed, args.report_every, args.timeout_s, args.events_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
