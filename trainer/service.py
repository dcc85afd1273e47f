"""The trainer process: collector endpoint + per-domain joiner/learner loops.

    python -m trainer serve [--port 50050] [--workdir var/trainer] [--registry-dir var/registry]

Services stream served predictions and outcomes to the collector, which appends them to
the durable event log and acks. For each domain with a model checkpoint (made by
`python -m trainer bootstrap`), a loop polls that domain's joiner, hands the joined
examples to the learner, and runs an update-gate-publish round when one is due. Rounds
run in a worker thread, so the collector keeps acknowledging while a model trains.

Domains are plug-ins (trainer/plugins.py): the `domain_modules` setting lists the modules
that declare them (default the built-in three); this file names none. A plug-in's own
settings (fraud: adv_*, recommender: catalog_path) are trainer settings under their own
names: `TrainerSettings` is the trainer's settings plus those of the built-in plug-ins, and
`TrainerSettings.load` adds those of the modules its `--domain-modules` names.

Retention: every `retention_interval_s` the event log deletes what no consumer needs any more
(trainer/eventlog.py); each domain loop commits its learner's checkpointed progress as the log
consumer `learner-<domain>`, which is what retention goes by.

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
import dataclasses
import functools
import logging
import math
import os
import sys
import threading
import time
import typing
from pathlib import Path
from typing import Awaitable, Callable, Mapping, Sequence

from prometheus_client import Counter, Gauge

from shared.registry import GC_KEEP_LAST, GC_MIN_AGE_S, LEASE_TTL_S, ModelRegistry, RegistryError
from shared.server import ServerApp
from shared.settings import ServerSettings, setting
from trainer.collector import FeedbackCollector, add_collector
from trainer.eventlog import RetentionPolicy, SqliteEventLog
from trainer.joiner import Joiner, parse_windows
from trainer.learner import Learner, LearnerConfig
from trainer.plugins import DEFAULT_DOMAIN_MODULES, Domains, TrainerDomain, load_domains, parse_modules
from trainer.report import write_report
from trainer.shutdown import RoundCancel, RoundCancelled

log = logging.getLogger(__name__)

# decision: published, refused (worse than the champion with confidence, or failed export checks),
# deferred (the gate's window cannot tell yet); the decision log holds each one's evidence
ROUNDS = Counter("storefront_trainer_rounds_total", "Learning rounds by domain (the model) and gate decision",
                 ["domain", "decision"])
DRIFT = Gauge("storefront_trainer_drift", "1 while the drift detector reports drift", ["domain"])
TRAINED = Gauge("storefront_trainer_trained_rows", "Labels the current checkpoint has learned from", ["domain"])


DOMAIN_MODULES_HELP = ("comma list of the modules whose TRAINER_DOMAIN plug-ins (trainer/plugins.py) this trainer "
                       "knows; a plug-in's own settings become trainer settings")


@dataclasses.dataclass
class CoreTrainerSettings(ServerSettings):
    """The trainer: feedback collector, event log, joiner, learner, gate, publisher."""

    port: int = setting(50050, "gRPC port of the feedback collector")
    workdir: str = setting("var/trainer", "event log, checkpoints, decision logs")
    domain_modules: str = setting(DEFAULT_DOMAIN_MODULES, DOMAIN_MODULES_HELP)
    domains: str = setting("", "comma list of domains to learn (empty = every domain of domain_modules)")
    windows: str = setting("", "label windows, e.g. 'fraud=1209600,recommender=3600' (seconds; empty = each "
                           "domain's own)")
    join_grace_s: float = setting(60.0, "how long an outcome waits for its served prediction")
    min_events: int = setting(200, "a round starts after this many new labels ...")
    max_interval_s: float = setting(30.0, "... or this long after the last round, with at least one")
    epochs: int = setting(3, "passes over each round's new labels (plus replay)")
    replay_size: int = setting(20000, "older labeled rows kept for replay against forgetting")
    gate_min_positives: str = setting("", "gate: positives the evaluation window needs per domain for the storefront "
                                      "metrics, e.g. 'fraud=30,recommender=100,pricing=30' (empty = those defaults)")
    gate_min_rows: str = setting("", "gate: rows the evaluation window needs per domain before any decision, e.g. "
                                 "'fraud=2000,recommender=200,pricing=100' (empty = those defaults)")
    gate_resamples: int = setting(500, "gate: paired bootstrap resamples per round")
    gate_confidence: float = setting(0.95, "gate: confidence of the bootstrap interval of challenger vs champion")
    gate_margin: float = setting(0.02, "gate: refuse a challenger whose interval lies below this relative difference "
                                 "(0.02 = 2 % worse than the champion)")
    latency_budget_ms: float = setting(5.0, "gate: batch-1 latency budget of a candidate, ms")
    delivery: str = setting("canary", "what happens to a candidate that passed the gate: canary = published and started "
                            "as the registry's CANARY, promoted or rolled back on live labels (trainer/canary.py); "
                            "direct = published as CURRENT at once")
    canary_modes: str = setting("", "per domain, how a candidate meets traffic, e.g. 'fraud=shadow,pricing=canary': "
                                "canary (answers canary_share of request keys) or shadow (scores every request, "
                                "answers none; paired comparison); a domain not named: its plug-in's default")
    canary_share: float = setting(0.1, "canary mode: share of request keys the candidate answers, (0, 1]")
    canary_min_labels: int = setting(200, "canary decision: labels each version needs (shadow: labeled pairs) first")
    canary_min_positives: int = setting(5, "canary decision: positives each version needs first")
    canary_margin: float = setting(0.05, "canary decision: promote when the interval of the relative difference lies "
                                   "above -margin, roll back when it lies below (0.05 = 5 %)")
    canary_timeout_s: float = setting(1800.0, "canary decision: no verdict by then keeps the champion (aborted)")
    bootstrap: bool = setting(True, "bootstrap a domain from its real dataset when it has no checkpoint")
    poll_interval_s: float = setting(0.5, "how often a domain loop looks for new joined labels")
    report_interval_s: float = setting(10.0, "refresh each domain's learning report (workdir/reports) at most this often; 0 = off")
    feedback_tokens: str = setting("", "each service's feedback token, 'fraud=<t>,recommender=<t>,pricing=<t>' (a stream "
                                   "may send its token's domain only); '@<file>' reads them from a file; empty = no "
                                   "tokens: only loopback peers (or mTLS clients whose certificate CN is the domain) "
                                   "may send feedback")
    gc_keep_last: int = setting(GC_KEEP_LAST, "registry gc after each round: newest versions of the domain's model kept "
                                "(besides CURRENT, its rollback target, other pointers', pinned and leased ones); "
                                "0 = no automatic gc")
    gc_min_age_s: float = setting(GC_MIN_AGE_S, "registry gc: versions younger than this are kept (a lagging replica "
                                  "may be loading one)")
    gc_lease_ttl_s: float = setting(LEASE_TTL_S, "registry gc: a serving lease not refreshed for this long is from a "
                                    "dead process and no longer protects its versions (services refresh every 30 s)")
    retention_interval_s: float = setting(60.0, "event log retention: run a pass this often (0 = never delete)")
    retention_slack_s: float = setting(600.0, "event log retention: predictions are kept this long beyond their "
                                       "domain's label window, for outcomes delivered late")
    retention_learned_domains: str = setting("", "event log retention: domains with one label per prediction, whose "
                                             "prediction goes as soon as its label is learned (a later correction "
                                             "then counts unmatched); empty = those whose plug-in says so")
    retention_max_age_s: float = setting(15 * 86400.0, "event log retention: processed events older than this go "
                                         "(0 = no age limit)")
    retention_max_mb: float = setting(1024.0, "event log retention: above this size the oldest processed events go, "
                                      "label windows or not (0 = no limit)")
    retention_hard_max_mb: float = setting(4096.0, "event log retention: above this size the oldest events go even if "
                                           "no consumer processed them (logged, counted as hard_cap; 0 = no cap)")
    shutdown_round_grace_s: float = setting(20.0, "on SIGTERM, a learning round in progress gets this long to finish "
                                            "and publish; then it is abandoned without publishing (its labels are "
                                            "learned after the restart)")

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
             description: str | None = None):
        """Like BaseSettings.load, with the settings of the plug-ins `--domain-modules` (or
        STOREFRONT_DOMAIN_MODULES) names: they are read first, to know which flags exist."""
        args = list(sys.argv[1:] if argv is None else argv)
        spec = _flag_value(args, "--domain-modules")
        if spec is None:
            spec = (os.environ if env is None else env).get(cls.env_name("domain_modules"), DEFAULT_DOMAIN_MODULES)
        try:
            target = trainer_settings_class(parse_modules(spec))
        except (ValueError, TypeError) as e:
            raise SystemExit(f"domain_modules: {e}") from None
        return super(CoreTrainerSettings, target).load(args, env, description)

    def loaded_domains(self) -> Domains:
        """The plug-ins of domain_modules."""
        return load_domains(self.domain_modules)

    def plugin(self, domain: str) -> TrainerDomain:
        return self.loaded_domains()[domain]

    @property
    def event_log_path(self) -> Path:
        return Path(self.workdir) / "events.db"

    def label_windows(self) -> dict[str, float]:
        return parse_windows(self.windows, self.loaded_domains().windows())

    def retention_policy(self) -> RetentionPolicy:
        learned = frozenset(d.strip() for d in self.retention_learned_domains.split(",") if d.strip())
        return RetentionPolicy(windows=self.label_windows(), slack_s=self.retention_slack_s + self.join_grace_s,
                               learned_domains=learned or self.loaded_domains().one_label_per_prediction(),
                               max_age_s=self.retention_max_age_s, max_bytes=int(self.retention_max_mb * 2**20),
                               hard_max_bytes=int(self.retention_hard_max_mb * 2**20))

    def learner_config(self, domain: str | None = None) -> LearnerConfig:
        from trainer.gate import parse_per_domain

        return LearnerConfig(min_events=self.min_events, max_interval_s=self.max_interval_s, epochs=self.epochs,
                             replay_size=self.replay_size, latency_budget_ms=self.latency_budget_ms,
                             gate_min_positives=parse_per_domain(self.gate_min_positives, "gate_min_positives").get(domain),
                             gate_min_rows=parse_per_domain(self.gate_min_rows, "gate_min_rows").get(domain),
                             gate_resamples=self.gate_resamples, gate_confidence=self.gate_confidence,
                             gate_margin=self.gate_margin, delivery=self.delivery,
                             canary_mode=self.canary_config(domain).mode, canary_share=self.canary_share)

    def canary_config(self, domain: str | None = None):
        from trainer.canary import CanaryConfig, parse_modes

        default = self.plugin(domain).canary_mode if domain in self.loaded_domains() else "canary"
        return CanaryConfig(mode=parse_modes(self.canary_modes).get(domain, default), share=self.canary_share,
                            min_labels=self.canary_min_labels, min_positives=self.canary_min_positives,
                            timeout_s=self.canary_timeout_s, margin=self.canary_margin,
                            confidence=self.gate_confidence, resamples=self.gate_resamples)

    def validate(self) -> list[str]:
        p = super().validate()
        try:
            domains = self.loaded_domains()
        except (ValueError, TypeError) as e:
            return [*p, f"domain_modules: {e}"]
        unknown = set(self.domain_list) - set(domains)
        if unknown:
            p.append(f"unknown domain(s) {sorted(unknown)}; known: {list(domains)} (domain_modules)")
        for plugin in domains.values():
            view = plugin.settings_view(self) if _has_fields(self, plugin) else None
            if view is not None and hasattr(view, "validate"):
                p += [f"{plugin.name}: {problem}" for problem in view.validate()]
        if self.min_events < 1 or self.epochs < 1 or self.poll_interval_s <= 0:
            p.append("min_events and epochs must be >= 1, poll_interval_s > 0")
        if self.gc_keep_last < 0 or self.gc_min_age_s < 0 or self.gc_lease_ttl_s <= 0:
            p.append("gc_keep_last and gc_min_age_s must be >= 0 (gc_keep_last 0 = no gc), gc_lease_ttl_s > 0")
        if self.report_interval_s < 0:
            p.append("report_interval_s must be >= 0 (0 = no learning report)")
        try:
            from trainer.gate import GateRule, parse_per_domain

            parse_per_domain(self.gate_min_positives, "gate_min_positives")
            parse_per_domain(self.gate_min_rows, "gate_min_rows")
            GateRule(self.gate_resamples, self.gate_confidence, self.gate_margin).validate()
            if self.gate_margin < 0:
                raise ValueError("gate_margin must be >= 0 (a negative margin refuses every candidate not better)")
        except ValueError as e:
            p.append(str(e))
        if self.retention_interval_s < 0 or self.shutdown_round_grace_s < 0:
            p.append("retention_interval_s and shutdown_round_grace_s must be >= 0")
        try:
            self.label_windows()
            self.retention_policy().validate(domains)
        except ValueError as e:
            p.append(str(e))
        if self.delivery not in ("canary", "direct"):
            p.append(f"delivery must be 'canary' or 'direct', not {self.delivery!r}")
        try:
            for domain in self.domain_list or [None]:
                self.canary_config(domain).validate()
        except ValueError as e:
            p.append(str(e))
        try:
            self.tokens()
        except (OSError, ValueError) as e:
            p.append(f"feedback_tokens: {e}")
        return p

    def tokens(self) -> dict[str, str]:
        """feedback_tokens parsed: service domain -> token."""
        from shared.feedback import read_secret
        from trainer.collector import parse_tokens

        return parse_tokens(read_secret(self.feedback_tokens), self.loaded_domains())

    @property
    def domain_list(self) -> list[str]:
        """The domains to learn: those `domains` names, else every loaded plug-in's."""
        named = [d.strip() for d in self.domains.split(",") if d.strip()]
        return named or list(self.loaded_domains())

    def domain_model(self, domain: str):
        """The DomainModel of a domain, from its plug-in and these settings."""
        return self.plugin(domain).model(self)


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of `flag` in argv ('--flag value' or '--flag=value'; the last one wins), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def _has_fields(settings, plugin: TrainerDomain) -> bool:
    """Whether these settings carry the plug-in's settings fields (a settings object made for other modules does not)."""
    return plugin.settings is not None and all(hasattr(settings, f.name) for f in dataclasses.fields(plugin.settings))


