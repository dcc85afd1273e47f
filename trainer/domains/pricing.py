"""Pricing domain, trainer side: a hierarchical Bayesian conversion model of price and context.

The network and its serving graph: trainer.domains.pricing_net (the model's equation and
priors are documented there); the Laplace posterior and its online updates (Thompson
sampling's uncertainty): trainer.domains.pricing_posterior. Their public names are importable
from here too. Here: the learner's glue (PricingModel), calibration per segment, and the
bootstrap.

Bootstrap (bootstrap_pricing, `python -m trainer bootstrap --domains pricing`, ~20 s): Ta Feng
Nov-Dec 2000 turned into conversion rows by the exposure assumption of
trainer.domains.pricing_data (an exposure = a basket holding the product's subclass, a
conversion = one holding the product; binomial rows per product-day-segment with the day's
price), weighted by HISTORY_WEIGHT (a power prior: the grocery shelf is not the storefront),
absorbed from the prior in one L-BFGS solve; the last week is the holdout. The vocabulary is
every Ta Feng product (23,812) with its subclass; it travels in the checkpoint (extra state)
and in each manifest (extra.products, in code order), which the service maps ids with.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trainer.domains.pricing_data import SEGMENTS, X_CLIP, Vocabulary
from trainer.domains.pricing_net import (B0_INIT, CATEGORY_CAPACITY, CELL_CAPACITY, COL_HOUR, COL_OFF_HI, COL_OFF_LO,
                                         COL_PRODUCT, COL_SEGMENT, COL_WEIGHT, COL_X, GROUP_INDEX, INPUT_NAMES,
                                         INPUT_RANGES, LEVELS, NOISE_SEED, NOISE_SLOTS, NO_HOUR, N_SAMPLES, N_SEGMENTS,
                                         OFFSET_SPLIT, OUTPUT_NAMES, PRIOR_PRECISION, PRODUCT_CAPACITY, SAMPLED, SLOPES,
                                         SLOPE_BASE, SLOPE_MULT, WIDTH, export_pricing, PricingExport, PricingNet, rows,
                                         sensitivity, split_offsets)
from trainer.domains.pricing_posterior import (BOOTSTRAP_CONTEXT_SLOPE_CAP, BOOTSTRAP_PRECISION_CAP, absorb,
                                               cap_precision, predict_mean, refit, weighted_log_loss)
from trainer.learner import DomainModel, Examples

log = logging.getLogger(__name__)

MODEL_NAME = "pricing"


# ---- calibration: predicted vs observed conversion per segment ----
CALIBRATION_MIN_QUOTES = 50  # segments with fewer quotes are listed but not judged (max_abs_*)


def segment_calibration(segment: np.ndarray, y: np.ndarray, p: np.ndarray, weight: np.ndarray | None = None,
                        min_quotes: int = CALIBRATION_MIN_QUOTES, names: Sequence[str] = SEGMENTS) -> dict[str, Any]:
    """Predicted against observed conversion per segment, at the prices the rows were quoted at.

    segment: codes (index into names); y: sold (0/1, or a share for aggregated rows); p: the
    model's conversion at the row's price; weight: row weights (default 1). Per segment with
    rows: quotes (total weight), observed and predicted (weighted means), gap = predicted -
    observed, and z = gap / its standard error under the model (sqrt(sum w^2 p (1-p)) / sum w:
    how far the observed share may fall from a calibrated prediction by chance alone; exact for
    0/1 quotes). max_abs_gap / max_abs_z and worst over segments with at least min_quotes: a
    model that is right on average can still be off by segment (an insensitive segment
    predicted like the others converts more at high prices than the model says)."""
    segment = np.asarray(segment, np.int64).reshape(-1)
    y = np.asarray(y, np.float64).reshape(-1)
    p = np.clip(np.asarray(p, np.float64).reshape(-1), 0.0, 1.0)
    w = np.ones_like(y) if weight is None else np.asarray(weight, np.float64).reshape(-1)
    if not len(segment) == len(y) == len(p) == len(w):
        raise ValueError(f"segment_calibration: lengths differ ({len(segment)}, {len(y)}, {len(p)}, {len(w)})")
    out: dict[str, Any] = {"segments": {}, "max_abs_gap": float("nan"), "max_abs_z": float("nan"), "worst": None,
                           "min_quotes": int(min_quotes)}
    worst = (-1.0, None)
    for code in np.unique(segment):
        m = segment == code
        total = float(w[m].sum())
        if total <= 0:
            continue
        observed, predicted = float(w[m] @ y[m] / total), float(w[m] @ p[m] / total)
        se = math.sqrt(float((w[m] ** 2) @ (p[m] * (1 - p[m])))) / total
        gap = predicted - observed
        name = names[code] if 0 <= code < len(names) else str(int(code))
        out["segments"][name] = {"quotes": round(total, 3), "observed": observed, "predicted": predicted,
                                 "gap": gap, "z": gap / se if se > 0 else float("nan")}
        if total >= min_quotes and abs(gap) > worst[0]:
            worst = (abs(gap), name)
    judged = [v for v in out["segments"].values() if v["quotes"] >= min_quotes]
    if judged:
        out["max_abs_gap"] = max(abs(v["gap"]) for v in judged)
        out["max_abs_z"] = max(abs(v["z"]) for v in judged if v["z"] == v["z"]) if any(
            v["z"] == v["z"] for v in judged) else float("nan")
        out["worst"] = worst[1]
    return out


def calibration_of_rows(X: np.ndarray, y: np.ndarray, p: np.ndarray, min_quotes: int = CALIBRATION_MIN_QUOTES
                        ) -> dict[str, Any]:
    """segment_calibration of training rows (WIDTH layout) and the model's predictions for them.
    Storefront quotes (rows with an hour) are judged on their own when there are any: the
    replayed Ta Feng rows (no hour, aggregated exposures of another population) would otherwise
    weigh in with their exposure counts; without quotes (the bootstrap) the Ta Feng rows are
    judged, weighted by their exposures."""
    X = np.asarray(X)
    quotes = X[:, COL_HOUR] < NO_HOUR
    rows_ = quotes if quotes.any() else np.ones(len(X), bool)
    out = segment_calibration(X[rows_, COL_SEGMENT], np.asarray(y)[rows_], np.asarray(p).reshape(-1)[rows_],
                              X[rows_, COL_WEIGHT], min_quotes)
    out["rows"] = "storefront quotes" if quotes.any() else "ta feng exposures"
    return out


def calibration_figures(cal: dict[str, Any], prefix: str = "calibration") -> dict[str, float]:
    """Flat figures of a calibration (report_metrics holds numbers only): the largest absolute
    gap and z over judged segments, and each judged segment's gap."""
    out = {f"{prefix}_max_abs_gap": cal["max_abs_gap"], f"{prefix}_max_abs_z": cal["max_abs_z"]}
    for name, v in cal["segments"].items():
        if v["quotes"] >= cal["min_quotes"]:
            out[f"{prefix}_gap[{name}]"] = v["gap"]
    return out

