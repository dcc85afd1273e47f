"""Canary and shadow delivery: the registry's CANARY pointer, routing by request key, shadow
scoring, and the trainer's decision on live labels, with real gRPC servers on loopback, a real
fraud model trained on the real creditcard data, a real feedback collector and event log."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from protos.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from services.fraud.main import FraudSettings, make_app
from shared.registry import CanaryState, ModelRegistry, RegistryError, canary_bucket
from shared.registry.__main__ import main as registry_cli
from shared.runtime.signature import signature_of_onnx
from tests.fake_trainer import FakeTrainer
from tests.fraud_fixtures import bootstrap_small_fraud
from tests.server_harness import until
from tests.test_collector import Harness
from tests.conftest import free_port
from trainer.canary import CanaryConfig, CanaryDecider, compare_unpaired
from trainer.domains.fraud import FEATURES, FraudModel
from trainer.gate import GateRule, log_loss_rows, mean_metric
from trainer.joiner import Joiner
from trainer.learner import DecisionLog, Learner, LearnerConfig


# ---------------------------------------------------------------- registry
def test_canary_pointer_start_promote_abort(registry, model_files, linear_signature, capsys):
    name = "m"
    for _ in range(3):
        registry.publish(name, model_files["v_a"], linear_signature, make_current=False)
    registry.set_current(name, "1")
    assert registry.canary(name) is None  # a registry without CANARY: no canary, as before
    with pytest.raises(RegistryError) as e:
        registry.start_canary(name, "1")
    assert "already CURRENT" in str(e.value)
    state = registry.start_canary(name, "2", "canary", 0.25)
    assert registry.canary(name) == state and state.champion == "1" and state.share == 0.25
    on_disk = json.loads((registry.model_dir(name) / "CANARY").read_text())
    assert on_disk["version"] == "2" and on_disk["mode"] == "canary" and on_disk["started_utc"]
    assert registry.current_version(name) == "1"  # CURRENT does not move
    with pytest.raises(RegistryError) as e:  # one canary at a time
        registry.start_canary(name, "3")
    assert e.value.reason == "canary_running"
    with pytest.raises(RegistryError):  # a decision on another canary never promotes this one
        registry.promote(name, "3")
    assert registry.abort_canary(name, "2") == "2"
    assert registry.canary(name) is None and registry.current_version(name) == "1"
    with pytest.raises(RegistryError) as e:
        registry.abort_canary(name)
    assert e.value.reason == "no_canary"
    shadow = registry.start_canary(name, "3", "shadow", 0.1)
    assert shadow.mode == "shadow" and shadow.share == 1.0  # a shadow scores every request
    replaced = registry.start_canary(name, "2", "canary", 0.5, replace=True)
    assert registry.canary(name) == replaced
    assert registry.promote(name) == "2"
    assert registry.current_version(name) == "2" and registry.canary(name) is None
    # a promote that crashed between its writes leaves CANARY naming CURRENT: read as no canary
    (registry.model_dir(name) / "CANARY").write_text(json.dumps(replaced.to_json()))
    assert registry.canary(name) is None
    # gc keeps the canary's version, whatever its age
    registry.start_canary(name, "3", "canary", 0.1, replace=True)
    report = registry.gc(name, keep_last=1, min_age_s=0, rollback_depth=0, lease_ttl_s=1)
    assert "3" in report.kept and any("CANARY" in why for why in report.kept["3"])
    # a corrupt CANARY is an error, never a guess
    (registry.model_dir(name) / "CANARY").write_text("{not json")
    with pytest.raises(RegistryError) as e:
        registry.canary(name)
    assert e.value.reason == "pointer_corrupt"
    (registry.model_dir(name) / "CANARY").unlink()
    # the CLI verbs
    root = str(registry.root)
    assert registry_cli(["--root", root, "start-canary", name, "3", "--share", "0.2"]) == 0
    assert registry_cli(["--root", root, "canary", name]) == 0
    assert '"version": "3"' in capsys.readouterr().out
    assert registry_cli(["--root", root, "abort-canary", name]) == 0
    assert registry_cli(["--root", root, "start-canary", name, "3", "--mode", "shadow"]) == 0
    assert registry_cli(["--root", root, "promote", name, "3"]) == 0
    assert registry.current_version(name) == "3"
    assert registry_cli(["--root", root, "promote", name]) == 2  # nothing to promote


def test_routing_is_deterministic_and_matches_the_share():
    keys = [f"card-{i}" for i in range(20_000)]
    b = np.array([canary_bucket("fraud", "7", k) for k in keys])
    assert np.array_equal(b, [canary_bucket("fraud", "7", k) for k in keys])  # any replica, any time
    assert 0 <= b.min() and b.max() < 1
    for share in (0.01, 0.1, 0.5):
        assert abs((b < share).mean() - share) < 4 * np.sqrt(share * (1 - share) / len(keys)) + 1e-3
    # each canary draws its own keys: another version splits them independently
    other = np.array([canary_bucket("fraud", "8", k) for k in keys])
    both = ((b < 0.1) & (other < 0.1)).mean()
    assert abs(both - 0.01) < 0.005


# ---------------------------------------------------------------- fraud service
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("canary")
    registry, learner, data = bootstrap_small_fraud(root)
    return root, registry, data


def publish_variant(registry: ModelRegistry, kind: str) -> str:
    """Publish a new version of the fraud model built from version 1's graph: "same" (its very
    weights: a candidate as good as the champion), "flipped" (probability 1 - p: a bad candidate
    that passes every load check), "nan_on_large" (NaN when the amount exceeds 1000: fails on
    some real requests, never on warm-up's standard-normal inputs)."""
    m1 = registry.manifest("fraud", "1")
    model = onnx.load(str(registry.model_path("fraud", "1")))
    g = model.graph
    if kind != "same":
        out = next(o for o in g.output if o.name == "probability")
        for node in g.node:
            node.output[:] = ["p_raw" if o == "probability" else o for o in node.output]
            node.input[:] = ["p_raw" if i == "probability" else i for i in node.input]
        if kind == "flipped":
            g.initializer.append(helper.make_tensor("one_c", TensorProto.FLOAT, [], [1.0]))
            g.node.append(helper.make_node("Sub", ["one_c", "p_raw"], ["probability"]))
        else:
            g.initializer.extend([helper.make_tensor("lim_c", TensorProto.FLOAT, [], [1000.0]),
                                  helper.make_tensor("zero_c", TensorProto.FLOAT, [], [0.0]),
                                  helper.make_tensor("amt_idx", TensorProto.INT64, [1], [28])])
            g.node.extend([helper.make_node("Gather", [g.input[0].name, "amt_idx"], ["amt"], axis=1),
                           helper.make_node("Sub", ["lim_c", "amt"], ["room"]),
                           helper.make_node("Sqrt", ["room"], ["root"]),
                           helper.make_node("Mul", ["root", "zero_c"], ["nan_or_zero"]),
                           helper.make_node("Add", ["p_raw", "nan_or_zero"], ["probability"])])
        assert out.name == "probability"
    path = Path(registry.root).parent / f"{kind}-{time.monotonic_ns()}.onnx"
    onnx.save(model, str(path))
    files = [registry.version_dir("fraud", "1") / f for f in m1.files if f != "model.onnx"]
    return registry.publish("fraud", path, signature_of_onnx(path), extra=m1.extra, extra_files=files,
                            make_current=False, parent="1").version


def request_for(data, i: int, card: str | None = None) -> fraud_pb2.ScoreTransactionRequest:
    row = data.X[i]
    return fraud_pb2.ScoreTransactionRequest(transaction_id=f"tx-{i}", amount=float(row[-1]), timestamp=1.7e9,
                                             card_ref=card if card is not None else f"card-{i}",
                                             features={n: float(v) for n, v in zip(FEATURES, row[:-1])})


def settings(root: Path, registry: ModelRegistry, **kw) -> FraudSettings:
    base = dict(host="127.0.0.1", port=0, metrics_port=0, registry_dir=str(registry.root), trainer_target="",
                spool_dir=str(root / f"spool-{time.monotonic_ns()}"), poll_interval_s=0.05, grace_s=1.0,
                log_format="text")
    base.update(kw)
    return FraudSettings(**base)


async def gather_bounded(calls, limit: int = 32):
    """Await every call with at most `limit` in flight, as a client pool would: the server sheds
    calls beyond its admission limit (RESOURCE_EXHAUSTED), which is not what these tests test."""
    gate = asyncio.Semaphore(limit)

    async def one(make):
        async with gate:
            return await make()

    return await asyncio.gather(*(one(make) for make in calls))


def reset_canary(registry: ModelRegistry) -> None:
    try:
        registry.abort_canary("fraud")
    except RegistryError:
        pass
    registry.set_current("fraud", "1")


async def test_canary_serves_its_share_and_the_champion_the_rest(world):
    root, registry, data = world
    reset_canary(registry)
    v = publish_variant(registry, "same")
    app = make_app(settings(root, registry))
    await app.start()
    served = app.models["fraud"]
    channel = grpc.aio.insecure_channel(app.address)
    stub = fraud_pb2_grpc.FraudStub(channel)
    try:
        registry.start_canary("fraud", v, "canary", 0.3)
        await until(lambda: served.canary is not None, what="the canary to load")
        rows = range(40_000, 41_000)
        answers = await gather_bounded([lambda i=i: stub.ScoreTransaction(request_for(data, i)) for i in rows])
        by = {i: a.model.version for i, a in zip(rows, answers)}
        expected = {i: (v if canary_bucket("fraud", v, f"card:card-{i}") < 0.3 else "1") for i in rows}
        assert by == expected  # exactly the keys the hash puts in the share, on any replica
        share = np.mean([x == v for x in by.values()])
        assert 0.25 < share < 0.35
        again = await stub.ScoreTransaction(request_for(data, 40_007))  # sticky per card
        assert again.model.version == by[40_007]
        # a canary that fails on some requests never fails one: the champion answers them
        registry.abort_canary("fraud")
        bad = publish_variant(registry, "nan_on_large")
        registry.start_canary("fraud", bad, "canary", 1.0)
        await until(lambda: served.canary is not None and served.canary.model.version == bad, what="bad canary")
        large = [i for i in range(40_000, 60_000) if data.X[i, -1] > 1000][:20]
        small = [i for i in range(40_000, 40_020) if data.X[i, -1] <= 1000]
        got = await gather_bounded([lambda i=i: stub.ScoreTransaction(request_for(data, i)) for i in large + small])
        assert all(g.model.version == "1" for g in got[:len(large)])  # the canary could not: fell back
        assert all(g.model.version == bad for g in got[len(large):])
        assert all(0 <= g.fraud_probability <= 1 for g in got)
        # aborted: every request back on the champion
        registry.abort_canary("fraud")
        await until(lambda: served.canary is None, what="the canary to go")
        assert (await stub.ScoreTransaction(request_for(data, 40_001))).model.version == "1"
    finally:
        await channel.close()
        await app.stop()
        reset_canary(registry)


async def test_shadow_scores_every_request_and_answers_none(world):
    root, registry, data = world
    reset_canary(registry)
    trainer = FakeTrainer(free_port())
    await trainer.start()
    app = make_app(settings(root, registry, trainer_target=trainer.address))
    await app.start()
    served = app.models["fraud"]
    channel = grpc.aio.insecure_channel(app.address)
    stub = fraud_pb2_grpc.FraudStub(channel)
    try:
        rows = list(range(40_000, 40_300))
        champion_only = await gather_bounded([lambda i=i: stub.ScoreTransaction(request_for(data, i)) for i in rows])
        flipped = publish_variant(registry, "flipped")
        registry.start_canary("fraud", flipped, "shadow")
        await until(lambda: served.canary is not None, what="the shadow to load")
        shadowed = await gather_bounded([lambda i=i: stub.ScoreTransaction(request_for(data, i)) for i in rows])
        for a, b in zip(champion_only, shadowed):  # the answers are the champion's, unchanged
            # (to float32 rounding: rows merge into other micro-batches from one run to the next)
            assert (b.model.version, b.decision) == ("1", a.decision)
            assert abs(b.fraud_probability - a.fraud_probability) < 1e-6
            assert [r.feature for r in a.reasons] == [r.feature for r in b.reasons]
        ids = {b.prediction_id: b.fraud_probability for b in shadowed}

        def recorded():
            return {r.served.prediction_id: r.served for r in trainer.stored.values()
                    if r.WhichOneof("payload") == "served" and r.served.prediction_id in ids}

        await until(lambda: len(recorded()) == len(ids), what="every served record")
        for pid, s in recorded().items():  # every request scored by the shadow, beside the answer
            assert s.model.version == "1" and s.shadow.model.version == flipped
            assert abs(s.shadow.score - (1 - ids[pid])) < 1e-5
            assert [t.name for t in s.shadow.outputs] == ["probability", "contributions"]
            assert s.shadow.latency_ms >= 0
        # a failing shadow never fails a request
        registry.abort_canary("fraud")
        bad = publish_variant(registry, "nan_on_large")
        registry.start_canary("fraud", bad, "shadow")
        await until(lambda: served.canary is not None and served.canary.model.version == bad, what="bad shadow")
        large = [i for i in range(40_000, 60_000) if data.X[i, -1] > 1000][:30]
        got = await gather_bounded([lambda i=i: stub.ScoreTransaction(request_for(data, i)) for i in large])
        assert all(g.model.version == "1" and 0 <= g.fraud_probability <= 1 for g in got)
        failed = {g.prediction_id for g in got}
        await until(lambda: sum(1 for r in trainer.stored.values() if r.WhichOneof("payload") == "served"
                                and r.served.prediction_id in failed) == len(failed), what="records of failed shadows")
        assert not any(r.served.HasField("shadow") for r in trainer.stored.values()
                       if r.WhichOneof("payload") == "served" and r.served.prediction_id in failed)
    finally:
        await channel.close()
        await app.stop()
        await trainer.stop()
        reset_canary(registry)


# ---------------------------------------------------------------- decisions on live labels, under load
async def run_until_decided(data, stub, joiner: Joiner, decider: CanaryDecider, rows: np.ndarray,
                            failures: list, answered: list, timeout_s: float = 120.0) -> dict:
    """32 concurrent clients score real transactions and report their real labels through the
    service, while the decider judges the joined labels; stops at the first decision."""
    decided: list[dict] = []
    stop = asyncio.Event()
    cursor = iter(range(10**9))

    async def client(c: int) -> None:
        while not stop.is_set():
            i = int(rows[next(cursor) % len(rows)])
            try:
                resp = await stub.ScoreTransaction(request_for(data, i, card=f"card-{c}-{i}-{time.monotonic_ns()}"))
                answered.append((time.time(), resp.model.version))
                await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=resp.prediction_id,
                                                                 is_fraud=bool(data.y[i])))
            except grpc.aio.AioRpcError as e:
                failures.append(e.code())

    async def judge() -> None:
        while not stop.is_set():
            joined = await asyncio.to_thread(joiner.poll, 4096)
            entry = decider.observe(joined)
            if entry is not None:
                decided.append(entry)
                stop.set()
                return
            await asyncio.sleep(0.05)

    clients = [asyncio.create_task(client(c)) for c in range(32)]
    judge_task = asyncio.create_task(judge())
    try:
        await asyncio.wait_for(stop.wait(), timeout_s)
    finally:
        stop.set()
        await asyncio.gather(*clients, judge_task, return_exceptions=True)
    return decided[0]


