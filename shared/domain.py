"""The template every domain service follows: preprocess -> inference -> postprocess.

A domain (fraud, recommender, pricing, or any other: the runtime names none) subclasses
DomainService, names itself by its registered domain name (`domain`: the name its trainer
plug-in registers, trainer/plugins.py), and writes only what is particular to it:
`preprocess` (validate the request, build model inputs), `postprocess` (turn outputs into its
response, apply its rules) and `outcome_to_feedback` (validate an outcome, say what makes two
outcomes the same, pack it with `feedback_outcome`). `attach_domain` wires it into its server.
The template does the rest the same way everywhere: the deadline,
the batcher, a prediction id unique across replicas and restarts, recording what was
served and what happened for the trainer, and de-duplicating repeated outcomes.

Outcomes become training labels, so the template only takes them for predictions this
deployment really served (see "Outcome admission" below), at most `outcome_rate_per_s` per
caller, once per identity.

Delivery (see shared.serving): while the registry runs a canary, `routing_key` (a domain hook;
default: none, a random draw) decides by hash which requests the canary version answers; a
request it cannot answer goes to the champion (counted), so a bad candidate never fails one.
In shadow mode the champion answers and the shadow version scores the same request afterwards
in a bounded background task (`shadow_record` picks what of its run is recorded); the served
record then carries both (ServedPrediction.shadow), for the trainer's paired comparison.

Two optional hooks for domains whose model inputs are not what the trainer should see:
`served_record` picks what is recorded for the trainer (default: every model input and
output; the recommender records ids instead of its catalog matrix), and
`outcome_accepted` sees each new (non-duplicate) outcome (the recommender updates the
user's recent history with it).

Outcome admission (ReportOutcome / StreamOutcomes of every domain), in this order:
1. rate limit per caller (shared.ratelimit): RESOURCE_EXHAUSTED, nothing of it is kept;
2. validation (`outcome_to_feedback`): INVALID_ARGUMENT naming the field;
3. the prediction id must be one this deployment issued: NOT_FOUND otherwise. NOT_FOUND and not
   INVALID_ARGUMENT because the outcome is well formed: what it names does not exist (a guessed,
   mistyped or foreign id); retrying it does not help. A prediction id is
   `<128 random bits>.<HMAC-SHA256 of domain and those bits, 128 bits>` (base64url, 45
   characters), signed with a per-deployment key (`prediction_id_key_file`): any replica with
   the key verifies an id without memory, after restarts and weeks later (chargebacks). Ids this
   replica served recently are also remembered (bounded), which still admits them should the
   key be rotated away meanwhile;
4. duplicates (same identity, bounded memory) are counted, not queued again;
5. queued for the trainer; with `outcome_ack_durable` the answer waits until the outcome is
   fsync'd in the feedback spool (see shared.feedback.FeedbackClient).
Each refusal is counted in storefront_outcomes_rejected_total{domain, reason}.
"""
from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import logging
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, AsyncIterator, Generic, Hashable, Iterable, Mapping, TypeVar

import numpy as np
from google.protobuf.message import Message

from protos.common.v1 import common_pb2
from protos.feedback.v1 import feedback_pb2
from shared import logs
from shared.channels import is_loopback
from shared.feedback.records import feedback_outcome  # noqa: F401 (the domains' way to pack an outcome)
from shared.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted, ServiceError, Unavailable
from shared.metrics import OUTCOMES_REJECTED
from shared.prediction_ids import PREDICTION_ID_LEN  # noqa: F401 (importable from here, as before the move)
from shared.prediction_ids import PredictionIds, ServedIds, load_prediction_id_keys
from shared.ratelimit import RateLimiter
from shared.runtime.model import LoadedModel, ModelLoader
from shared.server import ServerApp
from shared.serving import ServedModel

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

MAX_FUTURE_SKEW_S = 300.0  # outcome times further in the future than this are refused


@dataclasses.dataclass
class Prepared:
    """Model inputs built from one request, plus whatever postprocess needs from preprocess."""

    feeds: dict[str, np.ndarray]
    rows: int
    extra: Any = None
    # Inputs without a batch axis, fed once per run (e.g. a catalog matrix). A request that has
    # them runs on the model version preprocess saw (they are usually made for that version).
    shared: dict[str, np.ndarray] | None = None