HISTORY_ROWS = 50_000  # storefront rows each round refits; older ones are absorbed into the anchor
SERVED_HISTORY = 50_000  # served quotes kept for the prequential calibration (>= the learner's window)


class PricingModel(DomainModel):
    """The learner's view of pricing. `epochs` scales the L-BFGS iterations of an absorption.
    The optimizer the learner checkpoints is not used for steps: every absorption is its own
    full-batch L-BFGS solve (its objective changes with the prior), built inside train()."""

    name = MODEL_NAME
    width = WIDTH

    def __init__(self, iterations_per_epoch: int = 30, bootstrap_iterations: int = 60) -> None:
        self.iterations_per_epoch = iterations_per_epoch
        self.bootstrap_iterations = bootstrap_iterations
        self.vocab: Vocabulary | None = None  # set by the bootstrap before new_network
        self.progress = None  # optional callback(done, total) of a bootstrap solve
        # The learner hands report_metrics / manifest_extra / prequential_metrics labels and
        # predictions only; the per-segment calibration needs each row's segment. The rows of
        # the last predict() (the learner scores the rows it then reports on) and of the recent
        # served quotes (from examples(), in the order the learner receives them) are kept, and
        # used only when they match what the learner passes (never attributed to other rows).
        self._predicted: tuple[np.ndarray, np.ndarray] | None = None
        self._served = np.zeros((0, 3), np.float64)  # segment, sold, served conversion
        # the bootstrap's posterior (the prior of every refit) and the storefront rows since (train)
        self._anchor: PricingNet | None = None
        self._history = (np.zeros((0, WIDTH), np.float32), np.zeros(0, np.float32))

    def new_network(self, bootstrap_X: np.ndarray) -> PricingNet:
        net = PricingNet()
        if self.vocab is not None:
            net.set_vocabulary(self.vocab)
        return net

    def optimizer(self, net):
        return torch.optim.SGD([net.a0], lr=0.0)  # checkpointed by the learner, never stepped

    def train(self, net, opt, X, y, epochs, seed) -> None:
        """Bootstrap: absorb the Ta Feng rows, cap the precisions, keep the result as the anchor
        (the prior of every later refit). A round: the rows not seen before join the storefront
        history, and the net is refit on the whole history under the anchor (refit). Without an
        anchor (a checkpoint from before it), each round's rows are absorbed into the previous
        posterior as before."""
        offsets = X[:, COL_OFF_HI].astype(np.float64) * OFFSET_SPLIT + X[:, COL_OFF_LO] if len(X) else np.zeros(0)
        bootstrap = len(X) and float(np.max(offsets)) == 0.0
        iters = self.bootstrap_iterations if bootstrap else self.iterations_per_epoch * max(1, epochs)
        if bootstrap:
            # the curve shapes stay at their prior (0) here: fitted to the shelf, they learned
            # Ta Feng's bump of conversion at the reference price (the reference is each
            # product's most frequent price: a selection effect of the shelf, not demand) and
            # took over part of the price response from the sensitivities (median product slope
            # 0.8 instead of ~2 without the curve); on the logit market, whose truth is the
            # logistic part, the service then priced below the optimum and could not unlearn it
            # (regret 9.3 %). The storefront's own quotes fit the curve (refit).
            absorb(net, X, y, max_iter=iters, progress=self.progress, fit_curve=False)
            cap_precision(net)
            self._anchor = self._copy(net)
            self._history = (np.zeros((0, WIDTH), np.float32), np.zeros(0, np.float32))
            return
        if self._anchor is None:
            absorb(net, X, y, max_iter=iters)
            return
        hX, hy = self._history
        last = float(hX[-1, COL_OFF_HI]) * OFFSET_SPLIT + float(hX[-1, COL_OFF_LO]) if len(hX) else 0.0
        new = offsets > last  # the learner's replay passes rows the history holds already
        if new.any():
            order = np.argsort(offsets[new], kind="stable")
            hX = np.concatenate([hX, np.asarray(X, np.float32)[new][order]])
            hy = np.concatenate([hy, np.asarray(y, np.float32)[new][order]])
        if len(hX) > HISTORY_ROWS:  # the oldest rows go into the anchor (absorbed once, as before)
            cut = len(hX) - HISTORY_ROWS
            absorb(self._anchor, hX[:cut], hy[:cut], max_iter=iters)
            hX, hy = hX[cut:], hy[cut:]
        self._history = (hX, hy)
        refit(net, self._anchor, hX, hy, max_iter=iters)

    @staticmethod
    def _copy(net: PricingNet) -> PricingNet:
        out = PricingNet()
        out.load_state_dict(net.state_dict())
        return out

    def domain_state(self) -> dict[str, Any]:
        if self._anchor is None:
            return {}
        keep = {*PricingNet.SHAPES, *(f"prec_{n}" for n in PricingNet.SHAPES), "product_category", "absorbed_offset"}
        return {"anchor": {k: v.clone() for k, v in self._anchor.state_dict().items() if k in keep},
                "history_X": self._history[0].copy(), "history_y": self._history[1].copy()}

    def load_domain_state(self, state: dict[str, Any]) -> None:
        if state and "anchor" in state:
            self._anchor = PricingNet()
            self._anchor.load_state_dict(state["anchor"], strict=False)  # means, precisions, subclasses
            self._history = (np.asarray(state["history_X"], np.float32), np.asarray(state["history_y"], np.float32))

    def predict(self, net, X) -> np.ndarray:
        p = predict_mean(net, X)
        self._predicted = (np.asarray(X), p)
        return p

    def calibration(self, y: np.ndarray, p: np.ndarray) -> dict[str, Any] | None:
        """Per-segment calibration of predictions p for labels y, when p is the last predict()'s
        output (so the rows, and their segments, are known); else None."""
        last = self._predicted
        if last is None or len(last[1]) != len(p) or len(y) != len(p):
            return None
        if not (last[1] is p or np.array_equal(last[1], p)):
            return None
        return calibration_of_rows(last[0], y, p)

    def prequential_metrics(self, y: np.ndarray, served_p: np.ndarray) -> dict[str, float]:
        """The default figures plus the per-segment calibration of what was served: the conversion
        the serving version predicted at the price it quoted, against the sales (segments from the
        quotes examples() turned into rows, when they are the rows the learner passes)."""
        out = super().prequential_metrics(y, served_p)
        n = len(y)
        hist = self._served
        if n and len(hist) >= n and np.array_equal(hist[-n:, 1], np.asarray(y, np.float64)) and np.allclose(
                hist[-n:, 2], np.asarray(served_p, np.float64), rtol=0, atol=1e-6):
            out.update(calibration_figures(segment_calibration(hist[-n:, 0], y, served_p), "served_calibration"))
        return out

    def gate_spec(self):
        """The gate (trainer/gate.py) on the window of recent quotes neither version trained
        on: the log-likelihood of the observed sales (as mean log loss of the posterior-mean
        conversion at the quoted price, lower is better). Expected revenue at the quoted
        prices would score the same conversion probabilities times a price the model did not
        choose alone (Thompson sampling and the step limit do), so the likelihood is the
        cleaner test of what the model knows. 30 sales and 100 quotes at least; the window is
        capped at 5,000 quotes. Not seeded with the bootstrap's Ta Feng holdout week: those
        are aggregated shelf rows of another population, not storefront quotes."""
        from trainer.gate import GateSpec, log_loss_rows, mean_metric

        return GateSpec(metrics=(mean_metric("log_loss", log_loss_rows, False),),
                        positive=lambda y: np.asarray(y) > 0, min_positives=30, min_rows=100, max_rows=5000,
                        seed_from_bootstrap=False)

    def report_metrics(self, y, p) -> dict[str, float]:
        out = {"log_loss": weighted_log_loss(y, p), "brier": float(np.mean((y - p) ** 2)) if len(y) else float("nan"),
               "mean_conversion": float(np.mean(y)) if len(y) else float("nan"),
               "mean_predicted": float(np.mean(p)) if len(y) else float("nan"), "rows": int(len(y))}
        cal = self.calibration(y, p)
        if cal is not None:
            out.update(calibration_figures(cal))
        return out

    def export(self, net, path):
        self.vocab = net.vocab or self.vocab  # a restored network carries the vocabulary
        return export_pricing(net, path), PricingExport(net).eval()

    def signature_inputs(self, X) -> dict[str, np.ndarray]:
        X = np.asarray(X, np.float32)
        grid = X[:, COL_X:COL_X + 1] + np.linspace(-0.3, 0.3, 5, dtype=np.float32)[None, :]
        return {"product": X[:, COL_PRODUCT].astype(np.int64), "segment": X[:, COL_SEGMENT].astype(np.int64),
                "hour": np.minimum(X[:, COL_HOUR], 23).astype(np.int64), "log_price_ratio": grid}

    def manifest_extra(self, y, p) -> dict[str, Any]:
        import hashlib

        products = self.vocab.products if self.vocab else []
        # the same vocabulary in every version: the service keeps its id -> code map across reloads
        digest = hashlib.sha256("\n".join([*products, "|", *SEGMENTS]).encode()).hexdigest()
        out = {"products": products, "segments": list(SEGMENTS), "vocabulary_id": digest,
               "samples": N_SAMPLES, "x_clip": X_CLIP}
        cal = self.calibration(y, p)
        if cal is not None:  # predicted vs observed conversion per segment on the rows the version was judged on
            out["calibration"] = cal
        return out

    def examples(self, joined: Sequence[Any]) -> Examples:
        """Training rows from joined quotes: the served product/segment/hour codes, the quoted
        price relative to the request's reference price, sold or not. When one poll holds
        several outcomes of the same quote, the one with the latest occurred_at counts (the
        proto's rule; an outcome corrected in a later poll adds a row instead: the posterior
        cannot take a row back)."""
        from protos.pricing.v1 import pricing_pb2
        from shared.feedback import tensor_to_numpy

        latest: dict[str, tuple[float, tuple]] = {}
        for j in joined:
            tensors = {t.name: t for t in j.served.inputs}
            if not {"product", "segment", "hour"} <= tensors.keys():
                continue
            req, resp = pricing_pb2.QuoteRequest(), pricing_pb2.QuoteResponse()
            if not (j.served.request.Unpack(req) and j.served.response.Unpack(resp)):
                continue
            if not (req.reference_price > 0 and resp.price > 0):
                continue
            try:
                codes = [int(tensor_to_numpy(tensors[n]).reshape(-1)[0]) for n in ("product", "segment", "hour")]
            except (ValueError, IndexError):
                continue
            if not (0 <= codes[0] < PRODUCT_CAPACITY and 0 <= codes[1] < N_SEGMENTS and 0 <= codes[2] < NO_HOUR):
                continue  # served by a model of another vocabulary shape: not this learner's input
            x = math.log(resp.price / req.reference_price)
            sold = 1.0 if j.label.sold else 0.0
            row = (*codes, x, sold, resp.expected_conversion, j.offset)
            seen = latest.get(j.prediction_id)
            if seen is None or j.label.occurred_at >= seen[0]:
                latest[j.prediction_id] = (j.label.occurred_at, row)
        out = sorted((row for _, row in latest.values()), key=lambda r: r[-1])
        if not out:
            return Examples.empty(WIDTH)
        a = np.array(out, np.float64)
        X = rows(a[:, 0], a[:, 1], a[:, 2], a[:, 3], 1.0, a[:, 6].astype(np.int64))
        served = np.column_stack([a[:, 1], a[:, 4], a[:, 5].astype(np.float32)])
        self._served = np.concatenate([self._served, served])[-SERVED_HISTORY:]
        return Examples(X, a[:, 4].astype(np.float32), a[:, 5].astype(np.float32), a[:, 6].astype(np.int64))


