"""Teacher EMA (paper eq. 2): theta_t <- m theta_t + (1 - m) theta_s, for all parameters at once."""

from __future__ import annotations

import torch


def ema_update_(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: torch.Tensor) -> None:
    """In place, one fused ``torch._foreach_lerp_`` over every teacher parameter.

    ``lerp(t, s, w) = t + w (s - t) = (1 - w) t + w s`` with ``w = 1 - m``. The weight goes through
    the list overload as a 0-d device tensor: passing it as one tensor would select the Scalar
    overload, which reads the value on the host (a device sync on CUDA every step).
    """
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} parameters, student {len(student)}: not the same network")
    weight = (1.0 - momentum).to(teacher[0].dtype) if isinstance(momentum, torch.Tensor) else 1.0 - momentum
    if isinstance(weight, torch.Tensor):
        torch._foreach_lerp_(teacher, student, [weight] * len(teacher))
    else:
        torch._foreach_lerp_(teacher, student, weight)