class SeenOutcomes:
    """Bounded memory of outcome identities this replica already accepted (best effort:
    the trainer de-duplicates for real)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._seen: collections.OrderedDict[Hashable, None] = collections.OrderedDict()

    def add(self, key: Hashable) -> bool:
        """True if new."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True

    def discard(self, key: Hashable) -> None:
        """Forget a key whose outcome could not be queued after all, so a retry is not a duplicate."""
        self._seen.pop(key, None)


def check_domain_name(name: str) -> str:
    """The name when it is a registered domain name ([a-z][a-z0-9_]{0,31}), else ValueError."""
    from shared.feedback.domains import domain_value

    return domain_value(name)


def finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{field} must be a finite number, got {value}")
    return value


def check_id(value: str, field: str, max_len: int, required: bool = True) -> str:
    if required and not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) > max_len:
        raise InvalidArgument(f"{field} is longer than {max_len} characters")
    return value


def event_time(value: float, field: str, now: float, allow_future: bool = False) -> float:
    """A client-sent Unix time: 0 means now; negative, non-finite or far future is refused."""
    finite(value, field)
    if value == 0:
        return now
    if value < 0:
        raise InvalidArgument(f"{field} must be >= 0 (Unix seconds), got {value}")
    if not allow_future and value > now + MAX_FUTURE_SKEW_S:
        raise InvalidArgument(f"{field} is {value - now:.0f} s in the future")
    return value


