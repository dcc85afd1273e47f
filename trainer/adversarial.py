"""Adversarial examples for the fraud model, in standardized feature space.

An attacker who controls a transaction can nudge its features a little. We model that as
an L-infinity ball of radius `epsilon` around the row's standardized features
z = net.standardize(x) (V1..V28 and log1p(amount), each in units of its training
standard deviation). Inside the ball the attacker wants a fraud (y=1) to look legitimate
(lower fraud logit); for training symmetry a legitimate row (y=0) is pushed the other way.
The amount column stays a valid amount (log1p(amount) >= 0) while it moves.

The attacks live in trainer.domains.fraud_attacks (FraudModel trains on them) and are
importable from here:
- `pgd_attack(net, X, y, epsilon)`: projected gradient descent (random start in the ball,
  signed-gradient steps, projection), returns adversarial z; score it with `logits_from_std`.
- `fgsm(net, z, y, epsilon)`: the one-step variant (from z itself).
- `robust_recall_at_fpr(net, X, y, epsilon)`: the threshold is set on the CLEAN legitimate
  scores at the target false-positive rate (the deployed threshold), then the share of
  frauds whose PGD-attacked score is still at or above it.

    python -m trainer.adversarial [--seeds 0,1,2] [--epsilons 0.1,0.2,0.3,0.5,1.0,1.5] [--epochs 4]

trains plain and adversarially trained models (FraudModel's defaults) on the first 60% of
the time-ordered real creditcard stream and evaluates them on the last 40%: clean PR-AUC,
recall at 1% FPR, and robust recall at 1% FPR under a 10-step PGD attack per epsilon
(mean +- sd over seeds, then the paired difference adversarial minus plain). Two training
protocols: `offline` (4 epochs over the training share, as the bootstrap trains) and
`updates` (bootstrap on its first half, then the learner's kind of incremental rounds).
"""
from __future__ import annotations

import numpy as np
import torch

from trainer.domains.fraud import FraudModel, FraudNet, load_creditcard, pr_auc
from trainer.domains.fraud_attacks import (clean_logits, fgsm, fgsm_std, logits_from_std, pgd_attack,
                                           pgd_std)


def _threshold(scores_legit: np.ndarray, fpr: float) -> float:
    """Smallest score threshold with at most floor(fpr * n) legitimate rows at or above it."""
    legit = np.sort(np.asarray(scores_legit, np.float64))
    if len(legit) == 0:
        return 0.0
    idx = len(legit) - int(np.floor(fpr * len(legit))) - 1
    return float(np.nextafter(legit[idx], np.inf)) if idx >= 0 else float(legit[0])


def robust_report(net, X: np.ndarray, y: np.ndarray, epsilon: float, fpr: float = 0.01, steps: int = 10,
                  seed: int = 0) -> dict[str, float]:
    """Clean and robust recall at `fpr` with the clean (deployed) threshold, plus clean PR-AUC."""
    y = np.asarray(y)
    s = clean_logits(net, X)
    thr = _threshold(s[y == 0], fpr)
    frauds = y == 1
    if not frauds.any():
        return {"clean_recall": float("nan"), "robust_recall": float("nan"), "pr_auc": float("nan"),
                "threshold_logit": thr}
    z_adv = pgd_attack(net, X[frauds], y[frauds], epsilon, steps=steps, seed=seed)
    s_adv = logits_from_std(net, z_adv)
    return {"clean_recall": float((s[frauds] >= thr).mean()), "robust_recall": float((s_adv >= thr).mean()),
            "pr_auc": pr_auc(y, s), "threshold_logit": thr}


def robust_recall_at_fpr(net, X: np.ndarray, y: np.ndarray, epsilon: float, fpr: float = 0.01,
                         steps: int = 10) -> float:
    """Recall of frauds still at or above the clean threshold (set at `fpr` on the clean
    legitimate scores) after a `steps`-step PGD attack of radius `epsilon`."""
    return robust_report(net, X, y, epsilon, fpr, steps)["robust_recall"]


# ---- measurement: python -m trainer.adversarial ----
def _train(model, X: np.ndarray, y: np.ndarray, epochs: int, seed: int):
    """A fresh network trained as the learner's bootstrap does (one epoch per call)."""
    torch.manual_seed(seed)
    net = FraudNet(model.hidden)
    net.fit_scaler(np.array(X, np.float32))  # a writable copy (torch.from_numpy warns on read-only views)
    opt = model.optimizer(net)
    for epoch in range(epochs):
        model.train(net, opt, X, y, epochs=1, seed=seed * 1000 + epoch)
    return net


