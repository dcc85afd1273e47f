"""The trainer process: collector endpoint + per-domain joiner/learner loops.

    python -m trainer serve [--port 50050] [--workdir var/trainer] [--registry-dir var/registry]

Services stream served predictions and outcomes to the collector, which appends them to
the durable event log and acks. For each domain with a model checkpoint (made by
`python -m trainer bootstrap`), a loop polls that domain's joiner, hands the joined
examples to the learner, and runs an update-gate-publish round when one is due. Rounds
run in a worker thread, so the collector keeps acknowledging while a model trains.

Domains are plug-ins (trainer/plugins.py): the `domain_modules` setting lists the modules
that declare them (default the built-in three); this file names none. The settings, with each
plug-in's own (fraud: adv_*, recommender: catalog_path), are in trainer/settings.py.

Retention: every `retention_interval_s` the event log deletes what no consumer needs any more
(trainer/eventlog.py); each domain loop commits its learner's checkpointed progress as the log
consumer `learner-<domain>`, which is what retention goes by.

Redis mode (`event_log_url` = redis://...; DESIGN.md "Beyond one host"): the event log is
RedisEventLog (trainer/eventlog_redis.py), shared by every trainer replica, and every replica's
collector accepts feedback. Each domain is learned by one replica at a time: the one holding the
domain's LearnerLease (trainer/lease.py; its terms: trainer/ha.py). The others wait as standbys;
when the holder dies its lease runs out (lease_ttl_s) and a standby takes it, restores the domain's checkpoint from the
shared workdir and resumes from the position it records (= the offset committed in the log as
`learner-<domain>`), so no label is trained twice or skipped. The lease's fencing token is
checked before every checkpoint write and right before every registry publish (a holder that lost
the lease, e.g. paused past its TTL, raises LeaseLost there and writes nothing), and recorded in
each published manifest (extra "lease": token and owner). Retention runs on the replica that holds
the first domain's lease. workdir and registry_dir must be on a volume every replica mounts.

Shutdown (SIGTERM / SIGINT, `TrainerApp.stop`): the collector stops taking feedback (new streams
UNAVAILABLE; open ones end once what they read is acked, so clients spool the rest); no new round
starts; a round in progress gets `shutdown_round_grace_s` to finish (and publish), after which it
is abandoned at its commit point without checkpointing or publishing (the log says which; its
labels are learned after the restart); then the server stops, the log is closed and the process
exits 0. Nothing is published after "trainer stopped".
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from pathlib import Path
from typing import Awaitable, Callable

from prometheus_client import Counter, Gauge

from shared.registry import ModelRegistry, RegistryError
from shared.server import ServerApp
from shared.server.bootstrap import ABANDONABLE_THREAD
from trainer.collector import FeedbackCollector, add_collector
from trainer.eventlog import EventLog
from trainer.ha import DomainLeadership
from trainer.joiner import Joiner
from trainer.learner import Learner
from trainer.report import write_report
from trainer.settings import CoreTrainerSettings, TrainerSettings, trainer_settings_class  # noqa: F401 (importable here)
from trainer.shutdown import RoundCancel, RoundCancelled

log = logging.getLogger(__name__)

# decision: published, refused (worse than the champion with confidence, or failed export checks),
# deferred (the gate's window cannot tell yet); the decision log holds each one's evidence
ROUNDS = Counter("storefront_trainer_rounds_total", "Learning rounds by domain (the model) and gate decision",
                 ["domain", "decision"])
DRIFT = Gauge("storefront_trainer_drift", "1 while the drift detector reports drift", ["domain"])
TRAINED = Gauge("storefront_trainer_trained_rows", "Labels the current checkpoint has learned from", ["domain"])


ROUND_LOCK = threading.Lock()  # see DomainLoop._round


def _in_daemon_thread(fn: Callable, *args, name: str) -> asyncio.Future:
    """Run fn(*args) in a new daemon thread; the returned future (of the running loop) gets its
    result. A daemon thread, not the default executor: at shutdown an abandoned round may still be
    training, and asyncio.run / the interpreter would wait for an executor thread until it ends
    (the old trainer published a version 18 s after "trainer stopped" and did not exit). The
    round cannot commit once cancelled (trainer.shutdown), so leaving it behind loses nothing."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(ok: bool, value) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def target() -> None:
        try:
            outcome = (True, fn(*args))
        except BaseException as e:  # handed to the awaiting task, which logs it
            outcome = (False, e)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the event loop is closed: the process is exiting
            pass

    threading.Thread(target=target, name=name, daemon=True).start()
    return fut


