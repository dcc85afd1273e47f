"""Composition root of the recommender service: settings -> registry, model, catalog, history, server.

    python -m services.recommender.main [--port 50052] [--registry-dir var/registry] \
        [--catalog-path var/catalog/items.jsonl] ...

Needs the registry's `recommender` and `text-encoder` models (`python -m trainer bootstrap`).
Catalog updates: UpsertItems, or JSONL lines appended to the catalog journal by another
writer (the other workers of `--workers N`, a catalog feed), applied every catalog_poll_s.
The Redis mode (`--redis-url redis://HOST:PORT/DB`, several replicas behind a load balancer):
user history, prediction memory and catalog on Redis, shared by every replica
(services.recommender.redis_state; docs/REDIS.md).
The KServe V2 API is not exposed here: the scoring graph takes the catalog matrix, which
only this service has; Recommend is the way in.
"""
from __future__ import annotations

import asyncio
import dataclasses
import sys

from services.recommender.adapter import (EXPLORE_SHARE, MAX_CATEGORY_CHARS, MAX_K, MAX_TITLE_CHARS, MAX_UPSERT,
                                          RecommenderService)
from services.recommender.catalog import Catalog
from services.recommender.contract import check_manifest, check_outputs
from services.recommender.history import MAX_RECENT, UserHistory
from services.recommender.redis_state import RedisOnlineState
from services.recommender.servicer import RecommenderServicer, register
from shared.domain import domain_app, served_model
from shared.redis_conn import check_redis_url
from shared.server import ServerApp, run_app
from shared.settings import DomainSettings, setting


@dataclasses.dataclass
class RecommenderSettings(DomainSettings):
    """Recommender service."""

    port: int = setting(50052, "gRPC port")
    model_name: str = setting("recommender", "model name in the registry")
    catalog_path: str = setting("var/catalog/items.jsonl",
                                "catalog journal (JSONL, fsync'd per upsert; seeded from the model's catalog.jsonl); "
                                "unused with redis_url (the catalog is then shared on Redis)")
    max_k: int = setting(MAX_K, "largest k a Recommend may ask for (1..200)")
    history_max_users: int = setting(200_000, "users whose recent interactions are kept in memory")
    history_max_recent: int = setting(MAX_RECENT, "recent interactions kept per user (the model reads its manifest history_len of them)")
    history_max_purchased: int = setting(1000, "purchased items kept per user (for exclude_purchased)")
    prediction_memory: int = setting(200_000, "recent predictions whose user is remembered, so outcomes update history")
    text_cache_size: int = setting(200_000, "title embeddings cached in memory (LRU)")
    catalog_poll_s: float = setting(1.0, "how often to apply catalog journal lines other writers appended; 0 = never")
    upsert_max_items: int = setting(MAX_UPSERT, "most items one UpsertItems may carry (larger loads: several calls)")
    title_max_chars: int = setting(MAX_TITLE_CHARS, "longest item title UpsertItems accepts (encoder CPU grows with it, up to 128 tokens)")
    category_max_chars: int = setting(MAX_CATEGORY_CHARS, "longest item category UpsertItems accepts")
    explore_share: float = setting(EXPLORE_SHARE, "most of a Recommend's k slots given to items the serving version "
                                   "has not learned yet (new items, by title/category/price), floor(k x share); 0 = off")
    redis_url: str = setting("", "where the online state lives: empty = in this process (user history, prediction "
                             "memory) and the catalog_path journal; redis://HOST:PORT/DB (or rediss://, unix://) = "
                             "on Redis, shared by every replica (catalog_path is then unused)")
    redis_password_file: str = setting("", "file whose first line is the Redis password (not in redis_url)")

    def validate(self) -> list[str]:
        p = super().validate()
        if not 1 <= self.max_k <= MAX_K:
            p.append(f"max_k must be in 1..{MAX_K}")
        for name in ("history_max_users", "history_max_recent", "prediction_memory"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1")
        for name in ("history_max_purchased", "text_cache_size"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0")
        if not self.catalog_path and not self.redis_url:
            p.append("catalog_path is required (or redis_url)")
        p += [f"redis_url: {problem}" for problem in check_redis_url(self.redis_url)]
        if self.redis_password_file and not self.redis_url:
            p.append("redis_password_file is set but redis_url is empty (the in-process state needs no password)")
        if not 0 <= self.explore_share <= 1:
            p.append("explore_share must be in 0..1")
        if self.catalog_poll_s < 0:
            p.append("catalog_poll_s must be >= 0")
        for name in ("upsert_max_items", "title_max_chars", "category_max_chars"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1")
        return p


def make_app(s: RecommenderSettings) -> ServerApp:
    return build(s)[0]


def build(s: RecommenderSettings) -> tuple[ServerApp, RecommenderService]:
    """The server app and its domain core (tests and tools reach the catalog and history through it)."""
    served, loader = served_model(s, output_check=check_outputs, manifest_check=check_manifest)
    shared = history = None
    if s.redis_url:  # the Redis mode: history, prediction memory and catalog shared by every replica
        shared = RedisOnlineState(s.redis_url, s.redis_password_file, max_recent=s.history_max_recent,
                                  max_purchased=s.history_max_purchased)
    else:
        history = UserHistory(s.history_max_users, s.history_max_recent, s.history_max_purchased)
    service = RecommenderService(served, Catalog(s.catalog_path), history, options=s.runtime_options(),
                                 max_k=s.max_k, prediction_memory=s.prediction_memory,
                                 text_cache_size=s.text_cache_size, upsert_max_items=s.upsert_max_items,
                                 title_max_chars=s.title_max_chars, category_max_chars=s.category_max_chars,
                                 explore_share=s.explore_share, shared=shared)
    # per-version state (catalog item vectors from the version's own item tower), built
    # in the loader thread before the version serves; warm-up runs on the real catalog
    loader.prepare = service.prepare
    loader.warmup_feeds = service.warmup_feeds
    app = domain_app(service, s, register(RecommenderServicer(service)), v2=False)
    if shared is not None or s.catalog_poll_s > 0:
        follower: list[asyncio.Task] = []

        async def start_following() -> None:
            following = (service.follow_shared_catalog(s.catalog_poll_s or 1.0) if shared is not None
                         else service.follow_journal(s.catalog_poll_s))
            follower.append(asyncio.get_running_loop().create_task(following))

        async def stop_following() -> None:
            for task in follower:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        app.on_start.append(start_following)
        app.on_stop.append(stop_following)
    if shared is not None:
        app.on_stop.append(shared.close)
    return app, service


def main(argv: list[str] | None = None) -> int:
    return run_app(make_app, RecommenderSettings.load(argv))


if __name__ == "__main__":
    sys.exit(main())
