"""The recommender domain's trainer plug-in (trainer/plugins.py): its feedback contract, model, first model, settings."""
from __future__ import annotations

import dataclasses

from protos.recommender.v1 import recommender_pb2
from shared.settings import setting
from trainer.plugins import TrainerDomain


@dataclasses.dataclass
class RecommenderTrainerSettings:
    """The recommender's trainer settings (flag --catalog-path, environment STOREFRONT_CATALOG_PATH)."""

    catalog_path: str = setting("var/catalog/items.jsonl", "recommender: the service's catalog journal (JSONL), read "
                                "for the features of new items")


def recommender_model(settings=None):
    """The RecommenderModel: the registry's text encoder, the service's catalog journal (catalog_path)."""
    from trainer.domains.recommender import RecommenderModel, model_from_settings

    return RecommenderModel() if settings is None else model_from_settings(settings)


def bootstrap(registry, workdir, **kw):
    """Ta Feng purchases in time order; the item titles through the frozen MiniLM encoder."""
    from trainer.domains.recommender_bootstrap import bootstrap_recommender

    return bootstrap_recommender(registry, workdir, **kw)


TRAINER_DOMAIN = TrainerDomain(
    name="recommender",
    outcome_type=recommender_pb2.RecommendationOutcome,
    request_type=recommender_pb2.RecommendRequest,
    response_type=recommender_pb2.RecommendResponse,
    # recommender.proto: each (item, event) of a recommendation is its own label
    outcome_identity=lambda o: (o.item_id, int(o.event)),
    latest_outcome_wins=False,
    window_s=3600.0,  # clicks within minutes, purchases within the session
    model=recommender_model,
    bootstrap=bootstrap,
    settings=RecommenderTrainerSettings,
)
