"""Hot reload from the registry: new versions swap in, bad ones are refused, rollback is instant."""
import numpy as np

from shared import metrics
from shared.reload import HotReloader
from shared.runtime.model import ModelHandle, ModelLoader


def refused_count(name):
    return metrics.RELOADS.labels(name, "refused")._value.get()


async def test_new_versions_swap_in_and_bad_ones_are_refused(registry, model_files, linear_signature):
    name = "reloadtest"
    handle = ModelHandle(name)
    reloader = HotReloader(registry, handle, ModelLoader(expected=linear_signature))
    assert await reloader.check_once() is None  # empty registry: nothing to serve yet
    registry.publish(name, model_files["v_a"], linear_signature)
    assert (await reloader.check_once()).version == "1"
    registry.publish(name, model_files["v_b"], linear_signature)
    assert (await reloader.check_once()).version == "2"
    assert handle.previous.version == "1"

    before = refused_count(name)
    # a model whose signature is not what the service declares
    registry.publish(name, model_files["wrong_signature"], registry.manifest(name, "1").signature)
    assert await reloader.check_once() is None
    assert "disagrees with its manifest" in reloader.refused["3"]
    registry.publish(name, model_files["nan"], linear_signature)
    assert await reloader.check_once() is None
    assert "non-finite" in reloader.refused["4"]
    # a file corrupted after publishing (checksum no longer matches)
    registry.publish(name, model_files["v_a"], linear_signature)
    registry.model_path(name, "5").write_bytes(model_files["corrupt"].read_bytes())
    assert await reloader.check_once() is None
    assert "checksum mismatch" in reloader.refused["5"]
    assert refused_count(name) == before + 3
    assert handle.current.version == "2"  # still serving the last good version
    assert await reloader.check_once() is None  # refused versions are not retried

    # rollback to the previous version is an instant swap (it is still loaded)
    previous = handle.previous
    registry.rollback(name, "1")
    assert await reloader.check_once() is previous
    x = np.ones((2, 4), np.float32)
    assert handle.current.run({"x": x})[0].shape == (2, 1)


async def test_manifest_with_a_different_signature_is_refused(registry, model_files, linear_signature):
    from shared.runtime.signature import signature_of_onnx
    name = "sigtest"
    handle = ModelHandle(name)
    reloader = HotReloader(registry, handle, ModelLoader(expected=linear_signature))
    registry.publish(name, model_files["wrong_signature"], signature_of_onnx(model_files["wrong_signature"]))
    assert await reloader.check_once() is None
    assert "signature differs from what the service declares" in reloader.refused["1"]
    assert handle.current is None
