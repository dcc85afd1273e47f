"""Recommender domain, trainer side: the model glue the learner drives (state, batches,
prediction, gate, examples from joined outcomes).

The network (two towers, ESMM heads, repeat term) is in trainer.domains.recommender_net, the
training loss in trainer.domains.recommender_training, the ONNX export in
trainer.domains.recommender_export, its metrics in trainer.domains.recommender_metrics; their
public names are importable from here too.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from trainer.domains.recommender_data import (COL_DAY, COL_DEVICE, COL_HIST, COL_HOUR, COL_ITEM, COL_PAGE, COL_POSITION,
                                              COL_USER,
                                              DEVICES, HISTORY_LEN, LEVEL_CLICK, LEVEL_IMPRESSION, LEVEL_PURCHASE,
                                              PAGES, POPULARITY_TAU_DAYS, TEXT_DIM, WIDTH, RecoState)
from trainer.domains.recommender_catalog import CatalogJournal, RedisCatalogReader
from trainer.domains.recommender_metrics import (_log_loss, decode_bytes_tensor, expected_calibration_error,
                                                 ranking_metrics)
from trainer.domains.recommender_export import (ITEM_TOWER_FILE, _ort_run, catalog_vocab_json, export_onnx,
                                                scoring_input_ranges, scoring_parity)
from trainer.domains.recommender_net import ItemTowerExport, RecoDims, RecoNet, ScoringExport
from trainer.domains.recommender_training import (JointOptimizer, fit_click_calibration, optimizer_parameters,
                                                  torch_threads, train_epochs, upgrade_checkpoint)
from trainer.export import batch1_latency_ms
from trainer.learner import DomainModel, Examples

log = logging.getLogger(__name__)

MODEL_NAME = "recommender"
LATENCY_CATALOG = 100_000  # catalog rows the latency gate scores (the serving target's size)
EVENT_LEVEL = {1: LEVEL_IMPRESSION, 2: LEVEL_CLICK, 3: LEVEL_CLICK, 4: LEVEL_PURCHASE}  # recommender.v1.Event



class RecommenderModel(DomainModel):
    """The learner's view of the recommender (see the module doc for the network).

    state: the vocabulary/catalog/interactions (RecoState), saved in the learner's checkpoint
    through domain_state()/load_domain_state(). encoder: texts -> title embeddings (a
    shared.text.TextEncoder; default: the registry's `text-encoder`, loaded on first need).
    catalog_path: the service's catalog journal, read for items the trainer does not know.
    """

    name = MODEL_NAME
    width = WIDTH

    def __init__(self, dims: RecoDims = RecoDims(), *, batch_size: int = 1024, lr: float = 5e-3,
                 sparse_lr: float = 5e-3,
                 negatives: int = 256, user_dropout: float = 0.1, id_dropout: float = 0.25,
                 esmm_weight: float = 0.3, cold_items: bool = True,
                 encoder: Callable[[Sequence[str]], np.ndarray] | None = None,
                 registry_dir: str | Path | None = None, catalog_path: str | Path | None = None,
                 latency_catalog: int = LATENCY_CATALOG, seed: int = 0, threads: int = 1,
                 catalog_reader=None) -> None:
        self.dims, self.batch_size, self.lr, self.sparse_lr, self.negatives = dims, batch_size, lr, sparse_lr, negatives
        self.user_dropout, self.id_dropout, self.esmm_weight = user_dropout, id_dropout, esmm_weight
        # items whose id is dropped in training also lose their recent sales: they look exactly
        # like a brand-new item (see recommender_training); False: ids only (the former rule)
        self.cold_items = cold_items
        self.state = RecoState()
        self._encoder = encoder
        self.registry_dir = registry_dir
        # what the services upsert: their catalog journal file, or (catalog_reader) the shared catalog on Redis
        self.journal = catalog_reader or (CatalogJournal(catalog_path) if catalog_path else None)
        self.latency_catalog = latency_catalog
        self.seed, self.threads = seed, threads
        self.on_batch: Callable[[int], None] | None = None  # progress callback (bootstrap's bar)
        self._features: tuple[int, dict[str, torch.Tensor]] | None = None
        self._exported: dict[str, Any] = {}
        self.skipped_unknown_items = 0

    # ---- state ----
    def domain_state(self) -> dict[str, Any]:
        return {"reco_state": self.state.to_dict()}

    def load_domain_state(self, state: dict[str, Any]) -> None:
        if "reco_state" in state:
            self.state = RecoState.from_dict(state["reco_state"])
            self._features = None

    def encoder(self) -> Callable[[Sequence[str]], np.ndarray]:
        if self._encoder is None:
            from shared.registry import ModelRegistry
            from shared.text import TextEncoder

            if self.registry_dir is None:
                raise RuntimeError("recommender: no text encoder and no registry to load one from")
            self._encoder = TextEncoder.from_registry(ModelRegistry(self.registry_dir)).encode
        return self._encoder

    def add_catalog(self, records, encoder=None) -> int:
        self._features = None
        return self.state.upsert_items(records, encoder or self.encoder())

    def _feature_tensors(self) -> dict[str, torch.Tensor]:
        if self._features is None or self._features[0] != self.state.revision:
            f = self.state.item_features()
            self._features = (self.state.revision, {
                "category": torch.from_numpy(f["category"]), "price": torch.from_numpy(f["price"]),
                "text": torch.from_numpy(f["text"]), "text_emb": torch.from_numpy(self.state.text_emb)})
        return self._features[1]

    # ---- network ----
    def new_network(self, bootstrap_X: np.ndarray) -> RecoNet:
        s = self.state
        if not s.item_capacity:
            # room to grow between bootstraps: new users and items get their own rows
            s.set_capacity(2 * s.n_users + 10_000, 2 * s.n_items + 10_000, 2 * len(s.categories) + 1_000)
        torch.manual_seed(self.seed)
        net = RecoNet(s.user_capacity, s.item_capacity, s.category_capacity, self.dims)
        if s.n_items:
            net.set_price_scale(np.asarray(s.item_price[1:], np.float32))
        X = np.asarray(bootstrap_X)
        if len(X) > 1:
            net.init_popularity(X[:, COL_ITEM].astype(np.int64), self.state.n_items)
        return net

    def optimizer(self, net):
        sparse, dense = optimizer_parameters(net)
        return JointOptimizer({"sparse": torch.optim.SparseAdam(sparse, lr=self.sparse_lr),
                               "dense": torch.optim.Adam([p for _, p in dense], lr=self.lr)})

    def upgrade_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        return upgrade_checkpoint(state, self.dims)

    def _item_base(self, net: RecoNet, codes: torch.Tensor, id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The learned part of the item vectors of item codes, from the state's features."""
        f = self._feature_tensors()
        codes = codes.clamp(0, self.state.n_items)
        uniq_text, inv = torch.unique(f["text"][codes], return_inverse=True)
        projected = net.text_proj(f["text_emb"][uniq_text])[inv]  # each distinct title projected once
        return net.item_base(codes, None, f["category"][codes], f["price"][codes], id_keep, projected)

    def sales_tables(self, days) -> tuple[dict[int, int], torch.Tensor]:
        """Recent sales of every item code as of each day: (day -> index, [days, n_items+1, 2])."""
        days = sorted({int(x) for x in np.asarray(days).reshape(-1)})
        tables = self.state.popularity(days)
        return {d: n for n, d in enumerate(days)}, torch.from_numpy(np.stack([tables[d] for d in days]))

    def export_day(self) -> int:
        """The day the exported popularity is as of: the day after the latest known sale."""
        latest = self.state.latest_day()
        return latest + 1 if latest is not None else 0

    def all_item_vectors(self, net: RecoNet, day: int | None = None) -> torch.Tensor:
        """[n_items, Dv], row = item code - 1 (the catalog order of the export), with the
        popularity as of `day` (default: as exported, export_day())."""
        day = self.export_day() if day is None else int(day)
        codes = torch.arange(1, self.state.n_items + 1)
        with torch.no_grad():
            sales = torch.from_numpy(self.state.popularity([day])[day][1:])
            return net.with_popularity(self._item_base(net, codes), sales)

    @staticmethod
    def _split(X: np.ndarray) -> tuple[torch.Tensor, ...]:
        Xt = torch.from_numpy(np.ascontiguousarray(X, np.float32)).round().to(torch.int64)
        return Xt[:, COL_USER], Xt[:, COL_PAGE:COL_HOUR + 1], Xt[:, COL_ITEM], Xt[:, COL_HIST:COL_POSITION]

    @staticmethod
    def contexts(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Group rows by what the user tower sees (user, context, history): (context index of
        each row, row of X that represents each context). The rows of one basket share one
        (the item and its served position are the row's own)."""
        keys = np.ascontiguousarray(np.delete(np.asarray(X, np.float32), [COL_ITEM, COL_POSITION], axis=1))
        view = keys.view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).ravel()
        _, first, inverse = np.unique(view, return_index=True, return_inverse=True)
        return inverse.reshape(-1), first

    def batches(self, X: np.ndarray, g: torch.Generator) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Mini-batches of whole contexts, about batch_size rows each: (context representative
        rows, rows, context index of each row within the batch)."""
        ctx_of_row, rep_rows = self.contexts(X)
        order = np.argsort(ctx_of_row, kind="stable")
        counts = np.bincount(ctx_of_row, minlength=len(rep_rows))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        perm = torch.randperm(len(rep_rows), generator=g).numpy()
        cum = np.cumsum(counts[perm])
        cuts = np.searchsorted(cum, np.arange(self.batch_size, cum[-1] if len(cum) else 0, self.batch_size), "left") + 1
        out = []
        for part in np.split(perm, cuts):
            if len(part) == 0:
                continue
            n = counts[part]
            local = np.repeat(np.arange(len(part)), n)
            offs = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
            rows = order[np.repeat(starts[part], n) + offs]
            out.append((rep_rows[part], rows, local))
        return out

    def train(self, net, opt, X, y, epochs, seed) -> None:
        with torch_threads(self.threads):
            train_epochs(self, net, opt, X, y, epochs, seed)
            fitted = fit_click_calibration(self, net, X, y)
        if fitted is not None:
            log.info("recommender: click calibration fitted on %d shown rows: click rate %.4f, mean click p %.4f "
                     "(a %.3f, b %.3f)", fitted["rows"], fitted["click_rate"], fitted["mean_click_p"], fitted["a"],
                     fitted["b"])

    def finish_bootstrap(self, net: RecoNet) -> None:
        """After a bootstrap on rows with random hours (state.random_hours: TafengRows, since
        Ta Feng has none), every hour gets the mean of the 24 hour embeddings. The random hours
        are a noise that regularises the user tower (without it the cold-start test's matching
        customers fell 161 -> 129 of 233), but what each hour's embedding learned from them is
        noise too: the first version's top-10s changed with the hour of day they were asked at
        (that test failed at 02:00 UTC only). The mean keeps the offset the tower was trained
        around; live traffic, which has real hours, teaches them. A bootstrap on rows with real
        hours keeps what it learned."""
        if not self.state.random_hours:
            return
        with torch.no_grad():
            net.hour.weight.copy_(net.hour.weight.mean(0, keepdim=True).expand_as(net.hour.weight))

    # ---- prediction ----
    def score_all(self, net: RecoNet, user: torch.Tensor, ctx: torch.Tensor, hist: torch.Tensor,
                  catalog: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores of every catalog row [B, N] (c + r + repeat), the user vectors and the repeat
        values; hist holds catalog rows (item code - 1), -1 = padding."""
        d = net.dims.d
        valid = hist >= 0
        rows = torch.where(valid, hist, 0)
        hv = catalog[rows]
        u = net.user_vectors(user, ctx, hv, valid)
        rep = net.repeat_values(rows, valid, hv[..., 2 * d + 2], u[:, 2 * d])
        scores = (net.augmented_users(u) @ catalog.t()).scatter_add(1, rows, rep)
        return scores, u, rep

    def predict(self, net, X) -> np.ndarray:
        """[n, 3]: pCTR and pCTCVR of each row's item, and its 0-based rank among all catalog
        items for that user (the gate's HR@10)."""
        with torch_threads(self.threads):
            return self._predict(net, X)

    def _predict(self, net, X) -> np.ndarray:
        net.eval()
        out = np.zeros((len(X), 3), np.float32)
        if len(X) == 0:
            return out
        user, ctx, item, hist = self._split(X)
        days = np.asarray(X, np.float32)[:, COL_DAY].astype(np.int64)
        with torch.no_grad():
            for day in np.unique(days):
                catalog = self.all_item_vectors(net, int(day))  # popularity as of the row's day
                on_day = np.flatnonzero(days == day)
                for a in range(0, len(on_day), 512):
                    sl = torch.from_numpy(on_day[a:a + 512])
                    h = torch.where(hist[sl] > 0, hist[sl] - 1, -1)
                    scores, u, rep = self.score_all(net, user[sl], ctx[sl], h, catalog)
                    rows = (item[sl] - 1).clamp(min=0)
                    target = scores.gather(1, rows.unsqueeze(1))
                    rank = (scores > target).sum(1)
                    c, r = net.heads(u, catalog[rows])
                    c = c + (rep * (h == rows.unsqueeze(1))).sum(1)
                    known = item[sl] > 0
                    click = net.click_probability(c)
                    out[sl.numpy(), 0] = click.numpy()
                    out[sl.numpy(), 1] = (click * torch.sigmoid(r)).numpy()
                    out[sl.numpy(), 2] = torch.where(known, rank, self.state.n_items).numpy()
        return out

    def prequential_loss(self, y: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Log loss of the served click probability against clicked-or-bought."""
        clicked = (np.asarray(y) >= LEVEL_CLICK).astype(np.float64)
        p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
        return -(clicked * np.log(p) + (1 - clicked) * np.log(1 - p))

    def prequential_metrics(self, y: np.ndarray, served_p: np.ndarray) -> dict[str, float]:
        """What was served, judged by what happened: the served click probability of each item
        an outcome was reported for, against whether it was clicked or bought (the learning
        report's curve; report_metrics needs the candidate's full score rows instead)."""
        clicked = (np.asarray(y) >= LEVEL_CLICK).astype(np.float64)
        p = np.asarray(served_p, np.float64)
        out = {"click_rate": float(clicked.mean()), "mean_served_click_p": float(p.mean()),
               "click_ece": expected_calibration_error(clicked, p), "click_log_loss": _log_loss(clicked, p)}
        if 0 < clicked.sum() < len(clicked):
            from sklearn.metrics import roc_auc_score

            out["served_click_auc"] = float(roc_auc_score(clicked, p))
        return out

    def gate_spec(self):
        """The gate (trainer/gate.py) on the window of recent outcomes neither version trained
        on: HR@10 of each clicked or bought item, ranked among every catalog item for that
        user, history and context as served (predict's rank column). Requests may also carry
        a candidate list or exclude the user's purchases; neither is in the learner's
        examples (the served record's candidate lists are not kept in the rows), so the rank
        is over the whole catalog, the way a request without them is served. HR@10 is a mean
        of hits: 100 clicks give it a standard error near 0.05. Until then the click log loss
        of all shown items decides on 20 clicks. The window is capped at 5,000 rows: each
        row scores the whole catalog, twice (both versions) per round."""
        from trainer.gate import GateSpec, log_loss_rows, mean_metric

        clicked = lambda y: np.asarray(y) >= LEVEL_CLICK  # noqa: E731
        return GateSpec(
            metrics=(mean_metric("hr@10", lambda y, p: (np.asarray(p)[:, 2] < 10).astype(np.float64), True,
                                 rows=clicked),),
            positive=clicked, min_positives=100, min_rows=200, max_rows=5000,
            fallback=mean_metric("click_log_loss", lambda y, p: log_loss_rows(clicked(y), np.asarray(p)[:, 0]),
                                 False),
            fallback_positives=20)

    def report_metrics(self, y, p) -> dict[str, float]:
        y = np.asarray(y)
        pos = y >= LEVEL_CLICK
        m = {"rows": int(len(y)), "clicked_or_bought": int(pos.sum()), "bought": int((y >= LEVEL_PURCHASE).sum())}
        if len(y):
            m.update(ranking_metrics(p[pos, 2], 10))
            m.update(ranking_metrics(p[pos, 2], 50))
            m["click_log_loss"] = _log_loss(pos.astype(np.float64), p[:, 0])
            # calibration on the gate's window: the candidate's click probability of each row
            # (shown items included) against what happened
            m["click_rate"] = float(pos.mean())
            m["mean_click_p"] = float(np.mean(p[:, 0]))
            m["click_ece"] = expected_calibration_error(pos, p[:, 0])
        return m

    # ---- export ----
    def export(self, net, path):
        """model.onnx at path and item_tower.onnx beside it (see recommender_export.export_onnx)."""
        return export_onnx(self, net, path)

    def signature_inputs(self, X) -> dict[str, np.ndarray]:
        """Rows as served (from X), a realistic catalog: this version's item vectors plus
        perturbed copies up to latency_catalog rows (no exact ties), some rows restricted or
        excluded."""
        catalog = self._exported.get("catalog")
        if catalog is None:
            raise RuntimeError("signature_inputs needs export() first (it uses the exported catalog)")
        rng = np.random.default_rng(1)
        if len(catalog) < self.latency_catalog:
            extra = catalog[rng.integers(0, len(catalog), self.latency_catalog - len(catalog))]
            extra = extra + rng.normal(0, 0.05, extra.shape).astype(np.float32)
            catalog = np.concatenate([catalog, extra]).astype(np.float32)
        X = np.asarray(X, np.float32)
        if len(X) == 0:
            X = np.zeros((4, WIDTH), np.float32)
        X = X[:64]
        b = len(X)
        user, ctx, _, hist = (t.numpy() for t in self._split(X))
        restrict = np.full((b, 8), -1, np.int64)
        exclude = np.full((b, 4), -1, np.int64)
        restrict[1::4] = rng.integers(0, len(catalog), (len(restrict[1::4]), 8))
        exclude[2::4, :2] = rng.integers(0, len(catalog), (len(exclude[2::4]), 2))
        return {"user": user.reshape(b, 1), "history": np.where(hist > 0, hist - 1, -1).astype(np.int64),
                "context": ctx.astype(np.int64), "k": np.full((b, 1), 10, np.int64), "restrict": restrict,
                "exclude": exclude, "item_vectors": catalog}

    def parity(self, module, path, feeds) -> float:
        """Max abs difference of ONNX Runtime vs PyTorch over scores and probabilities (equal
        -inf counts as equal), after checking that both pick the same items except where two
        scores tie within the tolerance; also the item tower's difference."""
        got = _ort_run(path, feeds)
        with torch.no_grad():
            want = [t.numpy() for t in module(*(torch.from_numpy(np.asarray(v)) for v in feeds.values()))]
        return max(scoring_parity(got, want), float(self._exported.get("tower_parity", 0.0)))

    def latency_ms(self, path, feeds) -> float:
        return batch1_latency_ms(path, feeds, runs=100, unbatched=("item_vectors",))

    def extra_files(self, net, folder) -> list[Path]:
        folder = Path(folder)
        tower = self._exported.get("folder", folder) / ITEM_TOWER_FILE
        return [tower, self.state.write_vocab(folder / "vocab.json"), self.state.write_catalog(folder / "catalog.jsonl"),
                self.state.write_users(folder / "users.npz")]

    def manifest_extra(self, y, p) -> dict[str, Any]:
        return {"history_len": HISTORY_LEN, "item_vector_dim": self.dims.item_dim, "pages": list(PAGES),
                "devices": list(DEVICES), "text_dim": TEXT_DIM, "users": self.state.n_users,
                "items": self.state.n_items, "categories": len(self.state.categories),
                "capacity": {"users": self.state.user_capacity, "items": self.state.item_capacity},
                "score": "click logit + conversion logit (log-odds of pCTCVR), repeat term included",
                "item_vector_layout": {"click": [0, self.dims.d], "cvr": [self.dims.d, 2 * self.dims.d],
                                       "click_bias": 2 * self.dims.d, "cvr_bias": 2 * self.dims.d + 1,
                                       "repeat_propensity": 2 * self.dims.d + 2,
                                       "log1p_recent_sales": [self.dims.base_dim, self.dims.item_dim]},
                "popularity_tau_days": list(POPULARITY_TAU_DAYS),
                "popularity_as_of_day": self._exported.get("popularity_day"),
                "latency_catalog_rows": self.latency_catalog}

    # ---- joined examples (what the service records) ----
    def _learn_catalog(self) -> None:
        if self.journal is not None:
            records = self.journal.read_new()
            if records:
                self.add_catalog(records)

    def examples(self, joined) -> Examples:
        """Rows from joined recommender outcomes: the user (by id, from the packed request: a
        user the serving version did not know gets a code now), the history as served (item
        ids, mapped to codes), the served context, the outcome's item and its event level.
        An item is learnable once its features are known (catalog journal); rows of an item
        with no known features are skipped and counted. Events of the same (prediction, item)
        within one call count once, at the highest level (a purchase implies the click). The
        impressions the joiner derives from the served record (items shown and not clicked in
        the window: recommender_plugin.served_impressions) come as EVENT_IMPRESSION labels; every
        row of a served item records its place in the list (COL_POSITION)."""
        from protos.recommender.v1 import recommender_pb2 as rec
        from shared.feedback import tensor_to_numpy

        best: dict[tuple[str, str], tuple[int, Any]] = {}
        for j in joined:
            o = j.label
            level = EVENT_LEVEL.get(int(o.event))
            if level is None or not o.item_id:
                continue
            key = (j.prediction_id, o.item_id)
            if key not in best or level > best[key][0] or (level == best[key][0] and j.offset > best[key][1].offset):
                best[key] = (level, j)
        if not best:
            return Examples.empty(WIDTH)
        self._learn_catalog()
        rows, levels, served, offsets, pos_users, pos_items, pos_days = [], [], [], [], [], [], []
        for (_, item_id), (level, j) in sorted(best.items(), key=lambda kv: kv[1][1].offset):
            inputs = {t.name: t for t in j.served.inputs}
            outputs = {t.name: t for t in j.served.outputs}
            item = self.state.item_code(item_id)
            if item == 0:
                self.skipped_unknown_items += 1
                continue
            user_id = ""
            if j.served.HasField("request"):
                req = rec.RecommendRequest()
                if j.served.request.Unpack(req):
                    user_id = req.user_id
            user = self.state.user_code(user_id, add=True) if user_id else 0
            row = np.zeros(WIDTH, np.float32)
            row[COL_USER] = user
            if "context" in inputs:
                ctx = tensor_to_numpy(inputs["context"]).reshape(-1)
                if ctx.shape == (3,):
                    row[COL_PAGE] = ctx[0] if 0 <= ctx[0] <= len(PAGES) else 0
                    row[COL_DEVICE] = ctx[1] if 0 <= ctx[1] <= len(DEVICES) else 0
                    row[COL_HOUR] = min(max(int(ctx[2]), 0), 23)
            row[COL_ITEM] = item
            day = int((j.outcome.occurred_at or j.served.served_at) // 86400)
            row[COL_DAY] = day
            hist = [self.state.item_code(h) for h in decode_bytes_tensor(inputs["history_ids"])] \
                if "history_ids" in inputs else []
            hist = [h for h in hist if h > 0][:HISTORY_LEN]
            row[COL_HIST:COL_POSITION] = -1
            row[COL_HIST:COL_HIST + len(hist)] = hist
            p = np.nan
            if "item_ids" in outputs and "click" in outputs:
                ids = decode_bytes_tensor(outputs["item_ids"])
                clicks = tensor_to_numpy(outputs["click"]).reshape(-1)
                if item_id in ids and ids.index(item_id) < len(clicks):
                    p = float(clicks[ids.index(item_id)])
                if item_id in ids:
                    row[COL_POSITION] = ids.index(item_id) + 1
            rows.append(row)
            levels.append(level)
            served.append(p)
            offsets.append(j.offset)
            if level >= LEVEL_CLICK:
                pos_users.append(user)
                pos_items.append(item)
                pos_days.append(day)
        self.state.record_interactions(pos_users, pos_items, pos_days)
        if self.skipped_unknown_items:
            log.warning("recommender: %d outcome rows so far name items with no known features (not in the catalog "
                        "journal): skipped", self.skipped_unknown_items)
        if not rows:
            return Examples.empty(WIDTH)
        return Examples(np.stack(rows), np.asarray(levels, np.float32), np.asarray(served, np.float32),
                        np.asarray(offsets, np.int64))


def model_from_settings(s=None) -> RecommenderModel:
    """The trainer's recommender (its plug-in's model): the registry's text encoder, the service's
    catalog journal (the recommender plug-in's catalog_path setting), or with event_log_url set
    (the Redis mode) the services' shared catalog on that Redis."""
    if s is None:
        return RecommenderModel()
    url = getattr(s, "catalog_redis_url", "") or getattr(s, "event_log_url", "")
    if url:
        # the Redis mode: the services keep the catalog on Redis (their redis_url); by default the
        # server of this trainer's event log, so the one setting that switches the trainer over names it
        return RecommenderModel(registry_dir=s.registry_dir,
                                catalog_reader=RedisCatalogReader(url, s.redis_password_file))
    return RecommenderModel(registry_dir=s.registry_dir, catalog_path=s.catalog_path)


__all__ = ["EVENT_LEVEL", "ITEM_TOWER_FILE", "LATENCY_CATALOG", "MODEL_NAME", "ItemTowerExport", "JointOptimizer",
           "RecoDims", "RecoNet", "RecommenderModel", "ScoringExport", "catalog_vocab_json", "decode_bytes_tensor",
           "expected_calibration_error",
           "model_from_settings", "ranking_metrics", "scoring_input_ranges", "scoring_parity", "torch_threads"]
