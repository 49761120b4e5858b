"""Optimizer pieces of the DINO step: per-parameter gradient clipping, AdamW, SGD and LARS.

AdamW itself is PyTorch's functional `torch.optim.adamw.adamw`; this module only arranges its
inputs so that every scheduled value stays a device tensor:
- decoupled weight decay ``p <- p (1 - lr wd)`` is applied here, on the regularized parameters
  only, because the functional API takes weight decay as a Python float (a branch on its value);
  AdamW applies exactly this multiply before its update, so the result is the same;
- the head's last layer can be frozen by a device-side condition: it is updated on copies and
  the old values are selected back while frozen, which leaves parameter, moments and step count
  untouched, as when the reference code sets its gradient to None.

SGD and LARS (`sgd_`, `lars_`) are the reference code's ``--optimizer sgd`` (``torch.optim.SGD`` with
momentum and the weight decay of its regularized parameter group) and ``--optimizer lars``
(``utils.LARS`` of facebookresearch/dino), written with foreach ops on tensor lr and weight decay. Their
one state is a momentum buffer per parameter (`MomentumState`), zero at the start: ``m * 0 + d = d`` is
the first step of both, so no step count is needed.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch.optim.adamw import adamw as torch_adamw

if TYPE_CHECKING:
    from .config import DinoConfig


class AdamWState(NamedTuple):
    """AdamW moments and per-parameter step counts (as `torch.optim.AdamW` keeps them)."""

    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    count: dict[str, torch.Tensor]


class MomentumState(NamedTuple):
    """SGD / LARS momentum buffers (``torch.optim.SGD``'s ``momentum_buffer``, the reference LARS's ``mu``)."""

    momentum_buffer: dict[str, torch.Tensor]


OptimizerState = AdamWState | MomentumState
# The reference LARS's trust coefficient (utils.LARS default, which main_dino.py keeps).
LARS_ETA = 0.001


def init_optimizer(optimizer: str, params: dict[str, torch.Tensor]) -> OptimizerState:
    """The fresh state of ``optimizer`` ('adamw', 'sgd' or 'lars'; `fdino.config.OPTIMIZERS`) for ``params``."""
    if optimizer == "adamw":
        return init_adamw(params)
    if optimizer in ("sgd", "lars"):
        return MomentumState(momentum_buffer={k: torch.zeros_like(v) for k, v in params.items()})
    raise ValueError(f"unknown optimizer {optimizer!r}; choose one of 'adamw', 'sgd', 'lars'")


def optimizer_state_type(optimizer: str) -> type:
    """The NamedTuple that holds ``optimizer``'s state (checkpoints rebuild it by name)."""
    return AdamWState if optimizer == "adamw" else MomentumState


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
    with untouched_while(frozen, [*params, *exp_avg, *exp_avg_sq, *count]):
        adamw_(params, grads, exp_avg, exp_avg_sq, count, **adamw_kwargs)


@contextlib.contextmanager
def untouched_while(frozen: torch.Tensor, tensors: list[torch.Tensor]):
    """Updates made in the block to ``tensors`` are undone (old values selected back) while the 0-d bool
    ``frozen`` is true: a device-side condition, so the step's graph is the same frozen or not."""
    before = [t.clone() for t in tensors]
    yield
    for t, old in zip(tensors, before):
        t.copy_(torch.where(frozen, old, t))


def sgd_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffer: list[torch.Tensor],
    *,
    lr: torch.Tensor,
    wd: torch.Tensor,
    regularized: list[bool],
    momentum: float,
) -> None:
    """One step of ``torch.optim.SGD(momentum=m, dampening=0, nesterov=False)`` in place, weight decay
    ``wd`` on the regularized parameters only (the reference code's two parameter groups):

        d = g + wd p (regularized) or g;   buf <- m buf + d;   p <- p - lr buf
    """
    if not params:
        return
    updates = [torch.add(g, p * wd) if r else g for p, g, r in zip(params, grads, regularized)]
    _momentum_step_(params, updates, momentum_buffer, lr=lr, momentum=momentum)


def lars_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffer: list[torch.Tensor],
    *,
    lr: torch.Tensor,
    wd: torch.Tensor,
    regularized: list[bool],
    momentum: float,
    eta: float = LARS_ETA,
) -> None:
    """One step of the reference code's LARS (`utils.LARS`, from Barlow Twins) in place. Per parameter:

        d = g + wd p                                    (regularized: weights with ndim > 1)
        d <- d * eta ||p|| / ||d||  if ndim > 1 and ||p|| > 0 and ||d|| > 0
        buf <- m buf + d;   p <- p - lr buf

    Biases and norm parameters (ndim <= 1) get neither weight decay nor the trust ratio, as in the
    reference, whose unregularized group has weight decay 0 and which adapts only ``p.ndim != 1``.
    """
    if not params:
        return
    updates = [torch.add(g, p * wd) if r else g for p, g, r in zip(params, grads, regularized)]
    adapted = [i for i, p in enumerate(params) if p.ndim > 1]
    if adapted:
        p_norms = torch._foreach_norm([params[i] for i in adapted])
        d_norms = torch._foreach_norm([updates[i] for i in adapted])
        for i, p_norm, d_norm in zip(adapted, p_norms, d_norms):
            # Device-side selects (no host read); the unselected eta * 0 / 0 = nan never reaches the update.
            trust = torch.where((p_norm > 0) & (d_norm > 0), eta * p_norm / d_norm, torch.ones_like(p_norm))
            updates[i] = updates[i] * trust
    _momentum_step_(params, updates, momentum_buffer, lr=lr, momentum=momentum)


def _momentum_step_(
    params: list[torch.Tensor],
    updates: list[torch.Tensor],
    momentum_buffer: list[torch.Tensor],
    *,
    lr: torch.Tensor,
    momentum: float,
) -> None:
    """``buf <- m buf + d;  p <- p - lr buf`` with a tensor ``lr`` (no host read)."""
    torch._foreach_mul_(momentum_buffer, momentum)
    torch._foreach_add_(momentum_buffer, updates)
    torch._foreach_sub_(params, torch._foreach_mul(momentum_buffer, lr))


def optimizer_update_(
    cfg: DinoConfig,
    opt: OptimizerState,
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    names: list[str],
    *,
    lr: torch.Tensor,
    wd: torch.Tensor,
    regularized: list[bool],
    frozen: torch.Tensor | None = None,
) -> None:
    """One step of ``cfg.optimizer`` (a `DinoConfig`) on the parameters ``names``, in place on ``params`` and
    ``opt``; with a 0-d bool ``frozen``, the group (parameters and state) is left untouched while it is true."""
    p, g = [params[k] for k in names], [grads[k] for k in names]
    if cfg.optimizer == "adamw":
        moments = ([opt.exp_avg[k] for k in names], [opt.exp_avg_sq[k] for k in names], [opt.count[k] for k in names])
        args = (p, g, *moments)
        kwargs = dict(lr=lr, wd=wd, regularized=regularized, betas=cfg.adam_betas, eps=cfg.adam_eps)
        if frozen is None:
            adamw_(*args, **kwargs)
        else:
            adamw_frozen_aware_(*args, frozen=frozen, **kwargs)
        return
    step = {"sgd": sgd_, "lars": lars_}[cfg.optimizer]
    buffers = [opt.momentum_buffer[k] for k in names]
    kwargs = dict(lr=lr, wd=wd, regularized=regularized, momentum=cfg.optimizer_momentum)
    if frozen is None or not names:
        step(p, g, buffers, **kwargs)
        return
    with untouched_while(frozen, [*p, *buffers]):
        step(p, g, buffers, **kwargs)
