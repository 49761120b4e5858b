"""What the DINO loss accepts, shared by `fdino.loss` and the fused kernel (`fdino.kernels.dino_loss`).

A leaf module (it imports neither of them), so the loss can dispatch to the kernel and the kernel
can validate like the loss without the two modules importing each other.
"""

from __future__ import annotations

import torch

from .checks import check_int, is_number

# The implementations `dino_loss(impl=...)` and `DinoConfig.loss_impl` accept.
LOSS_IMPLS = ("auto", "triton", "reference")

# V, all crops of an image: the fused kernel holds them in the rows of one [16, BLOCK_K] register
# tile (more rows would spill registers). Here, not in the kernel module, so that "auto" can test
# it without importing Triton.
KERNEL_MAX_CROPS = 16

# A softmax temperature: a Python float, or a 0-d tensor (a schedule's value inside a compiled step).
Temperature = float | torch.Tensor

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_loss_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: Temperature,
    teacher_temp: Temperature,
    n_global_crops: int,
) -> int:
    """Validate shapes and dtypes of the loss inputs; returns B (images per crop).

    Every error names the offending argument, what it got and what it needs. Host-side only (shapes,
    dtypes, Python numbers): a tensor temperature's value is not read, so nothing syncs the device.
    """
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"dino_loss: {name} must be a 2-D tensor [rows, K], got {got}")
        if t.dtype not in _FLOAT_TYPES:
            raise TypeError(f"dino_loss: {name} must be floating point (fp32/bf16/fp16/fp64), got {t.dtype}")
    k = student_logits.shape[1]
    if teacher_logits.shape[1] != k:
        raise ValueError(
            f"dino_loss: K mismatch: student_logits has K={k} but teacher_logits has K={teacher_logits.shape[1]}; "
            "both must come from the same head (same out_dim)"
        )
    if not isinstance(center, torch.Tensor) or tuple(center.shape) != (k,):
        got = tuple(center.shape) if isinstance(center, torch.Tensor) else type(center).__name__
        raise ValueError(f"dino_loss: center must have shape [K]=[{k}], got {got}")
    check_int("dino_loss: n_global_crops", n_global_crops, lo=1)
    rows_t = teacher_logits.shape[0]
    if rows_t == 0 or rows_t % n_global_crops:
        raise ValueError(
            f"dino_loss: teacher_logits has {rows_t} rows, not a positive multiple of n_global_crops="
            f"{n_global_crops} (expected [n_global_crops*B, K])"
        )
    batch = rows_t // n_global_crops
    rows_s = student_logits.shape[0]
    if rows_s % batch or rows_s // batch < n_global_crops:
        raise ValueError(
            f"dino_loss: student_logits has {rows_s} rows but the teacher implies B={batch} images; "
            f"expected V*B rows with V >= n_global_crops={n_global_crops} crops (crop-major layout)"
        )
    if rows_s // batch == 1:
        raise ValueError("dino_loss: a single crop has no (teacher, student) pair with i != j; use V >= 2")
    for name, temp in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if isinstance(temp, torch.Tensor):
            if temp.numel() != 1:
                raise ValueError(f"dino_loss: {name} must be a float or a 0-d tensor, got shape {tuple(temp.shape)}")
        elif not is_number(temp) or not temp > 0:
            raise ValueError(f"dino_loss: {name} must be > 0, got {temp!r}")
    return batch


__all__ = ["KERNEL_MAX_CROPS", "LOSS_IMPLS", "Temperature", "check_loss_inputs"]
