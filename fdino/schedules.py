"""Schedules as pure functions of the step: learning rate, weight decay, teacher momentum,
teacher temperature, last-layer freezing.

Each takes the config and the step as a 0-d integer tensor and returns a 0-d tensor computed on
the step's device, so a compiled training step sees the same graph at every step (no new Python
float ever reaches it). Python ints are accepted too, for plotting and tests.

Closed forms (s = step, T = total steps, W = warm-up steps; all per optimizer step). Lengths given in
epochs count ``cfg.schedule_epoch_steps`` steps per epoch: the data epoch's steps, or a budget's share
(``schedule_steps / epochs``) when `fdino.budget` fitted the run to a time.
- learning rate: ``peak * s / W`` for ``s < W``, then cosine
  ``min + (peak - min) * (1 + cos(pi * (s - W) / (T - W))) / 2``
  where ``peak = lr * batch_size / 256`` (the paper's linear scaling rule). ``lr_warmup="official"``: the
  reference code's ``np.linspace(0, peak, W)``, i.e. ``peak * s / (W - 1)``, which reaches the peak at
  s = W - 1 (`utils.cosine_scheduler` of facebookresearch/dino); the cosine after it is the same.
- weight decay: cosine from ``weight_decay`` at s = 0 to ``weight_decay_end`` at s = T.
- teacher momentum: ``1 - (1 - m0) * (1 + cos(pi * s / T)) / 2``, from m0 to ``teacher_momentum_end`` (1 in the paper);
  0 or 1 per step for the other ``teacher_update`` modes (see `teacher_momentum`).
- teacher temperature: linear from ``warmup_teacher_temp`` to ``teacher_temp`` over the warm-up, then constant.
  Deviation from the reference code: the ramp is per step, not per epoch (as in DINOv2), so it has no jumps.
  ``teacher_temp_warmup="per_epoch"`` is the reference code's table ``np.linspace(warmup, final, E)[e]``
  for epoch ``e = floor(s / epoch_steps) < E`` (the final value from epoch E - 1 on).
Weight decay and teacher momentum equal the reference code's (`utils.cosine_scheduler` without warm-up) as they are.
After T every schedule holds its final value.
"""

from __future__ import annotations

import math

import torch

from . import checks
from .config import TEACHER_UPDATES, DinoConfig


def _as_step(step: torch.Tensor | int) -> torch.Tensor:
    # float64 keeps the boundaries exact (s == W, s == T) for any realistic step count.
    if isinstance(step, torch.Tensor):
        return step.to(torch.float64)
    return torch.tensor(float(step), dtype=torch.float64)


def _cosine(start: float, end: float, progress: torch.Tensor) -> torch.Tensor:
    """start at progress 0, end at progress 1 (progress clamped to [0, 1])."""
    progress = progress.clamp(0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + torch.cos(math.pi * progress))


def warmup_steps(cfg: DinoConfig) -> int:
    return int(round(cfg.warmup_epochs * cfg.schedule_epoch_steps))


def learning_rate(cfg: DinoConfig, step: torch.Tensor | int) -> torch.Tensor:
    """Linear warm-up from 0 to the scaled peak, then cosine decay to ``min_lr``."""
    s = _as_step(step)
    peak, total, warm = cfg.peak_lr, cfg.total_steps, warmup_steps(cfg)
    decay = _cosine(peak, cfg.min_lr, (s - warm) / max(total - warm, 1))
    if warm == 0:
        return decay.float()
    if cfg.lr_warmup == "official":  # np.linspace(0, peak, W) = i * (peak / (W - 1)); W = 1 gives [0]
        return torch.where(s < warm, s * (peak / max(warm - 1, 1)), decay).float()
    return torch.where(s < warm, peak * s / warm, decay).float()


def weight_decay(cfg: DinoConfig, step: torch.Tensor | int) -> torch.Tensor:
    """Cosine from ``weight_decay`` to ``weight_decay_end`` over the run."""
    return _cosine(cfg.weight_decay, cfg.weight_decay_end, _as_step(step) / cfg.total_steps).float()


