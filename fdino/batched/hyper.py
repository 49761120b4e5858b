"""Hyperparameters as data: which `DinoConfig` fields variants of one batched run may differ in.

Variants batch together when their configs differ only in `BATCHABLE` fields: scalars the step
reads as values (temperatures, momentums, learning rate, weight decay, clipping, the seed) and the
two ablation switches whose every choice is the same computation with other values (`centering`:
"none" is the EMA with momentum 1 around a zero center; `teacher_update`: a momentum per step).
Everything else (architecture, out_dim, crops, batch size, schedule lengths) shapes the graph and
is the batched run's `structure`.

Each batchable field becomes a ``[N]`` float64 tensor (one value per variant, like optax's
``inject_hyperparams``): float64 holds a Python float exactly, so the schedules computed from the
tensors are bitwise those a single run computes from its config, and a variant's config is read
back exactly (`configs_of`). Switches are stored as the index of their choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .. import schedules
from ..config import CENTERINGS, TEACHER_UPDATES, DinoConfig

BATCHABLE = (
    "seed",
    "lr",
    "min_lr",
    "weight_decay",
    "weight_decay_end",
    "clip_grad",
    "teacher_momentum",
    "teacher_momentum_end",
    "teacher_update",
    "teacher_temp",
    "warmup_teacher_temp",
    "student_temp",
    "center_momentum",
    "centering",
)
# Switches stored as the index of their value in these tuples.
CHOICES = {"centering": CENTERINGS, "teacher_update": TEACHER_UPDATES}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DinoConfig) if f.name in BATCHABLE}

Hyperparams = dict[str, torch.Tensor]


def structure(cfg: DinoConfig) -> DinoConfig:
    """``cfg`` with every batchable field at its default: equal for configs that can share one batched run.
    ``centering="sinkhorn"`` is another computation, not another value: it stays (see `unbatchable`)."""
    keep = {"centering": cfg.centering} if cfg.centering == "sinkhorn" else {}
    return cfg.replace(**{**_DEFAULTS, **keep})


def unbatchable(cfg: DinoConfig) -> str | None:
    """Why variants of ``cfg`` cannot train as one batched run, with the fix; None when they can."""
    if cfg.centering == "sinkhorn" or cfg.koleo_weight > 0:
        return (
            "the batched (vmapped) step does not run DINOv2's centering='sinkhorn' or koleo_weight > 0 (only the "
            "single-run step does); run these variants unbatched (fdino sweep --batched off, or one train_step each)"
        )
    if cfg.optimizer != "adamw":
        return (
            f"the batched (vmapped) step stacks AdamW states only, not optimizer={cfg.optimizer!r}; run these "
            "variants unbatched (fdino sweep --batched off, or one train_step each)"
        )
    if cfg.grad_accum_steps != 1 or cfg.grad_checkpointing:
        return (
            "batched variants train with grad_accum_steps=1 and grad_checkpointing=False (micro-batches and "
            "checkpointing are not vmapped); run these variants one after another instead"
        )
    return None


def differing_fields(a: DinoConfig, b: DinoConfig) -> list[str]:
    """The fields (none batchable) that keep ``a`` and ``b`` out of one batched run."""
    sa, sb = structure(a), structure(b)
    return [f.name for f in dataclasses.fields(DinoConfig) if getattr(sa, f.name) != getattr(sb, f.name)]


def batch_groups(cfgs: Sequence[DinoConfig]) -> list[list[int]]:
    """Indices of ``cfgs`` grouped by structure (first appearance order): each group can train as one batch."""
    groups: dict[DinoConfig, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(structure(cfg), []).append(i)
    return list(groups.values())


def _encode(field: str, value) -> float:
    return float(CHOICES[field].index(value)) if field in CHOICES else float(value)


def _decode(field: str, value: float):
    if field in CHOICES:
        return CHOICES[field][int(value)]
    return int(value) if field == "seed" else value


def hyperparams_of(cfgs: Sequence[DinoConfig], device: torch.device | str) -> Hyperparams:
    """``{field: [N] float64}`` for the batchable fields of ``cfgs`` (one structure; see `batch_groups`)."""
    return {
        f: torch.tensor([_encode(f, getattr(c, f)) for c in cfgs], dtype=torch.float64, device=device)
        for f in BATCHABLE
    }


def configs_of(base: DinoConfig, hparams: Hyperparams) -> tuple[DinoConfig, ...]:
    """Each variant's full config: ``base``'s structure with that variant's values (a host read)."""
    columns = {f: hparams[f].tolist() for f in BATCHABLE}
    n = len(columns["seed"])
    return tuple(base.replace(**{f: _decode(f, columns[f][i]) for f in BATCHABLE}) for i in range(n))


class _Values:
    """A config whose batchable fields read as ``[N]`` tensors, so `fdino.schedules` computes every variant's
    schedule at once with the single-run formulas (the same code, not a copy)."""

    def __init__(self, cfg: DinoConfig, hparams: Hyperparams, **fixed) -> None:
        self._cfg, self._values = cfg, {**hparams, **fixed}

    def __getattr__(self, name: str):
        return self._values[name] if name in self._values else getattr(self._cfg, name)

    @property
    def peak_lr(self):
        return self.lr * self._cfg.batch_size / 256.0


def batched_schedules(cfg: DinoConfig, hparams: Hyperparams, step: torch.Tensor) -> dict[str, torch.Tensor]:
    """`fdino.schedules.all_schedules` of every variant: ``[N]`` fp32 tensors (``step``: ``[N]`` int64)."""
    values = _Values(cfg, hparams)
    mode = hparams["teacher_update"]
    momentum = torch.zeros_like(step, dtype=torch.float32)
    # Every teacher-update mode's momentum, selected per variant: one graph for any mix of modes.
    for code, name in enumerate(TEACHER_UPDATES):
        m = schedules.teacher_momentum(_Values(cfg, hparams, teacher_update=name), step)
        momentum = torch.where(mode == code, m, momentum)
    return {
        "lr": schedules.learning_rate(values, step),
        "wd": schedules.weight_decay(values, step),
        "momentum": momentum,
        "teacher_temp": schedules.teacher_temperature(values, step),
    }


def centered(hparams: Hyperparams) -> torch.Tensor:
    """``[N]`` bool: the variant centers its teacher (``centering="ema"``)."""
    return hparams["centering"] == CENTERINGS.index("ema")


__all__ = [
    "BATCHABLE",
    "CHOICES",
    "Hyperparams",
    "batch_groups",
    "batched_schedules",
    "centered",
    "configs_of",
    "differing_fields",
    "hyperparams_of",
    "structure",
    "unbatchable",
]