# ---- bootstrap from Ta Feng ----
BOOTSTRAP_END = "2001-01-01"  # bootstrap learns from Nov-Dec 2000; the simulator is calibrated on Jan-Feb 2001
HOLDOUT_DAYS = 7  # the last week before BOOTSTRAP_END is the bootstrap's holdout
MIN_LINES = 30  # products with at least this many lines (and two prices) give training rows
# Power prior: one Ta Feng exposure counts as this share of an observed quote. The shelf of a
# Taiwanese grocery in 2000 is not this storefront: at full weight its thousands of exposures per
# product would make the posterior so sure that the storefront's own sales could hardly move it
# (and Thompson sampling would hardly explore). At 0.1 a product's history weighs like a few
# hundred quotes; measured on the market simulator (bench.eval_pricing), see the README.
HISTORY_WEIGHT = 0.1


def bootstrap_data(limit: int | None = None, end: str = BOOTSTRAP_END, min_lines: int = MIN_LINES,
                   history_weight: float = HISTORY_WEIGHT):
    """(vocabulary, train rows, holdout rows) from Ta Feng before `end` (rows: (X, y)); each
    row's weight is its exposures x history_weight."""
    import pandas as pd

    from trainer.domains import pricing_data
    from trainer.tafeng import load_tafeng

    df = load_tafeng(limit)
    vocab = pricing_data.vocabulary(df)
    period = df[df["day"] < pd.Timestamp(end)]
    products = pricing_data.priced_products(period, min_lines)
    conv = pricing_data.conversion_rows(period, vocab, products)
    cut = np.datetime64(pd.Timestamp(end) - pd.Timedelta(days=HOLDOUT_DAYS), "D")

    def to_xy(r):
        return rows(r.product, r.segment, NO_HOUR, r.x, r.n * history_weight, 0), (r.k / r.n).astype(np.float32)

    return vocab, to_xy(conv.take(conv.day < cut)), to_xy(conv.take(conv.day >= cut))