class DomainLoop:
    """One domain: its joiner feeds its learner; rounds run off the event loop, in a thread."""

    def __init__(self, domain: str, log_: EventLog, registry: ModelRegistry, s: TrainerSettings) -> None:
        self.domain = domain
        self.learner = Learner(s.domain_model(domain), registry, Path(s.workdir), s.learner_config(domain))
        if not self.learner.restore():
            raise FileNotFoundError(f"{domain}: no checkpoint in {self.learner.checkpoint.path}")
        self.joiner = Joiner(log_, s.label_windows(), domain=domain, grace_s=s.join_grace_s)
        # The learner's checkpoint is the truth for where learning resumes.
        self.joiner.restore(self.learner.progress.get("offset", 0), self.learner.progress.get("pending", ()),
                            self.learner.progress.get("served_offset"))  # served predictions still to derive labels of
        # ... and what the log's retention goes by: committed as this domain's consumer (again at
        # start: a checkpoint restored from a backup may be behind what was committed before)
        self.log = log_
        self.consumer = f"learner-{domain}"
        self._committed: tuple[int, tuple[int, ...], int] | None = None
        self._committed_at = -math.inf
        self._commit(self.learner.progress)
        # shutdown: no new round once stopping; the round in progress is cancelled at its commit point
        self.cancel = RoundCancel()
        self.learner.cancel = self.cancel
        self.stopping = False
        self.round_future: asyncio.Future | None = None
        self.round_labels = 0  # labels of the round in progress
        self.poll_interval_s = s.poll_interval_s
        self.report_interval_s = s.report_interval_s
        self.reports_dir = Path(s.workdir) / "reports"
        self._reported = -math.inf
        self.registry = registry
        self.gc_keep_last, self.gc_min_age_s, self.gc_lease_ttl_s = s.gc_keep_last, s.gc_min_age_s, s.gc_lease_ttl_s
        # live labels judge any running canary of this model (the learner's, or one an operator started)
        from trainer.canary import CanaryDecider

        self.learner.reconcile_canary()
        self.canary = CanaryDecider(self.learner.model, registry, s.canary_config(domain), self.learner.decisions,
                                    on_decision=self._canary_decided)
        TRAINED.labels(domain).set(self.learner.trained_rows)
        self.after_round: Callable[[], Awaitable[None]] | None = None  # e.g. refresh health

    def _canary_decided(self, entry: dict) -> None:
        """The canary decider acted on the registry: the learner follows (in the decider's thread,
        between rounds: the loop awaits each round before it polls again)."""
        self.learner.canary_decided(entry["version"], promoted=entry["decision"] == "canary_promoted")

    def _commit(self, progress: dict) -> None:
        """Commit the learner's durable progress as this domain's log consumer (blocking: a write)."""
        offset = int(progress.get("offset", 0))
        pending = tuple(int(o) for o in progress.get("pending", ()))
        # served predictions above served_offset still await their derived labels (their window is
        # open): retention keeps them, and their outcomes, even under the size cap
        served = int(progress.get("served_offset", offset))
        if self._committed == (offset, pending, served):
            return
        self.log.commit_offset(self.consumer, offset, {"domain": self.domain, "offset": offset,
                                                       "pending": list(pending), "served_offset": served})
        self._committed, self._committed_at = (offset, pending, served), time.monotonic()

    def _round(self, progress):
        # One domain's round at a time: torch.export (dynamo) is not thread-safe (concurrent
        # exports fail with "SymInt ... is not tracked with proxy"), and rounds competing for
        # the same cores only make each slower.
        with ROUND_LOCK:
            if self.cancel.is_set():  # shutdown began while this round waited for the lock
                raise RoundCancelled(f"{self.domain}: round not started: shutting down")
            self.cancel.begin_round()
            entry = self.learner.round(progress)
        if entry is not None:  # its checkpoint is written: the log may forget what it covers
            self._commit(self.learner.progress)
        return entry

    def commit_idle(self) -> None:
        """Between rounds, with no joined label waiting for one, everything the joiner has read
        is accounted for (learned in checkpointed rounds, or dropped: late, duplicate, unmatched):
        commit its position, so retention also moves on in a domain whose predictions get few
        labels. At most every 5 s (a commit is a write with an fsync)."""
        if len(self.learner.pending) or self.stopping or time.monotonic() - self._committed_at < 5.0:
            return
        self._commit(self.joiner.checkpoint())

    def refresh_report(self, force: bool = False) -> None:
        """Re-render the learning report (in the calling thread) when it is due."""
        if self.report_interval_s <= 0:
            return
        now = time.monotonic()
        if not force and now - self._reported < self.report_interval_s:
            return
        self._reported = now
        try:
            write_report(self.learner.decisions.path, self.reports_dir, self.learner.model.name)
        except Exception:  # a chart must never stop learning
            log.exception("%s: learning report failed", self.domain)

    def collect_garbage(self) -> None:
        """Registry gc of this domain's model (in the calling thread), bounding the registry's disk
        (a version every few seconds, tens of MB each). A failure is logged, never raised: it must
        not stop learning; the next round tries again. Not under ROUND_LOCK: it does not export."""
        if self.gc_keep_last <= 0:
            return
        name = self.learner.model.name
        try:
            report = self.registry.gc(name, self.gc_keep_last, min_age_s=self.gc_min_age_s,
                                      lease_ttl_s=self.gc_lease_ttl_s, lock_timeout_s=5.0)
        except RegistryError as e:  # e.g. busy (an operator's gc), an unreadable pointer: nothing was deleted
            log.warning("%s: registry gc of %s deleted nothing (%s): %s", self.domain, name, e.reason, e)
            return
        except Exception:
            log.exception("%s: registry gc of %s failed", self.domain, name)
            return
        if report.removed:
            log.info("%s: registry gc removed %d version(s) of %s (%s), %d bytes freed, %d kept, %d bytes left",
                     self.domain, len(report.removed), name, ",".join(report.removed), report.bytes_freed,
                     len(report.kept), report.bytes_after)

    async def run(self) -> None:
        await asyncio.to_thread(self.refresh_report, True)
        while not self.stopping:
            try:
                joined = await asyncio.to_thread(self.joiner.poll, 4096)
                if self.stopping:  # not learned, not committed: read again after the restart
                    return
                examples = self.learner.model.examples(joined)
                self.learner.add(examples)
                # off the event loop: a decision runs a bootstrap over thousands of labels
                if await asyncio.to_thread(self.canary.observe, joined, examples) is not None:
                    await asyncio.to_thread(self.refresh_report, True)
                DRIFT.labels(self.domain).set(1 if self.learner.drift.in_drift else 0)
                if self.learner.due():
                    progress = self.joiner.checkpoint()
                    self.round_labels = len(self.learner.pending)
                    log.info("%s: round started on %d new labels", self.domain, self.round_labels)
                    self.round_future = _in_daemon_thread(self._round, progress,
                                                          name=f"{ABANDONABLE_THREAD}round-{self.domain}")
                    try:
                        # shielded: a cancelled loop task leaves the round to the shutdown, which
                        # waits for it or cancels it at its commit point
                        entry = await asyncio.shield(self.round_future)
                    except RoundCancelled as e:
                        log.info("%s", e)
                        return
                    if entry is not None:
                        ROUNDS.labels(self.domain, entry["decision"]).inc()
                        TRAINED.labels(self.domain).set(self.learner.trained_rows)
                        await asyncio.to_thread(self.refresh_report)
                        await asyncio.to_thread(self.collect_garbage)
                        if self.after_round is not None:
                            await self.after_round()
                else:
                    await asyncio.to_thread(self.commit_idle)
                if not joined:
                    await asyncio.sleep(self.poll_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep learning alive; the error is in the log with its traceback
                log.exception("%s: learning loop failed; retrying", self.domain)
                await asyncio.sleep(max(1.0, self.poll_interval_s))


class TrainerApp(ServerApp):
    """The trainer's ServerApp: its stop() first runs `before_stop` (stop taking feedback, settle
    the rounds in progress; see the module docstring), then the servers' drain and stop."""

    before_stop: Callable[[], Awaitable[None]] | None = None

    async def stop(self) -> None:
        if not self._stopping and self.before_stop is not None:
            try:
                await self.before_stop()
            except Exception:  # the rest of the shutdown must still happen
                log.exception("trainer: shutdown of the learning loops failed")
        await super().stop()


def make_app(s: TrainerSettings) -> ServerApp:
    Path(s.workdir).mkdir(parents=True, exist_ok=True)
    event_log = s.open_event_log()
    registry = ModelRegistry(s.registry_dir)
    tokens = s.tokens()
    collector = FeedbackCollector(event_log, tokens=tokens)
    if not tokens:
        # Safe default for one machine (make up generates tokens; a bare `trainer serve` has none):
        # without tokens only loopback peers, or mTLS clients named by their certificate, get in.
        log.warning("no feedback_tokens configured: the feedback collector accepts records only from loopback "
                    "peers%s, without service identity; set feedback_tokens (and each service's feedback_token) "
                    "before exposing the trainer", " or from clients whose certificate CN names a domain"
                    if s.tls_client_ca else "")

    def register(server) -> list[str]:
        return [add_collector(server, collector)]

    loops: dict[str, DomainLoop] = {}
    model_names: dict[str, str] = {}  # domain -> its model's name (Redis mode's readiness)

    def ready() -> bool:
        # SERVING only once every configured domain is being learned and has a published
        # version: while bootstrapping (minutes) there is nothing a service could load yet.
        if s.on_redis:
            # every replica collects feedback, whichever learns: SERVING once every domain has a version
            if set(model_names) != set(s.domain_list):
                return False
            try:
                return all(registry.current_version(name) is not None for name in model_names.values())
            except Exception:
                return False
        if set(loops) != set(s.domain_list):
            return False
        try:
            return all(registry.current_version(loop.learner.model.name) is not None for loop in loops.values())
        except Exception:  # an unreadable pointer (logged and counted by the registry's readers)
            return False

    app = TrainerApp("trainer", s, {}, register, v2=False, ready=ready)
    tasks: list[asyncio.Task] = []
    policy = s.retention_policy()
    retention_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eventlog-retention")

    async def retain_forever() -> None:
        """Retention passes, one at a time, in their own thread (a pass deletes in batches and may
        vacuum: never on the event loop, never two at once)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                if s.on_redis and not (leadership and s.domain_list and leadership[0].holds(s.domain_list[0])):
                    await asyncio.sleep(s.retention_interval_s)  # another replica runs the passes
                    continue
                report = await loop.run_in_executor(retention_pool, event_log.retain, policy)
                if report.total_deleted:
                    log.info("event log retention: %d events deleted %s, %d pages given back, %d -> %d bytes on disk, "
                             "%d events left (%.2f s; safe offsets %s)", report.total_deleted,
                             {f"{d}/{r}": n for (d, r), n in sorted(report.deleted.items())}, report.pages_reclaimed,
                             report.bytes_before, report.bytes_after, report.rows_after, report.seconds,
                             {d: o for d, (o, _) in report.safe_offsets.items()})
            except asyncio.CancelledError:
                raise
            except Exception:  # retention must never stop the trainer; the next pass tries again
                log.exception("event log retention failed")
            await asyncio.sleep(s.retention_interval_s)

    leadership: list[DomainLeadership] = []  # Redis mode: this replica's terms as each domain's learner

    def open_domain(domain: str) -> DomainLoop:
        """Under the domain's lease (Redis mode, in a worker thread): bootstrap it if nobody has yet,
        then restore its checkpoint from the shared workdir."""
        if s.bootstrap and not Learner(s.domain_model(domain), registry, Path(s.workdir)).checkpoint.exists():
            from trainer.bootstrap import bootstrap

            log.info("bootstrapping %s from its own data (this trainer holds its lease)", domain)
            bootstrap(registry, Path(s.workdir), [domain], force=True, models={domain: s.domain_model(domain)},
                      plugins=s.loaded_domains())
        return DomainLoop(domain, event_log, registry, s)

    async def follow_readiness() -> None:
        """Redis mode: readiness depends on what other replicas publish (a standby's first version
        comes from the holder): re-read it every second (a pointer read per domain)."""
        while True:
            try:
                await app.refresh_health()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("trainer: health refresh failed")
            await asyncio.sleep(1.0)

    async def start() -> None:
        if s.on_redis:
            model_names.update(await asyncio.to_thread(lambda: {d: s.domain_model(d).name for d in s.domain_list}))
            leadership.append(DomainLeadership(s, open_domain, loops, app.refresh_health))
            tasks.extend(leadership[0].start())
            if s.retention_interval_s > 0:
                tasks.append(asyncio.get_running_loop().create_task(retain_forever(), name="eventlog-retention"))
            tasks.append(asyncio.get_running_loop().create_task(follow_readiness(), name="readiness"))
            return
        if s.bootstrap:
            from trainer.bootstrap import bootstrap

            missing = [d for d in s.domain_list
                       if not Learner(s.domain_model(d), registry, Path(s.workdir)).checkpoint.exists()]
            if missing:
                log.info("bootstrapping %s, each from its own data", missing)
                await asyncio.to_thread(bootstrap, registry, Path(s.workdir), missing, force=True,
                                        models={d: s.domain_model(d) for d in missing}, plugins=s.loaded_domains())
        for domain in s.domain_list:
            try:
                loop = DomainLoop(domain, event_log, registry, s)
            except FileNotFoundError as e:
                log.error("%s; run `python -m trainer bootstrap --domains %s`; not learning it", e, domain)
                continue
            loop.after_round = app.refresh_health
            loops[domain] = loop
            tasks.append(asyncio.get_running_loop().create_task(loop.run(), name=f"learn-{domain}"))
        if s.retention_interval_s > 0:
            tasks.append(asyncio.get_running_loop().create_task(retain_forever(), name="eventlog-retention"))

    async def settle() -> None:
        """Shutdown, before the server stops: no more feedback, no new round, and the round in
        progress either finishes within shutdown_round_grace_s or is abandoned unpublished."""
        log.info("trainer: shutting down: the collector takes no more feedback, no new round starts")
        for lead in leadership:
            lead.stop()
        for lp in loops.values():
            lp.stopping = True
        await collector.stop_accepting(timeout_s=max(1.0, s.grace_s))
        running = {lp: lp.round_future for lp in loops.values()
                   if lp.round_future is not None and not lp.round_future.done()}
        if running:
            log.info("trainer: waiting up to %.1f s for the round(s) in progress: %s", s.shutdown_round_grace_s,
                     ", ".join(f"{lp.domain} ({lp.round_labels} labels)" for lp in running))
            await asyncio.wait(running.values(), timeout=s.shutdown_round_grace_s)
        for lp, fut in running.items():
            if not fut.done() and lp.cancel.cancel():
                # past its commit point: writing its checkpoint and publishing; stopping it there
                # would leave a version without its checkpoint, so it finishes (seconds)
                log.info("%s: the round in progress is already checkpointing/publishing; letting it finish", lp.domain)
                await asyncio.wait([fut], timeout=300)
            if fut.done():
                error = fut.exception()
                if error is None:
                    entry = fut.result()
                    log.info("%s: the round in progress finished during shutdown: %s%s", lp.domain,
                             entry["decision"] if entry else "nothing to learn",
                             f" version {entry['version']}" if entry and entry.get("version") else "")
                elif isinstance(error, RoundCancelled):
                    log.info("%s: the round in progress was abandoned without publishing or checkpointing; its %d "
                             "labels are learned after the restart", lp.domain, lp.round_labels)
                else:
                    log.error("%s: the round in progress failed during shutdown: %r", lp.domain, error)
            else:
                log.warning("%s: the round in progress was abandoned after %.1f s without publishing or checkpointing "
                            "(it stops at its commit point); its %d labels are learned after the restart",
                            lp.domain, s.shutdown_round_grace_s, lp.round_labels)
        for lp in loops.values():
            lp.cancel.cancel()  # whatever still runs can never commit now
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # a retention pass in progress finishes its batch loop before the log is closed
        await asyncio.to_thread(retention_pool.shutdown, True)

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await collector.close()
        await asyncio.to_thread(retention_pool.shutdown, True)
        for lead in leadership:
            await lead.close()
        event_log.close()
        log.info("trainer: event log closed")

    app.before_stop = settle
    app.on_start.append(start)
    app.on_stop.append(stop)
    return app