class DomainService(abc.ABC, Generic[Req, Resp]):
    """What a domain servicer delegates to; the gRPC servicer stays a thin adapter."""

    domain: str  # the registered domain name (FeedbackRecord.domain, metrics, its trainer plug-in's name)
    # the number this domain's prediction ids were signed with before domains were named (the
    # retired feedback.proto enum), so that ids issued then still verify; None for a newer domain
    prediction_id_legacy_domain: int | None = None

    def __init__(self, served: ServedModel, feedback=None) -> None:
        self.served = served
        self.feedback = feedback  # shared.feedback.FeedbackClient, or None when not learning
        self._domain_label = check_domain_name(self.domain)
        # configure_outcomes gives it the deployment's keys
        self.ids = PredictionIds(domain=self.domain, legacy_domain=self.prediction_id_legacy_domain)
        self.served_ids = ServedIds()
        self.seen_outcomes = SeenOutcomes()
        self.outcome_limiter = RateLimiter(0, 1)  # off until configure_outcomes
        self.outcome_ack_durable = False
        self._m_rejected: dict[str, Any] = {}

    # ---- what a domain writes ----
    @abc.abstractmethod
    def preprocess(self, request: Req, model: LoadedModel) -> Prepared:
        """Validate the request (InvalidArgument naming the field) and build model inputs."""

    @abc.abstractmethod
    def postprocess(self, request: Req, prepared: Prepared, outputs: Mapping[str, np.ndarray],
                    model: LoadedModel, prediction_id: str) -> Resp:
        """Build the response from the model outputs and the domain's rules."""

    @abc.abstractmethod
    def outcome_to_feedback(self, outcome: Message, now: float) -> tuple[Hashable, feedback_pb2.Outcome]:
        """Validate one outcome; return its identity (for duplicates) and the feedback record
        (`feedback_outcome`; the identity must agree with its trainer plug-in's outcome_identity)."""

    def served_record(self, request: Req, prepared: Prepared, outputs: Mapping[str, np.ndarray],
                      response: Resp) -> tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]:
        """(inputs, outputs) recorded for the trainer with the request and response; what the
        trainer learns from must be exactly what was served. Default: the batched model
        inputs and every output (never the shared inputs)."""
        return prepared.feeds, outputs

    def recorded_request(self, request: Req) -> Req:
        """The request as recorded for the trainer (default: as received). A domain drops what
        training never reads and what would make every record large (the recommender: its
        candidate list, up to thousands of ids per request)."""
        return request

    def outcome_accepted(self, outcome: Message, record: feedback_pb2.Outcome) -> None:
        """Called once per new (non-duplicate) valid outcome, before it is queued for the trainer."""

    async def outcome_queued(self, outcome: Message) -> None:
        """Called once per new (non-duplicate) valid outcome after it was queued for the trainer
        (durably, when configured), before the call answers: state that other replicas read (a
        shared store) is updated here, where it may be awaited. A failure here must not fail the
        outcome, whose label is already on its way: log it."""

    def routing_key(self, request: Req) -> str | None:
        """The request key that decides, while a canary runs, which version answers (hashed with
        the canary version: shared.registry.canary_bucket). A domain returns what should see one
        version consistently (a card, a user, a product); None or empty: a random draw per
        request (the default), so the share still holds but a caller may meet both versions."""
        return None

    def shadow_record(self, request: Req, prepared: Prepared, outputs: Mapping[str, np.ndarray]
                      ) -> tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], float]:
        """(inputs, outputs, score) recorded for a shadow version's run of a served request.
        postprocess is never run for a shadow (domains count and sample there: exploration,
        recent predictions), so this sees the raw outputs. Default: the batched inputs, every
        output, and the first element of the first output as the score (fraud: the probability)."""
        first = next(iter(outputs.values()), None)
        score = float(np.asarray(first).reshape(-1)[0]) if first is not None and np.size(first) else float("nan")
        return prepared.feeds, outputs, score

    async def infer(self, prepared: Prepared, deadline: float | None, model: LoadedModel, *, pin: bool
                    ) -> tuple[dict[str, np.ndarray], LoadedModel]:
        """(outputs by name, the version that ran them) of the prepared inputs. pin: run on `model`
        even if another version was swapped in meanwhile (so do inputs made with shared ones). A
        domain whose request takes more than one run overrides it (the recommender's exploration)."""
        outputs, used = await self.served.infer(prepared.feeds, prepared.rows, deadline, shared=prepared.shared,
                                                model=model if pin or prepared.shared else None)
        return dict(zip(used.output_names, outputs)), used

    # ---- the template ----
    async def predict(self, request: Req, deadline: float | None) -> Resp:
        champion = self.served.current
        if champion is None:
            raise Unavailable(f"model {self.served.name!r} is not loaded yet")
        if self.served.canary is not None:
            canary = self.served.pick(self.routing_key(request))
            if canary is not None:
                try:
                    return await self._answer(request, deadline, canary, pin=True, shadow=None)
                except (DeadlineExceeded, ResourceExhausted):
                    raise  # no time or no room left: the champion would fare no better
                except Exception as e:
                    # One bad version never fails a request: what the candidate could not answer
                    # (an error, a refused output, a request its preprocessing refuses) goes to
                    # the champion, which answers it or refuses it on its own terms.
                    self.served.canary_failed()
                    self._log_canary_failure(canary, e)
            return await self._answer(request, deadline, champion, pin=False, shadow=self.served.shadow_model())
        return await self._answer(request, deadline, champion, pin=False, shadow=None)

    _last_canary_log = -math.inf

    def _log_canary_failure(self, canary: LoadedModel, e: Exception) -> None:
        now = time.monotonic()
        if now - self._last_canary_log >= 10.0:  # at most one line per 10 s; the counter has them all
            self._last_canary_log = now
            log.warning("%s: canary %s/%s could not answer a request (%s: %s); the champion answered it "
                        "(storefront_canary_fallbacks_total counts every one)", self._domain_label, canary.name,
                        canary.version, type(e).__name__, str(e)[:300])

    async def _answer(self, request: Req, deadline: float | None, model: LoadedModel, *, pin: bool,
                      shadow: LoadedModel | None) -> Resp:
        """Preprocess with model, run, postprocess, record. pin: run on model even if another
        version was swapped in meanwhile (the canary; or inputs made for that version)."""
        prepared = self.preprocess(request, model)
        named, used = await self.infer(prepared, deadline, model, pin=pin)
        prediction_id = self.ids.next()
        self.served_ids.add(prediction_id)
        logs.model_version.set(used.version)
        response = self.postprocess(request, prepared, named, used, prediction_id)
        served_at = time.time()
        record = None
        if self.feedback is not None:
            inputs, recorded = self.served_record(request, prepared, named, response)
            record = (prediction_id, used.name, used.version, inputs, recorded, self.recorded_request(request),
                      response, served_at)
        if shadow is not None and shadow.version != used.version:
            # after the answer is built; the served record waits for the shadow's score (the
            # task records it, with or without the score), the answer never does
            if self.served.spawn_shadow(self._shadow(request, shadow, record)):
                return response
        if record is not None:
            self._record(record, None)
        return response

    def _record(self, record: tuple, shadow: Any) -> None:
        prediction_id, name, version, inputs, recorded, request, response, served_at = record
        self.feedback.record_served(prediction_id, name, version, inputs, recorded, request=request,
                                    response=response, served_at=served_at, shadow=shadow)

    async def _shadow(self, request: Req, model: LoadedModel, record: tuple | None) -> None:
        """Score request with the shadow version (see shared.serving): never raises, never
        answers; records the served prediction with the shadow's run when it succeeded."""
        from shared.feedback import ShadowRecord

        result, shadow = "failed", None
        started = time.perf_counter()
        try:
            prepared = self.preprocess(request, model)
            named, used = await self.infer(prepared, time.monotonic() + self.served.shadow_timeout_s, model, pin=True)
            inputs, recorded, score = self.shadow_record(request, prepared, named)
            shadow = ShadowRecord(used.version, inputs, recorded, score, (time.perf_counter() - started) * 1e3)
            result = "scored"
        except DeadlineExceeded:
            result = "timeout"
        except asyncio.CancelledError:
            result = "failed"
            raise
        except Exception:  # counted; the answer went out long ago
            result = "failed"
        finally:
            self.served.shadow_result(result)
            if record is not None:
                self._record(record, shadow)

    def _rejected(self, reason: str, n: int = 1) -> None:
        m = self._m_rejected.get(reason)
        if m is None:
            m = self._m_rejected[reason] = OUTCOMES_REJECTED.labels(self._domain_label, reason)
        m.inc(n)

    def known_prediction(self, prediction_id: str) -> bool:
        """Whether this deployment issued the id: remembered by this replica, or signed by its key."""
        return prediction_id in self.served_ids or self.ids.verify(prediction_id)

    def _admit(self, outcome: Message, now: float) -> tuple[Hashable, feedback_pb2.Outcome] | None:
        """Validate one outcome and check its prediction id; None for a duplicate (counted by the
        caller). The key is marked seen: the caller discards it when queueing fails."""
        try:
            key, record = self.outcome_to_feedback(outcome, now)
        except InvalidArgument:
            self._rejected("invalid")
            raise
        if not self.known_prediction(record.prediction_id):
            self._rejected("unknown_prediction")
            raise NotFound(f"prediction_id {record.prediction_id[:64]!r} was not issued by this {self._domain_label} "
                           "service (send back the prediction_id of a response, unchanged)")
        if not self.seen_outcomes.add(key):
            return None
        record.received_at = now
        return key, record

    def accept_outcomes(self, outcomes: Iterable[Message]) -> common_pb2.ReportOutcomeResponse:
        """Queue outcomes for the trainer (in memory; see `report_outcomes` for the RPCs, which
        add rate limiting and the durable ack); the first refused one stops the call (earlier
        ones stay)."""
        accepted = duplicates = 0
        now = time.time()
        for outcome in outcomes:
            admitted = self._admit(outcome, now)
            if admitted is None:
                duplicates += 1
                continue
            key, record = admitted
            self.outcome_accepted(outcome, record)
            if self.feedback is not None and not self.feedback.record_outcome(record):
                self.seen_outcomes.discard(key)
                self._rejected("queue_full")
                raise ResourceExhausted("outcome queue and disk spool are full; retry later")
            accepted += 1
        return common_pb2.ReportOutcomeResponse(accepted=accepted, duplicates=duplicates)

    async def _accept_one(self, outcome: Message, caller: str, total: common_pb2.ReportOutcomeResponse) -> None:
        if not self.outcome_limiter.allow(caller):
            self._rejected("rate_limited")
            raise ResourceExhausted(f"outcome rate limit of {self.outcome_limiter.rate:g}/s for this caller "
                                    "exceeded; retry with backoff")
        if not (self.outcome_ack_durable and self.feedback is not None):
            one = self.accept_outcomes([outcome])
            total.accepted += one.accepted
            total.duplicates += one.duplicates
            if one.accepted:
                await self.outcome_queued(outcome)
            return
        admitted = self._admit(outcome, time.time())
        if admitted is None:
            total.duplicates += 1
            return
        key, record = admitted
        # Durable: answer only once the outcome is fsync'd in the spool (survives kill -9).
        if not await self.feedback.record_outcome_durable(record):
            self.seen_outcomes.discard(key)
            self._rejected("queue_full")
            raise ResourceExhausted("the outcome could not be written to the feedback spool (full or failing); "
                                    "retry later")
        self.outcome_accepted(outcome, record)
        total.accepted += 1
        await self.outcome_queued(outcome)

    async def report_outcomes(self, outcomes: Iterable[Message], caller: str = "") -> common_pb2.ReportOutcomeResponse:
        """ReportOutcome: rate limit (per caller), admission, queue (durably when configured)."""
        total = common_pb2.ReportOutcomeResponse()
        for outcome in outcomes:
            await self._accept_one(outcome, caller, total)
        return total

    async def accept_outcome_stream(self, outcomes: AsyncIterator[Message],
                                    caller: str = "") -> common_pb2.ReportOutcomeResponse:
        """StreamOutcomes: like report_outcomes per message; a refusal names the outcome's 0-based
        index and ends the call (earlier outcomes stay accepted)."""
        total = common_pb2.ReportOutcomeResponse()
        i = 0
        async for outcome in outcomes:
            try:
                await self._accept_one(outcome, caller, total)
            except ServiceError as e:
                raise type(e)(f"outcome {i}: {e.message}") from None
            i += 1
        return total