async def test_under_load_a_bad_canary_is_rolled_back_and_a_good_shadow_promoted(world, tmp_path):
    root, registry, data = world
    reset_canary(registry)
    async with Harness(tmp_path / "events.db") as collector:
        app = make_app(settings(root, registry, trainer_target=f"127.0.0.1:{collector.port}"))
        await app.start()
        served = app.models["fraud"]
        channel = grpc.aio.insecure_channel(app.address)
        stub = fraud_pb2_grpc.FraudStub(channel)
        # real transactions with their real labels; frauds are rare (0.2 %), so the stream is drawn
        # with every fraud of the range and ten legitimate ones per fraud, to label both arms quickly
        frauds = np.flatnonzero(data.y[30_000:60_000] == 1) + 30_000
        legit = np.flatnonzero(data.y[30_000:60_000] == 0)[: 10 * len(frauds)] + 30_000
        rows = np.random.default_rng(0).permutation(np.concatenate([frauds, legit]))
        decisions = DecisionLog(tmp_path / "decisions.jsonl")
        config = CanaryConfig(min_labels=150, min_positives=5, resamples=200, timeout_s=300)
        decider = CanaryDecider(FraudModel(), registry, config, decisions)
        joiner = Joiner(collector.log, domain="fraud", grace_s=30)
        failures: list = []
        answered: list = []
        try:
            bad = publish_variant(registry, "flipped")
            registry.start_canary("fraud", bad, "canary", 0.5)
            await until(lambda: served.canary is not None, what="the bad canary to load")
            entry = await run_until_decided(data, stub, joiner, decider, rows, failures, answered)
            assert entry["decision"] == "canary_rolled_back" and entry["version"] == bad, entry
            assert entry["canary"]["arms"]["canary"]["labels"] >= 150
            assert bad in {v for _, v in answered}  # it did answer its share before the verdict
            assert registry.canary("fraud") is None and registry.current_version("fraud") == "1"
            await until(lambda: served.canary is None, what="the services to drop the rolled-back canary")

            good = publish_variant(registry, "same")
            registry.start_canary("fraud", good, "shadow")
            await until(lambda: served.canary is not None, what="the good shadow to load")
            answered.clear()
            entry = await run_until_decided(data, stub, joiner, decider, rows, failures, answered)
            assert entry["decision"] == "canary_promoted" and entry["version"] == good, entry
            assert entry["canary"]["arms"]["paired"]["labels"] >= 150
            # in shadow mode the champion answered every request until the promotion
            assert {v for t, v in answered if t < entry["time"]} == {"1"}
            assert registry.current_version("fraud") == good and registry.canary("fraud") is None
            await until(lambda: served.current.version == good, what="the promoted version to serve")
            assert (await stub.ScoreTransaction(request_for(data, 40_000))).model.version == good
            assert failures == []  # 0 failed requests through a rollback and a promotion
            logged = [e["decision"] for e in decisions.read()]
            assert logged == ["canary_rolled_back", "canary_promoted"]
        finally:
            await channel.close()
            await app.stop()
            reset_canary(registry)


