"""Input safety (issue 11, items 1 and 4 and the echo limit): no request can fail another,
make a model answer garbage, or blow the status message past gRPC's metadata limit.

Real servers on free loopback ports and real ONNX files: the pricing and fraud models are
the ones the real learner trains (tests.pricing_fixtures, tests.fraud_fixtures); the small
graphs below are built with onnx.helper for what a trained model never does on purpose
(fail a Gather, overflow to NaN).
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import REGISTRY

from protos.fraud.v1 import fraud_pb2_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.pricing.v1 import pricing_pb2_grpc
from shared.batching import MicroBatcher
from shared.errors import MAX_MESSAGE_CHARS, InvalidArgument, shorten
from shared.registry import Signature, TensorSpec
from shared.runtime.model import ModelHandle, ModelLoader
from shared.runtime.signature import signature_of_onnx
from tests import server_harness
from tests.fraud_fixtures import bootstrap_small_fraud
from tests.pricing_fixtures import quote, small_world
from trainer.domains import pricing
from trainer.domains.fraud import FEATURES
from trainer.export import declare_input_ranges

TABLE = np.arange(10, dtype=np.float32) * 1.5  # the gather model's table: 10 rows


def _save(graph, path: Path) -> Path:
    import onnx

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def gather_model(path: Path) -> Path:
    """idx INT64 [batch] -> y = TABLE[idx] FP32 [batch]: an index outside 0..9 fails the run."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)], "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(TABLE, "table")])
    return _save(graph, path)


def overflow_model(path: Path, kind: str) -> Path:
    """x FP32 [batch, 4] -> y [batch, 4], finite for ordinary x (so warm-up passes) and, for
    x > ~89: NaN (kind "nan": exp(x) * 0), +inf ("posinf": exp(x)) or -inf ("neginf": -exp(x))."""
    nodes = [helper.make_node("Exp", ["x"], ["e"])]
    if kind == "nan":
        nodes.append(helper.make_node("Mul", ["e", "zero"], ["y"]))
    elif kind == "posinf":
        nodes.append(helper.make_node("Identity", ["e"], ["y"]))
    else:
        nodes.append(helper.make_node("Neg", ["e"], ["y"]))
    graph = helper.make_graph(
        nodes, kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    return _save(graph, path)


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def int_request(model: str, **inputs) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    for name, arr in inputs.items():
        arr = np.asarray(arr)
        req.inputs.add(name=name, datatype="INT64" if arr.dtype.kind == "i" else "FP32", shape=list(arr.shape))
        req.raw_input_contents.append(arr.tobytes())
    return req


# ---------------------------------------------------------------- the batcher isolates a failing run
async def test_a_failing_request_in_a_merged_batch_fails_alone(tmp_path):
    """Straight to the batcher (no validation in the way): one out-of-table index among
    twelve good requests. The merged run fails in ONNX Runtime; the twelve get their rows."""
    handle = ModelHandle("gather-split")
    handle.swap(ModelLoader().from_file("gather-split", gather_model(tmp_path / "g.onnx")))
    model = handle.current
    runs: list[int] = []
    original = model.run

    def run(feeds):
        runs.append(len(feeds["idx"]))
        return original(feeds)

    model.run = run
    splits = counter("storefront_batch_splits_total", model="gather-split")
    isolated = counter("storefront_batch_isolated_failures_total", model="gather-split")
    batcher = MicroBatcher(handle, max_batch_size=64)
    batcher.start()
    try:
        good = [np.array([i % 10], np.int64) for i in range(12)]
        bad = np.array([1000], np.int64)
        # one gather: every request is queued before the worker takes a batch, so they merge
        results = await asyncio.gather(*(batcher.infer({"idx": x}, 1) for x in good[:6]),
                                       batcher.infer({"idx": bad}, 1),
                                       *(batcher.infer({"idx": x}, 1) for x in good[6:]),
                                       return_exceptions=True)
    finally:
        await batcher.stop()
    assert runs[0] == 13, f"the requests were not merged into one run: {runs}"
    answers = results[:6] + results[7:]
    for x, answer in zip(good, answers):
        assert not isinstance(answer, BaseException), answer
        outputs, used = answer
        assert used is model
        np.testing.assert_array_equal(outputs[0], TABLE[x])
    assert isinstance(results[6], Exception) and "idx" in str(results[6])
    assert counter("storefront_batch_splits_total", model="gather-split") == splits + 1
    assert counter("storefront_batch_isolated_failures_total", model="gather-split") == isolated + 1


# ---------------------------------------------------------------- declared index ranges
def test_declared_ranges_round_trip_and_old_manifests_read_without_them(tmp_path):
    spec = TensorSpec("product", "INT64", (-1,), (0, 32767))
    assert spec.to_json() == {"name": "product", "datatype": "INT64", "shape": [-1], "range": [0, 32767]}
    assert TensorSpec.from_json(spec.to_json()) == spec
    old = {"name": "product", "datatype": "INT64", "shape": [-1]}
    assert TensorSpec.from_json(old).value_range is None and TensorSpec.from_json(old).to_json() == old
    sig = Signature((spec, TensorSpec("x", "FP32", (-1, 3))), ())
    assert Signature.from_json(json.loads(json.dumps(sig.to_json()))).input_ranges() == {"product": (0, 32767)}
    # the exporter's declaration lives in the ONNX file and reaches the signature
    path = declare_input_ranges(gather_model(tmp_path / "g.onnx"), {"idx": (0, 9)})
    assert signature_of_onnx(path).input_ranges() == {"idx": (0, 9)}
    assert ModelLoader().from_file("g", path).input_ranges == {"idx": (0, 9)}


async def test_out_of_range_index_over_v2_is_invalid_argument_naming_input_and_range(tmp_path):
    path = declare_input_ranges(gather_model(tmp_path / "g.onnx"), {"idx": (0, 9)})
    s = server_harness.settings(name="gather", onnx=str(path))
    async with server_harness.running(s) as (_, stub, _ch):
        ok = await stub.ModelInfer(int_request("gather", idx=np.array([3, 9], np.int64)))
        np.testing.assert_array_equal(np.frombuffer(ok.raw_output_contents[0], np.float32), TABLE[[3, 9]])
        for bad in ([10], [-1], [2, 10**9]):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ModelInfer(int_request("gather", idx=np.array(bad, np.int64)))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "'idx'" in e.value.details() and "[0, 9]" in e.value.details()


@pytest.fixture(scope="module")
def pricing_world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("pricing-safety"))


