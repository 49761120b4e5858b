"""The DINO step of N variants at once: `torch.func.vmap` of the single step's gradients, updates on the stack.

    bstate, metrics = batched_train_step(bstate, batch)   # batch: V crops, each [N, B, C, H, W]

1. every variant's schedules from its hyperparameters (`fdino.batched.hyper.batched_schedules`: the
   single-run formulas on ``[N]`` tensors);
2. `torch.func.vmap` of `fdino.step.micro_grads` (teacher forward, student forward, loss, gradients)
   over the stacked states, crops, centers and temperatures; the reference loss runs inside vmap
   (the Triton kernel has no batching rule);
3. the updates act on the stacked tensors directly, outside vmap (``_foreach_lerp_`` and
   capturable AdamW do not run under vmap): per-variant per-parameter clipping, AdamW with each
   variant's lr and weight decay broadcast along the leading axis, last-layer freezing, the
   teacher EMA and the center EMA as one ``_foreach_lerp_`` each with per-variant weights.

Variant i equals its own `fdino.train_step` run within fp32 rounding (tests/test_batched.py), except
that stochastic depth draws differ (vmap draws them per variant): compare with drop_path_rate=0.
Like `train_step`, the step donates its input: it updates the stacked tensors in place.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch.func import vmap

from .. import schedules
from ..config import DinoConfig
from ..models import is_last_layer, is_regularized
from ..step import Networks, check_batch, micro_grads, networks, step_rng
from .hyper import batched_schedules, centered, unbatchable
from .state import BatchedState

Tree = dict[str, torch.Tensor]


def _along(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[N]`` per-variant values shaped to broadcast over a stacked ``[N, ...]`` tensor."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def vmapped_grads(
    cfg: DinoConfig, nets: Networks, bstate: BatchedState, crops: Sequence[torch.Tensor], sched: dict[str, torch.Tensor]
) -> tuple[Tree, dict[str, torch.Tensor]]:
    """Every variant's gradients and loss outputs: ``micro_grads`` under vmap (stacked ``[N, ...]`` results)."""
    use = centered(bstate.hparams)
    center = bstate.state.center * _along(use, bstate.state.center).to(bstate.state.center.dtype)

    def one(state, crops, center, teacher_temp, student_temp):
        return micro_grads(cfg, nets, state, crops, center, teacher_temp, student_temp)

    student_temp = bstate.hparams["student_temp"].float()
    # randomness="different": stochastic depth draws its own mask per variant.
    return vmap(one, randomness="different")(bstate.state, list(crops), center, sched["teacher_temp"], student_temp)


def _clip_per_variant_(grads: list[torch.Tensor], max_norm: torch.Tensor) -> torch.Tensor:
    """`fdino.optim.clip_grads_per_param_` per variant: each ``[N, ...]`` gradient's per-variant norm clipped
    to that variant's ``max_norm`` (0: off). Returns ``[N]`` global norms before clipping."""
    norms = [torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]  # each [N]
    total = torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)
    limit = max_norm.float()
    factors = [torch.where(limit > 0, torch.clamp(limit / (n + 1e-6), max=1.0), 1.0) for n in norms]
    torch._foreach_mul_(grads, [_along(f, g) for f, g in zip(factors, grads)])
    return total


def _adamw_stacked_(
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
    """AdamW (Loshchilov and Hutter 2019, as `torch.optim.AdamW` computes it) on stacked tensors with
    per-variant ``[N]`` lr and weight decay; ``count`` holds ``[N]`` step counts per parameter."""
    if not params:
        return
    beta1, beta2 = betas
    decayed = [p for p, r in zip(params, regularized) if r]
    if decayed:
        torch._foreach_mul_(decayed, [_along(1.0 - lr * wd, p) for p in decayed])
    torch._foreach_add_(count, 1.0)
    torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
    step_size = [lr / (1.0 - torch.pow(beta1, c)) for c in count]  # each [N]
    bias2_sqrt = [torch.sqrt(1.0 - torch.pow(beta2, c)) for c in count]
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, [_along(b, d) for b, d in zip(bias2_sqrt, denom)])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, [e * _along(-s, e) for e, s in zip(exp_avg, step_size)], denom)