def teacher_momentum(cfg: DinoConfig, step: torch.Tensor | int) -> torch.Tensor:
    """Momentum m of the teacher update after step ``step`` (theta_t <- m theta_t + (1 - m) theta_s).

    ``cfg.teacher_update`` picks the teacher of the paper's Table 6 as a momentum per step, so every
    mode is the same EMA (no extra state, one compiled graph; m = 0 copies the student bitwise, m = 1
    keeps the teacher bitwise):
    - ``"ema"``: cosine from ``teacher_momentum`` to ``teacher_momentum_end`` (paper: 0.996 -> 1);
    - ``"student_copy"``: 0 (the teacher is the student after every step);
    - ``"previous_epoch"``: 0 when the step ends an epoch (``(step + 1) % steps_per_epoch == 0``:
      ``step`` counts the steps taken before this one), else 1; within epoch e the teacher is the
      student as it was at the end of epoch e - 1 (the initialization during epoch 0);
    - ``"frozen"``: 1 (the teacher stays at its initialization).
    """
    mode = cfg.teacher_update
    if mode == "ema":
        return _cosine(cfg.teacher_momentum, cfg.teacher_momentum_end, _as_step(step) / cfg.total_steps).float()
    s = _as_step(step)
    if mode == "student_copy":
        return torch.zeros_like(s).float()
    if mode == "frozen":
        return torch.ones_like(s).float()
    if mode == "previous_epoch":
        return (torch.remainder(s + 1, cfg.steps_per_epoch) != 0).float()
    checks.fail("DinoConfig.teacher_update", mode, f"one of {TEACHER_UPDATES}")  # configs validate it already


def teacher_temperature(cfg: DinoConfig, step: torch.Tensor | int) -> torch.Tensor:
    """Linear warm-up of tau_t (per step, or per epoch as the reference code), then constant."""
    s = _as_step(step)
    if cfg.teacher_temp_warmup == "per_epoch":
        return _teacher_temperature_per_epoch(cfg, s)
    warm = cfg.warmup_teacher_temp_epochs * cfg.schedule_epoch_steps
    if warm <= 0:
        return (torch.zeros_like(s) + cfg.teacher_temp).float()  # + also takes a tensor (fdino.batched)
    ramp = cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * (s / warm).clamp(max=1.0)
    return ramp.float()


def _teacher_temperature_per_epoch(cfg: DinoConfig, s: torch.Tensor) -> torch.Tensor:
    """The reference code's ``concat(linspace(warmup_teacher_temp, teacher_temp, E), [teacher_temp] * ...)[epoch]``
    (DINOLoss in main_dino.py) with ``E = warmup_teacher_temp_epochs`` (whole, validated by the config)."""
    n_warm = int(cfg.warmup_teacher_temp_epochs)
    if n_warm <= 0:
        return (torch.zeros_like(s) + cfg.teacher_temp).float()
    epoch = torch.floor(s / cfg.schedule_epoch_steps)
    # numpy's order of operations (i * step + start), and its exact endpoint at epoch E - 1 (E = 1: [start]).
    ramp = epoch * ((cfg.teacher_temp - cfg.warmup_teacher_temp) / max(n_warm - 1, 1)) + cfg.warmup_teacher_temp
    return torch.where(epoch < max(n_warm - 1, 1), ramp, torch.zeros_like(ramp) + cfg.teacher_temp).float()


def freeze_last_layer_steps(cfg: DinoConfig) -> int:
    return int(round(cfg.freeze_last_layer * cfg.schedule_epoch_steps))


def last_layer_frozen(cfg: DinoConfig, step: torch.Tensor | int) -> torch.Tensor:
    """True while the head's last layer must not be updated (first ``freeze_last_layer`` epochs)."""
    return _as_step(step) < freeze_last_layer_steps(cfg)


def all_schedules(cfg: DinoConfig, step: torch.Tensor | int) -> dict[str, torch.Tensor]:
    """Every scheduled value at ``step`` (0-d tensors), keyed by metric name."""
    return {
        "lr": learning_rate(cfg, step),
        "wd": weight_decay(cfg, step),
        "momentum": teacher_momentum(cfg, step),
        "teacher_temp": teacher_temperature(cfg, step),
    }
