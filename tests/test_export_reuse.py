"""trainer.export.GraphReuse: a later export of the same network puts the new weights into the
kept translated graph and optimizes it, and the file is the one a fresh export writes."""
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

from trainer.export import GraphReuse, torch_to_onnx


class Folded(nn.Module):
    """What the exporter's optimizer folds: softplus of a one-element parameter (a scalar of the
    graph), a table times it, a buffer; a parameter the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.3]))
        self.table = nn.Parameter(torch.randn(50, 4))
        self.register_buffer("shift", torch.zeros(4))
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, idx, x):
        scaled = self.table * F.softplus(self.scale) + self.shift  # weights only: folded
        return (scaled[idx] * x).sum(-1)


class Tempered(nn.Module):
    """A plain Python attribute in the forward: the exporter bakes it in as a constant."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(width, 2)
        self.temperature = 2.0

    def forward(self, x):
        return self.lin(x) / self.temperature


DYN = {"idx": {0: torch.export.Dim("batch", min=1, max=1024)}, "x": {0: torch.export.Dim("batch", min=1, max=1024)}}
EXAMPLE = (torch.tensor([1, 7, 3]), torch.randn(3, 4))


def run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_new_weights_through_the_kept_graph_give_the_fresh_export(tmp_path):
    reuse = GraphReuse()
    module = Folded()
    torch_to_onnx(module, EXAMPLE, ["idx", "x"], ["y"], tmp_path / "v1.onnx", DYN, reuse=reuse)
    assert (reuse.exported, reuse.reused) == (1, 0)
    with torch.no_grad():
        module.scale.fill_(-1.5)
        module.table.mul_(3.0)
        module.shift.fill_(0.25)
    torch_to_onnx(module, EXAMPLE, ["idx", "x"], ["y"], tmp_path / "v2.onnx", DYN, reuse=reuse)
    assert (reuse.exported, reuse.reused) == (1, 1)
    torch_to_onnx(module, EXAMPLE, ["idx", "x"], ["y"], tmp_path / "fresh.onnx", DYN, reuse=None)

    feeds = {"idx": np.array([0, 49, 7, 7, 20]), "x": np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)}
    with torch.no_grad():
        want = module(torch.from_numpy(feeds["idx"]), torch.from_numpy(feeds["x"])).numpy()
    np.testing.assert_allclose(run(tmp_path / "v2.onnx", feeds), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run(tmp_path / "v2.onnx", feeds), run(tmp_path / "fresh.onnx", feeds), rtol=0, atol=1e-7)
    assert not np.allclose(run(tmp_path / "v1.onnx", feeds), want, atol=1e-3)  # the weights did change
    assert ops(tmp_path / "v2.onnx") == ops(tmp_path / "fresh.onnx")  # folded alike: softplus is gone
    assert "Softplus" not in ops(tmp_path / "v2.onnx")
    onnx.checker.check_model(str(tmp_path / "v2.onnx"), full_check=True)


def test_a_changed_python_attribute_is_caught_and_exported_afresh(tmp_path):
    reuse = GraphReuse()
    module = Tempered()
    x = (torch.randn(3, 4),)
    dyn = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    torch_to_onnx(module, x, ["x"], ["y"], tmp_path / "v1.onnx", dyn, reuse=reuse)
    module.temperature = 5.0  # not a tensor: the kept graph still divides by 2
    torch_to_onnx(module, x, ["x"], ["y"], tmp_path / "v2.onnx", dyn, reuse=reuse)
    assert (reuse.exported, reuse.reused) == (2, 0)
    feeds = {"x": np.ones((2, 4), np.float32)}
    with torch.no_grad():
        want = module(torch.from_numpy(feeds["x"])).numpy()
    np.testing.assert_allclose(run(tmp_path / "v2.onnx", feeds), want, rtol=1e-6, atol=1e-6)
    torch_to_onnx(module, x, ["x"], ["y"], tmp_path / "v3.onnx", dyn, reuse=reuse)
    assert (reuse.exported, reuse.reused) == (3, 0)  # that network's graph is not kept again


def test_another_shape_is_another_graph(tmp_path):
    reuse = GraphReuse()
    dyn = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    torch_to_onnx(Tempered(4), (torch.randn(3, 4),), ["x"], ["y"], tmp_path / "a.onnx", dyn, reuse=reuse)
    torch_to_onnx(Tempered(5), (torch.randn(3, 5),), ["x"], ["y"], tmp_path / "b.onnx", dyn, reuse=reuse)
    assert (reuse.exported, reuse.reused) == (2, 0)
    assert run(tmp_path / "b.onnx", {"x": np.ones((1, 5), np.float32)}).shape == (1, 2)
