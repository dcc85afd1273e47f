"""Real recommender artifacts for tests: the text encoder exported once per test session,
and (bootstrap_small_recommender) a recommender trained by the real learner on a small slice
of the real Ta Feng data, published with the encoder into a registry under tmp."""
from __future__ import annotations

import functools
from pathlib import Path

from tests.first_versions import bootstrap_config, bootstrap_key, built_once, copy_first_version, require_version
from trainer.text_encoder import export_text_encoder


@functools.lru_cache(maxsize=1)
def exported_text_encoder() -> tuple[Path, float]:
    """(path, ONNX-vs-PyTorch max abs diff) of the encoder, exported once per session (~10 s)."""
    folder, diff = built_once("text-encoder", (), lambda f: float(export_text_encoder(f / "model.onnx")[1]))
    return folder / "model.onnx", diff


def recommender_test_settings(root: Path, registry, name: str, **kw):
    """Settings of one in-process recommender for tests: free port, no metrics, no trainer, its
    own catalog journal and spool under root/name, fast polling; kw overrides."""
    from services.recommender.main import RecommenderSettings

    base = dict(host="127.0.0.1", port=0, metrics_port=0, registry_dir=str(registry.root), trainer_target="",
                catalog_path=str(root / name / "items.jsonl"), spool_dir=str(root / name / "spool"),
                poll_interval_s=0.05, grace_s=1.0, log_format="text")
    base.update(kw)
    return RecommenderSettings(**base)


SMALL_LINES = 40_000  # the first ~6 days of Ta Feng: ~6k customers, ~9k products


def _train_recommender(root: Path, config, limit: int, epochs: int):
    from shared.registry import ModelRegistry
    from trainer.domains.recommender import RecommenderModel
    from trainer.domains.recommender_bootstrap import bootstrap_recommender

    registry = ModelRegistry(root / "registry")
    model = RecommenderModel(registry_dir=registry.root)
    bootstrap_recommender(registry, root / "trainer", epochs=epochs, limit=limit, force=True, show_progress=False,
                          model=model, holdout_days=1, text_encoder=exported_text_encoder(), config=config)
    require_version(registry, "recommender")


@functools.lru_cache(maxsize=None)
def _trained_once(limit: int, epochs: int, key: tuple) -> Path:
    return built_once("recommender-first-version", (limit, epochs, key),
                      lambda root: _train_recommender(root, bootstrap_config(key), limit, epochs))[0]


@functools.lru_cache(maxsize=None)
def _lines(limit: int):
    from trainer.tafeng import load_tafeng

    return load_tafeng(limit)


def bootstrap_small_recommender(root: Path, config=None, limit: int = SMALL_LINES, epochs: int = 1):
    """A real `recommender` trained on the first `limit` Ta Feng lines with the real learner,
    published with the real `text-encoder` into root/registry (its checkpoint in root/trainer).
    Trained once per test session for each (limit, epochs, what the bootstrap reads of config) and
    copied here (tests/first_versions.py).
    Returns (registry, learner restored with config, a copy of the purchase lines used)."""
    from shared.registry import ModelRegistry
    from trainer.domains.recommender import RecommenderModel
    from trainer.learner import Learner

    root = Path(root)
    copy_first_version(_trained_once(limit, epochs, bootstrap_key(config)), root)
    registry = ModelRegistry(root / "registry")
    learner = Learner(RecommenderModel(registry_dir=registry.root), registry, root / "trainer", config)
    assert learner.restore()
    return registry, learner, _lines(limit).copy()


class RunningRecommender:
    """`async with RunningRecommender(settings) as stub`: one recommender server (services.recommender
    .main.build) on its settings' loopback port, with a channel to it; .app and .service while it runs."""

    def __init__(self, s) -> None:
        self.s = s

    async def __aenter__(self):
        import grpc

        from protos.recommender.v1 import recommender_pb2_grpc
        from services.recommender.main import build

        self.app, self.service = build(self.s)
        await self.app.start()
        self.channel = grpc.aio.insecure_channel(self.app.address)
        return recommender_pb2_grpc.RecommenderStub(self.channel)

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.app.stop()
