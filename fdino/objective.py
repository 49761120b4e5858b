"""What the student's gradient step minimizes, per config: the DINO loss against the teacher (centered
softmax, or DINOv2's Sinkhorn-Knopp targets) plus, when ``koleo_weight > 0``, DINOv2's KoLeo term.

`fdino.step.micro_grads` calls these around its forwards, so the step itself stays one code path:

    targets = teacher_targets(cfg, t_logits, teacher_temp, all_reduce_sum)    # None unless sinkhorn
    total, aux = student_objective(cfg, s_out, t_logits, targets, center, student_temp, teacher_temp)

With the defaults (``centering="ema"`` or ``"none"``, ``koleo_weight=0``) this is exactly the DINO loss
call the step made before these options existed (bitwise: same ops, same order).
"""

from __future__ import annotations

import torch

from .config import DinoConfig
from .diagnostics import target_diagnostics, teacher_diagnostics
from .koleo import koleo_per_crop
from .loss import dino_loss
from .loss_inputs import Temperature
from .sinkhorn import AllReduceSum, dino_loss_from_targets, sinkhorn_knopp_targets


def wants_features(cfg: DinoConfig) -> bool:
    """The student forward must also return its backbone features (KoLeo reads them)."""
    return cfg.koleo_weight > 0


def teacher_targets(
    cfg: DinoConfig, t_logits: torch.Tensor, teacher_temp: Temperature, all_reduce_sum: AllReduceSum | None = None
) -> torch.Tensor | None:
    """``[G*B, K]`` Sinkhorn-Knopp targets for ``centering="sinkhorn"`` (normalized over every worker's rows
    through ``all_reduce_sum``), else None (the loss then softmaxes the centered logits itself)."""
    if cfg.centering != "sinkhorn":
        return None
    return sinkhorn_knopp_targets(
        t_logits, teacher_temp, n_iterations=cfg.sinkhorn_iterations, all_reduce_sum=all_reduce_sum
    )


def student_objective(
    cfg: DinoConfig,
    s_out: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    t_logits: torch.Tensor,
    targets: torch.Tensor | None,
    center: torch.Tensor,
    student_temp: Temperature,
    teacher_temp: Temperature,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(total, aux)``: the loss to differentiate and ``aux`` holding ``batch_center`` (``[K]``), plus
    ``dino_loss`` and ``koleo`` (0-d, unweighted, detached) when the KoLeo term is on.

    ``s_out``: ``[V*B, K]`` student logits, or ``(logits, [V*B, D] backbone features)`` when
    `wants_features`. ``total = dino_loss + koleo_weight * koleo``.
    """
    g = cfg.n_global_crops
    s_logits, s_features = s_out if wants_features(cfg) else (s_out, None)
    if targets is None:
        loss, batch_center = dino_loss(
            s_logits,
            t_logits,
            center,
            student_temp=student_temp,
            teacher_temp=teacher_temp,
            n_global_crops=g,
            impl=cfg.loss_impl,
        )
    else:
        # The fused kernel computes the teacher softmax from logits and a center; targets are probabilities.
        loss = dino_loss_from_targets(s_logits, targets, student_temp=student_temp, n_global_crops=g)
        batch_center = t_logits.float().mean(dim=0)  # keeps the center EMA (a diagnostic under sinkhorn)
    aux = {"batch_center": batch_center}
    if s_features is None:
        return loss, aux
    koleo = koleo_per_crop(s_features[: t_logits.shape[0]], g)  # the global crops' rows come first
    aux.update(dino_loss=loss.detach(), koleo=koleo.detach())
    return loss + cfg.koleo_weight * koleo, aux


def step_diagnostics(
    t_logits: torch.Tensor,
    targets: torch.Tensor | None,
    center: torch.Tensor,
    teacher_temp: Temperature,
    loss: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The collapse diagnostics of the distributions the student was trained towards (`fdino.diagnostics`)."""
    if targets is None:
        return teacher_diagnostics(t_logits, center, teacher_temp, loss)
    return target_diagnostics(targets, center, loss)


__all__ = ["step_diagnostics", "student_objective", "teacher_targets", "wants_features"]