@functools.lru_cache(maxsize=None)
def trainer_settings_class(modules: tuple[str, ...]) -> type[CoreTrainerSettings]:
    """The trainer's settings class for these domain modules: CoreTrainerSettings plus each
    plug-in's settings fields (same names, help and defaults), with domain_modules defaulting to
    these modules. A name two of them declare is an error."""
    domains = load_domains(modules)
    owner = {f.name: "the trainer" for f in dataclasses.fields(CoreTrainerSettings)}
    fields: list[tuple] = [("domain_modules", str, setting(",".join(modules), DOMAIN_MODULES_HELP))]
    for plugin in domains.values():
        if plugin.settings is None:
            continue
        hints = typing.get_type_hints(plugin.settings)
        for f in dataclasses.fields(plugin.settings):
            if f.name in owner:
                raise ValueError(f"setting {f.name!r} of domain {plugin.name} is declared by {owner[f.name]} too")
            owner[f.name] = f"domain {plugin.name}"
            kwargs = {"default": f.default} if f.default is not dataclasses.MISSING else {
                "default_factory": f.default_factory}
            fields.append((f.name, hints[f.name], dataclasses.field(metadata=f.metadata, **kwargs)))
    return dataclasses.make_dataclass("TrainerSettings", fields, bases=(CoreTrainerSettings,),
                                      namespace={"__doc__": CoreTrainerSettings.__doc__, "__module__": __name__})