def test_timeout_decides_for_the_champion(registry, model_files, linear_signature, tmp_path):
    for _ in range(2):
        registry.publish("fraud", model_files["v_a"], linear_signature, make_current=False)
    registry.set_current("fraud", "1")
    now = [1000.0]
    registry.clock = lambda: now[0]
    registry.start_canary("fraud", "2", "canary", 0.1)
    decider = CanaryDecider(FraudModel(), registry, CanaryConfig(timeout_s=60), DecisionLog(tmp_path / "d.jsonl"),
                            clock=lambda: now[0])
    assert decider.observe([]) is None
    now[0] += 61
    entry = decider.observe([])
    assert entry["decision"] == "canary_timeout" and "champion stays" in entry["reasons"][0]
    assert registry.canary("fraud") is None and registry.current_version("fraud") == "1"


def test_unpaired_comparison_tells_worse_from_as_good():
    rng = np.random.default_rng(1)
    y_a, y_b = (rng.random(3000) < 0.1).astype(float), (rng.random(3000) < 0.1).astype(float)
    good_a = np.clip(np.where(y_a > 0, 0.7, 0.05) + rng.normal(0, 0.02, 3000), 0.01, 0.99)
    good_b = np.clip(np.where(y_b > 0, 0.7, 0.05) + rng.normal(0, 0.02, 3000), 0.01, 0.99)
    bad_b = np.clip(np.where(y_b > 0, 0.3, 0.3) + rng.normal(0, 0.02, 3000), 0.01, 0.99)
    metric = (mean_metric("loss", log_loss_rows, False),)
    rule = GateRule(resamples=300, margin=0.05)
    same = compare_unpaired(metric, y_a, good_a, y_b, good_b, lambda y: y > 0.5, rule, 0)["loss"]
    assert not same["worse_with_confidence"] and same["interval"][0] > -0.1
    worse = compare_unpaired(metric, y_a, good_a, y_b, bad_b, lambda y: y > 0.5, rule, 0)["loss"]
    assert worse["worse_with_confidence"] and worse["interval"][1] < -0.05