def bootstrap_pricing(registry, workdir: Path, *, force: bool = False, model: PricingModel | None = None,
                      show_progress: bool = True, limit: int | None = None, **_) -> dict | None:
    """Train version 1 on Ta Feng (Nov-Dec 2000) and publish it."""
    import time

    from trainer.learner import Learner

    if registry.current_version(MODEL_NAME) is not None and not force:
        log.info("pricing: registry already has version %s; bootstrap skipped", registry.current_version(MODEL_NAME))
        return None
    t0 = time.time()
    model = model or PricingModel()
    vocab, (X, y), (hX, hy) = bootstrap_data(limit)
    model.vocab = vocab
    if show_progress:
        from trainer.progress import progress_bar

        bar = progress_bar("pricing bootstrap (L-BFGS iterations)")
        model.progress = bar
    learner = Learner(model, registry, workdir)
    entry = learner.bootstrap(X, y, hX, hy, epochs=1)
    model.progress = None
    p = predict_mean(learner.net, hX)
    log.info("pricing: bootstrapped version %s from %d Ta Feng product-day-segment rows (%d exposures x %g) of %d "
             "products in %.1f s; holdout weighted log loss %.4f (constant rate: %.4f)", entry.get("version"),
             len(y), int(X[:, COL_WEIGHT].sum() / HISTORY_WEIGHT), HISTORY_WEIGHT, len(np.unique(X[:, COL_PRODUCT])),
             time.time() - t0,
             weighted_log_loss(hy, p, hX[:, COL_WEIGHT]),
             weighted_log_loss(hy, np.full_like(hy, np.average(y, weights=X[:, COL_WEIGHT])), hX[:, COL_WEIGHT]))
    return entry


