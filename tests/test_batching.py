"""The micro-batcher over a real ORT session: merging, correctness per request, bounds, deadlines."""
import asyncio
import threading
import time

import numpy as np
import pytest

from shared.batching import MicroBatcher
from shared.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from shared.runtime.model import ModelHandle, ModelLoader
from tests import onnx_models
from tests.server_harness import until


@pytest.fixture
def handle(model_files, linear_signature):
    h = ModelHandle("m")
    h.swap(ModelLoader(expected=linear_signature).from_file("m", model_files["v_a"]))
    return h


class CountingRuns:
    """Wraps the live model's run to count session runs and the rows each one got.

    gated: every run is recorded as started, then holds its worker thread until release(): a
    test sees "a run is in progress" as an event (batches grew) and decides when it ends,
    instead of guessing with sleeps how long a slowed-down run takes."""

    def __init__(self, handle, gated=False):
        self.batches = []
        self._gate = threading.Event()
        if not gated:
            self._gate.set()
        model = handle.current
        original = model.run

        def run(feeds):
            self.batches.append(len(next(iter(feeds.values()))))
            if not self._gate.wait(timeout=60):
                raise TimeoutError("the test never released the gated run")
            return original(feeds)

        model.run = run

    def release(self) -> None:
        self._gate.set()


async def test_concurrent_requests_are_merged_and_each_gets_its_own_rows(handle):
    runs = CountingRuns(handle)
    batcher = MicroBatcher(handle, max_batch_size=64)
    batcher.start()
    xs = [np.full((1, 4), i / 10, np.float32) for i in range(48)]
    results = await asyncio.gather(*(batcher.infer({"x": x}, 1) for x in xs))
    await batcher.stop()
    for x, (outputs, model) in zip(xs, results):
        np.testing.assert_allclose(outputs[0], onnx_models.linear_reference(x, seed=1), rtol=1e-5)
        assert model.version == "1"
    assert sum(runs.batches) == 48
    assert len(runs.batches) < 48 and max(runs.batches) > 1


async def test_batches_never_exceed_max_rows_and_multi_row_requests_stay_whole(handle):
    runs = CountingRuns(handle)
    batcher = MicroBatcher(handle, max_batch_size=8)
    batcher.start()
    xs = [np.random.default_rng(i).standard_normal((3, 4)).astype(np.float32) for i in range(10)]
    results = await asyncio.gather(*(batcher.infer({"x": x}, 3) for x in xs))
    await batcher.stop()
    assert max(runs.batches) <= 8
    for x, (outputs, _) in zip(xs, results):
        assert outputs[0].shape == (3, 1)
        np.testing.assert_allclose(outputs[0], onnx_models.linear_reference(x, seed=1), rtol=1e-5)


async def test_full_queue_is_resource_exhausted(handle):
    runs = CountingRuns(handle, gated=True)
    batcher = MicroBatcher(handle, max_batch_size=1, max_queue_size=2)
    batcher.start()
    x = np.zeros((1, 4), np.float32)
    first = asyncio.ensure_future(batcher.infer({"x": x}, 1))
    await until(lambda: runs.batches == [1], "the first request to be running")  # the queue is empty again
    queued = [asyncio.ensure_future(batcher.infer({"x": x}, 1)) for _ in range(2)]
    await until(lambda: batcher.queued == 2, "two requests queued behind the running one")
    with pytest.raises(ResourceExhausted, match="queue is full"):
        await batcher.infer({"x": x}, 1)
    runs.release()
    await asyncio.gather(first, *queued)
    assert runs.batches == [1, 1, 1]  # the refused request never queued
    await batcher.stop()


async def test_expired_requests_are_dropped_before_running(handle):
    runs = CountingRuns(handle, gated=True)
    batcher = MicroBatcher(handle, max_batch_size=1)
    batcher.start()
    x = np.zeros((1, 4), np.float32)
    first = asyncio.ensure_future(batcher.infer({"x": x}, 1))
    await until(lambda: runs.batches == [1], "the first request to be running")
    deadline = time.monotonic() + 0.01
    late = asyncio.ensure_future(batcher.infer({"x": x}, 1, deadline=deadline))
    await until(lambda: batcher.queued == 1, "the second request to be queued")
    await until(lambda: time.monotonic() > deadline, "its deadline to pass while it waits in the queue")
    runs.release()
    await first
    with pytest.raises(DeadlineExceeded):
        await late
    assert runs.batches == [1]  # the expired request never reached the session
    await batcher.stop()


async def test_requests_with_different_inner_shapes_are_not_merged(tmp_path):
    # a model with a dynamic inner axis: ReduceSum over axis 1 of x[B, N]
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)], "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 1])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    path = tmp_path / "sum.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    h = ModelHandle("sum")
    h.swap(ModelLoader().from_file("sum", path))
    batcher = MicroBatcher(h, max_batch_size=64)
    batcher.start()
    a, b = np.ones((1, 3), np.float32), np.ones((1, 5), np.float32)
    (ya, _), (yb, _) = await asyncio.gather(batcher.infer({"x": a}, 1), batcher.infer({"x": b}, 1))
    await batcher.stop()
    assert ya[0].item() == 3 and yb[0].item() == 5


async def test_no_model_and_stopped_batcher_are_unavailable(handle):
    empty = MicroBatcher(ModelHandle("none"))
    empty.start()
    with pytest.raises(Unavailable, match="not loaded"):
        await empty.infer({"x": np.zeros((1, 4), np.float32)}, 1)
    await empty.stop()
    with pytest.raises(Unavailable, match="shutting down"):
        await empty.infer({"x": np.zeros((1, 4), np.float32)}, 1)


async def test_cheap_models_run_at_once_in_the_calling_coroutine(handle):
    # a threshold no run of this tiny model reaches even on a loaded machine (20 ms once read
    # 10.7 ms per row under a parallel suite): the behaviour under test is the fast path, not
    # this machine's speed
    batcher = MicroBatcher(handle, max_batch_size=64, inline_below_us=1_000_000)
    batcher.start()
    x = np.ones((2, 4), np.float32)
    for _ in range(5):  # the first runs go through a worker thread and are measured
        await batcher.infer({"x": x}, 2)
    assert batcher._run_s_per_row * 2 < batcher.inline_below_s
    # the fast path answers without queueing: the result is there before any other task runs
    outputs, model = await batcher.infer({"x": x}, 2)
    np.testing.assert_allclose(outputs[0], onnx_models.linear_reference(x, seed=1), rtol=1e-5)
    with pytest.raises(DeadlineExceeded):
        await batcher.infer({"x": x}, 2, deadline=time.monotonic() - 1)
    await batcher.stop()