# The trainer's settings with the built-in plug-ins' (what `python -m trainer serve` loads by default).
TrainerSettings = trainer_settings_class(parse_modules(DEFAULT_DOMAIN_MODULES))

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

    def __init__(self, domain: str, log_: SqliteEventLog, registry: ModelRegistry, s: TrainerSettings) -> None:
        self.domain = domain
        self.learner = Learner(s.domain_model(domain), registry, Path(s.workdir), s.learner_config(domain))
        if not self.learner.restore():
            raise FileNotFoundError(f"{domain}: no checkpoint in {self.learner.checkpoint.path}")
        self.joiner = Joiner(log_, s.label_windows(), domain=domain, grace_s=s.join_grace_s)
        # The learner's checkpoint is the truth for where learning resumes.
        self.joiner.restore(self.learner.progress.get("offset", 0), self.learner.progress.get("pending", ()))
        # ... and what the log's retention goes by: committed as this domain's consumer (again at
        # start: a checkpoint restored from a backup may be behind what was committed before)
        self.log = log_
        self.consumer = f"learner-{domain}"
        self._committed: tuple[int, tuple[int, ...]] | None = None
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
        if self._committed == (offset, pending):
            return
        self.log.commit_offset(self.consumer, offset, {"domain": self.domain, "offset": offset,
                                                       "pending": list(pending)})
        self._committed, self._committed_at = (offset, pending), time.monotonic()

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
                    self.round_future = _in_daemon_thread(self._round, progress, name=f"round-{self.domain}")
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
    event_log = SqliteEventLog(s.event_log_path, domains=s.loaded_domains())
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

    def ready() -> bool:
        # SERVING only once every configured domain is being learned and has a published
        # version: while bootstrapping (minutes) there is nothing a service could load yet.
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

    async def start() -> None:
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
        event_log.close()
        log.info("trainer: event log closed")

    app.before_stop = settle
    app.on_start.append(start)
    app.on_stop.append(stop)
    return app
