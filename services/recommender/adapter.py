"""Recommender domain rules: request -> model inputs over the catalog, outputs -> ranked items.

The model contract (docs in the trainer's recommender domain and notes/reco_contract.md):
a version holds the scoring graph (model.onnx: user tower + scoring over the catalog matrix
+ TopK inside the graph), an item tower (item_tower.onnx: item id, title embedding,
category, price -> one vector per item), vocab.json, catalog.jsonl and users.npz.
Each version's item vectors over the catalog: services.recommender.item_index.

Variable-length inputs are padded with -1 so that requests of different lengths land in
a few shapes and can be batched together: restrict (candidate rows) to 1 (none) or a
bucket width (64 x a power of 4), exclude (purchased rows, bounded by
history_max_purchased) always to the one width that holds the largest purchased set.

Departments: a request scoped to departments restricts the graph to their rows (the model and
the popularity fallback alike: both are the graph). Exploration: while the catalog holds items
the serving version has no id for (brand-new items, scored by their title, category and price
and the cold-item popularity prior), a request gets a second scoring by the graph (a run of its
own or a second row of the request's: RecommenderService.infer) ranking only those items, and
the best of them take at most floor(k x explore_share) of the last places when the ranking
itself shows fewer (realised share: explored_items_total / served_items_total); for a customer
with a history, "best" is the titles closest to the history's among its top EXPLORE_SHORTLIST
(services.recommender.explore); past EXPLORE_POOL unlearned items it ranks a uniform draw of
that many, so its cost is bounded. It is only made while unlearned items exist, i.e. until the
next round learns them.
Catalog updates (UpsertItems, the journal follower): services.recommender.catalog_updates.
The Redis mode (RedisOnlineState: history, prediction memory, catalog shared by every replica):
predict() reads the user's lists before the template's preprocess, and remembers the
prediction's user before answering; an accepted interaction is recorded after admission.
"""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import logging
import math
import threading
import time
from typing import Hashable

import numpy as np
from prometheus_client import Counter
from redis.exceptions import RedisError

from protos.common.v1 import common_pb2
from protos.feedback.v1 import feedback_pb2
from protos.recommender.v1 import recommender_pb2 as pb
from services.recommender.catalog import Catalog, CatalogSnapshot
from services.recommender.catalog_records import MAX_DEPARTMENT_CHARS, read_jsonl
from services.recommender.catalog_updates import CATALOG_ITEMS, CatalogUpdates
from services.recommender.contract import bucket, padded
from services.recommender.explore import (EXPLORATIONS, EXPLORE_SHORTLIST, closest_titles, explore_inputs,
                                          explore_pool, with_explore_row)
from services.recommender.history import RecentPredictions, UserHistory
from services.recommender.item_index import ItemIndex, VersionItems
from services.recommender.redis_state import RedisOnlineState
from shared.domain import DomainService, Prepared, check_id, event_time, feedback_outcome
from shared.errors import InvalidArgument, Unavailable
from shared.runtime.model import LoadedModel, ModelRejected
from shared.runtime.session import RuntimeOptions

log = logging.getLogger(__name__)

MAX_K = 200
MAX_CANDIDATES = 10_000
MAX_UPSERT = 1_000  # default items per UpsertItems (setting upsert_max_items)
MAX_TITLE_CHARS = 300  # default title bound (setting title_max_chars): ~60 tokens, ~20 ms of encoder CPU
MAX_CATEGORY_CHARS = 128
MAX_DEPARTMENTS = 16  # department names per Recommend
EXPLORE_SHARE = 0.1  # default share of k given to not-yet-learned items at most (setting explore_share)
EVENTS = {pb.EVENT_IMPRESSION, pb.EVENT_CLICK, pb.EVENT_ADD_TO_CART, pb.EVENT_PURCHASE}
INTERACTIONS = {pb.EVENT_CLICK, pb.EVENT_ADD_TO_CART, pb.EVENT_PURCHASE}  # what feeds the user's history

# The Redis mode: the user's (recent, purchased) as read from Redis for the request being
# answered. predict() awaits the read before the synchronous template runs preprocess (which
# cannot await); a context variable reaches preprocess in the same task and in the shadow
# task it spawns (a task copies the context it was created in).
_USER_STATE: contextvars.ContextVar[tuple[str, list[str], list[str]] | None] = \
    contextvars.ContextVar("recommender_user_state", default=None)


FALLBACKS = Counter("storefront_recommender_fallback_total",
                    "Recommend answers that used the popularity fallback (user unknown to the model, no history)")