# the public names of the pricing domain, including those of pricing_net and pricing_posterior
__all__ = ["B0_INIT", "BOOTSTRAP_CONTEXT_SLOPE_CAP", "BOOTSTRAP_END", "BOOTSTRAP_PRECISION_CAP",
           "CALIBRATION_MIN_QUOTES", "CATEGORY_CAPACITY", "CELL_CAPACITY", "COL_HOUR", "COL_OFF_HI", "COL_OFF_LO",
           "COL_PRODUCT", "COL_SEGMENT", "COL_WEIGHT", "COL_X", "GROUP_INDEX", "HISTORY_ROWS", "HISTORY_WEIGHT",
           "HOLDOUT_DAYS", "INPUT_NAMES", "INPUT_RANGES", "LEVELS", "MIN_LINES", "MODEL_NAME", "NOISE_SEED",
           "NOISE_SLOTS", "NO_HOUR", "N_SAMPLES", "N_SEGMENTS", "OFFSET_SPLIT", "OUTPUT_NAMES", "PRIOR_PRECISION",
           "PRODUCT_CAPACITY", "PricingExport", "PricingModel", "PricingNet", "SAMPLED", "SERVED_HISTORY", "SLOPES",
           "SLOPE_BASE", "SLOPE_MULT", "WIDTH", "absorb", "bootstrap_data", "bootstrap_pricing", "calibration_figures",
           "calibration_of_rows", "cap_precision", "export_pricing", "predict_mean", "refit", "rows",
           "segment_calibration", "sensitivity", "split_offsets", "weighted_log_loss"]