def _train_with_updates(model, X: np.ndarray, y: np.ndarray, epochs: int, seed: int, boot_share: float = 0.5,
                        chunk: int = 5000, update_epochs: int = 3):
    """Bootstrap on the first `boot_share` of X, then incremental updates as the learner runs
    them: each round trains `update_epochs` on `chunk` new rows plus as many replayed older rows."""
    n0 = int(len(y) * boot_share)
    net = _train(model, X[:n0], y[:n0], epochs, seed)
    opt = model.optimizer(net)
    rng = np.random.default_rng(seed)
    for r, start in enumerate(range(n0, len(y), chunk)):
        stop = min(start + chunk, len(y))
        old = rng.choice(start, size=min(start, stop - start), replace=False)
        Xr, yr = np.concatenate([X[start:stop], X[old]]), np.concatenate([y[start:stop], y[old]])
        model.train(net, opt, Xr, yr, epochs=update_epochs, seed=seed * 1000 + 100 + r)
    return net


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m trainer.adversarial", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epsilons", default="0.1,0.2,0.3,0.5,1.0,1.5", help="attack radii, standardized units")
    ap.add_argument("--train-share", type=float, default=0.6)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--limit", type=int, default=None, help="first rows of the stream only")
    ap.add_argument("--protocol", default="offline,updates",
                    help="offline: train on the whole train share; updates: bootstrap on its first half, then "
                         "incremental rounds of 5000 new rows + 5000 replayed, 3 epochs each (as the learner)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a tiny MLP: 1 is fastest)")
    ap.add_argument("--models", default="", help="';'-separated name=k:v,k:v FraudModel configs "
                    "(default: plain, and the FraudModel default adversarial settings)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    data = load_creditcard(args.limit)
    cut = int(len(data) * args.train_share)
    train, test = data.slice(0, cut), data.slice(cut, len(data))
    default = FraudModel()
    configs: dict[str, dict] = {"plain": {"adv_epsilon": 0.0}}
    if args.models:
        for spec in args.models.split(";"):
            name, _, kv = spec.partition("=")
            cfg = {}
            for item in filter(None, kv.split(",")):
                k, _, v = item.partition(":")
                cfg[k] = v if k == "adv_method" else (int(v) if k == "adv_steps" else float(v))
            configs[name.strip()] = cfg
    else:
        cfg = {"adv_epsilon": default.adv_epsilon or 1.0, "adv_share": default.adv_share,
               "adv_method": default.adv_method, "adv_steps": default.adv_steps}
        configs["adversarial"] = cfg
    print(f"train rows {len(train)} ({int(train.y.sum())} frauds), test rows {len(test)} "
          f"({int(test.y.sum())} frauds), epochs {args.epochs}, seeds {seeds}, "
          f"PGD {args.attack_steps} steps, recall at {args.fpr:.0%} FPR (clean threshold)", flush=True)
    results: dict[str, list[dict]] = {}
    protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
    trainers = {"offline": _train, "updates": _train_with_updates}
    for protocol, name, cfg in [(p, n, c) for p in protocols for n, c in configs.items()]:
        for seed in seeds:
            t0 = time.time()
            net = trainers[protocol](FraudModel(**cfg), train.X, train.y, args.epochs, seed)
            row = {"train_s": time.time() - t0}
            for eps in epsilons:
                r = robust_report(net, test.X, test.y, eps, args.fpr, args.attack_steps, seed=seed)
                row["pr_auc"], row["clean"] = r["pr_auc"], r["clean_recall"]
                row[eps] = r["robust_recall"]
            results.setdefault(f"{protocol}: {name}", []).append(row)
            print(f"  {protocol} {name} {cfg} seed {seed}: " + ", ".join(
                f"{k}={v:.3f}" if isinstance(k, str) else f"eps{k:g}={v:.3f}" for k, v in row.items()), flush=True)

    def ms(vals) -> str:
        a = np.asarray(vals, np.float64)
        return f"{a.mean():.3f} +- {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"

    head = ["model", "clean PR-AUC", f"recall@{args.fpr:.0%}FPR clean"] + [f"robust eps={e:g}" for e in epsilons]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, rows in results.items():
        cells = [name, ms([r["pr_auc"] for r in rows]), ms([r["clean"] for r in rows])]
        cells += [ms([r[e] for r in rows]) for e in epsilons]
        print("| " + " | ".join(cells) + " |")
    for name, rows in results.items():  # paired by seed: what adversarial training changes
        protocol, _, model = name.partition(": ")
        base = results.get(f"{protocol}: plain")
        if model == "plain" or base is None:
            continue
        cells = [f"{name} minus plain", ms([r["pr_auc"] - b["pr_auc"] for r, b in zip(rows, base)]),
                 ms([r["clean"] - b["clean"] for r, b in zip(rows, base)])]
        cells += [ms([r[e] - b[e] for r, b in zip(rows, base)]) for e in epsilons]
        print("| " + " | ".join(cells) + " |")
    return 0


__all__ = ["clean_logits", "fgsm", "fgsm_std", "logits_from_std", "pgd_attack", "pgd_std",
           "robust_recall_at_fpr", "robust_report"]


if __name__ == "__main__":
    raise SystemExit(main())
