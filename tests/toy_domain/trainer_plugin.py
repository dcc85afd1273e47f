"""The toy domain's trainer plug-in: feedback contract, a tiny torch model, its first model, its setting.

Enabled by naming this module in the trainer's domain_modules setting; nothing outside
tests/toy_domain/ refers to it. The world it learns: a point x of 4 numbers is positive with
probability sigmoid(x . w). The first model is trained on synthetic draws with w = W_FIRST (a toy
has no dataset; the point is the plumbing, and the test checks the model learned: accuracy well
above chance). Live traffic then follows W_LIVE, where the 4th number, ignored by W_FIRST, matters:
a round on live labels must beat the first model on them (the gate publishes only what is not
behind the champion).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.settings import setting
from tests.toy_domain import toy_pb2
from trainer.learner import DomainModel, Examples
from trainer.plugins import TrainerDomain

log = logging.getLogger(__name__)

NAME = "toy"
WIDTH = 4
W_FIRST = np.array([2.0, -1.5, 1.0, 0.0], np.float32)
W_LIVE = np.array([2.0, -1.5, 1.0, 3.0], np.float32)


def draw(n: int, seed: int, w: np.ndarray = W_FIRST) -> tuple[np.ndarray, np.ndarray]:
    """n points of the toy world with weights w, and their labels."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, WIDTH)).astype(np.float32)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-X @ w))).astype(np.float32)
    return X, y


@dataclasses.dataclass
class ToyTrainerSettings:
    """The toy's trainer setting (flag --toy-learning-rate, environment STOREFRONT_TOY_LEARNING_RATE)."""

    toy_learning_rate: float = setting(0.05, "toy domain (tests): Adam step size of its logistic model")

    def validate(self) -> list[str]:
        return [] if self.toy_learning_rate > 0 else ["toy_learning_rate must be > 0"]


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x))


class ToyModel(DomainModel):
    name = NAME
    width = WIDTH

    def __init__(self, lr: float = 0.05) -> None:
        self.lr = lr

    def examples(self, joined) -> Examples:
        """Rows from joined events: the x that was served, the label's `positive`."""
        from shared.feedback import tensor_to_numpy

        X, y, p, off = [], [], [], []
        for j in joined:
            inputs = {t.name: t for t in j.served.inputs}
            outputs = {t.name: t for t in j.served.outputs}
            if "x" not in inputs:
                continue
            row = tensor_to_numpy(inputs["x"]).reshape(-1)
            if row.shape != (WIDTH,):
                continue
            X.append(row)
            y.append(1.0 if j.label.positive else 0.0)
            p.append(float(tensor_to_numpy(outputs["probability"]).reshape(-1)[0])
                     if "probability" in outputs else np.nan)
            off.append(j.offset)
        if not X:
            return Examples.empty(WIDTH)
        return Examples(np.stack(X).astype(np.float32), np.array(y, np.float32), np.array(p, np.float32),
                        np.array(off, np.int64))

    def new_network(self, bootstrap_X):
        torch.manual_seed(0)
        return ToyNet()

    def optimizer(self, net):
        return torch.optim.Adam(net.parameters(), lr=self.lr)

    def train(self, net, opt, X, y, epochs, seed) -> None:
        net.train()
        g = torch.Generator().manual_seed(seed)
        Xt, yt = torch.from_numpy(np.ascontiguousarray(X, np.float32)), torch.from_numpy(np.asarray(y, np.float32))
        loss_fn = nn.BCELoss()
        for _ in range(epochs):
            order = torch.randperm(len(yt), generator=g)
            for i in range(0, len(yt), 64):
                idx = order[i:i + 64]
                opt.zero_grad()
                loss_fn(net(Xt[idx]).squeeze(-1), yt[idx]).backward()
                opt.step()
        net.eval()

    def predict(self, net, X) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(X, np.float32))).squeeze(-1).numpy()

    def gate_spec(self):
        from trainer.gate import GateSpec, log_loss_rows, mean_metric

        return GateSpec(metrics=(mean_metric("log_loss", log_loss_rows, False),),
                        positive=lambda y: np.asarray(y) > 0.5, min_positives=10, min_rows=50, max_rows=400)

    def report_metrics(self, y, p) -> dict[str, float]:
        from trainer.gate import log_loss_rows

        y, p = np.asarray(y), np.asarray(p).reshape(-1)
        return {"log_loss": float(np.mean(log_loss_rows(y, p))) if len(y) else float("nan"),
                "accuracy": float(np.mean((p > 0.5) == (y > 0.5))) if len(y) else float("nan"), "rows": int(len(y))}

    def export(self, net, path: Path):
        from trainer.export import export_onnx

        module = net.eval()
        return export_onnx(module, {"x": (2, WIDTH)}, ["probability"], path), module

    def signature_inputs(self, X) -> dict[str, np.ndarray]:
        return {"x": np.ascontiguousarray(X, np.float32)}

    def manifest_extra(self, y, p) -> dict[str, Any]:
        return {"features": WIDTH}


def toy_model(settings=None) -> ToyModel:
    """The model, with the plug-in's own setting (toy_learning_rate) when trainer settings are given."""
    return ToyModel() if settings is None else ToyModel(lr=settings.toy_learning_rate)


def bootstrap(registry, workdir, *, force: bool = False, model=None, show_progress: bool = True, **_) -> dict | None:
    """Version 1 from 2,000 synthetic draws (400 more calibrate nothing: they start the gate's window)."""
    from trainer.learner import Learner

    if registry.current_version(NAME) is not None and not force:
        log.info("toy: registry already has version %s; bootstrap skipped", registry.current_version(NAME))
        return None
    X, y = draw(2000, seed=0)
    hX, hy = draw(400, seed=1)
    learner = Learner(model or toy_model(), registry, Path(workdir))
    entry = learner.bootstrap(X, y, hX, hy, epochs=5)
    log.info("toy: bootstrapped version %s: %s", entry.get("version"), entry.get("metrics"))
    return entry


TRAINER_DOMAIN = TrainerDomain(
    name=NAME,
    outcome_type=toy_pb2.ToyOutcome,
    request_type=toy_pb2.ScoreRequest,
    response_type=toy_pb2.ScoreResponse,
    outcome_identity=lambda o: (o.positive,),
    latest_outcome_wins=True,
    window_s=3600.0,
    model=toy_model,
    bootstrap=bootstrap,
    settings=ToyTrainerSettings,
)
