"""The plug-in boundary, proven: a fourth domain that lives only in this folder serves over real
gRPC, streams what it served and the outcomes to the real trainer's collector, is logged, joined
and learned in a real round, and its new version is published and hot-reloaded by its service.

It is enabled only by naming its modules (the trainer's --domain-modules; its service's own
module), and no file outside tests/toy_domain/ mentions it (checked below): adding a domain
needs no edit to the runtime, the trainer or the feedback protocol.
"""
from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import grpc
import pytest

from ops.procs import Proc, free_port, wait_serving
from shared.registry import ModelRegistry
from tests.loop_harness import wait_until
from tests.toy_domain import codegen, toy_pb2, toy_pb2_grpc
from tests.toy_domain.trainer_plugin import W_LIVE, draw
from trainer.eventlog import OUTCOME, SERVED, SqliteEventLog
from trainer.plugins import default_domains, load_domains

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PLUGIN = "tests.toy_domain.trainer_plugin"
ROUND_LABELS = 250
POINTS = 300


def test_no_file_outside_this_folder_names_the_toy_domain():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    folder = HERE.relative_to(ROOT).as_posix() + "/"
    assert any(f.startswith(folder) for f in files), "git does not list this folder: the check would see nothing"
    mentions = []
    for name in filter(None, files):
        path = ROOT / name
        if name.startswith(folder) or not path.is_file():
            continue
        text = path.read_bytes()
        if b"toy_domain" in text or b"storefront.toy" in text:
            mentions.append(name)
    assert mentions == [], f"files outside {folder} name the toy domain: {mentions}"
    assert "toy" not in default_domains()  # the built-in set does not know it either


def test_generated_code_is_fresh():
    assert codegen.stale() == [], "run: python -m tests.toy_domain.codegen"


def test_the_plug_in_brings_its_own_trainer_settings():
    from trainer.service import TrainerSettings

    s = TrainerSettings.load(["--domain-modules", PLUGIN, "--toy-learning-rate", "0.2"], env={})
    assert s.domain_list == ["toy"] and s.toy_learning_rate == 0.2 and s.domain_model("toy").lr == 0.2
    assert s.label_windows() == {"toy": 3600.0} and s.retention_policy().learned_domains == {"toy"}
    env = {"STOREFRONT_DOMAIN_MODULES": PLUGIN, "STOREFRONT_TOY_LEARNING_RATE": "0.3"}
    assert TrainerSettings.load([], env=env).toy_learning_rate == 0.3
    assert not hasattr(TrainerSettings(), "toy_learning_rate")  # the default trainer has not loaded it
    with pytest.raises(SystemExit):
        TrainerSettings.load(["--domain-modules", PLUGIN, "--toy-learning-rate", "0"], env={})
    with pytest.raises(SystemExit):  # the built-in domains' settings are not there without their modules
        TrainerSettings.load(["--domain-modules", PLUGIN, "--adv-epsilon", "0.5"], env={})


def test_the_toy_domain_serves_logs_joins_learns_publishes_and_reloads(tmp_path: Path):
    registry_dir, workdir = tmp_path / "registry", tmp_path / "trainer"
    trainer_port, toy_port = free_port(), free_port()
    token = secrets.token_urlsafe(32)  # the toy service's identity on the feedback stream
    # The trainer learns the toy domain only because --domain-modules names it; it bootstraps the
    # toy's first model (the plug-in's bootstrap) since it has no checkpoint.
    trainer = Proc("trainer", ["-m", "trainer", "serve", "--domain-modules", PLUGIN, "--port", str(trainer_port),
                               "--metrics-port", "0", "--workdir", str(workdir), "--registry-dir", str(registry_dir),
                               "--log-format", "text", "--delivery", "direct", "--min-events", str(ROUND_LABELS),
                               "--max-interval-s", "3600", "--poll-interval-s", "0.2", "--retention-interval-s", "0",
                               "--epochs", "5", "--toy-learning-rate", "0.1"], tmp_path / "trainer.log",
                   env={"STOREFRONT_FEEDBACK_TOKENS": f"toy={token}"})
    toy = Proc("toy", ["-m", "tests.toy_domain.service", "--port", str(toy_port), "--metrics-port", "0",
                       "--registry-dir", str(registry_dir), "--trainer-target", f"127.0.0.1:{trainer_port}",
                       "--spool-dir", str(tmp_path / "spool"), "--poll-interval-s", "0.2", "--log-format", "text"],
               tmp_path / "toy.log", env={"STOREFRONT_FEEDBACK_TOKEN": token})
    registry = ModelRegistry(registry_dir)
    try:
        trainer.start()
        wait_serving(f"127.0.0.1:{trainer_port}", 240, trainer)  # SERVING once the toy has version 1
        first = registry.current_version("toy")
        assert first is not None and registry.manifest("toy", first).metrics["accuracy"] > 0.7, \
            "the bootstrap did not learn the toy world"
        toy.start()
        wait_serving(f"127.0.0.1:{toy_port}", 120, toy)

        X, y = draw(POINTS, seed=2, w=W_LIVE)  # the live world: the 4th number now matters
        with grpc.insecure_channel(f"127.0.0.1:{toy_port}") as channel:
            stub = toy_pb2_grpc.ToyStub(channel)
            served = []
            for x, label in zip(X, y):
                resp = stub.Score(toy_pb2.ScoreRequest(x=x.tolist()), timeout=10)
                assert 0.0 <= resp.probability <= 1.0
                served.append(int(resp.model.version))
                ack = stub.ReportOutcome(toy_pb2.ToyOutcome(prediction_id=resp.prediction_id, positive=bool(label)),
                                         timeout=10)
                assert ack.accepted == 1
            # version 1 first; a round that starts after ROUND_LABELS labels may publish (and the
            # service reload) before the last points are sent: versions only ever move forward
            assert served[0] == int(first) and served == sorted(served), served
            with pytest.raises(grpc.RpcError) as refused:  # the template's admission works for it too
                stub.ReportOutcome(toy_pb2.ToyOutcome(prediction_id="not-issued-here", positive=True), timeout=10)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND

            # logged: every served point and every label is in the trainer's event log, as the toy's
            log = SqliteEventLog(workdir / "events.db", domains=load_domains(PLUGIN))
            try:
                wait_until(lambda: log.count("toy", SERVED) == POINTS and log.count("toy", OUTCOME) == POINTS, 120,
                           "the toy's records in the trainer's event log")
                assert log.count() == 2 * POINTS
            finally:
                log.close()

            # joined and learned in a real round, published to the registry
            wait_until(lambda: registry.current_version("toy") not in (None, first), 240, "a new toy version")
            second = registry.current_version("toy")
            manifest = registry.manifest("toy", second)
            gate = manifest.extra["gate"]
            assert gate["new_labels"] >= ROUND_LABELS and manifest.learned_up_to > 0, gate
            loss = gate["evidence"]["metrics"]["log_loss"]  # on live labels neither version trained on
            assert loss["challenger"] < loss["champion"], loss
            assert manifest.metrics["accuracy"] > 0.7, manifest.metrics

            # and hot-reloaded by the toy service
            def answers_with_second() -> bool:
                return stub.Score(toy_pb2.ScoreRequest(x=X[0].tolist()), timeout=10).model.version == second

            wait_until(answers_with_second, 60, f"the toy service to serve {second}")
        assert toy.stop() == 0 and trainer.stop() == 0, (toy.tail(), trainer.tail())
    finally:
        for proc in (toy, trainer):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.kill9()
