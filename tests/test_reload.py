"""Hot reload from the registry: new versions swap in, bad ones are refused, rollback is instant."""
import logging

import numpy as np

from shared import metrics
from shared.reload import HotReloader
from shared.runtime.model import ModelHandle, ModelLoader
from tests import onnx_models


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


def registry_errors(name, reason):
    return metrics.REGISTRY_ERRORS.labels(name, reason)._value.get()


async def test_refused_version_is_retried_once_repaired_when_the_pointer_comes_back(registry, model_files,
                                                                                  linear_signature):
    name = "retrytest"
    handle = ModelHandle(name)
    reloader = HotReloader(registry, handle, ModelLoader(expected=linear_signature), retry_min_s=0.0)
    registry.publish(name, model_files["v_a"], linear_signature)
    assert (await reloader.check_once()).version == "1"
    registry.publish(name, model_files["v_b"], linear_signature)
    good = registry.model_path(name, "2").read_bytes()
    registry.model_path(name, "2").write_bytes(model_files["corrupt"].read_bytes())
    assert await reloader.check_once() is None
    assert "checksum mismatch" in reloader.refused["2"]
    assert await reloader.check_once() is None  # same files, pointer still there: not tried again
    assert reloader.refusals["2"].attempts == 1

    # the operator rolls back, repairs the files, and points CURRENT at the version again
    registry.rollback(name, "1")
    assert await reloader.check_once() is None and handle.current.version == "1"  # serving it all along
    registry.model_path(name, "2").write_bytes(good)
    registry.set_current(name, "2")
    assert (await reloader.check_once()).version == "2"
    assert handle.current.version == "2" and "2" not in reloader.refused
    np.testing.assert_allclose(handle.current.run({"x": np.ones((1, 4), np.float32)})[0],
                               onnx_models.linear_reference(np.ones((1, 4), np.float32), seed=2), rtol=1e-5)


async def test_repaired_files_are_retried_without_moving_the_pointer(registry, model_files, linear_signature):
    name = "repairtest"
    handle = ModelHandle(name)
    reloader = HotReloader(registry, handle, ModelLoader(expected=linear_signature), retry_min_s=0.0)
    registry.publish(name, model_files["v_a"], linear_signature)
    registry.publish(name, model_files["v_b"], linear_signature)
    good = registry.model_path(name, "2").read_bytes()
    registry.model_path(name, "2").write_bytes(model_files["corrupt"].read_bytes())
    assert await reloader.check_once() is None
    assert "checksum mismatch" in reloader.refused["2"]
    registry.model_path(name, "2").write_bytes(good)  # rewritten in place: size and mtime change
    assert (await reloader.check_once()).version == "2"


async def test_pointer_coming_back_retries_a_version_whose_files_did_not_change(registry, model_files,
                                                                               linear_signature, tmp_path):
    """A refusal that came from outside the version's files (here a dependency the service's
    prepare step needs) is retried when an operator points CURRENT at the version again."""
    name = "comebacktest"
    dependency = tmp_path / "dependency-ready"

    def prepare(model):
        if not dependency.exists():
            raise RuntimeError(f"{dependency} is not there yet")
        return dependency.read_text()

    handle = ModelHandle(name)
    clock = [1000.0]
    reloader = HotReloader(registry, handle, ModelLoader(expected=linear_signature, prepare=prepare),
                           retry_min_s=10.0, clock=lambda: clock[0])
    registry.publish(name, model_files["v_a"], linear_signature)
    dependency.write_text("v1")
    assert (await reloader.check_once()).version == "1"
    dependency.unlink()
    registry.publish(name, model_files["v_b"], linear_signature)
    assert await reloader.check_once() is None
    assert "is not there yet" in reloader.refused["2"]
    dependency.write_text("v2")
    assert await reloader.check_once() is None  # nothing says it would work now: no retry
    registry.rollback(name, "1")
    assert await reloader.check_once() is None and handle.current.version == "1"  # serving it all along
    registry.set_current(name, "2")
    assert await reloader.check_once() is None  # asked again, but within the backoff (10 s)
    clock[0] += 10.0
    model = await reloader.check_once()
    assert model.version == "2" and model.prepared == "v2"


async def test_a_version_that_keeps_failing_is_retried_with_growing_backoff(registry, model_files, linear_signature):
    name = "backofftest"
    handle = ModelHandle(name)
    clock = [0.0]
    reloader = HotReloader(registry, handle, ModelLoader(expected=linear_signature), retry_min_s=1.0,
                           retry_max_s=4.0, clock=lambda: clock[0])
    registry.publish(name, model_files["v_a"], linear_signature)
    assert (await reloader.check_once()).version == "1"
    registry.publish(name, model_files["nan"], linear_signature)
    waits = []
    for _ in range(5):
        assert await reloader.check_once() is None
        refusal = reloader.refusals["2"]
        waits.append(refusal.retry_at - clock[0])
        # the files change every time (a publisher keeps rewriting them): each change may be retried,
        # but only once the backoff has passed
        (registry.version_dir(name, "2") / "notes.txt").write_text(str(len(waits)))
        assert await reloader.check_once() is None and reloader.refusals["2"].attempts == len(waits)
        clock[0] = refusal.retry_at
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert handle.current.version == "1"


async def test_refusals_remembered_are_bounded(registry, model_files, linear_signature):
    name = "boundtest"
    reloader = HotReloader(registry, ModelHandle(name), ModelLoader(expected=linear_signature), max_refusals=3)
    for _ in range(5):
        registry.publish(name, model_files["nan"], linear_signature)
        assert await reloader.check_once() is None
    assert list(reloader.refusals) == ["3", "4", "5"]


async def test_corrupt_pointer_is_counted_and_logged_once_per_state(registry, model_files, linear_signature, caplog):
    name = "pointertest"
    handle = ModelHandle(name)
    reloader = HotReloader(registry, handle, ModelLoader(expected=linear_signature))
    registry.publish(name, model_files["v_a"], linear_signature)
    assert (await reloader.check_once()).version == "1"
    before = registry_errors(name, "pointer_corrupt")
    caplog.set_level(logging.INFO, logger="shared.reload")

    def pointer_logs():
        return [r for r in caplog.records if "cannot read the registry pointer" in r.getMessage()]

    registry.pointer_path(name).write_text('{"version": ')
    for _ in range(5):
        assert await reloader.check_once() is None
    assert len(pointer_logs()) == 1 and pointer_logs()[0].levelno == logging.ERROR
    assert registry_errors(name, "pointer_corrupt") == before + 1
    assert metrics.POINTER_UNREADABLE.labels(name)._value.get() == 1
    assert handle.current.version == "1"  # still serving

    registry.pointer_path(name).write_text('{"version": "../../etc"}')  # a different problem: reported
    for _ in range(3):
        assert await reloader.check_once() is None
    assert len(pointer_logs()) == 2 and registry_errors(name, "pointer_corrupt") == before + 2

    registry.publish(name, model_files["v_b"], linear_signature, parent="1")  # a good pointer again
    assert (await reloader.check_once()).version == "2"
    assert metrics.POINTER_UNREADABLE.labels(name)._value.get() == 0
    assert any("pointer reads again" in r.getMessage() for r in caplog.records)
    registry.pointer_path(name).write_text('{"version": ')  # broken again later: reported again
    assert await reloader.check_once() is None
    assert len(pointer_logs()) == 3
