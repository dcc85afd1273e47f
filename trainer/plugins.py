"""Domain plug-ins, trainer side: what the runtime needs to know about a domain, found by module name.

The event log, the collector, the joiner, the learner loops and the bootstrap know no domain.
Each domain describes itself in one module of its own folder, as a module attribute
`TRAINER_DOMAIN = TrainerDomain(...)`, and the trainer loads the modules its `domain_modules`
setting lists (default: the three built-in ones, `DEFAULT_DOMAIN_MODULES`):

    python -m trainer serve --domain-modules trainer.domains.fraud_plugin,acme.returns.trainer_plugin

A plug-in declares:
- `name`: the registered name, [a-z][a-z0-9_]{0,31}: FeedbackRecord.domain, the log's domain
  column, metrics labels, the key of per-domain settings ("fraud=...");
- the protobuf types it packs in the feedback stream (feedback.proto): its outcome message
  (Outcome.domain_outcome) and its request and response messages (ServedPrediction.request /
  .response); the event log rejects a record that packs another type;
- `outcome_identity`: the fields of its outcome message that make two outcomes the same (the
  joiner emits the first of each identity only; its contract with the outcome's sender);
- `latest_outcome_wins`: one label per prediction whose latest outcome (by occurred_at) wins (a
  chargeback later reversed); otherwise every identity is its own label (clicks on items);
- `one_label_per_prediction`: retention may drop a served prediction as soon as one of its
  outcomes is learned (default: `latest_outcome_wins`);
- `window_s`: its label window (how long after serving an outcome still counts);
- `served_labels(served, labels)` (optional): the labels a served prediction implies beyond the
  outcomes sent for it, asked once per served prediction when its label window has closed, with
  the outcome messages of it that arrived inside the window: e.g. the recommender's impressions
  (items shown and not clicked). The joiner emits them like outcomes (trainer/joiner.py);
- `model(settings)`: its DomainModel (trainer/learner.py), built from the trainer settings;
- `bootstrap(registry, workdir, *, force, model, show_progress)`: its first-model training from
  its own data, publishing version 1 (`python -m trainer bootstrap`);
- `settings`: a dataclass of its own settings. Its fields become trainer settings under their
  own names (flag `--adv-epsilon`, environment `STOREFRONT_ADV_EPSILON`); two plug-ins, or a
  plug-in and the trainer, declaring the same name is an error at start. Its `validate()`
  (when it has one) returns problems like a settings class's;
- `canary_mode`: how its candidates meet traffic by default ("canary" or "shadow"; the
  `canary_modes` setting overrides it per domain);
- `round_epochs`: passes over each round's new labels (None: the trainer's `epochs`; the
  `domain_epochs` setting overrides it per domain);
- `round_lr_factor`: a round's step size as a share of its model's own (the bootstrap's):
  small daily batches fit at the bootstrap's rate pull the weights toward one day.

The service side of a domain is its own process (services/<domain>/main.py, on the shared
template shared/domain.py), which names itself with the same registered name.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Iterator, Mapping, Sequence

from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError, Message

from shared.feedback.domains import DOMAIN_NAME

DEFAULT_DOMAIN_MODULES = "trainer.domains.fraud_plugin,trainer.domains.recommender_plugin,trainer.domains.pricing_plugin"
NAME = DOMAIN_NAME  # the registered name's syntax, shared with the services' feedback client
CANARY_MODES = ("canary", "shadow")
PLUGIN_ATTRIBUTE = "TRAINER_DOMAIN"
LEGACY_OUTCOME_FIELDS = (4, 5, 6)  # feedback.proto Outcome: the oneof of domain messages before plug-ins


def check_domain_name(name: str) -> str:
    """The name when it is a valid registered domain name, else ValueError."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"domain name {str(name)[:40]!r}: expected [a-z][a-z0-9_]{{0,31}}")
    return name