def apply_stacked_update(
    cfg: DinoConfig, bstate: BatchedState, grads: Tree, batch_center: torch.Tensor, sched: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`fdino.step.apply_update` for every variant at once, in place on the stacked state; returns metrics."""
    state, hp = bstate.state, bstate.hparams
    names = list(state.student)
    grad_norm = _clip_per_variant_([grads[k] for k in names], hp["clip_grad"])
    last = [k for k in names if cfg.freeze_last_layer > 0 and is_last_layer(k)]
    rest = [k for k in names if k not in last]
    common = dict(lr=sched["lr"], wd=sched["wd"], betas=cfg.adam_betas, eps=cfg.adam_eps)
    for frozen_group, group in ((False, rest), (True, last)):
        tensors = (
            [state.student[k] for k in group],
            [grads[k] for k in group],
            [state.opt.exp_avg[k] for k in group],
            [state.opt.exp_avg_sq[k] for k in group],
            [state.opt.count[k] for k in group],
        )
        # Decay is decided as for one variant: by the name and the shape without the leading variant axis.
        regularized = [is_regularized(k, state.student[k][0]) for k in group]
        before = [[t.clone() for t in ts] for ts in (tensors[0], *tensors[2:])] if frozen_group and group else None
        _adamw_stacked_(*tensors, regularized=regularized, **common)
        if before is not None:
            # Same step for every variant, so one condition; the group is left untouched while frozen.
            frozen = schedules.last_layer_frozen(cfg, state.step[0]).to(state.center.device)
            for ts, olds in zip((tensors[0], *tensors[2:]), before):
                for t, old in zip(ts, olds):
                    t.copy_(torch.where(frozen, old, t))
    teacher = [state.teacher[k] for k in names]
    torch._foreach_lerp_(
        teacher, [state.student[k] for k in names], [_along(1.0 - sched["momentum"], t) for t in teacher]
    )
    # centering="none": momentum 1 keeps the center at its initial zeros (and the loss used 0, see vmapped_grads).
    use = centered(hp)
    center_weight = torch.where(use, 1.0 - hp["center_momentum"], 0.0).float()
    state.center.lerp_(batch_center, _along(center_weight, state.center))
    state.step.add_(1)
    return {"grad_norm": grad_norm}


def _batched_full_step(
    cfg: DinoConfig, nets: Networks, bstate: BatchedState, crops: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One optimizer step of every variant (one compiled graph)."""
    sched = batched_schedules(cfg, bstate.hparams, bstate.state.step)
    grads, out = vmapped_grads(cfg, nets, bstate, crops, sched)
    metrics = apply_stacked_update(cfg, bstate, grads, out.pop("batch_center"), sched)
    return {**sched, **out, **metrics}


def check_batched_batch(bstate: BatchedState, batch: Sequence[torch.Tensor]) -> None:
    """Host-side checks: V crops of ``[N, B, C, H, W]``, each variant's slice a valid single-run batch."""
    cfg, n = bstate.cfg, bstate.n_variants
    reason = unbatchable(cfg)
    if reason is not None:
        raise ValueError(reason)
    if not isinstance(batch, (list, tuple)):
        raise TypeError(
            f"batch must be a list of {cfg.n_crops} crop tensors [N, B, C, H, W], got {type(batch).__name__}"
        )
    for i, crop in enumerate(batch):
        if not isinstance(crop, torch.Tensor) or crop.ndim != 5 or crop.shape[0] != n:
            raise ValueError(
                f"crop {i} must be [N={n}, B, C, H, W] (one batch per variant; expand a shared batch with "
                f"crop.expand({n}, ...)), got {getattr(crop, 'shape', type(crop))}"
            )
    check_batch(cfg, bstate.state, [c[0] for c in batch])


@functools.lru_cache(maxsize=8)
def _compiled(cfg: DinoConfig):
    return torch.compile(_batched_full_step, fullgraph=True, dynamic=False)


def _run(bstate: BatchedState, batch: Sequence[torch.Tensor], *, compiled: bool):
    check_batched_batch(bstate, batch)
    # The fused loss kernel has no vmap batching rule: the reference loss runs inside vmap.
    cfg = bstate.cfg.replace(loss_impl="reference")
    step = _compiled(cfg) if compiled else _batched_full_step
    # The step's RNG from the first variant's (seed, draws); vmap then draws per variant.
    with step_rng(bstate.state.rng, bstate.device):
        metrics = step(cfg, networks(cfg, bstate.device, vmapped=True), bstate, list(batch))
    return bstate, metrics


def batched_train_step(
    bstate: BatchedState, batch: Sequence[torch.Tensor]
) -> tuple[BatchedState, dict[str, torch.Tensor]]:
    """One DINO step of every variant, compiled (one graph per structure). Donates ``bstate`` (in place).

    ``batch``: V crop tensors ``[N, B, C, H, W]`` (variant i's crops at index i). Metrics: ``[N]`` tensors,
    the keys of `fdino.train_step`'s metrics.
    """
    return _run(bstate, batch, compiled=True)


def batched_train_step_eager(
    bstate: BatchedState, batch: Sequence[torch.Tensor]
) -> tuple[BatchedState, dict[str, torch.Tensor]]:
    """`batched_train_step` without `torch.compile` (the same math)."""
    return _run(bstate, batch, compiled=False)


__all__ = ["apply_stacked_update", "batched_train_step", "batched_train_step_eager", "vmapped_grads"]
