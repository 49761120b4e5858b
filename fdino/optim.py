"""Optimizer pieces of the DINO step: per-parameter gradient clipping and AdamW.

AdamW itself is PyTorch's functional `torch.optim.adamw.adamw`; this module only arranges its
inputs so that every scheduled value stays a device tensor:
- decoupled weight decay ``p <- p (1 - lr wd)`` is applied here, on the regularized parameters
  only, because the functional API takes weight decay as a Python float (a branch on its value);
  AdamW applies exactly this multiply before its update, so the result is the same;
- the head's last layer can be frozen by a device-side condition: it is updated on copies and
  the old values are selected back while frozen, which leaves parameter, moments and step count
  untouched, as when the reference code sets its gradient to None.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.optim.adamw import adamw as torch_adamw


class AdamWState(NamedTuple):
    """AdamW moments and per-parameter step counts (as `torch.optim.AdamW` keeps them)."""

    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    count: dict[str, torch.Tensor]


def init_adamw(params: dict[str, torch.Tensor]) -> AdamWState:
    """Zero moments; step counts are fp32 0-d tensors on each parameter's device."""
    return AdamWState(
        exp_avg={k: torch.zeros_like(v) for k, v in params.items()},
        exp_avg_sq={k: torch.zeros_like(v) for k, v in params.items()},
        count={k: torch.zeros((), dtype=torch.float32, device=v.device) for k, v in params.items()},
    )


def clip_grads_per_param_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each gradient's own L2 norm to ``max_norm`` in place (the paper's reference semantics:
    ``g *= min(1, max_norm / (||g|| + 1e-6))`` per parameter, not one global norm).

    Returns the global norm sqrt(sum ||g||^2) before clipping, as a 0-d device tensor.
    """
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        factors = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, factors)
    return total


def _on_device_path(tensors: list[torch.Tensor]) -> bool:
    # Tensor lr needs AdamW's `capturable` path, which PyTorch allows on accelerators and inside
    # torch.compile; eager CPU uses the plain path with the lr read on the host (no device there).
    return torch.compiler.is_compiling() or tensors[0].device.type != "cpu"


def adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    count: list[torch.Tensor],
    *,
    lr: torch.Tensor,
    wd: torch.Tensor,
    regularized: list[bool],
    betas: tuple[float, float],
    eps: float,
) -> None:
    """One AdamW step in place over a group of parameters."""
    if not params:
        return
    decayed = [p for p, r in zip(params, regularized) if r]
    if decayed:
        torch._foreach_mul_(decayed, [1.0 - lr * wd] * len(decayed))
    capturable = _on_device_path(params)
    torch_adamw(
        params,
        grads,
        exp_avg,
        exp_avg_sq,
        [],
        count,
        foreach=capturable,
        capturable=capturable,
        amsgrad=False,
        beta1=betas[0],
        beta2=betas[1],
        lr=lr if capturable else float(lr),
        weight_decay=0.0,
        eps=eps,
        maximize=False,
    )


def adamw_frozen_aware_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    count: list[torch.Tensor],
    *,
    frozen: torch.Tensor,
    **adamw_kwargs,
) -> None:
    """`adamw_` that leaves the group completely untouched while the 0-d bool ``frozen`` is true."""
    if not params:
        return
    groups = (params, exp_avg, exp_avg_sq, count)
    before = [[t.clone() for t in group] for group in groups]
    adamw_(params, grads, exp_avg, exp_avg_sq, count, **adamw_kwargs)
    for group, old_group in zip(groups, before):
        for t, old in zip(group, old_group):
            t.copy_(torch.where(frozen, old, t))
