"""The trainer's settings: its own (CoreTrainerSettings) plus those of its domain plug-ins.

Every field is a flag and an environment variable (shared/settings.py). A domain plug-in's own
settings (trainer/plugins.py: fraud's adv_*, the recommender's catalog_path) are trainer settings
under their own names: `TrainerSettings` is the class for the built-in plug-ins, and
`TrainerSettings.load` reads `--domain-modules` (or STOREFRONT_DOMAIN_MODULES) first and loads
the class for the modules it names (`trainer_settings_class`), so a plug-in's flags exist
exactly when its module is loaded. A name declared twice (by two plug-ins, or by a plug-in and
the trainer) is an error at start.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import typing
from pathlib import Path
from typing import Mapping, Sequence

from shared.registry import GC_KEEP_LAST, GC_MIN_AGE_S, LEASE_TTL_S
from shared.settings import ServerSettings, setting
from trainer.eventlog import RetentionPolicy
from trainer.joiner import parse_windows
from trainer.learner import LearnerConfig
from trainer.plugins import DEFAULT_DOMAIN_MODULES, Domains, TrainerDomain, load_domains, parse_modules

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
    epochs: int = setting(3, "passes over each round's new labels (plus replay), in domains without their own")
    domain_epochs: str = setting("", "passes over each round's new labels per domain, e.g. 'recommender=1' (empty = "
                                 "each domain's own: the recommender's 1; the others --epochs)")
    replay_size: int = setting(20000, "older labeled rows kept for replay against forgetting")
    gate_min_positives: str = setting("", "gate: positives the evaluation window needs per domain for the storefront "
                                      "metrics, e.g. 'fraud=30,recommender=100,pricing=30' (empty = those defaults)")
    gate_min_rows: str = setting("", "gate: rows the evaluation window needs per domain before any decision, e.g. "
                                 "'fraud=2000,recommender=200,pricing=100' (empty = those defaults)")
    gate_resamples: int = setting(500, "gate: paired bootstrap resamples per round")
    gate_confidence: float = setting(0.95, "gate: confidence of the bootstrap interval of challenger vs champion")
    gate_margin: float = setting(0.02, "gate: refuse a challenger whose interval lies below this relative difference "
                                 "(0.02 = 2 % worse than the champion)")
    gate_min_gain: float = setting(0.0, "gate: publish only a challenger whose interval of its main metric lies above "
                                   "this relative difference (0 = better than the champion with confidence; -0.02 = "
                                   "not worse than 2 % with confidence; -1 = off); otherwise deferred, learning goes on")
    gate_publish_confidence: float = setting(0.99, "gate: confidence of the interval the must-beat bar reads (a "
                                             "deferred challenger is judged again every round, so its bar is "
                                             "stricter than the refusal's gate_confidence)")
    gate_must_beat: str = setting("fraud", "gate: domains held to gate_min_gain (comma-separated); the others publish "
                                  "unless worse with confidence or behind on the point estimate. Fraud's window holds "
                                  ">= 30 frauds and can show a gain; the recommender's 200 rows could not (22 of 30 "
                                  "daily Ta Feng rounds deferred, HR@10 1.06x -> 1.00x buy-again)")
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
    event_log_url: str = setting("", "where the event log lives: empty = the SQLite file workdir/events.db (one "
                                 "trainer); redis://HOST:PORT/DB (or rediss://, unix://) = Redis Streams, shared by "
                                 "every trainer replica: any replica collects feedback, and each domain is learned "
                                 "by the one replica holding its lease (workdir and registry_dir on a shared volume)")
    redis_password_file: str = setting("", "file whose first line is the Redis password (not in event_log_url)")
    lease_ttl_s: float = setting(10.0, "Redis mode: a domain's learner lease lasts this long unless renewed (every "
                                 "ttl/3); a standby takes over at most lease_ttl_s + lease_poll_s after the holder dies")
    lease_poll_s: float = setting(1.0, "Redis mode: how often a standby trainer asks for a domain's lease")

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

    def loaded_plugin(self, domain: str | None) -> TrainerDomain | None:
        """domain's plug-in, None for no domain or one domain_modules does not load."""
        domains = self.loaded_domains()
        return domains[domain] if domain is not None and domain in domains else None

    @property
    def event_log_path(self) -> Path:
        return Path(self.workdir) / "events.db"

    @property
    def on_redis(self) -> bool:
        """The event log on Redis Streams and the learners under leases (event_log_url set)."""
        return bool(self.event_log_url)

    def open_event_log(self):
        """The event log these settings name: SqliteEventLog, or RedisEventLog on event_log_url."""
        if self.on_redis:
            from trainer.eventlog_redis import RedisEventLog

            return RedisEventLog(self.event_log_url, password_file=self.redis_password_file,
                                 domains=self.loaded_domains())
        from trainer.eventlog import SqliteEventLog

        return SqliteEventLog(self.event_log_path, domains=self.loaded_domains())

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

        return LearnerConfig(min_events=self.min_events, max_interval_s=self.max_interval_s,
                             epochs=self.epochs_for(domain), lr_factor=self.lr_factor_for(domain),
                             replay_size=self.replay_size, latency_budget_ms=self.latency_budget_ms,
                             gate_min_positives=parse_per_domain(self.gate_min_positives, "gate_min_positives").get(domain),
                             gate_min_rows=parse_per_domain(self.gate_min_rows, "gate_min_rows").get(domain),
                             gate_resamples=self.gate_resamples, gate_confidence=self.gate_confidence,
                             gate_margin=self.gate_margin, gate_publish_confidence=self.gate_publish_confidence,
                             gate_min_gain=self.min_gain_for(domain),
                             delivery=self.delivery,
                             canary_mode=self.canary_config(domain).mode, canary_share=self.canary_share)

    def epochs_for(self, domain: str | None) -> int:
        """Passes over a round's rows in domain: domain_epochs, else the plug-in's own
        (TrainerDomain.round_epochs), else epochs."""
        from trainer.gate import parse_per_domain

        own = parse_per_domain(self.domain_epochs, "domain_epochs").get(domain)
        plugin = self.loaded_plugin(domain)
        if own is None and plugin is not None:
            own = plugin.round_epochs
        return own or self.epochs

    def lr_factor_for(self, domain: str | None) -> float:
        """A round's step size as a share of the model's own: the plug-in's (TrainerDomain.round_lr_factor)."""
        plugin = self.loaded_plugin(domain)
        return plugin.round_lr_factor if plugin is not None else 1.0

    def min_gain_for(self, domain: str | None) -> float | None:
        """The must-beat bar of domain's gate (None: not worse is enough)."""
        must_beat = {d.strip() for d in self.gate_must_beat.split(",") if d.strip()}
        return None if self.gate_min_gain <= -1 or domain not in must_beat else self.gate_min_gain

    def canary_config(self, domain: str | None = None):
        from trainer.canary import CanaryConfig, parse_modes

        plugin = self.loaded_plugin(domain)
        default = plugin.canary_mode if plugin is not None else "canary"
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
            if 0 in parse_per_domain(self.domain_epochs, "domain_epochs").values():
                raise ValueError("domain_epochs: a domain's epochs must be >= 1")
            GateRule(self.gate_resamples, self.gate_confidence, self.gate_margin,
                     min_gain=None if self.gate_min_gain <= -1 else self.gate_min_gain,
                     publish_confidence=self.gate_publish_confidence).validate()
            if self.gate_margin < 0:
                raise ValueError("gate_margin must be >= 0 (a negative margin refuses every candidate not better)")
        except ValueError as e:
            p.append(str(e))
        if self.retention_interval_s < 0 or self.shutdown_round_grace_s < 0:
            p.append("retention_interval_s and shutdown_round_grace_s must be >= 0")
        from shared.redis_conn import check_redis_url

        p += [f"event_log_url: {problem}" for problem in check_redis_url(self.event_log_url)]
        if self.redis_password_file and not self.event_log_url:
            p.append("redis_password_file is set but event_log_url is empty (the SQLite log needs no password)")
        if self.lease_ttl_s <= 0 or self.lease_poll_s <= 0:
            p.append("lease_ttl_s and lease_poll_s must be > 0")
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