SERVED_ITEMS = Counter("storefront_recommender_served_items_total", "Items returned by Recommend")
EXPLORED = Counter("storefront_recommender_explored_items_total",
                   "Items returned by Recommend through the exploration slot (items the serving version has not "
                   "learned yet); the realised exploration share is this over served_items_total")


@dataclasses.dataclass
class RecoRequest:
    """What postprocess and the trainer's record need from preprocess."""

    snapshot: CatalogSnapshot
    k: int
    user_id: str
    history_ids: list[str]
    fallback: bool
    restrict: frozenset[int] | None
    exclude: frozenset[int]
    explore: int = 0  # exploration slots (the exploration ranks not-yet-learned items: infer)
    history_rows: tuple[int, ...] = ()  # the history's catalog rows (the slot picks by their titles)
    index: ItemIndex | None = None  # the version's item index the request was scored on
    explore_pool: np.ndarray | None = None  # the exploration's candidate rows (explore_pool)
    explore_k: int = 0  # how many of them the exploration ranks


class RecommenderService(CatalogUpdates, DomainService[pb.RecommendRequest, pb.RecommendResponse]):
    domain = "recommender"
    prediction_id_legacy_domain = 2  # ids issued before domains were named still verify

    def __init__(self, served, catalog: Catalog, history: UserHistory | None, feedback=None, *,
                 options: RuntimeOptions | None = None, max_k: int = MAX_K, prediction_memory: int = 200_000,
                 text_cache_size: int = 200_000, upsert_max_items: int = MAX_UPSERT,
                 title_max_chars: int = MAX_TITLE_CHARS, category_max_chars: int = MAX_CATEGORY_CHARS,
                 explore_share: float = EXPLORE_SHARE, shared: RedisOnlineState | None = None) -> None:
        """history: the in-process UserHistory; shared: the Redis mode instead (history,
        prediction memory and catalog journal on Redis, shared by every replica)."""
        super().__init__(served, feedback)
        if (history is None) == (shared is None):
            raise ValueError("give the in-process history or the shared (Redis) state, one of them")
        self.catalog = catalog
        self.shared = shared
        self.history = history if shared is None else shared.history
        self.options = options or RuntimeOptions()
        self.max_k = max_k
        self.predictions = RecentPredictions(prediction_memory) if shared is None else shared.predictions
        self.catalog_position = None  # the Redis mode: where the catalog's first load left the shared stream
        self.exclude_width = bucket(max(1, self.history.max_purchased))
        self.text_cache_size = text_cache_size
        self.encoder = None  # shared.text.TextEncoder, loaded with the first model version
        self._encoder_lock = threading.Lock()
        self._upsert_lock = asyncio.Lock()
        self.upsert_max_items = upsert_max_items
        self.title_max_chars = title_max_chars
        self.category_max_chars = category_max_chars
        self.explore_share = explore_share
        self._explore_rng = np.random.default_rng()  # the exploration pool's draws (explore_pool)
        self.titles_embedded = 0  # titles the upsert path has sent to the encoder (tests, logs)

    # ---- per-version preparation (loader thread) ----
    def text_encoder(self):
        with self._encoder_lock:
            if self.encoder is None:
                from shared.registry import RegistryError
                from shared.text import TextEncoder

                if self.served.registry is None:
                    raise ModelRejected("the recommender needs a registry (for the text-encoder model)")
                try:
                    self.encoder = TextEncoder.from_registry(self.served.registry, self.options,
                                                             cache_size=self.text_cache_size)
                except RegistryError as e:
                    raise ModelRejected(str(e)) from e
                self.catalog.embed = self.encoder.encode
            return self.encoder

    def prepare(self, model: LoadedModel) -> VersionItems:
        """ModelLoader.prepare: the catalog (loaded once), the history seeded from this
        version's users, and the catalog's item vectors computed by this version."""
        folder = model.path.parent
        self.text_encoder()
        state = VersionItems(model, self.options)
        if self.history.max_recent < state.history_len:
            log.warning("recommender %s reads %d history items but history_max_recent is %d: raise it",
                        model.version, state.history_len, self.history.max_recent)
        if self.shared is not None:
            self._prepare_shared(model)
        else:
            self.catalog.ensure_loaded(seed=folder / "catalog.jsonl")
            if (folder / "users.npz").is_file():
                added = self.history.seed_npz(folder / "users.npz")
                log.info("recommender %s: history seeded with %d users", model.version, added)
        snap = self.catalog.current
        CATALOG_ITEMS.set(snap.size)
        started = time.perf_counter()
        state.publish(state.build(snap))
        log.info("recommender %s: item vectors for %d items in %.2f s", model.version, snap.size,
                 time.perf_counter() - started)
        return state

    def _prepare_shared(self, model: LoadedModel) -> None:
        """The Redis mode's part of prepare (loader thread): the version's users.npz into the
        shared history (once for all replicas), and, the first time, the catalog: the shared one,
        seeded from the version's catalog.jsonl when it is empty, loaded from its snapshot with
        the stream position the follower goes on from."""
        folder = model.path.parent
        first_load = not self.catalog.loaded
        seed = read_jsonl(folder / "catalog.jsonl") if first_load and (folder / "catalog.jsonl").is_file() else []

        async def work(history, journal):
            added = await history.seed_npz(folder / "users.npz") if (folder / "users.npz").is_file() else 0
            if not first_load:
                return added, None
            if seed and await journal.seed(seed):
                log.info("recommender %s: the shared catalog seeded with %d items", model.version, len(seed))
            return added, await journal.snapshot()

        added, snapshot = self.shared.blocking(work)
        log.info("recommender %s: shared history seeded with %d users", model.version, added)
        if snapshot is not None:
            items, position = snapshot
            if not items:
                raise ModelRejected("the shared catalog is empty and the version has no catalog.jsonl to seed it")
            self.catalog.load_records(items, "the shared catalog (Redis)")
            self.catalog_position = position

    def warmup_feeds(self, model: LoadedModel, batch: int) -> dict[str, np.ndarray]:
        """Realistic warm-up: known users, real history rows, the whole catalog matrix."""
        state: VersionItems = model.prepared
        idx = state.index
        if idx.size == 0:
            raise ModelRejected("the catalog is empty")
        rng = np.random.default_rng(0)
        users = np.arange(1, batch + 1) % (len(state.user_code) + 1)
        history = np.full((batch, state.history_len), -1, np.int64)
        history[:, : min(3, state.history_len)] = rng.integers(0, idx.size, (batch, min(3, state.history_len)))
        return {"user": users.reshape(-1, 1).astype(np.int64), "history": history,
                "context": np.zeros((batch, 3), np.int64),
                "k": np.full((batch, 1), min(10, idx.size), np.int64),
                "restrict": np.full((batch, 1), -1, np.int64),
                "exclude": np.full((batch, self.exclude_width), -1, np.int64),  # the width requests have
                "item_vectors": idx.vectors}

    # ---- Recommend ----
    def routing_key(self, request: pb.RecommendRequest) -> str | None:
        """Canary routing by user: one user sees one version's rankings while a canary runs (no
        flip-flopping lists between page views). Anonymous requests: a random draw."""
        return request.user_id or None

    def preprocess(self, request: pb.RecommendRequest, model: LoadedModel) -> Prepared:
        user_id = check_id(request.user_id, "user_id", 128, required=False)
        ctx = request.context
        check_id(ctx.page, "context.page", 64, required=False)
        check_id(ctx.device, "context.device", 64, required=False)
        if ctx.HasField("hour_of_day"):
            if ctx.hour_of_day > 23:
                raise InvalidArgument(f"context.hour_of_day must be 0..23, got {ctx.hour_of_day}")
            hour = ctx.hour_of_day
        else:
            hour = time.gmtime().tm_hour
        if not 1 <= request.k <= self.max_k:
            raise InvalidArgument(f"k must be 1..{self.max_k}, got {request.k}")
        if len(request.candidate_item_ids) > MAX_CANDIDATES:
            raise InvalidArgument(f"candidate_item_ids has {len(request.candidate_item_ids)} ids; at most {MAX_CANDIDATES}")
        if len(request.departments) > MAX_DEPARTMENTS:
            raise InvalidArgument(f"departments has {len(request.departments)} names; at most {MAX_DEPARTMENTS}")
        for i, name in enumerate(request.departments):
            check_id(name, f"departments[{i}]", MAX_DEPARTMENT_CHARS, required=False)
        state: VersionItems = model.prepared
        snap = self.catalog.current
        if snap.size == 0:
            raise Unavailable("the catalog is empty")
        restrict: list[int] = []
        if request.candidate_item_ids:
            unknown = []
            for item_id in dict.fromkeys(request.candidate_item_ids):
                row = snap.row(item_id)
                if row is None:
                    unknown.append(item_id)
                else:
                    restrict.append(row)
            if unknown:
                shown = ", ".join(repr(u[:128]) for u in unknown[:5])
                raise InvalidArgument(f"candidate_item_ids: {len(unknown)} id(s) not in the catalog: {shown}"
                                      + (" ..." if len(unknown) > 5 else ""))
        restrict_set = frozenset(restrict) if restrict else None
        if request.departments:
            # scoped: the graph ranks only the scope's rows, the model and the popularity fallback
            # alike (both are the same graph); postprocess checks the rows again
            rows, row_set = snap.scope(request.departments)
            if restrict:
                restrict = [r for r in restrict if r in row_set]
                restrict_set = frozenset(restrict)
            else:
                restrict, restrict_set = rows, row_set
            if len(restrict) == 0:  # nothing in scope: the graph needs some row, postprocess keeps none
                restrict, restrict_set = [0], frozenset()
        index = state.index_for(snap)
        user_code = state.user_code.get(user_id, 0) if user_id else 0
        # ids -> rows of this snapshot (rows >= size were added after it): hot path, inlined lookups
        row_of, size = snap.row_of, snap.size
        history_ids, history_rows = [], []
        recent, purchased = self._user_state(user_id, 2 * state.history_len, request.exclude_purchased)
        if user_id:
            for item_id, row in zip(recent, map(row_of.get, recent)):
                if row is not None and row < size:
                    history_ids.append(item_id)
                    history_rows.append(row)
                    if len(history_rows) == state.history_len:
                        break
        exclude: list[int] = []
        if request.exclude_purchased and user_id:
            exclude = [r for r in map(row_of.get, purchased) if r is not None and r < size]
        history = np.full((1, state.history_len), -1, np.int64)
        history[0, : len(history_rows)] = history_rows
        context = np.array([[state.pages.get(ctx.page.lower(), 0), state.devices.get(ctx.device.lower(), 0), hour]],
                           np.int64)
        feeds = {"user": np.array([[user_code]], np.int64), "history": history, "context": context,
                 "k": np.array([[request.k]], np.int64), "restrict": padded(restrict),
                 # one width for every request (the purchased set is bounded): exclusions never split a
                 # batch, and scattering a few hundred -1s costs nothing next to scoring the catalog
                 "exclude": padded(exclude, empty=self.exclude_width, at_least=self.exclude_width)}
        slots = int(request.k * self.explore_share)
        pool = None
        if slots and len(index.unlearned):
            unlearned = index.unlearned
            if restrict_set is not None:
                unlearned = unlearned[np.isin(unlearned, np.fromiter(restrict_set, np.int64))]
            if len(unlearned):
                pool = explore_pool(unlearned, self._explore_rng)
        extra = RecoRequest(snap, request.k, user_id, history_ids,
                            fallback=user_code == 0 and not history_rows,
                            restrict=restrict_set, exclude=frozenset(exclude),
                            explore=slots if pool is not None else 0, history_rows=tuple(history_rows),
                            index=index, explore_pool=pool,
                            # with a history the graph shortlists, the titles pick (postprocess)
                            explore_k=max(slots, EXPLORE_SHORTLIST) if history_rows else slots)
        return Prepared(feeds, len(feeds["user"]), extra, shared={"item_vectors": index.vectors})

    def _user_state(self, user_id: str, n: int, want_purchased: bool) -> tuple[list[str], list[str]]:
        """(recent, purchased) of the user: the in-process history, or what predict read from
        Redis for this request (the Redis mode)."""
        if not user_id:
            return [], []
        if self.shared is None:
            return self.history.recent(user_id, n), self.history.purchased(user_id) if want_purchased else []
        state = _USER_STATE.get()
        if state is None or state[0] != user_id:
            raise RuntimeError("the Redis mode reads the user's state in predict(), before preprocess")
        return state[1][:n], state[2]

    async def predict(self, request: pb.RecommendRequest, deadline: float | None) -> pb.RecommendResponse:
        """The template's predict; in the Redis mode the user's history is read first (one round
        trip) and the prediction's user is remembered on Redis before the answer goes out, so an
        outcome reported to any replica right after it finds the user."""
        if self.shared is None or not request.user_id:
            return await super().predict(request, deadline)
        user_id = check_id(request.user_id, "user_id", 128, required=False)
        try:
            recent, purchased = await self.shared.history.user_state(user_id, self.history.max_recent)
        except RedisError as e:
            raise Unavailable(f"the user's history (Redis) could not be read: {e}") from e
        token = _USER_STATE.set((user_id, recent, purchased))
        try:
            response = await super().predict(request, deadline)
        finally:
            _USER_STATE.reset(token)
        try:
            await self.predictions.add(response.prediction_id, user_id)
        except RedisError as e:
            # answered and recorded for the trainer; only its outcomes will not update the history
            log.warning("recommender: prediction %s could not be remembered on Redis (%s); its outcomes will not "
                        "update the user's history", response.prediction_id, e)
        return response

    async def infer(self, prepared: Prepared, deadline: float | None, model: LoadedModel, *, pin: bool
                    ) -> tuple[dict[str, np.ndarray], LoadedModel]:
        """The request's run and the exploration's (outputs explore_<name>, items as catalog rows), on one
        version. Idle or unbatched: a run of its own (explore_inputs): two rows over the whole catalog make
        ORT pack it (3.1 ms, one row 0.8, 100k items). Queued: a second row in the batch's GEMM."""
        r: RecoRequest = prepared.extra
        if r.explore_pool is None:
            return await super().infer(prepared, deadline, model, pin=pin)
        own = self.served.batcher.max_batch_size == 1 or self.served.batcher.queued == 0
        EXPLORATIONS[own].inc()
        if own:
            feeds, shared, rows = explore_inputs(prepared.feeds, prepared.shared["item_vectors"], r.explore_pool,
                                                 r.explore_k)
            (named, used), (explored, _) = await asyncio.gather(
                super().infer(prepared, deadline, model, pin=pin),
                self.served.infer(feeds, 1, deadline, shared=shared, model=model))
            for name, value in zip(model.output_names, explored):
                named["explore_" + name] = rows[value] if name == "items" else value
            return named, used
        both = with_explore_row(prepared.feeds, padded(r.explore_pool), r.explore_k)
        outputs, used = await self.served.infer(both, 2, deadline, shared=prepared.shared, model=model)
        named = {name: value[:1] for name, value in zip(used.output_names, outputs)}
        named.update({"explore_" + name: value[1:] for name, value in zip(used.output_names, outputs)})
        return named, used

    def postprocess(self, request, prepared: Prepared, outputs, model: LoadedModel,
                    prediction_id: str) -> pb.RecommendResponse:
        r: RecoRequest = prepared.extra
        resp = pb.RecommendResponse(prediction_id=prediction_id, fallback=r.fallback,
                                    model=common_pb2.ModelRef(name=model.name, version=model.version))
        ranked = self._ranked(r, outputs, 0, r.k)
        if r.explore:
            # the exploration slot: the best not-yet-learned items (for this user) take the last
            # places when the ranking itself shows fewer than `explore` of them; they scored below
            # every item they displace, so the list stays best first
            shown = int(r.index.is_unlearned([e[0] for e in ranked]).sum())
            rows = {e[0] for e in ranked}
            explored = self._ranked(r, outputs, 0, r.explore_k, prefix="explore_")
            candidates = [e for e in explored if e[0] not in rows]
            if r.history_rows:  # the shortlist's titles closest to the history's (services.recommender.explore)
                texts = r.snapshot.text_vectors
                picked = closest_titles(texts(np.asarray(r.history_rows)), texts(np.asarray([e[0] for e in candidates],
                                                                                           np.int64)), r.explore)
                candidates = [candidates[i] for i in picked]
            extra = candidates[:max(0, r.explore - shown)]
            if extra:
                ranked = ranked[:max(0, min(len(ranked), r.k - len(extra)))] + extra
                EXPLORED.inc(len(extra))
        for row, s, c, p in ranked:
            resp.items.add(item_id=r.snapshot.ids[row], score=s, click_probability=c, purchase_probability=p)
        SERVED_ITEMS.inc(len(ranked))
        if r.user_id and self.shared is None:  # the Redis mode remembers it in predict (a network write)
            self.predictions.add(prediction_id, r.user_id)
        if r.fallback:
            FALLBACKS.inc()
        return resp

    @staticmethod
    def _ranked(r: RecoRequest, outputs, b: int, k: int, prefix: str = "") -> list[tuple[int, float, float, float]]:
        """(row, score, click, purchase) of output row b (of the outputs named prefix + name), at
        most k, filtered: the graph marks filtered entries with -inf; the rules are checked again here."""
        rows, score, click, purchase = (outputs[prefix + n][b] for n in ("items", "score", "click", "purchase"))
        out, seen = [], set()
        for j in range(len(rows)):
            row, s = int(rows[j]), float(score[j])
            if not math.isfinite(s) or not 0 <= row < r.snapshot.size or row in seen or row in r.exclude \
                    or (r.restrict is not None and row not in r.restrict):
                continue
            seen.add(row)
            out.append((row, s, min(1.0, max(0.0, float(click[j]))), min(1.0, max(0.0, float(purchase[j])))))
            if len(out) == k:
                break
        return out

    def served_record(self, request, prepared: Prepared, outputs, response):
        """What the trainer learns from: the user code, the history as item ids (catalog rows
        mean nothing outside this process), the context, and the items served with their
        probabilities. Never the catalog matrix."""
        r: RecoRequest = prepared.extra
        ids = [it.item_id for it in response.items]
        inputs = {"user": prepared.feeds["user"][:1],
                  "history_ids": np.array(r.history_ids, dtype=object).reshape(1, -1),
                  "context": prepared.feeds["context"][:1]}
        if request.candidate_item_ids:
            # the candidate list itself is not recorded (recorded_request drops it: up to
            # MAX_CANDIDATES ids, ~7.7 KB a record); a reference is: how many there were and a
            # digest of the set, enough to tell restricted requests apart and to match a list kept
            # elsewhere, at 30 bytes
            unique = sorted(set(request.candidate_item_ids))
            digest = hashlib.blake2b("\x1f".join(unique).encode(), digest_size=16).hexdigest()
            inputs["candidate_count"] = np.array([[len(unique)]], np.int64)
            inputs["candidate_digest"] = np.array([[digest]], dtype=object)
        recorded = {"item_ids": np.array(ids, dtype=object).reshape(1, -1),
                    "click": np.array([[it.click_probability for it in response.items]], np.float32).reshape(1, -1),
                    "purchase": np.array([[it.purchase_probability for it in response.items]],
                                         np.float32).reshape(1, -1)}
        return inputs, recorded

    def recorded_request(self, request: pb.RecommendRequest) -> pb.RecommendRequest:
        """The request without its candidate list (served_record keeps a count and a digest):
        training reads the user id and the context, never the candidates."""
        if not request.candidate_item_ids:
            return request
        slim = pb.RecommendRequest()
        slim.CopyFrom(request)
        del slim.candidate_item_ids[:]
        return slim

    # ---- outcomes ----
    def outcome_to_feedback(self, outcome: pb.RecommendationOutcome, now: float) -> tuple[Hashable, feedback_pb2.Outcome]:
        check_id(outcome.prediction_id, "prediction_id", 64)
        check_id(outcome.item_id, "item_id", 128)
        if outcome.event not in EVENTS:
            raise InvalidArgument(f"event must be EVENT_IMPRESSION, EVENT_CLICK, EVENT_ADD_TO_CART or "
                                  f"EVENT_PURCHASE, got {outcome.event}")
        occurred = event_time(outcome.occurred_at, "occurred_at", now)
        message = pb.RecommendationOutcome()
        message.CopyFrom(outcome)
        message.occurred_at = occurred
        return (outcome.prediction_id, outcome.item_id, int(outcome.event)), feedback_outcome(message, occurred)

    def outcome_accepted(self, outcome: pb.RecommendationOutcome, record) -> None:
        if outcome.event not in INTERACTIONS or self.shared is not None:  # the Redis mode: outcome_queued
            return
        user_id = self.predictions.get(outcome.prediction_id)
        if user_id:  # unknown prediction (another replica, or forgotten): the trainer still learns it
            self.history.record(user_id, outcome.item_id, purchase=outcome.event == pb.EVENT_PURCHASE)

    async def outcome_queued(self, outcome: pb.RecommendationOutcome) -> None:
        """In the Redis mode an accepted (new) interaction goes into the shared history before
        the call answers, so the next Recommend on any replica sees it. The label is already
        queued for the trainer: Redis unreachable costs the history one interaction (logged),
        never the label."""
        if self.shared is None or outcome.event not in INTERACTIONS:
            return
        try:
            user_id = await self.predictions.get(outcome.prediction_id)
            if user_id:  # unknown (older than the prediction memory's TTL): the trainer still learns it
                await self.history.record(user_id, outcome.item_id, purchase=outcome.event == pb.EVENT_PURCHASE)
        except RedisError as e:
            log.warning("recommender: the outcome of %s could not update the shared history (%s)",
                        outcome.prediction_id, e)
