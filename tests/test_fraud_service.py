"""Fraud service in-process over real gRPC, with a model the real learner trained on real data."""

import grpc
import numpy as np
import pytest

from protos.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.fraud.main import FraudSettings, make_app
from tests.conftest import free_port
from tests.fake_trainer import FakeTrainer
from tests.fraud_fixtures import bootstrap_small_fraud
from tests.server_harness import until
from trainer.domains.fraud import FEATURES


@pytest.fixture(scope="module")
def fraud_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fraud")
    registry, learner, data = bootstrap_small_fraud(root)
    return root, registry, data


def request_for(data, i, **overrides) -> fraud_pb2.ScoreTransactionRequest:
    row = data.X[i]
    req = fraud_pb2.ScoreTransactionRequest(transaction_id=f"tx-{i}", amount=float(row[-1]), timestamp=1.7e9,
                                            features={name: float(v) for name, v in zip(FEATURES, row[:-1])})
    for k, v in overrides.items():
        setattr(req, k, v)
    return req


def settings(root, registry, **kw):
    base = dict(host="127.0.0.1", port=0, metrics_port=0, registry_dir=str(registry.root), trainer_target="",
                spool_dir=str(root / "spool"), poll_interval_s=0.05, grace_s=1.0, log_format="text")
    base.update(kw)
    return FraudSettings(**base)


async def started(s):
    app = make_app(s)
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    return app, channel, fraud_pb2_grpc.FraudStub(channel)


async def test_scores_decisions_and_reasons_on_real_transactions(fraud_world):
    root, registry, data = fraud_world
    app, channel, stub = await started(settings(root, registry))
    try:
        frauds = np.flatnonzero(data.y[40_000:60_000] == 1)[:20] + 40_000
        legit = np.arange(40_000, 40_200)
        p_fraud = []
        for i in frauds:
            resp = await stub.ScoreTransaction(request_for(data, i))
            assert 0.0 <= resp.fraud_probability <= 1.0
            assert resp.model.name == "fraud" and resp.model.version == "1" and resp.prediction_id
            t = (resp.review_threshold, resp.block_threshold)
            expected = (fraud_pb2.DECISION_BLOCK if resp.fraud_probability >= t[1] else
                        fraud_pb2.DECISION_REVIEW if resp.fraud_probability >= t[0] else fraud_pb2.DECISION_ALLOW)
            assert resp.decision == expected
            assert 0 <= t[0] <= t[1] <= 1
            contributions = [r.contribution for r in resp.reasons]
            assert len(resp.reasons) <= 3 and all(c > 0 for c in contributions)
            assert contributions == sorted(contributions, reverse=True)
            assert all(r.feature in FEATURES + ["amount"] for r in resp.reasons)
            p_fraud.append(resp.fraud_probability)
        p_legit = [(await stub.ScoreTransaction(request_for(data, i))).fraud_probability for i in legit]
        # the model learned something real: frauds score far above ordinary transactions
        assert np.median(p_fraud) > 10 * np.median(p_legit)
        assert np.mean([p >= 0.5 for p in p_fraud]) > 0.5
        # reasons name the features that push the score up: a fraud's top reason has a real effect
        top = (await stub.ScoreTransaction(request_for(data, frauds[0]))).reasons[0]
        assert top.contribution > 0.1
        # the same model over KServe V2, next to the domain API
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name="fraud")
        req.inputs.add(name="features", datatype="FP32", shape=[1, 29])
        req.raw_input_contents.append(data.X[frauds[0]:frauds[0] + 1].tobytes())
        out = await v2.ModelInfer(req)
        p = np.frombuffer(out.raw_output_contents[0], np.float32)[0]
        assert abs(p - p_fraud[0]) < 1e-6
    finally:
        await channel.close()
        await app.stop()


BAD = [
    ("missing feature", lambda r: r.features.pop("V3"), 'features["V3"] is required'),
    ("unknown feature", lambda r: r.features.__setitem__("V99", 1.0), "unknown feature"),
    ("amount as feature", lambda r: r.features.__setitem__("amount", 1.0), "unknown feature"),
    ("NaN feature", lambda r: r.features.__setitem__("V5", float("nan")), 'features["V5"] must be finite'),
    ("inf feature", lambda r: r.features.__setitem__("V5", float("inf")), 'features["V5"] must be finite'),
    ("negative amount", lambda r: setattr(r, "amount", -1.0), "amount must be >= 0"),
    ("NaN amount", lambda r: setattr(r, "amount", float("nan")), "amount must be a finite"),
    ("no transaction id", lambda r: setattr(r, "transaction_id", ""), "transaction_id is required"),
    ("long customer ref", lambda r: setattr(r, "customer_ref", "c" * 129), "customer_ref is longer"),
    ("negative time", lambda r: setattr(r, "timestamp", -5.0), "timestamp must be >= 0"),
]


async def test_invalid_requests_name_the_field(fraud_world):
    root, registry, data = fraud_world
    app, channel, stub = await started(settings(root, registry))
    try:
        for label, mutate, words in BAD:
            req = request_for(data, 1)
            mutate(req)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ScoreTransaction(req)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
            assert words in e.value.details(), (label, e.value.details())
    finally:
        await channel.close()
        await app.stop()


async def test_configured_thresholds_override_the_calibrated_ones(fraud_world):
    root, registry, data = fraud_world
    app, channel, stub = await started(settings(root, registry, review_threshold=0.0, block_threshold=0.0))
    try:
        resp = await stub.ScoreTransaction(request_for(data, 2))
        assert resp.decision == fraud_pb2.DECISION_BLOCK
        assert (resp.review_threshold, resp.block_threshold) == (0.0, 0.0)
    finally:
        await channel.close()
        await app.stop()


async def test_outcomes_are_validated_deduplicated_and_streamed_to_the_trainer(fraud_world):
    root, registry, data = fraud_world
    trainer = FakeTrainer(free_port())
    await trainer.start()
    app, channel, stub = await started(settings(root, registry, trainer_target=trainer.address))
    try:
        resp = await stub.ScoreTransaction(request_for(data, 3))
        one = await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=resp.prediction_id, is_fraud=True))
        assert (one.accepted, one.duplicates) == (1, 0)
        again = await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=resp.prediction_id, is_fraud=True))
        assert (again.accepted, again.duplicates) == (0, 1)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=""))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prediction_id" in e.value.details()

        pids = [(await stub.ScoreTransaction(request_for(data, 10 + i))).prediction_id for i in range(4)]

        async def outcomes():
            for i in range(4):
                yield fraud_pb2.FraudOutcome(prediction_id=pids[i], is_fraud=False,
                                             occurred_at=-1.0 if i == 2 else 0.0)

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.StreamOutcomes(outcomes())
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outcome 2" in e.value.details()

        def delivered():  # the served records and the accepted outcomes reach the trainer
            kinds = [r.WhichOneof("payload") for r in trainer.stored.values()]
            return kinds.count("outcome") >= 3 and kinds.count("served") >= 5

        await until(delivered, "the feedback to reach the trainer")
        served = [r.served for r in trainer.stored.values() if r.WhichOneof("payload") == "served"]
        assert served[0].prediction_id == resp.prediction_id and served[0].model.version == "1"
        assert list(served[0].inputs[0].shape) == [1, 29]
        got = sorted(r.outcome.prediction_id for r in trainer.stored.values() if r.WhichOneof("payload") == "outcome")
        assert got == sorted([resp.prediction_id, pids[0], pids[1]])
    finally:
        await channel.close()
        await app.stop()
        await trainer.stop()