def test_an_as_good_canary_is_promoted_on_the_storefront_metrics_while_the_loss_cannot_tell():
    """Unpaired arms of a fraud stream where one fraud in ten is missed (each costs ~6 nats of log
    loss): the loss interval stays wide where PR-AUC and recall are already tight. Promotion is
    decided on the storefront metrics (as the gate does once it has the positives); any metric
    worse with confidence, the loss included, still rolls back."""
    from trainer.canary import LOSS, verdict
    from trainer.domains.fraud import gate_spec

    rng = np.random.default_rng(1)

    def arm(n):
        y = (rng.random(n) < 0.1).astype(float)
        missed = rng.random(n) < 0.1
        p = np.where(y > 0, np.where(missed, rng.uniform(0.001, 0.003, n), rng.beta(6, 2, n)), rng.beta(1, 30, n))
        return y, np.clip(p, 1e-4, 1 - 1e-4)

    (y_a, p_a), (y_b, p_b) = arm(4000), arm(4000)
    storefront = tuple(m.name for m in gate_spec().metrics)
    metrics = gate_spec().metrics + (mean_metric(LOSS, log_loss_rows, False),)
    rule = GateRule(resamples=200, margin=0.05)
    same = compare_unpaired(metrics, y_a, p_a, y_b, p_b, lambda y: y > 0.5, rule, 1)
    assert same[LOSS]["interval"][0] < -0.05 and not same[LOSS]["worse_with_confidence"]  # the loss cannot tell
    decision, reasons = verdict(same, storefront, 0.05)
    assert decision == "promoted" and len(reasons) == len(storefront)
    assert verdict(same, storefront + (LOSS,), 0.05) == (None, [])  # with the loss in the rule: never decided
    halved = np.where(y_b > 0.5, p_b * 0.5, p_b)  # frauds' scores halved: worse calibrated and ranked
    worse = compare_unpaired(metrics, y_a, p_a, y_b, halved, lambda y: y > 0.5, rule, 1)
    decision, reasons = verdict(worse, storefront, 0.05)
    assert decision == "rolled_back" and any(LOSS in r for r in reasons)


