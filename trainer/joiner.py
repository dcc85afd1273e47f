"""Join outcomes to the predictions that were served, so training uses exactly the features served.

`Joiner.poll()` reads the outcomes stored after its position, looks up each one's served
prediction by prediction_id through the log's index, and returns JoinedExamples. Per outcome:

- matched: the served prediction is in the log and the label arrived inside the domain's window
  (occurred_at - served_at <= window) -> emitted;
- late: the label came after the window (a chargeback after the fraud window, a click long after
  the recommendation was shown) -> counted and dropped;
- duplicate: an outcome with the same identity (as its domain's plug-in defines it,
  trainer/plugins.py: e.g. fraud (prediction_id, is_fraud)) is stored at a lower offset ->
  counted and dropped. The first occurrence in log order is the one emitted;
  that is a pure function of the log, so a resent outcome (new record_id, same label) is never
  emitted twice, not across restarts either, without the joiner keeping any state of its own;
- superseded: the domain's plug-in says the latest outcome wins (fraud: a chargeback later
  reversed; pricing: a sale later corrected; `TrainerDomain.outcome_slot`): an outcome is dropped when
  its slot holds a non-duplicate outcome with a later occurred_at (ties: the higher offset) in the
  log already. So when both labels of a prediction are in the log before the joiner gets to them,
  only the latest is learned. A correction that arrives after the earlier label was emitted is
  emitted too, with `supersedes` naming the earlier outcomes' offsets (a model cannot unlearn; a
  learner may drop them from its replay);
- pending: the served prediction is not in the log yet (another replica's feedback stream is
  behind, or spooled during an outage) -> kept and looked up again on later polls, until
  `grace_s` after the log received the outcome; then (or when more than `max_pending` are
  waiting, oldest first) it is counted unmatched and dropped.

Labels a served prediction implies (a domain plug-in's `served_labels`, trainer/plugins.py: the
recommender's items shown and not clicked): a second position follows the served predictions of
those domains in log order; once a prediction's label window (plus `grace_s`, for outcomes
delivered late to the log) has closed by the clock, the plug-in is given it with the outcomes of
it that arrived inside the window, and the labels it returns are emitted as JoinedExamples whose
offset is the served prediction's (`derived` = True). The position stops at the first prediction
whose window is still open, so each served prediction is asked exactly once.

Position and restarts. The joiner does not commit its own offset: the learner stores
`checkpoint()` together with its model checkpoint (e.g. `log.commit_offset(consumer, cp["offset"],
cp)` right after the model is durable, or in the model's manifest) and gives it back to
`restore()` after a restart. A checkpoint is the read position, the served position and the offsets of the outcomes
still pending at that moment: everything at or below the position was emitted or dropped except
those, so a restored joiner emits every outcome exactly once. `restore_committed()` restores from
the log's consumer offsets (the constructor does it).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import Counter, Gauge, Histogram

from google.protobuf.message import Message

from protos.feedback.v1 import feedback_pb2 as fb
from trainer.eventlog import OUTCOME, SERVED, EventLog, LogEntry
from trainer.plugins import Domains, default_domains

log = logging.getLogger(__name__)

JOINED = Counter("storefront_trainer_joined_total",
                 "Outcomes processed by the joiner, by domain and result (matched, late, unmatched, duplicate, "
                 "superseded)",
                 ["domain", "result"])
DERIVED = Counter("storefront_trainer_derived_labels_total",
                  "Labels a domain plug-in derived from a served prediction once its label window closed "
                  "(recommender: items shown and not clicked)", ["domain"])
PENDING = Gauge("storefront_trainer_join_pending", "Outcomes waiting for their served prediction")
LABEL_DELAY = Histogram("storefront_trainer_label_delay_seconds",
                        "occurred_at of an outcome minus served_at of its prediction, matched outcomes",
                        ["domain"], buckets=(1, 10, 60, 300, 1800, 3600, 4 * 3600, 86400, 7 * 86400, 14 * 86400,
                                             30 * 86400))


def parse_windows(spec: str, base: Mapping[str, float]) -> dict[str, float]:
    """'fraud=1209600,recommender=1800' -> windows (seconds), over `base` (each domain's plug-in
    window: `Domains.windows()`); a domain not in base is an error."""
    out = dict(base)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in base:
            raise ValueError(f"window {part!r}: expected <domain>=<seconds> with domain one of {list(base)}")
        seconds = float(value)
        if not seconds > 0:
            raise ValueError(f"window {part!r}: seconds must be > 0")
        out[name] = seconds
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class JoinedExample:
    """One outcome with the prediction it belongs to, exactly as served."""
    domain: str                      # the domain's registered name
    prediction_id: str
    offset: int                      # log offset of the outcome (the learner's progress marker)
    served_offset: int               # log offset of the served prediction
    served: fb.ServedPrediction      # model inputs/outputs, domain request/response, model version
    outcome: fb.Outcome              # the label as forwarded (times, the packed domain message)
    model_name: str
    model_version: str               # the version that served the prediction
    label_delay_s: float             # outcome.occurred_at - served.served_at (>= 0; clocks may skew)
    label: Message                   # the domain outcome message, unpacked (its plug-in's outcome_type)
    supersedes: tuple[int, ...] = ()  # offsets of earlier labels of the same slot this one corrects
    derived: bool = False            # implied by the served prediction (plug-in served_labels), not sent


@dataclasses.dataclass(slots=True)
class _Pending:
    entry: LogEntry
    deadline: float


class Joiner:
    """Outcome x served-prediction join over an EventLog.

    log: the event log (its `domains` are the plug-ins the joiner asks about identity and windows;
    outcomes of other domains are skipped). windows: label window per domain, seconds (missing
    domains get their plug-in's). domain: join only this domain's outcomes (None: all). consumer: the name
    its checkpoints are committed under. grace_s: how long (after the log received an outcome)
    to wait for its served prediction. max_pending: most outcomes kept waiting. clock: time.time.
    """

    def __init__(self, log: EventLog, windows: Mapping[str, float] | None = None, *, domain: str | None = None,
                 consumer: str | None = None, grace_s: float = 60.0, max_pending: int = 100_000,
                 clock: Callable[[], float] = time.time) -> None:
        self.domains: Domains = getattr(log, "domains", None) or default_domains()
        if domain is not None and domain not in self.domains:
            raise ValueError(f"domain {domain!r}: one of {list(self.domains)}")
        if grace_s < 0 or max_pending < 0:
            raise ValueError("grace_s and max_pending must be >= 0")
        self.log = log
        self.windows = {**self.domains.windows(), **(windows or {})}
        self.domain = domain
        self.consumer = consumer or ("joiner" if domain is None else f"joiner-{domain}")
        self.grace_s = grace_s
        self.max_pending = max_pending
        self.clock = clock
        self._position = 0
        self._served_position = 0  # served predictions at or below it were given to served_labels
        self._deriving = frozenset(n for n, d in self.domains.items()
                                   if d.served_labels is not None and (domain is None or n == domain))
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()  # by offset
        self._pending_checked_upto = 0  # log end when pending outcomes were last looked up
        # Totals since this object was made (replays after restore() count again).
        self.matched = 0
        self.late = 0
        self.unmatched = 0
        self.duplicates = 0
        self.superseded = 0
        self.derived = 0
        self._series: dict[tuple[str, str], Any] = {}
        self.restore_committed()

    # ------------------------------------------------------------ position

    @property
    def position(self) -> int:
        """Offset up to which the log has been read (outcomes at or below it are emitted, dropped,
        or listed in `pending_offsets`)."""
        return self._position

    @property
    def pending_offsets(self) -> list[int]:
        return list(self._pending)

    @property
    def served_position(self) -> int:
        """Offset up to which served predictions were given to their plug-in's served_labels."""
        return self._served_position

    def checkpoint(self) -> dict[str, Any]:
        """What to store with the model: {"offset": position, "pending": [offsets], "served_offset":
        served position} (JSON-able). A joiner that derives nothing has no served prediction left
        to derive from: its served position is its read position (retention keeps the events above
        a consumer's served_offset, trainer/eventlog.py)."""
        served = self._served_position if self._deriving else self._position
        return {"offset": self._position, "pending": list(self._pending), "served_offset": served}

    def restore(self, offset: int, pending: Iterable[int] = (), served_offset: int | None = None) -> None:
        """Continue from a checkpoint: read after `offset`; the outcomes at `pending` offsets
        (those <= offset that were waiting for their prediction) are looked up again; served
        predictions after `served_offset` are given to served_labels (None, a checkpoint from
        before served positions: `offset`, so no served prediction is asked twice)."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self._position = int(offset)
        self._served_position = int(offset if served_offset is None else served_offset)
        self._pending.clear()
        now = self.clock()
        for e in self.log.get(o for o in pending if 0 < o <= offset):
            if e.kind == OUTCOME and (self.domain is None or e.domain == self.domain):
                self._pending[e.offset] = _Pending(e, e.received_at + self.grace_s)
        self._pending_checked_upto = 0
        PENDING.set(len(self._pending))
        log.debug("%s restored at offset %d with %d pending (now %.0f)", self.consumer, offset,
                  len(self._pending), now)

    def restore_committed(self) -> None:
        """Restore from the checkpoint committed in the log under `consumer` (start when none)."""
        offset, meta = self.log.committed(self.consumer)
        self.restore(offset, (meta or {}).get("pending", ()), (meta or {}).get("served_offset"))

    def commit(self) -> None:
        """Commit `checkpoint()` under `consumer` in the log. Only for a caller whose progress is
        durable at this point (the learner, once its model checkpoint is written)."""
        cp = self.checkpoint()
        self.log.commit_offset(self.consumer, cp["offset"], cp)

    # ------------------------------------------------------------ joining

    def _count(self, domain: str, result: str, n: int = 1) -> None:
        series = self._series.get((domain, result))
        if series is None:
            series = self._series[(domain, result)] = JOINED.labels(domain, result)
        series.inc(n)

    def poll(self, limit: int = 1024) -> list[JoinedExample]:
        """Read up to `limit` new outcomes and return those that join now (plus pending ones whose
        prediction has arrived), in log order of the outcomes."""
        upto = self.log.end_offset()
        new = self.log.read(self._position, limit, domain=self.domain, kind=OUTCOME, upto=upto)
        next_position = new[-1].offset if len(new) >= limit else max(upto, self._position)
        if self.domain is None:  # a domain whose plug-in this trainer did not load is not joined
            new = [e for e in new if e.domain in self.domains]

        now = self.clock()
        waiting = list(self._pending.values()) if upto > self._pending_checked_upto else []
        # Every outcome (up to `upto`) of the predictions concerned: for duplicates (an outcome whose
        # identity is stored at a lower offset was, or will be, handled at that offset) and for
        # "the latest outcome of a slot wins".
        slots = self._slots(new + [p.entry for p in waiting], upto)
        fresh = []
        for e in new:
            if slots.is_duplicate(e):
                self.duplicates += 1
                self._count(e.domain, "duplicate")
            elif slots.superseded(e):
                self._supersede(e)
            else:
                fresh.append(e)
        still_waiting = []
        for p in waiting:
            if slots.superseded(p.entry):
                del self._pending[p.entry.offset]
                self._supersede(p.entry)
            else:
                still_waiting.append(p)
        waiting = still_waiting

        # Look the predictions up: the new outcomes', and the pending ones' when the log has grown.
        lookup = [e for e in fresh] + [p.entry for p in waiting]
        served = self._served(lookup)
        self._pending_checked_upto = upto

        out: list[JoinedExample] = []
        for p in waiting:
            s = served.get((p.entry.domain, p.entry.prediction_id))
            if s is not None:
                del self._pending[p.entry.offset]
                self._judge(p.entry, s, out, slots)
        for e in fresh:
            s = served.get((e.domain, e.prediction_id))
            if s is not None:
                self._judge(e, s, out, slots)
            else:
                self._pending[e.offset] = _Pending(e, e.received_at + self.grace_s)

        # Give up on outcomes whose prediction did not come in time, and beyond the bound.
        expired = [o for o, p in self._pending.items() if p.deadline <= now]
        overflow = len(self._pending) - len(expired) - self.max_pending
        if overflow > 0:
            expired += [o for o, p in self._pending.items() if p.deadline > now][:overflow]
        for o in expired:
            e = self._pending.pop(o).entry
            self.unmatched += 1
            self._count(e.domain, "unmatched")
        PENDING.set(len(self._pending))

        self._position = next_position
        if self._deriving:
            self._derive(now, upto, limit, out)
        out.sort(key=lambda x: x.offset)
        return out

    def _derive(self, now: float, upto: int, limit: int, out: list[JoinedExample]) -> None:
        """Give the served predictions whose window has closed to their plug-in's served_labels
        (see the module doc), up to `limit` of them, and emit what it returns."""
        entries = self.log.read(self._served_position, limit, domain=self.domain, kind=SERVED, upto=upto)
        closed: list[LogEntry] = []
        open_window = False
        for e in entries:
            if e.domain in self._deriving:
                if e.event_time + self.windows[e.domain] + self.grace_s > now:
                    # served in log order, so the next ones' windows are open too (a prediction
                    # stored late, from a spool, has an earlier served_at: it waits for this one)
                    open_window = True
                    break
                closed.append(e)
            self._served_position = e.offset
        if not open_window and len(entries) < limit:
            self._served_position = max(self._served_position, upto)
        by_domain: dict[str, list[LogEntry]] = collections.defaultdict(list)
        for e in closed:
            by_domain[e.domain].append(e)
        for name, served in by_domain.items():
            plugin = self.domains[name]
            window = self.windows[name]
            outcomes: dict[str, list[LogEntry]] = collections.defaultdict(list)
            for o in self.log.outcomes_for([s.prediction_id for s in served], name, upto=upto):
                outcomes[o.prediction_id].append(o)
            for s in served:
                record = s.record.served
                labels = [plugin.unpack_outcome(o.record.outcome) for o in outcomes.get(s.prediction_id, ())
                          if o.event_time - record.served_at <= window]
                derived = plugin.served_labels(record, labels)
                for label in derived:
                    # about what was shown then; known once the window closed
                    outcome = fb.Outcome(prediction_id=s.prediction_id, occurred_at=record.served_at, received_at=now)
                    outcome.domain_outcome.Pack(label)
                    out.append(JoinedExample(domain=name, prediction_id=s.prediction_id, offset=s.offset,
                                             served_offset=s.offset, served=record, outcome=outcome, label=label,
                                             model_name=record.model.name, model_version=record.model.version,
                                             label_delay_s=window, derived=True))
                if derived:
                    self.derived += len(derived)
                    DERIVED.labels(name).inc(len(derived))

    def _supersede(self, e: LogEntry) -> None:
        self.superseded += 1
        self._count(e.domain, "superseded")

    def _slots(self, entries: list[LogEntry], upto: int) -> "_Slots":
        by_domain: dict[str, list[str]] = collections.defaultdict(list)
        for e in entries:
            by_domain[e.domain].append(e.prediction_id)
        everything: list[LogEntry] = []
        for domain, pids in by_domain.items():
            everything += self.log.outcomes_for(pids, domain, upto=upto)
        return _Slots(everything, self.domains)

    def _served(self, entries: list[LogEntry]) -> dict[tuple[str, str], LogEntry]:
        by_domain: dict[str, list[str]] = collections.defaultdict(list)
        for e in entries:
            by_domain[e.domain].append(e.prediction_id)
        out: dict[tuple[str, str], LogEntry] = {}
        for domain, pids in by_domain.items():
            for pid, s in self.log.served_for(pids, domain=domain).items():
                out[(domain, pid)] = s
        return out

    def _judge(self, e: LogEntry, s: LogEntry, out: list[JoinedExample], slots: "_Slots") -> None:
        outcome = e.record.outcome
        served = s.record.served
        delay = outcome.occurred_at - served.served_at
        if delay > self.windows[e.domain]:
            self.late += 1
            self._count(e.domain, "late")
            return
        delay = max(0.0, delay)
        self.matched += 1
        self._count(e.domain, "matched")
        LABEL_DELAY.labels(e.domain).observe(delay)
        out.append(JoinedExample(domain=e.domain, prediction_id=e.prediction_id, offset=e.offset,
                                 served_offset=s.offset, served=served, outcome=outcome, label=slots.label(e),
                                 model_name=served.model.name, model_version=served.model.version,
                                 label_delay_s=delay, supersedes=slots.earlier(e)))

    def stats(self) -> dict[str, int]:
        return {"position": self._position, "matched": self.matched, "late": self.late,
                "unmatched": self.unmatched, "duplicates": self.duplicates, "superseded": self.superseded,
                "pending": len(self._pending), "derived": self.derived, "served_position": self._served_position}


class _Slots:
    """Identity and slot facts about a set of outcomes (all those of some predictions)."""

    def __init__(self, entries: list[LogEntry], domains: Domains) -> None:
        self._first: dict[str, int] = {}        # identity key -> lowest offset
        self._label: dict[int, Message] = {}    # offset -> the domain outcome message
        self._key: dict[int, str] = {}          # offset -> identity key
        self._slot: dict[int, str] = {}         # offset -> slot
        self._members: dict[str, list[LogEntry]] = collections.defaultdict(list)  # slot -> non-duplicates
        for e in sorted(entries, key=lambda x: x.offset):
            plugin = domains[e.domain]
            label = plugin.unpack_outcome(e.record.outcome)  # validated when it was appended
            self._label[e.offset] = label
            key = plugin.outcome_key(e.prediction_id, label)
            self._key[e.offset] = key
            if key in self._first:
                continue  # a duplicate never wins a slot
            self._first[key] = e.offset
            slot = plugin.outcome_slot(e.prediction_id, label)
            self._slot[e.offset] = slot
            self._members[slot].append(e)
        self._latest = {slot: max(m, key=lambda x: (x.event_time, x.offset)).offset
                        for slot, m in self._members.items()}

    def label(self, e: LogEntry) -> Message:
        return self._label[e.offset]

    def is_duplicate(self, e: LogEntry) -> bool:
        key = self._key.get(e.offset)
        return key is not None and self._first[key] < e.offset

    def superseded(self, e: LogEntry) -> bool:
        slot = self._slot.get(e.offset)
        return slot is not None and self._latest[slot] != e.offset

    def earlier(self, e: LogEntry) -> tuple[int, ...]:
        """Offsets of the other (earlier-stored) labels of e's slot."""
        slot = self._slot.get(e.offset)
        if slot is None:
            return ()
        return tuple(m.offset for m in self._members[slot] if m.offset < e.offset)
