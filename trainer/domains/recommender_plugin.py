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
                                "for the features of new items; in the Redis mode (event_log_url set) the services' "
                                "shared catalog on Redis is read instead (see catalog_redis_url)")
    catalog_redis_url: str = setting("", "recommender, Redis mode: the Redis of the services' shared catalog (their "
                                     "redis_url) when it is not the event log's; empty = event_log_url's "
                                     "(redis_password_file serves both)")

    def validate(self) -> list[str]:
        from shared.redis_conn import check_redis_url

        return [f"catalog_redis_url: {problem}" for problem in check_redis_url(self.catalog_redis_url)]


def recommender_model(settings=None):
    """The RecommenderModel: the registry's text encoder, the service's catalog journal (catalog_path)."""
    from trainer.domains.recommender import RecommenderModel, model_from_settings

    return RecommenderModel() if settings is None else model_from_settings(settings)


def served_impressions(served, labels) -> list:
    """The impressions a Recommend response implies, once its label window closed (the joiner
    asks: TrainerDomain.served_labels). Every item the response returned (the served record's
    "item_ids" output, in the order served) that no outcome in the window names becomes an
    EVENT_IMPRESSION label: shown, not clicked, a negative for the click head at its served place
    (RecommenderModel.examples reads the place from the same list). A click without a purchase
    is already a negative for the conversion head (its row's level is a click). When the client
    sent explicit EVENT_IMPRESSION outcomes for the response, it knows which items were really
    rendered: those outcomes are the impressions and none is derived."""
    from trainer.domains.recommender import decode_bytes_tensor

    if any(int(o.event) == recommender_pb2.EVENT_IMPRESSION for o in labels):
        return []
    outputs = {t.name: t for t in served.outputs}
    if "item_ids" not in outputs:
        return []
    named = {o.item_id for o in labels}
    prediction_id = served.prediction_id
    out = []
    for item_id in dict.fromkeys(decode_bytes_tensor(outputs["item_ids"])):
        if item_id and item_id not in named:
            out.append(recommender_pb2.RecommendationOutcome(prediction_id=prediction_id, item_id=item_id,
                                                             event=recommender_pb2.EVENT_IMPRESSION,
                                                             occurred_at=served.served_at))
    return out


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
    served_labels=served_impressions,
    # A round makes one pass over its rows (and their replay), not the trainer's 3, at a tenth of
    # the bootstrap's step size: a day's few thousand rows, fit like the bootstrap's months, pull
    # the weights toward that day's baskets. Chosen on the 30 Ta Feng days before the scored window,
    # never on it (`python -m bench.eval_recommender --end-offset-days 30 --round-epochs N
    # --round-lr-factor F`), HR@10 there: 3 passes 0.3656; 1 pass 0.3719; 1 pass at step size
    # x0.5 0.3748, x0.25 0.3783, x0.1 0.3820, x0.05 0.3765 (replay 2 or 0.5 rows per new row at
    # x1: 0.3734, 0.3713)
    round_epochs=1,
    round_lr_factor=0.1,
)
