"""Hot swap under load: 32 concurrent clients, 10 publishes, zero failed requests;
bad versions published under load are refused while the old version keeps answering."""
import asyncio
import collections

import grpc
import numpy as np

from shared.runtime.signature import signature_of_onnx
from tests import onnx_models
from tests.server_harness import infer_request, running, settings, until

CLIENTS = 32
ANSWERS_PER_VERSION = 50  # answers each version gives before the next publish (11 x 50 > the 500 asserted)


async def _load(stub, stop: asyncio.Event, versions: collections.Counter, failures: list, x: np.ndarray):
    req = infer_request(x)
    while not stop.is_set():
        try:
            resp = await stub.ModelInfer(req, timeout=10)
        except grpc.aio.AioRpcError as e:
            failures.append((e.code(), e.details()))
            continue
        y = np.frombuffer(resp.raw_output_contents[0], np.float32)
        # every answer comes whole from exactly one version (seed = 1 for odd versions, 2 for even)
        seed = 1 if int(resp.model_version) % 2 else 2
        np.testing.assert_allclose(y.reshape(-1, 1), onnx_models.linear_reference(x, seed=seed), rtol=1e-5)
        versions[resp.model_version] += 1


async def test_ten_publishes_under_32_concurrent_clients_fail_no_request(registry, model_files, linear_signature):
    registry.publish("linear", model_files["v_a"], linear_signature)
    async with running(settings(registry_dir=str(registry.root))) as (app, stub, channel):
        stop, versions, failures = asyncio.Event(), collections.Counter(), []
        x = np.random.default_rng(3).standard_normal((1, 4)).astype(np.float32)
        clients = [asyncio.ensure_future(_load(stub, stop, versions, failures, x)) for _ in range(CLIENTS)]
        for i in range(10):
            # each version answers its share of the load before the next is published
            await until(lambda v=str(i + 1): versions[v] >= ANSWERS_PER_VERSION, f"version {i + 1} to answer")
            # versions 2..11 alternate between the two weight sets
            await asyncio.to_thread(registry.publish, "linear", model_files["v_b" if i % 2 == 0 else "v_a"], linear_signature)
            await until(lambda v=str(i + 2): app.models["linear"].current.version == v, f"version {i + 2} to load")
        await until(lambda: versions["11"] >= ANSWERS_PER_VERSION, "version 11 to answer")
        stop.set()
        await asyncio.gather(*clients)
    assert failures == []
    assert versions["11"] > 0, versions
    assert len(versions) >= 8, versions  # most versions really served traffic
    assert sum(versions.values()) > 500


async def test_bad_versions_under_load_are_refused_and_the_old_one_keeps_answering(registry, model_files, linear_signature):
    registry.publish("linear", model_files["v_a"], linear_signature)
    async with running(settings(registry_dir=str(registry.root))) as (app, stub, channel):
        stop, versions, failures = asyncio.Event(), collections.Counter(), []
        x = np.ones((1, 4), np.float32)
        clients = [asyncio.ensure_future(_load(stub, stop, versions, failures, x)) for _ in range(CLIENTS)]
        await until(lambda: versions["1"] >= ANSWERS_PER_VERSION, "the load to be answered")
        # 2: a corrupt file (its manifest checksum is of the corrupt bytes, so it reaches ORT)
        await asyncio.to_thread(registry.publish, "linear", model_files["corrupt"], linear_signature)
        await until(lambda: "2" in app.models["linear"].reloader.refused)
        # 3: a model with the wrong signature, honestly declared in its manifest
        await asyncio.to_thread(registry.publish, "linear", model_files["wrong_signature"],
                                signature_of_onnx(model_files["wrong_signature"]))
        await until(lambda: "3" in app.models["linear"].reloader.refused)
        answered = sum(versions.values())
        await until(lambda: sum(versions.values()) >= answered + ANSWERS_PER_VERSION, "answers after the refusals")
        stop.set()
        await asyncio.gather(*clients)
        refused = dict(app.models["linear"].reloader.refused)
        serving = app.models["linear"].current.version
    assert failures == []
    assert set(versions) == {"1"}
    assert serving == "1"
    assert "signature" in refused["3"] and "onnxruntime can load" in refused["2"], refused
