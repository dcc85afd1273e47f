from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from ops.ports import free_port  # noqa: F401  (the tests import it from here)
from shared.registry import ModelRegistry
from shared.runtime.signature import signature_of_onnx
from tests import onnx_models
from tests.first_versions import BUILDS_ENV


def pytest_configure(config):
    """One folder for what the session builds once (first versions, the text encoder), made by
    the controlling process before any xdist worker starts, so every worker inherits it."""
    if hasattr(config, "workerinput") or os.environ.get(BUILDS_ENV):
        return
    config.storefront_builds = tempfile.mkdtemp(prefix="storefront-test-builds-")
    os.environ[BUILDS_ENV] = config.storefront_builds


def pytest_collection_modifyitems(config, items):
    """Long tests first (stable otherwise): started last, one of them kept a worker busy for
    minutes after the other had run out of tests."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_unconfigure(config):
    root = getattr(config, "storefront_builds", None)
    if root:
        shutil.rmtree(root, ignore_errors=True)
        os.environ.pop(BUILDS_ENV, None)


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


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path, names: tuple[str, ...]) -> Path:
    """A throwaway CA (ca.pem) and one certificate per name (<name>.pem/.key, CN=<name>, valid for
    localhost and 127.0.0.1) in folder d."""
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=test-ca", cwd=d)
    for who in names:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN={who}", cwd=d)
        (d / f"{who}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.pem", "-days", "1", "-extfile", f"{who}.ext", cwd=d)
    return d


@pytest.fixture
def certs(tmp_path):
    """A throwaway CA with a server and a client certificate (for TLS and mTLS tests)."""
    return make_pki(tmp_path / "pki", ("server", "client"))