def test_the_trainer_declares_the_pricing_models_index_ranges(pricing_world):
    manifest = pricing_world.registry.manifest("pricing", pricing_world.registry.current_version("pricing"))
    assert manifest.signature.input_ranges() == pricing.INPUT_RANGES
    assert manifest.signature.input_ranges()["product"] == (0, pricing.PRODUCT_CAPACITY - 1)


async def test_batch_poisoning_mix_fails_only_the_bad_requests(pricing_world, tmp_path):
    """The issue's scenario: concurrent Quotes and V2 ModelInfers to pricing, among them V2
    requests with ids outside the model's tables. The good ones all succeed; the bad ones
    are INVALID_ARGUMENT naming the input and its range (never INTERNAL for anyone)."""
    from services.pricing.main import PricingSettings, make_app

    s = PricingSettings(host="127.0.0.1", port=0, metrics_port=0, registry_dir=str(pricing_world.registry.root),
                        trainer_target="", spool_dir=str(tmp_path / "spool"), poll_interval_s=0.05, grace_s=1.0,
                        log_format="text", exploration_seed=7, max_queue_delay_us=2000)
    app = make_app(s)
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    try:
        quotes = pricing_pb2_grpc.PricingStub(channel)
        from protos.inference import grpc_service_pb2_grpc as pb_grpc

        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        width = 22  # a Quote's grid (21 prices plus the reference): V2 requests of this width merge with Quotes

        def v2_request(product=1, segment=0, hour=12):
            return int_request("pricing", product=np.array([product], np.int64),
                               segment=np.array([segment], np.int64), hour=np.array([hour], np.int64),
                               log_price_ratio=np.zeros((1, width), np.float32))

        products = pricing_world.products[:8]
        good = [quotes.Quote(quote(p, pricing_world.references[p]), timeout=30) for p in products for _ in range(4)]
        good += [v2.ModelInfer(v2_request(product=c), timeout=30) for c in range(1, 17)]
        bad_inputs = [dict(product=10**9), dict(product=-1), dict(product=pricing.PRODUCT_CAPACITY),
                      dict(segment=10**6), dict(hour=pricing.NO_HOUR + 1)]
        bad = [v2.ModelInfer(v2_request(**kw), timeout=30) for kw in bad_inputs for _ in range(3)]
        mixed = [x for pair in zip(good, bad + [None] * len(good)) for x in pair if x is not None]
        results = await asyncio.gather(*mixed, return_exceptions=True)
        by_call = dict(zip(map(id, mixed), results))
        good_failures = [r for r in (by_call[id(c)] for c in good) if isinstance(r, BaseException)]
        assert not good_failures, [(e.code(), e.details()) for e in good_failures[:3]]
        for call, kw in zip(bad, [kw for kw in bad_inputs for _ in range(3)]):
            err = by_call[id(call)]
            assert isinstance(err, grpc.aio.AioRpcError), err
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
            name = next(iter(kw))
            lo, hi = pricing.INPUT_RANGES[name]
            assert f"'{name}'" in err.details() and f"[{lo}, {hi}]" in err.details()
        # the domain API checks the same declared ranges (its own ids are always in range)
        resp = await quotes.Quote(quote("never-seen-sku", 30.0), timeout=30)
        assert 0.0 < resp.expected_conversion < 1.0
    finally:
        await channel.close()
        await app.stop()


