import pytest

from shared.serve_onnx import OnnxServerSettings
from shared.settings import ServingSettings as ServerSettings


def test_flags_beat_environment_beat_defaults():
    env = {"STOREFRONT_PORT": "19000", "STOREFRONT_MAX_BATCH_SIZE": "8", "STOREFRONT_TRT_FP16": "true"}
    s = ServerSettings.load(["--max-batch-size", "16"], env=env)
    assert (s.port, s.max_batch_size, s.trt_fp16, s.max_queue_size) == (19000, 16, True, 1024)
    assert s.resolved_metrics_port == 20000
    assert ServerSettings.load([], env={}).port == 18111


def test_subclass_fields_are_settings_too():
    s = OnnxServerSettings.load(["--name", "mlp", "--onnx", "m.onnx"], env={"STOREFRONT_WORKERS": "2"})
    assert (s.name, s.onnx, s.workers) == ("mlp", "m.onnx", 2)


@pytest.mark.parametrize("argv, env, words", [
    (["--max-batch-size", "0"], {}, "max_batch_size must be >= 1"),
    (["--tls-cert", "c.pem"], {}, "tls_cert and tls_key go together"),
    (["--tls-client-ca", "ca.pem"], {}, "mTLS"),
    (["--port", "70000"], {}, "out of range"),
    ([], {"STOREFRONT_PORT": "abc"}, "STOREFRONT_PORT"),
    ([], {"STOREFRONT_TRT_FP16": "maybe"}, "STOREFRONT_TRT_FP16"),
])
def test_bad_settings_are_refused_with_the_reason(argv, env, words, capsys):
    with pytest.raises(SystemExit):
        ServerSettings.load(argv, env=env)
    assert words in capsys.readouterr().err


def test_as_env_round_trips():
    s = ServerSettings(port=1234, trt_fp16=True)
    assert ServerSettings.load([], env=s.as_env()) == s


def test_the_settings_doc_table_is_generated_from_the_settings_classes():
    from ops import settings_table

    assert settings_table.main(["--check"]) == 0, "run: python -m ops.settings_table --write"
    assert "`STOREFRONT_MAX_BATCH_SIZE`" in settings_table.table()
    assert "`STOREFRONT_MAX_BATCH_SIZE`" in settings_table.DOC.read_text()


@pytest.mark.parametrize("spec", ["trainer.service:TrainerSettings", "services.fraud.main:FraudSettings",
                                  "services.recommender.main:RecommenderSettings",
                                  "services.pricing.main:PricingSettings"])
def test_help_lists_every_setting(spec, capsys):
    """--help prints (a help text with a literal %, e.g. "2 % worse", once crashed argparse's formatting)."""
    import dataclasses
    import importlib

    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(SystemExit) as done:
        cls.load(["--help"], env={})
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all("--" + f.name.replace("_", "-") in out for f in dataclasses.fields(cls))


def test_round_epochs_per_domain_the_plugins_own_then_the_trainers():
    """The recommender's plug-in asks for one pass over a round's rows; fraud and pricing take
    --epochs; domain_epochs overrides either; 0 passes is refused."""
    from trainer.service import TrainerSettings

    s = TrainerSettings.load([], env={})
    assert [s.learner_config(d).epochs for d in ("recommender", "fraud", "pricing")] == [1, 3, 3]
    assert [s.learner_config(d).lr_factor for d in ("recommender", "fraud", "pricing")] == [0.1, 1.0, 1.0]
    s = TrainerSettings.load(["--epochs", "2", "--domain-epochs", "fraud=5"], env={})
    assert [s.learner_config(d).epochs for d in ("recommender", "fraud", "pricing")] == [1, 5, 2]
    s = TrainerSettings.load([], env={"STOREFRONT_DOMAIN_EPOCHS": "recommender=3"})
    assert s.learner_config("recommender").epochs == 3
    assert any("domain_epochs" in p for p in TrainerSettings(domain_epochs="recommender=0").validate())
    assert any("domain_epochs" in p for p in TrainerSettings(domain_epochs="recommender").validate())