def configure_outcomes(service: DomainService, settings) -> None:
    """Give a domain service its deployment's prediction id keys, its outcome rate limit and its
    outcome ack mode, from DomainSettings."""
    path = settings.prediction_id_key_file or str(Path(settings.registry_dir).resolve().parent / "secrets"
                                                  / "prediction-ids.key")
    service.ids = PredictionIds(load_prediction_id_keys(path), domain=service.domain,
                                legacy_domain=service.prediction_id_legacy_domain)
    service.outcome_limiter = RateLimiter(settings.outcome_rate_per_s, settings.outcome_burst)
    service.outcome_ack_durable = settings.outcome_ack_durable


def served_model(settings, *, expected=None, output_check=None, manifest_check=None):
    """The one model a domain service serves, loaded as its settings say (registry, execution
    providers, batching), with the domain's own checks of the signature, outputs and manifest.
    Returns (ServedModel, its ModelLoader): a domain may hook per-version work into the loader."""
    loader = ModelLoader(options=settings.runtime_options(), expected=expected, output_check=output_check,
                         manifest_check=manifest_check)
    return ServedModel.from_settings(settings.model_name, settings, loader), loader


def domain_app(service: "DomainService", settings, register, *, v2: bool = True):
    """The server app of a domain service (composition roots: services/<domain>/main.py): its
    one model, its gRPC registration (`register`, from its servicer module), the shared
    wiring of `attach_domain`, and `app.service` for in-process callers (tests, benchmarks)."""
    app = ServerApp(service.domain, settings, {settings.model_name: service.served}, register, v2=v2)
    attach_domain(app, service, settings)
    app.service = service
    return app


