"""BatchNorm whose batch statistics span all data-parallel workers (the math of `torch.nn.SyncBatchNorm`).

The official DINO code converts its ResNet (student and teacher, head included) with
``nn.SyncBatchNorm.convert_sync_batchnorm``, so W workers x B images normalize with the statistics of
all W x B images, exactly as one process with the whole batch would. `torch.nn.SyncBatchNorm` finds
its process group inside the module; fdino's step drives stateless templates through
`torch.func.functional_call` and receives its collectives from the caller (``reducer``), so here:

- `synced_batch_norm` is the pure math: per-channel sums over the local batch, summed across
  workers by a differentiable ``sum_across_workers`` (its backward sums the cotangents across
  workers, which is what SyncBatchNorm's backward all-reduce does), then the usual normalization and
  running-statistics update with the global count (unbiased running variance, as SyncBatchNorm).
  Mean and variance are two passes (sum of x, then sum of (x - mean)^2): no E[x^2] - E[x]^2
  cancellation.
- `SyncedBatchNorm1d/2d` are `nn.BatchNorm1d/2d` with the same parameters and buffers (checkpoints do
  not change); in training mode inside `batchnorm_statistics_across(sum_fn)` they use
  `synced_batch_norm`, everywhere else they ARE the torch module (bitwise: one process, eval, ViTs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Sums a tensor over all workers (differentiably); see fdino.distributed.MeanReducer.sum_across_workers.
SumAcrossWorkers = Callable[[torch.Tensor], torch.Tensor]

# The sum the synced layers use during a data-parallel step; None: plain per-process BatchNorm. Set only by
# `batchnorm_statistics_across` for the duration of a step (the templates are shared, stateless modules).
_ACTIVE: list[SumAcrossWorkers | None] = [None]


@contextlib.contextmanager
def batchnorm_statistics_across(sum_across_workers: SumAcrossWorkers) -> Iterator[None]:
    """Within this block, `SyncedBatchNorm*` layers in training mode take statistics over all workers."""
    previous = _ACTIVE[0]
    _ACTIVE[0] = sum_across_workers
    try:
        yield
    finally:
        _ACTIVE[0] = previous


def synced_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    momentum: float | torch.Tensor,
    eps: float,
    sum_across_workers: SumAcrossWorkers,
) -> torch.Tensor:
    """Training-mode batch normalization of ``x`` ``[N, C, *]`` with statistics over every worker's batch.

    mean_c = sum_workers sum_{n,*} x / M and var_c = sum_workers sum_{n,*} (x - mean_c)^2 / M, with M the
    number of values per channel on all workers; y = (x - mean) / sqrt(var + eps) * weight + bias
    (Ioffe & Szegedy 2015, Alg. 1). Running statistics (updated in place, no gradient) move by
    ``momentum`` towards mean and the unbiased var * M / (M - 1). With ``sum_across_workers`` the
    identity this is `F.batch_norm(..., training=True)` up to rounding.
    """
    dims = [0] + list(range(2, x.ndim))
    shape = [1, -1] + [1] * (x.ndim - 2)
    # Statistics in at least fp32 (bf16 activations under autocast), as torch's batch norm kernels keep them.
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    count = torch.full((1,), x.numel() // x.shape[1], dtype=xf.dtype, device=x.device)
    sums = sum_across_workers(torch.cat([xf.sum(dims), count]))  # one collective: [C sums, count]
    total = sums[-1]
    mean = sums[:-1] / total
    centered = xf - mean.view(shape)
    var = sum_across_workers((centered * centered).sum(dims)) / total  # biased, used to normalize
    y = centered * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            unbiased = var.detach() * (total / (total - 1).clamp(min=1))
            running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
            running_var.mul_(1 - momentum).add_(unbiased * momentum)
    return y.to(x.dtype)


class _SyncedForward:
    """The forward shared by the synced classes (mixed in before the torch BatchNorm class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sum_fn = _ACTIVE[0]
        if sum_fn is None or not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        tracked = self.track_running_stats
        if tracked and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as nn.BatchNorm (a tensor: no host read)
                factor = 1.0 / self.num_batches_tracked.float()
        return synced_batch_norm(
            x,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            momentum=factor,
            eps=self.eps,
            sum_across_workers=sum_fn,
        )


class SyncedBatchNorm1d(_SyncedForward, nn.BatchNorm1d):
    """`nn.BatchNorm1d` whose training statistics span workers inside `batchnorm_statistics_across`."""


class SyncedBatchNorm2d(_SyncedForward, nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training statistics span workers inside `batchnorm_statistics_across`."""


_SYNCED = {nn.BatchNorm1d: SyncedBatchNorm1d, nn.BatchNorm2d: SyncedBatchNorm2d}


def use_synced_batchnorm_(module: nn.Module) -> list[str]:
    """Turn every plain `nn.BatchNorm1d/2d` of ``module`` into its synced class, in place (same
    parameters, buffers and names). Returns the names of BatchNorm layers of other classes (e.g. timm's
    fused BatchNormAct2d), which stay per-worker: callers refuse to sync a network that has any."""
    unsupported = []
    for name, sub in module.named_modules():
        if type(sub) in _SYNCED:
            sub.__class__ = _SYNCED[type(sub)]
        elif isinstance(sub, nn.modules.batchnorm._BatchNorm) and not isinstance(sub, _SyncedForward):
            unsupported.append(f"{name} ({type(sub).__name__})")
    return unsupported


def has_synced_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, _SyncedForward) for m in module.modules())


@contextlib.contextmanager
def step_batchnorm_sync(cfg, templates: tuple[nn.Module, ...], reducer) -> Iterator[bool]:
    """The context of one training step: statistics across workers when the config asks for it, the step is
    data-parallel (a ``reducer``) and the network has BatchNorm. Yields whether they are synced."""
    if not cfg.sync_batchnorm or reducer is None or not any(has_synced_batchnorm(t) for t in templates):
        yield False
        return
    unsupported = sorted({n for t in templates for n in getattr(t, "unsynced_batchnorm", ())})
    if unsupported:
        raise ValueError(
            f"DinoConfig.sync_batchnorm=True but these BatchNorm layers cannot be synced: {unsupported[:5]}; "
            "use a backbone with plain nn.BatchNorm2d or set sync_batchnorm=False (per-worker statistics)"
        )
    sum_fn = getattr(reducer, "sum_across_workers", None)
    if sum_fn is None:
        raise ValueError(
            "DinoConfig.sync_batchnorm=True needs a reducer with a differentiable sum_across_workers (as "
            "fdino.distributed.mean_reducer() returns); pass that reducer or set sync_batchnorm=False"
        )
    with batchnorm_statistics_across(sum_fn):
        yield True


def batch_norm_reference(x, running_mean, running_var, weight, bias, *, momentum, eps) -> torch.Tensor:
    """One process's `F.batch_norm` in training mode: what the synced version equals on the whole batch."""
    return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
