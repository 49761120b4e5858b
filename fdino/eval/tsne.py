"""Exact t-SNE in torch (van der Maaten & Hinton 2008), for up to a few thousand points.

Exact means O(N^2) memory and time per iteration (no Barnes-Hut): 2,000 points take a few
seconds on a CPU. The recipe is the reference implementation's: Gaussian input affinities whose
per-point bandwidth is found by bisection to match the perplexity, symmetrized; Student-t
output affinities; gradient descent with momentum (0.5, then 0.8), per-coordinate adaptive
gains, and early exaggeration (x12 for the first 250 iterations). Initialization is the PCA
projection scaled to std 1e-4 (deterministic; keeps the global layout, as openTSNE and
scikit-learn >= 1.2 do), and the learning rate is N / exaggeration / 4 (Belkina et al. 2019, in
units of this gradient, which keeps the factor 4). Deviation: scikit-learn floors it at 50,
which flings points out of small (N of a few hundred) embeddings; here the floor is 1.
"""

from __future__ import annotations

import math

import torch


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """``[N, D] -> [N, N]`` squared Euclidean distances (float64, exact zeros on the diagonal)."""
    x = x.double()
    sq = (x * x).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min_(0.0)
    d.fill_diagonal_(0.0)
    return d


def conditional_affinities(
    dist2: torch.Tensor, perplexity: float, *, iters: int = 100, tol: float = 1e-5
) -> torch.Tensor:
    """Rows p_{j|i} = exp(-beta_i d_ij) / Z_i whose entropy is log(perplexity), all rows at once.

    Bisection on log(beta_i) (the entropy falls monotonically as beta grows), vectorized over
    rows; stops when every row is within ``tol`` nats. The entropy comes as
    H_i = log Z_i + beta_i E_p[d_i], so each step is two passes over the matrix (no log of p).
    ``dist2``: ``[N, N]`` squared distances. Returns ``[N, N]`` float64, zero diagonal, rows sum to 1.
    """
    n = dist2.shape[0]
    if not 1.0 <= perplexity < n:
        raise ValueError(f"perplexity={perplexity!r} is invalid for {n} points: allowed [1, {n})")
    d = dist2.double() + torch.diag(torch.full((n,), float("inf"), dtype=torch.float64, device=dist2.device))
    # Distances relative to each row's nearest neighbour keep exp() in range at any data scale;
    # float32 halves the memory traffic, sums are accumulated in float64.
    d = (d - d.min(dim=1, keepdim=True).values).float().fill_diagonal_(0.0)  # the diagonal is masked below
    finite = d[~torch.eye(n, dtype=torch.bool, device=d.device)]
    target = math.log(perplexity)
    lo = torch.full((n, 1), -60.0, dtype=torch.float64, device=d.device)  # log(beta) bracket
    hi = torch.full((n, 1), 60.0, dtype=torch.float64, device=d.device)
    log_beta = torch.full_like(lo, -math.log(max(finite.mean().item(), 1e-12)))  # beta ~ 1 / mean distance
    for _ in range(iters):
        beta = log_beta.exp()
        e = torch.exp(d * -beta.float()).fill_diagonal_(0.0)  # p_{i|i} = 0
        z = e.sum(dim=1, keepdim=True, dtype=torch.float64)
        mean_d = (e * d).sum(dim=1, keepdim=True, dtype=torch.float64) / z
        entropy = z.log() + beta * mean_d
        if (entropy - target).abs().max() < tol:
            break
        too_flat = entropy > target  # sharpen: raise beta
        lo = torch.where(too_flat, log_beta, lo)
        hi = torch.where(too_flat, hi, log_beta)
        log_beta = (lo + hi) / 2
    return e.double() / z


def joint_affinities(x: torch.Tensor, perplexity: float) -> torch.Tensor:
    """Symmetrized input affinities P = (P_cond + P_cond^T) / 2N, ``[N, N]`` summing to 1."""
    p = conditional_affinities(squared_distances(x), perplexity)
    p = (p + p.T) / (2.0 * p.shape[0])
    return p.clamp_min_(1e-12).fill_diagonal_(0.0)


def tsne(
    x: torch.Tensor,
    *,
    dim: int = 2,
    perplexity: float = 30.0,
    iters: int = 750,
    exaggeration: float = 12.0,
    exaggeration_iters: int = 250,
    learning_rate: float | None = None,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact t-SNE embedding ``[N, D] -> [N, dim]`` (float32, CPU or x's device).

    Deterministic: the initialization is PCA (or ``init``), there is no other randomness.
    ``iters`` = 250 exaggerated + 500 plain iterations by default (openTSNE's schedule).
    The perplexity is clipped to (N - 1) / 3 for tiny inputs.
    """
    from .viz import pca  # noqa: PLC0415

    n = x.shape[0]
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {n}")
    perplexity = min(perplexity, (n - 1) / 3.0)
    p = joint_affinities(x, perplexity).float()
    y = (init if init is not None else pca(x.float(), dim)).float().to(p.device)
    y = y / y[:, 0].std().clamp_min(1e-12) * 1e-4
    lr = learning_rate if learning_rate is not None else max(n / exaggeration / 4.0, 1.0)
    velocity = torch.zeros_like(y)
    gains = torch.ones_like(y)
    # float32 and in-place ops: each iteration is a handful of passes over N x N matrices.
    for it in range(iters):
        exag = exaggeration if it < exaggeration_iters else 1.0
        momentum = 0.5 if it < exaggeration_iters else 0.8
        sq = (y * y).sum(dim=1)
        num = torch.addmm(sq[:, None] + (sq[None, :] + 1.0), y, y.T, alpha=-2.0)  # 1 + |y_i - y_j|^2
        num.clamp_min_(1.0).reciprocal_().fill_diagonal_(0.0)  # Student-t kernel (N, N)
        z = num.sum()
        w = (p * num).mul_(exag).sub_(num.mul_(num).div_(z))  # (exag P - Q) * num
        grad = 4.0 * (w.sum(dim=1, keepdim=True) * y - w @ y)  # dC/dy_i = 4 sum_j w_ij (y_i - y_j)
        # Delta-bar-delta gains: grow where the step keeps its direction, shrink where it flips.
        same = (grad > 0) == (velocity > 0)
        gains = torch.where(same, gains * 0.8, gains + 0.2).clamp_min_(0.01)
        velocity = momentum * velocity - lr * gains * grad
        y = y + velocity
        y = y - y.mean(dim=0)
    return y.float()


__all__ = ["tsne", "squared_distances", "conditional_affinities", "joint_affinities"]
