"""Execution-provider selection, validated loading and the model handle (real ORT sessions)."""
import numpy as np
import pytest

from shared.runtime.model import ModelHandle, ModelLoader, ModelRejected, sample_inputs
from shared.runtime.session import ProviderError, RuntimeOptions, create_session, provider_options, requested_providers
from tests import onnx_models

GPU_BOX = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_auto_prefers_tensorrt_then_cuda_then_cpu():
    assert requested_providers("auto", GPU_BOX) == (GPU_BOX, False)
    assert requested_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert requested_providers("auto", ["AzureExecutionProvider", "CPUExecutionProvider"])[0] == ["CPUExecutionProvider"]


def test_forced_providers_keep_their_order_and_must_exist():
    assert requested_providers("cuda,cpu", GPU_BOX) == (["CUDAExecutionProvider", "CPUExecutionProvider"], True)
    with pytest.raises(ProviderError, match="unknown execution provider"):
        requested_providers("rocm", GPU_BOX)
    with pytest.raises(ProviderError, match="not installed"):
        requested_providers("tensorrt", ["CPUExecutionProvider"])


def test_tensorrt_options_use_a_stable_engine_cache_per_version(tmp_path):
    opts = RuntimeOptions(trt_fp16=True, trt_cache_dir=str(tmp_path / "trt"))
    o = provider_options("TensorrtExecutionProvider", opts, tmp_path / "trt" / "fraud" / "7")
    assert o["trt_engine_cache_enable"] == "True"
    assert o["trt_engine_cache_path"] == str(tmp_path / "trt" / "fraud" / "7")
    assert o["trt_fp16_enable"] == "True"
    assert (tmp_path / "trt" / "fraud" / "7").is_dir()
    assert provider_options("CPUExecutionProvider", opts, None) == {}


def test_cpu_session_reports_the_provider_that_really_runs(model_files):
    created = create_session(model_files["v_a"], RuntimeOptions())
    assert created.primary_provider == "CPUExecutionProvider"


def test_a_forced_provider_that_silently_falls_back_is_an_error(model_files):
    # onnxruntime-gpu on a machine without a GPU lists CUDA as available, then runs on CPU.
    with pytest.raises(ProviderError, match="runs on CPUExecutionProvider"):
        create_session(model_files["v_a"], RuntimeOptions(providers="cuda,cpu"),
                       available=["CUDAExecutionProvider", "CPUExecutionProvider"])
    # under auto the same fallback is accepted (and logged)
    created = create_session(model_files["v_a"], RuntimeOptions(),
                             available=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert created.primary_provider == "CPUExecutionProvider"


def test_loader_gives_correct_outputs(model_files, linear_signature):
    model = ModelLoader(expected=linear_signature).from_file("m", model_files["v_a"])
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    (y,) = model.run({"x": x})
    np.testing.assert_allclose(y, onnx_models.linear_reference(x, seed=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, reason", [
    ("wrong_signature", "signature differs"),
    ("nan", "non-finite"),
    ("corrupt", "not a model onnxruntime can load"),
])
def test_loader_refuses_bad_versions(model_files, linear_signature, bad, reason):
    with pytest.raises(ModelRejected, match=reason):
        ModelLoader(expected=linear_signature).from_file("m", model_files[bad])


def test_service_output_check_can_refuse(model_files, linear_signature):
    loader = ModelLoader(expected=linear_signature, output_check=lambda out: "too confident" if out["y"].max() > 0 else None)
    with pytest.raises(ModelRejected, match="too confident"):
        loader.from_file("m", model_files["v_a"])


def test_sample_inputs_follow_the_signature(linear_signature):
    feeds = sample_inputs(linear_signature, batch=3)
    assert feeds["x"].shape == (3, 4) and feeds["x"].dtype == np.float32


def test_handle_swaps_and_keeps_previous(model_files, linear_signature):
    loader = ModelLoader(expected=linear_signature)
    a = loader.from_file("m", model_files["v_a"], version="1")
    b = loader.from_file("m", model_files["v_b"], version="2")
    handle = ModelHandle("m")
    seen = []
    handle.on_swap(lambda m: seen.append(m.version))
    assert handle.swap(a) is None
    assert handle.swap(b) is a
    assert (handle.current, handle.previous) == (b, a)
    assert handle.loaded("1") is a and handle.loaded("3") is None
    assert seen == ["1", "2"]