# ---------------------------------------------------------------- outputs are checked on every request
@pytest.mark.parametrize("kind", ["nan", "posinf"])
async def test_non_finite_output_is_an_error_never_an_answer(tmp_path, kind):
    """A model that overflows for some inputs: the requests whose rows come out NaN/+inf
    get UNAVAILABLE (ModelOutputError, counted); ordinary requests, even merged into the
    same run, get their answers."""
    name = f"overflow-{kind}"
    s = server_harness.settings(name=name, onnx=str(overflow_model(tmp_path / f"{kind}.onnx", kind)),
                                max_queue_delay_us=2000)
    before = counter("storefront_model_output_errors_total", model=name, reason="nonfinite")
    async with server_harness.running(s) as (_, stub, _ch):
        ordinary = np.full((1, 4), 0.5, np.float32)
        huge = np.full((1, 4), 100.0, np.float32)  # finite input, exp overflows float32
        calls = [stub.ModelInfer(server_harness.infer_request(x, model=name))
                 for x in [ordinary] * 4 + [huge] + [ordinary] * 4]
        results = await asyncio.gather(*calls, return_exceptions=True)
    for i, r in enumerate(results):
        if i == 4:
            assert isinstance(r, grpc.aio.AioRpcError), f"a non-finite output was answered: {r}"
            assert r.code() == grpc.StatusCode.UNAVAILABLE and "non-finite" in r.details()
        else:
            assert not isinstance(r, BaseException), r
            np.testing.assert_allclose(np.frombuffer(r.raw_output_contents[0], np.float32),
                                       np.exp(0.5) * (0.0 if kind == "nan" else 1.0), rtol=1e-6)
    assert counter("storefront_model_output_errors_total", model=name, reason="nonfinite") == before + 1


async def test_minus_infinity_is_a_mask_value_and_is_answered(tmp_path):
    """-inf is what graphs emit on purpose for masked entries (the recommender's score of a
    filtered item): it is passed through, not refused."""
    s = server_harness.settings(name="overflow-neginf", onnx=str(overflow_model(tmp_path / "n.onnx", "neginf")))
    async with server_harness.running(s) as (_, stub, _ch):
        r = await stub.ModelInfer(server_harness.infer_request(np.full((1, 4), 100.0, np.float32),
                                                               model="overflow-neginf"))
    assert np.isneginf(np.frombuffer(r.raw_output_contents[0], np.float32)).all()


# ---------------------------------------------------------------- fraud: validated in float32, messages bounded
@pytest.fixture(scope="module")
def fraud_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fraud-safety")
    registry, _, data = bootstrap_small_fraud(root)
    return root, registry, data


@pytest.fixture
async def fraud_stub(fraud_world):
    from services.fraud.main import FraudSettings, make_app

    root, registry, data = fraud_world
    app = make_app(FraudSettings(host="127.0.0.1", port=0, metrics_port=0, registry_dir=str(registry.root),
                                 trainer_target="", spool_dir=str(root / "spool"), poll_interval_s=0.05, grace_s=1.0,
                                 log_format="text"))
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield fraud_pb2_grpc.FraudStub(channel), data
    finally:
        await channel.close()
        await app.stop()


def fraud_request(data, i=1):
    from protos.fraud.v1 import fraud_pb2

    row = data.X[i]
    return fraud_pb2.ScoreTransactionRequest(transaction_id=f"tx-{i}", amount=float(row[-1]), timestamp=1.7e9,
                                             features={n: float(v) for n, v in zip(FEATURES, row[:-1])})


async def test_a_feature_beyond_float32_is_invalid_not_allowed_with_nan(fraud_stub):
    stub, data = fraud_stub
    ok = await stub.ScoreTransaction(fraud_request(data))
    assert 0.0 <= ok.fraud_probability <= 1.0
    req = fraud_request(data)
    req.features["V14"] = 1e39  # finite as a double, inf as float32
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ScoreTransaction(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'features["V14"]' in e.value.details() and "float32" in e.value.details()
    req = fraud_request(data)
    req.amount = 1e39
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ScoreTransaction(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "amount" in e.value.details()


async def test_ten_thousand_unknown_features_get_a_short_invalid_argument(fraud_stub):
    stub, data = fraud_stub
    req = fraud_request(data)
    for i in range(10_000):
        req.features[f"unknown_feature_{i:05d}_with_a_rather_long_name"] = 1.0
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ScoreTransaction(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details()[:200])
    assert "unknown feature" in e.value.details() and "10000" in e.value.details()
    assert len(e.value.details()) < 2048


async def test_v2_echoes_a_huge_input_name_shortened(tmp_path, model_files):
    s = server_harness.settings(onnx=str(model_files["v_a"]))
    async with server_harness.running(s) as (_, stub, _ch):
        name = "x" * 100_000
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(server_harness.infer_request(np.zeros((1, 4), np.float32), input_name=name))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown input" in e.value.details()
        assert len(e.value.details()) < 1024
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(server_harness.infer_request(np.zeros((1, 4), np.float32), model="m" * 100_000))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and len(e.value.details()) < 1024


def test_every_service_error_message_is_capped():
    assert len(InvalidArgument("x" * 1_000_000).message) <= MAX_MESSAGE_CHARS
    assert shorten("abc", 10) == "abc"
    cut = shorten("y" * 1000, 200)
    assert len(cut) <= 200 and cut.endswith("more characters)")
