from __future__ import annotations

import socket
from pathlib import Path

import pytest

from shared.registry import ModelRegistry
from shared.runtime.signature import signature_of_onnx
from tests import onnx_models


@pytest.fixture
def model_files(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "onnx"
    d.mkdir()
    return {
        "v_a": onnx_models.linear_model(d / "a.onnx", seed=1),
        "v_b": onnx_models.linear_model(d / "b.onnx", seed=2),
        "wrong_signature": onnx_models.linear_model(d / "wide.onnx", seed=3, in_dim=5),
        "nan": onnx_models.nan_model(d / "nan.onnx"),
        "corrupt": onnx_models.corrupt_file(d / "corrupt.onnx"),
    }


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


@pytest.fixture
def linear_signature(model_files):
    return signature_of_onnx(model_files["v_a"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
