"""Serve any ONNX file (or a registry model, hot-reloaded) over the KServe V2 gRPC protocol.

    python -m shared.serve_onnx --onnx model.onnx --name mlp --port 18111
    python -m shared.serve_onnx --name mlp --registry-dir var/registry --port 18111

With --onnx the file is served as version 1 as it is. Without it the model is read from
the registry and follows its CURRENT pointer (hot reload); the signature of the first
version loaded becomes the one every later version must match.
"""
from __future__ import annotations

import dataclasses
import sys

from shared.runtime.model import ModelLoader
from shared.server import ServerApp, run_app
from shared.serving import ServedModel
from shared.settings import ServingSettings, setting


@dataclasses.dataclass
class OnnxServerSettings(ServingSettings):
    """Generic KServe V2 server for one ONNX model."""

    name: str = setting("model", "model name clients use (V2 model_name)")
    onnx: str = setting("", "ONNX file to serve; empty = follow the registry")


class PinFirstSignature(ModelLoader):
    """A loader that, having accepted one version, holds every later one to its signature."""

    def _load(self, name, version, path, manifest, engine_dir):
        model = super()._load(name, version, path, manifest, engine_dir)
        if self.expected is None:
            self.expected = model.signature
        return model


def make_app(s: OnnxServerSettings) -> ServerApp:
    loader = PinFirstSignature(options=s.runtime_options())
    served = ServedModel.from_settings(s.name, s, loader, model_file=s.onnx or None)
    return ServerApp(f"serve-onnx[{s.name}]", s, {s.name: served})


def main(argv: list[str] | None = None) -> int:
    settings = OnnxServerSettings.load(argv)
    return run_app(make_app, settings)


if __name__ == "__main__":
    sys.exit(main())
