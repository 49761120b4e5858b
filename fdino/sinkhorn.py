"""Sinkhorn-Knopp teacher targets (DINOv2, Oquab et al. 2023, sec. 4; from SwAV, Caron et al. 2020).

Instead of DINO's centered softmax, the teacher's targets for a batch are the transport plan that
spreads the B samples evenly over the K prototypes: with ``Q = exp(t / tau_t)^T`` (``[K, B]``),
normalized to total mass 1, ``n_iterations`` rounds of

    rows    (prototypes): Q <- Q / (K * Q.sum(1))      every prototype gets mass 1/K
    columns (samples):    Q <- Q / (B * Q.sum(0))      every sample gets mass 1/B

and finally ``Q * B`` (each sample's column sums to 1), returned transposed as ``[B, K]`` rows.
B and the row sums are global: with data parallelism the batch is every worker's rows together, so
the total and the row sums are summed across workers (``all_reduce_sum``, passed in; column sums
are per sample and stay local).

Overflow: ``exp(t / tau_t)`` overflows fp32 once a logit exceeds 88 tau_t (3.5 at tau_t = 0.04, e.g.
with a trainable last-layer scale). Each prototype's row is shifted by its own constant before the
exp; the first row normalization divides any per-row factor out again, so the targets are exactly
those of the unshifted formula. The shift is the mean over workers of the row's local maxima (one
sum all-reduce; no max all-reduce is needed): every row keeps an entry >= exp(0), so no row
underflows to zero.

`dino_loss_from_targets` is the DINO cross-entropy over crop pairs with these targets given as
probabilities (the reference loss's contraction; the fused kernel takes logits and a center).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .checks import check_int
from .loss_inputs import Temperature

# Sums a tensor over the data-parallel workers and returns the sum (same shape); None: one process.
AllReduceSum = Callable[[torch.Tensor], torch.Tensor]


def sinkhorn_knopp_targets(
    teacher_logits: torch.Tensor,
    teacher_temp: Temperature,
    *,
    n_iterations: int = 3,
    all_reduce_sum: AllReduceSum | None = None,
) -> torch.Tensor:
    """``[N, K]`` target probabilities (rows sum to 1) from ``[N, K]`` teacher logits (no gradient).

    ``N`` is this worker's rows (all global crops of its images, crop-major, as DINOv2 passes them);
    ``all_reduce_sum`` makes the normalization global across workers. fp32 math (fp64 for fp64 input).
    """
    check_int("sinkhorn_knopp_targets: n_iterations", n_iterations, lo=1)
    if teacher_logits.ndim != 2 or teacher_logits.shape[0] == 0:
        got = tuple(teacher_logits.shape)
        raise ValueError(f"sinkhorn_knopp_targets: teacher_logits must be [N, K] with N >= 1, got {got}")
    reduce = all_reduce_sum if all_reduce_sum is not None else _identity
    work = torch.promote_types(teacher_logits.dtype, torch.float32)
    scaled = teacher_logits.detach().to(work) / teacher_temp  # [N, K]
    n_local, k = scaled.shape
    # One collective for the per-prototype shift and the global N: [K local maxima, N_local, 1 per worker].
    counts = torch.tensor([float(n_local), 1.0], dtype=work, device=scaled.device)
    summed = reduce(torch.cat([scaled.amax(dim=0), counts]))
    shift, n_total = summed[:k] / summed[k + 1], summed[k]
    q = torch.exp(scaled - shift).T  # [K, N]
    q = q / reduce(q.sum())
    for _ in range(n_iterations):
        q = q / reduce(q.sum(dim=1, keepdim=True))  # rows: mass 1/K each (divided by K next)
        q = q / k
        q = q / q.sum(dim=0, keepdim=True)  # columns: mass 1/N each (local: a column is one sample)
        q = q / n_total
    return (q * n_total).T


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def dino_loss_from_targets(
    student_logits: torch.Tensor, targets: torch.Tensor, *, student_temp: Temperature, n_global_crops: int
) -> torch.Tensor:
    """The DINO loss with the teacher's distributions given: mean over pairs (i != j) and images of
    ``H(q_i, p_j) = -sum_k q_i[k] log p_j[k]``, ``log p_j = log_softmax(s_j / tau_s)``.

    ``student_logits``: ``[V*B, K]`` crop-major (gradients flow into it); ``targets``: ``[G*B, K]``
    probabilities of the G global crops (stop-gradient). The contraction of `fdino.dino_loss_reference`.
    """
    n_global = n_global_crops
    n_rows, k = student_logits.shape
    rows_t = targets.shape[0] if targets.ndim == 2 else 0
    if rows_t == 0 or targets.shape[1] != k or rows_t % n_global or n_rows % (rows_t // n_global):
        raise ValueError(
            f"dino_loss_from_targets: targets {tuple(targets.shape)} do not fit student_logits "
            f"{tuple(student_logits.shape)} with n_global_crops={n_global} (expected [G*B, K] and [V*B, K])"
        )
    batch = targets.shape[0] // n_global
    n_crops = n_rows // batch
    work = torch.promote_types(student_logits.dtype, torch.float32)
    q = targets.detach().to(work).view(n_global, batch, k)
    log_p = F.log_softmax(student_logits.to(work) / student_temp, dim=-1).view(n_crops, batch, k)
    cross = torch.einsum("ibk,jbk->ij", q, log_p)  # (G, V): summed over batch and K
    keep = 1.0 - torch.eye(n_global, n_crops, dtype=cross.dtype, device=cross.device)
    n_pairs = n_global * n_crops - n_global
    return -(cross * keep).sum() / (n_pairs * batch)


__all__ = ["AllReduceSum", "dino_loss_from_targets", "sinkhorn_knopp_targets"]