# ---------------------------------------------------------------- the learner's publish step
def test_learner_publishes_a_passing_candidate_as_canary_holds_the_next_and_follows_the_verdict(tmp_path):
    import copy

    import torch

    registry, learner, data = bootstrap_small_fraud(tmp_path, LearnerConfig(delivery="canary"))
    assert registry.current_version("fraud") == "1"
    champion = learner.net

    def candidate():
        net = copy.deepcopy(learner.net)
        return net, learner.model.optimizer(net)

    y, p = data.y[40_000:42_000], learner.model.predict(learner.net, data.X[40_000:42_000])
    first = candidate()
    entry = learner._publish_and_save(y, p, {}, decision="published", candidate=first)
    assert entry["decision"] == "published" and entry["delivery"] == "canary" and entry["version"] == "2"
    assert registry.current_version("fraud") == "1"  # CURRENT does not move: live labels decide
    assert registry.canary("fraud").version == "2" and registry.canary("fraud").mode == "canary"
    assert learner.net is first[0] and learner.champion is champion and learner.canary_version == "2"
    # one canary at a time: the next passing candidate is held, not published
    second = candidate()
    held = learner._publish_and_save(y, p, {}, decision="published", candidate=second)
    assert held["decision"] == "held" and "canary 2 is running" in held["reasons"][0]
    assert registry.versions("fraud") == ["1", "2"] and learner.net is second[0]
    # rolled back: the learner goes back to the champion's weights (checkpointed)
    registry.abort_canary("fraud", "2")
    learner.canary_decided("2", promoted=False)
    assert learner.net is champion and learner.champion is None and learner.canary_version is None
    restored = Learner(FraudModel(), registry, tmp_path / "trainer", LearnerConfig(delivery="canary"))
    assert restored.restore() and restored.canary_version is None
    # promoted: the canary's weights are the champion's, the learner continues from them
    third = candidate()
    entry = learner._publish_and_save(y, p, {}, decision="published", candidate=third)
    assert entry["version"] == "3" and registry.canary("fraud").version == "3"
    restored = Learner(FraudModel(), registry, tmp_path / "trainer", LearnerConfig(delivery="canary"))
    assert restored.restore() and restored.canary_version == "3" and restored.canary_net is not None
    registry.promote("fraud", "3")
    restored.reconcile_canary()  # a restart after the decision settles it from the registry
    assert restored.canary_version is None and restored.canary_net is None
    for a, b in zip(restored.champion.state_dict().values(), third[0].state_dict().values()):
        assert torch.equal(a, b)  # the promoted weights judge the next candidates
    learner.canary_decided("3", promoted=True)
    assert learner.net is third[0] and learner.champion is None
    # direct delivery: CURRENT flips at once, as before canaries
    learner.config.delivery = "direct"
    entry = learner._publish_and_save(y, p, {}, decision="published", candidate=candidate())
    assert entry["delivery"] == "direct" and registry.current_version("fraud") == entry["version"] == "4"
