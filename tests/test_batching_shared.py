"""Shared (unbatched) inputs in the micro-batcher: fed once per run, never concatenated;
requests merge only when they carry the very same shared array objects; a request pinned to
a model version runs on it even after a swap. Over a real ORT session (scores = q @ m^T)."""
import asyncio

import numpy as np
import onnx
from onnx import TensorProto, helper

from shared.batching import MicroBatcher, merge_key
from shared.runtime.model import ModelHandle, ModelLoader, ModelRejected
from tests.server_harness import until
from tests.test_batching import CountingRuns

D = 8


def scoring_model(path, scale: float = 1.0):
    """q [B, D] (batched) x m [N, D] (a shared matrix) -> scores [B, N] = scale * q @ m^T."""
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["m"], ["mt"], perm=[1, 0]),
         helper.make_node("MatMul", ["q", "mt"], ["s0"]),
         helper.make_node("Mul", ["s0", "scale"], ["scores"])],
        "scoring",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", D]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, ["n", D])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", "n"])],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def loaded(tmp_path, name="v", scale=1.0, version="1"):
    return ModelLoader(warmup_batches=()).from_file("scoring", scoring_model(tmp_path / f"{name}.onnx", scale), version)


async def test_requests_sharing_one_matrix_merge_and_it_is_fed_once(tmp_path):
    h = ModelHandle("scoring")
    h.swap(loaded(tmp_path))
    runs = CountingRuns(h)
    fed = []
    counted = h.current.run

    def run(feeds):
        fed.append(feeds["m"])
        return counted(feeds)

    h.current.run = run
    rng = np.random.default_rng(0)
    m = rng.standard_normal((100, D)).astype(np.float32)
    batcher = MicroBatcher(h, max_batch_size=64)
    batcher.start()
    qs = [rng.standard_normal((1, D)).astype(np.float32) for _ in range(40)]
    results = await asyncio.gather(*(batcher.infer({"q": q}, 1, shared={"m": m}) for q in qs))
    await batcher.stop()
    for q, (outputs, _) in zip(qs, results):
        assert outputs[0].shape == (1, 100)  # each request gets its own row over the whole matrix
        np.testing.assert_allclose(outputs[0], q @ m.T, rtol=1e-5, atol=1e-5)
    assert sum(runs.batches) == 40 and max(runs.batches) > 1  # merged
    assert all(x is m for x in fed)  # passed as is: never concatenated or copied


async def test_different_matrix_objects_never_share_a_run(tmp_path):
    h = ModelHandle("scoring")
    h.swap(loaded(tmp_path))
    runs = CountingRuns(h)
    m1 = np.ones((10, D), np.float32)
    m2 = np.ones((10, D), np.float32)  # equal values, another object (another catalog snapshot)
    m3 = np.full((20, D), 2.0, np.float32)
    batcher = MicroBatcher(h, max_batch_size=64)
    batcher.start()
    q = np.ones((1, D), np.float32)
    calls = [batcher.infer({"q": q}, 1, shared={"m": m}) for m in (m1, m2, m3, m1, m2, m3)]
    results = await asyncio.gather(*calls)
    await batcher.stop()
    assert [r[0][0].shape for r in results] == [(1, 10), (1, 10), (1, 20)] * 2
    assert results[2][0][0][0, 0] == 2.0 * D
    assert sum(runs.batches) == 6 and len(runs.batches) >= 3  # at most the pairs that share an object merge
    assert merge_key({"q": q}, {"m": m1}, None) != merge_key({"q": q}, {"m": m2}, None)
    assert merge_key({"q": q}, {"m": m1}, None) == merge_key({"q": q + 1}, {"m": m1}, None)


async def test_a_pinned_request_runs_on_its_version_after_a_swap(tmp_path):
    h = ModelHandle("scoring")
    v1 = loaded(tmp_path, "a", scale=1.0, version="1")
    v2 = loaded(tmp_path, "b", scale=10.0, version="2")
    h.swap(v1)
    runs = CountingRuns(h, gated=True)  # v1's runs hold until released: the next requests queue behind the first
    batcher = MicroBatcher(h, max_batch_size=1)
    batcher.start()
    m = np.ones((4, D), np.float32)
    q = np.ones((1, D), np.float32)
    first = asyncio.ensure_future(batcher.infer({"q": q}, 1, shared={"m": m}, model=v1))
    await until(lambda: runs.batches == [1], "the first request to be running on v1")
    pinned = asyncio.ensure_future(batcher.infer({"q": q}, 1, shared={"m": m}, model=v1))
    live = asyncio.ensure_future(batcher.infer({"q": q}, 1, shared={"m": m}))
    await until(lambda: batcher.queued == 2, "both requests to be queued")
    h.swap(v2)  # while both wait in the queue
    runs.release()
    (y1, m1), (yp, mp), (yl, ml) = await asyncio.gather(first, pinned, live)
    await batcher.stop()
    assert (m1.version, mp.version, ml.version) == ("1", "1", "2")
    assert yp[0][0, 0] == D and yl[0][0, 0] == 10 * D


def test_prepare_runs_before_warm_up_and_its_result_is_kept(tmp_path):
    path = scoring_model(tmp_path / "s.onnx")
    seen = []

    def prepare(model):
        seen.append(("prepare", model.version, model.path))
        return np.full((7, D), 0.5, np.float32)  # e.g. item vectors for this version

    def warmup_feeds(model, batch):
        seen.append(("warm", batch))
        return {"q": np.ones((batch, D), np.float32), "m": model.prepared}

    loader = ModelLoader(prepare=prepare, warmup_feeds=warmup_feeds, warmup_batches=(1, 4))
    model = loader.from_file("scoring", path, version="3")
    assert seen == [("prepare", "3", path), ("warm", 1), ("warm", 4)]
    assert model.prepared.shape == (7, D) and model.path == path

    def failing(model):
        raise FileNotFoundError("item_tower.onnx is missing")

    try:
        ModelLoader(prepare=failing).from_file("scoring", path)
    except ModelRejected as e:
        assert "preparation failed" in str(e) and "item_tower.onnx" in str(e)
    else:
        raise AssertionError("a failing preparation must refuse the version")