def _identity_part(value: Any) -> str:
    # the spelling the event log has always stored (bools as 0/1, floats by repr), so outcome
    # keys written before plug-ins still match the keys of outcomes resent after them
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclasses.dataclass(frozen=True)
class TrainerDomain:
    """One domain as the trainer sees it (see the module docstring)."""

    name: str
    outcome_type: type[Message]
    request_type: type[Message]
    response_type: type[Message]
    outcome_identity: Callable[[Any], tuple]
    window_s: float
    latest_outcome_wins: bool
    model: Callable[[Any], Any]
    bootstrap: Callable[..., "dict | None"]
    one_label_per_prediction: bool | None = None
    settings: type | None = None
    canary_mode: str = "canary"
    round_epochs: int | None = None
    round_lr_factor: float = 1.0
    # (feedback.v1.ServedPrediction, [outcome_type messages in the window]) -> [outcome_type messages]
    served_labels: Callable[[Any, list[Message]], list[Message]] | None = None

    def __post_init__(self) -> None:
        check_domain_name(self.name)
        for what in ("outcome_type", "request_type", "response_type"):
            t = getattr(self, what)
            if not (isinstance(t, type) and issubclass(t, Message)):
                raise TypeError(f"domain {self.name}: {what} must be a protobuf message class, got {t!r}")
        if "prediction_id" not in self.outcome_type.DESCRIPTOR.fields_by_name:
            raise TypeError(f"domain {self.name}: {self.outcome_type.DESCRIPTOR.full_name} has no prediction_id")
        if not self.window_s > 0:
            raise ValueError(f"domain {self.name}: window_s must be > 0")
        if self.served_labels is not None and not callable(self.served_labels):
            raise TypeError(f"domain {self.name}: served_labels must be callable")
        if self.canary_mode not in CANARY_MODES:
            raise ValueError(f"domain {self.name}: canary_mode must be one of {CANARY_MODES}")
        if self.round_epochs is not None and not (isinstance(self.round_epochs, int) and self.round_epochs >= 1):
            raise ValueError(f"domain {self.name}: round_epochs must be an int >= 1 or None")
        if not (isinstance(self.round_lr_factor, (int, float)) and 0 < self.round_lr_factor <= 10):
            raise ValueError(f"domain {self.name}: round_lr_factor must be in (0, 10]")
        if self.settings is not None and not dataclasses.is_dataclass(self.settings):
            raise TypeError(f"domain {self.name}: settings must be a dataclass")
        if self.one_label_per_prediction is None:
            object.__setattr__(self, "one_label_per_prediction", self.latest_outcome_wins)

    @property
    def outcome_type_name(self) -> str:
        return self.outcome_type.DESCRIPTOR.full_name

    @property
    def request_type_name(self) -> str:
        return self.request_type.DESCRIPTOR.full_name

    @property
    def response_type_name(self) -> str:
        return self.response_type.DESCRIPTOR.full_name

    def unpack_outcome(self, outcome: Any) -> Message:
        """The domain outcome message inside a feedback Outcome; ValueError when it packs another
        type or its bytes do not parse. An outcome stored before plug-ins (feedback.proto's retired
        fields 4..6 instead of domain_outcome) is read from its retired field: the event log's
        domain column says whose message that is, so no domain is named here."""
        if not outcome.HasField("domain_outcome"):
            for field in unknown_fields.UnknownFieldSet(outcome):
                if field.field_number in LEGACY_OUTCOME_FIELDS and field.wire_type == 2:
                    try:
                        return self.outcome_type.FromString(field.data)
                    except DecodeError:
                        raise ValueError(f"the retired outcome field {field.field_number} does not parse as "
                                         f"{self.outcome_type_name}") from None
            raise ValueError(f"no domain_outcome (a packed {self.outcome_type_name})")
        packed = outcome.domain_outcome
        type_name = packed.type_url.rsplit("/", 1)[-1]
        if type_name != self.outcome_type_name:
            raise ValueError(f"packs {type_name[:128]!r}, domain {self.name} sends {self.outcome_type_name!r}")
        try:
            return self.outcome_type.FromString(packed.value)
        except DecodeError:
            raise ValueError(f"the bytes of {self.outcome_type_name} do not parse") from None

    def outcome_key(self, prediction_id: str, message: Message) -> str:
        """The outcome's identity (duplicates): the domain, the prediction and its identity fields."""
        parts = (self.name, prediction_id, *(_identity_part(v) for v in self.outcome_identity(message)))
        return "\x1f".join(parts)

    def outcome_slot(self, prediction_id: str, message: Message) -> str:
        """What the label is about: the prediction when the latest outcome wins, else its identity."""
        if self.latest_outcome_wins:
            return f"{self.name}\x1f{prediction_id}"
        return self.outcome_key(prediction_id, message)

    def settings_view(self, trainer_settings: Any) -> Any:
        """This plug-in's settings dataclass, filled from the trainer settings' fields of the same names."""
        if self.settings is None:
            return None
        return self.settings(**{f.name: getattr(trainer_settings, f.name) for f in dataclasses.fields(self.settings)})


class Domains(Mapping[str, TrainerDomain]):
    """The domains one trainer knows: name -> TrainerDomain, in the order of their modules."""

    def __init__(self, domains: Sequence[TrainerDomain], modules: Sequence[str] = ()) -> None:
        self._by_name: dict[str, TrainerDomain] = {}
        for d in domains:
            if d.name in self._by_name:
                raise ValueError(f"two domain plug-ins register the name {d.name!r}")
            self._by_name[d.name] = d
        self.modules = tuple(modules)

    def __getitem__(self, name: str) -> TrainerDomain:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def windows(self) -> dict[str, float]:
        """Each domain's label window, seconds."""
        return {n: d.window_s for n, d in self._by_name.items()}

    def one_label_per_prediction(self) -> frozenset[str]:
        return frozenset(n for n, d in self._by_name.items() if d.one_label_per_prediction)

    def __repr__(self) -> str:
        return f"Domains({list(self._by_name)})"


def parse_modules(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'a.b,c.d' (or a sequence) -> ('a.b', 'c.d'), without blanks or repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return tuple(dict.fromkeys(m.strip() for m in items if m.strip()))


@functools.lru_cache(maxsize=None)
def _load(modules: tuple[str, ...]) -> Domains:
    found = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"domain module {name!r} cannot be imported: {e}") from e
        plugin = getattr(module, PLUGIN_ATTRIBUTE, None)
        if not isinstance(plugin, TrainerDomain):
            raise ValueError(f"domain module {name!r} has no {PLUGIN_ATTRIBUTE} = TrainerDomain(...)")
        found.append(plugin)
    return Domains(found, modules)


def load_domains(modules: str | Sequence[str] = DEFAULT_DOMAIN_MODULES) -> Domains:
    """The plug-ins of these modules (imported once per process)."""
    parsed = parse_modules(modules)
    if not parsed:
        raise ValueError("no domain module given")
    return _load(parsed)


def default_domains() -> Domains:
    """The built-in domains (DEFAULT_DOMAIN_MODULES)."""
    return load_domains(DEFAULT_DOMAIN_MODULES)