def attach_domain(app, service: "DomainService", settings) -> None:
    """Wire a domain service into its server app from DomainSettings: prediction id keys, outcome
    rate limit and ack mode (`configure_outcomes`), and its feedback stream to the trainer
    (`attach_feedback`, under the service's domain name)."""
    configure_outcomes(service, settings)
    service.feedback = attach_feedback(app, settings, service.domain)


def attach_feedback(app, settings, domain: str):
    """The feedback client of a domain service, started and stopped with its server; None
    when settings.trainer_target is empty (serving without learning). It presents the service's
    identity to the trainer: `feedback_token` as gRPC metadata and/or a client certificate
    (`trainer_tls_cert`/`trainer_tls_key`, whose CN names the domain) over TLS (`trainer_tls_ca`)."""
    if not settings.trainer_target:
        return None
    from shared.feedback import TOKEN_METADATA, FeedbackClient, client_credentials, read_secret

    spool = settings.spool_dir or f"var/spool/{domain}"
    worker = os.environ.get("STOREFRONT_WORKER_INDEX")
    if worker is not None:  # a spool folder is locked by one process: one per worker
        spool = os.path.join(spool, f"worker-{worker}")
    credentials = None
    options: list[tuple[str, object]] = []
    if settings.trainer_tls_ca:  # TLS to the trainer; with a client certificate, mTLS
        credentials = client_credentials(settings.trainer_tls_ca, settings.trainer_tls_cert, settings.trainer_tls_key)
        if settings.trainer_tls_server_name:
            options.append(("grpc.ssl_target_name_override", settings.trainer_tls_server_name))
    metadata = []
    token = read_secret(settings.feedback_token)
    if token:
        metadata.append((TOKEN_METADATA, token))
        if credentials is None and not is_loopback(settings.trainer_target):
            log.warning(
                "feedback: sending the feedback token to %s without TLS: anyone on the path can read it; "
                "set trainer_tls_ca", settings.trainer_target)
    client = FeedbackClient(settings.trainer_target, domain=domain, spool_dir=spool,
                            max_spool_bytes=settings.spool_max_mb << 20, channel_credentials=credentials,
                            channel_options=options, metadata=metadata)

    async def start() -> None:
        client.start()

    app.on_start.append(start)
    app.on_stop.append(client.stop)
    return client
