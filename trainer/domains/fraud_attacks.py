"""Adversarial attacks on the fraud network in standardized feature space: PGD and FGSM inside
an L-infinity ball of radius epsilon (the amount column stays a valid amount), and the
logits of clean and attacked rows. FraudModel trains on them (adversarial training);
trainer.adversarial measures what they do (robust recall) and documents the threat model.
"""
from __future__ import annotations

import numpy as np
import torch

CHUNK = 65536  # rows per attack batch (memory bound for very large X)


def _as_tensor(a, dtype=torch.float32) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(dtype)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dtype)


def _signs(y: torch.Tensor) -> torch.Tensor:
    """+1 for frauds (the attack lowers their logit), -1 for legitimate rows (raises it)."""
    return (y > 0.5).to(torch.float32) * 2.0 - 1.0


def _lower_bounds(net, width: int) -> torch.Tensor:
    """Per-column floor in standardized space: -inf, except the amount (log1p(amount) >= 0)."""
    low = torch.full((width,), -torch.inf)
    low[-1] = (0.0 - net.mean[-1]) / net.std[-1]
    return low


def _grad_of_attack_loss(net, z: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """d/dz of sign * logit (descending it is the attack); parameters get no gradient."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad((sign * net.logits_std(z)).sum(), z)
    return g


def pgd_std(net, z0: torch.Tensor, y: torch.Tensor, epsilon: float, steps: int = 10,
            step_size: float | None = None, generator: torch.Generator | None = None,
            random_start: bool = True, keep_best: bool = False) -> torch.Tensor:
    """PGD on standardized rows (torch in, torch out, no graph kept).

    keep_best: return, per row, the iterate (the clean point included) with the best attack
    value, so the attack never does worse than not attacking (evaluation); training uses the
    last iterate.
    """
    z0 = z0.detach()
    if epsilon <= 0 or len(z0) == 0:
        return z0.clone()
    steps = max(1, int(steps))
    alpha = float(step_size) if step_size is not None else 2.5 * epsilon / steps
    sign = _signs(y)
    low = _lower_bounds(net, z0.shape[1])
    lo, hi = torch.maximum(z0 - epsilon, low), z0 + epsilon
    lo = torch.minimum(lo, z0)  # a row already below the floor may stay where it is
    z = z0.clone()
    if random_start:
        z = z + (torch.rand(z0.shape, generator=generator) * 2 - 1) * epsilon
        z = torch.maximum(torch.minimum(z, hi), lo)
    if keep_best:
        with torch.no_grad():
            best, best_val = z0.clone(), sign * net.logits_std(z0)
    for _ in range(steps):
        g = _grad_of_attack_loss(net, z, sign)
        with torch.no_grad():
            z = torch.maximum(torch.minimum(z - alpha * g.sign(), hi), lo)
            if keep_best:
                val = sign * net.logits_std(z)
                better = val < best_val
                best[better], best_val = z[better], torch.minimum(val, best_val)
    return best if keep_best else z.detach()


def fgsm_std(net, z0: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
    """One signed-gradient step of size epsilon from z0 (torch in, torch out)."""
    z0 = z0.detach()
    if epsilon <= 0 or len(z0) == 0:
        return z0.clone()
    g = _grad_of_attack_loss(net, z0, _signs(y))
    low = _lower_bounds(net, z0.shape[1])
    with torch.no_grad():
        return torch.maximum(z0 - epsilon * g.sign(), torch.minimum(low.expand_as(z0), z0))


def pgd_attack(net, X: np.ndarray, y: np.ndarray, epsilon: float, steps: int = 10,
               step_size: float | None = None, seed=0) -> np.ndarray:
    """L-infinity PGD in standardized feature space; returns adversarial z [N, 29] (float32).

    Frauds (y=1) are pushed to a lower fraud logit, legitimate rows to a higher one; every
    row stays within `epsilon` (standardized units) of net.standardize(X) in every column.
    Random start in the ball; per row, the most damaging iterate is returned (the clean
    point included). Score with `logits_from_std(net, z)`.
    """
    g = torch.Generator().manual_seed(int(seed))
    out = []
    was_training = net.training
    net.eval()
    try:
        for i in range(0, len(X), CHUNK):
            xb, yb = _as_tensor(X[i:i + CHUNK]), _as_tensor(np.asarray(y)[i:i + CHUNK])
            with torch.no_grad():
                z0 = net.standardize(xb)
            out.append(pgd_std(net, z0, yb, epsilon, steps, step_size, g, keep_best=True).numpy())
    finally:
        net.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, net.mean.numel()), np.float32)


def fgsm(net, z, y, epsilon: float):
    """One-step attack from standardized z (numpy or torch; returns the same kind)."""
    out = fgsm_std(net, _as_tensor(z), _as_tensor(y), epsilon)
    return out if isinstance(z, torch.Tensor) else out.numpy()


def logits_from_std(net, z):
    """Fraud logits of standardized rows (numpy or torch; returns the same kind)."""
    with torch.no_grad():
        out = net.logits_std(_as_tensor(z))
    return out if isinstance(z, torch.Tensor) else out.numpy()


def clean_logits(net, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([net(_as_tensor(X[i:i + CHUNK])).numpy() for i in range(0, len(X), CHUNK)]) \
            if len(X) else np.zeros(0, np.float32)
