"""The DINO loss (paper eq. 1 and Algorithm 1): cross-entropy between the centered, sharpened
teacher softmax and the student log-softmax, averaged over all (teacher crop i, student crop j,
i != j) pairs and over the batch.

Layout (crop-major, as in the reference code): student logits are ``[V*B, K]`` with rows
``j*B .. j*B+B-1`` holding crop j; teacher logits are ``[G*B, K]`` for the G global crops.
The loss is a pure function: it returns ``(loss, batch_center)``; the center EMA, and any
all-reduce of ``batch_center``, are separate steps done by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loss_inputs import KERNEL_MAX_CROPS, LOSS_IMPLS, Temperature, check_loss_inputs


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    *,
    student_temp: Temperature,
    teacher_temp: Temperature,
    n_global_crops: int = 2,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO loss and the batch center of the teacher logits.

    Args:
        student_logits: ``[V*B, K]`` crop-major, fp32/bf16/fp16. Gradients flow into it.
        teacher_logits: ``[G*B, K]`` for the G = ``n_global_crops`` global crops (no gradient:
            the teacher is a stop-gradient target, as in the paper).
        center: ``[K]`` running center c.
        student_temp, teacher_temp: tau_s and tau_t, Python floats or 0-d tensors (tensors keep
            a compiled step from recompiling when a schedule changes them).
        impl: ``"triton"`` (fused kernel), ``"reference"`` (plain PyTorch) or ``"auto"``
            (the kernel on CUDA when Triton is installed and G = 2, the reference elsewhere).

    Returns:
        ``loss``: 0-d fp32, mean over the ``G*(V-1)`` pairs and the batch of
        ``H(q_i, p_j) = -sum_k q_i[k] log p_j[k]`` with ``q_i = softmax((t_i - c) / tau_t)`` and
        ``log p_j = log_softmax(s_j / tau_s)``.
        ``batch_center``: ``[K]`` fp32 mean of the teacher rows (before any all-reduce).
    """
    # Checked once, here; the kernel entry below trusts these checks (its public twin,
    # dino_loss_triton, runs them itself for callers that skip this function).
    batch = check_loss_inputs(student_logits, teacher_logits, center, student_temp, teacher_temp, n_global_crops)
    choice = resolve_impl(impl, student_logits, teacher_logits, n_global_crops)
    if choice == "triton":
        from .kernels.dino_loss import dino_loss_triton_unchecked  # noqa: PLC0415  (Triton is optional)

        return dino_loss_triton_unchecked(
            student_logits,
            teacher_logits,
            center,
            student_temp=student_temp,
            teacher_temp=teacher_temp,
            n_global_crops=n_global_crops,
            batch=batch,
        )
    return dino_loss_reference(
        student_logits,
        teacher_logits,
        center,
        student_temp=student_temp,
        teacher_temp=teacher_temp,
        n_global_crops=n_global_crops,
    )


def dino_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    *,
    student_temp: Temperature,
    teacher_temp: Temperature,
    n_global_crops: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch DINO loss, same signature and semantics as `dino_loss`.

    All (i, j) pair terms come from one contraction: ``cross[i, j] = sum_b <q_i^b, log p_j^b>``,
    then the diagonal (a global crop paired with itself) is masked out. Math is fp32 (fp64 for fp64 inputs).
    """
    n_global = n_global_crops
    n_rows, k = student_logits.shape
    batch = teacher_logits.shape[0] // n_global
    n_crops = n_rows // batch
    work = torch.promote_types(student_logits.dtype, torch.float32)
    teacher = teacher_logits.detach().to(work)
    q = F.softmax((teacher - center.detach().to(work)) / teacher_temp, dim=-1).view(n_global, batch, k)
    log_p = F.log_softmax(student_logits.to(work) / student_temp, dim=-1).view(n_crops, batch, k)
    cross = torch.einsum("ibk,jbk->ij", q, log_p)  # (G, V): summed over batch and K
    keep = 1.0 - torch.eye(n_global, n_crops, dtype=cross.dtype, device=cross.device)
    n_pairs = n_global * n_crops - n_global
    loss = -(cross * keep).sum() / (n_pairs * batch)
    return loss, teacher.mean(dim=0)


def resolve_impl(impl: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, n_global_crops: int) -> str:
    """Which implementation ``impl`` means for these inputs ("auto": the kernel where it applies)."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"dino_loss impl={impl!r} is unknown: choose one of {LOSS_IMPLS}")
    if impl != "auto":
        return impl
    n_crops = student_logits.shape[0] * n_global_crops // teacher_logits.shape[0]
    return "triton" if kernel_applies(student_logits.device.type, n_crops, n_global_crops) else "reference"


def kernel_applies(device_type: str, n_crops: int, n_global_crops: int) -> bool:
    """The fused kernel runs on CUDA for exactly 2 global crops and at most KERNEL_MAX_CROPS crops."""
    return device_type == "cuda" and n_global_crops == 2 and n_crops <= KERNEL_MAX_CROPS and triton_available()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401, PLC0415  (a probe: is the optional package installed?)
    except ImportError:
        return False
    return True


def update_center_(center: torch.Tensor, batch_center: torch.Tensor, momentum: float | torch.Tensor) -> torch.Tensor:
    """Center EMA after the loss (paper Algorithm 1): c <- m c + (1 - m) batch_center, in place; returns ``center``.

    ``center`` and ``batch_center``: ``[K]`` fp32. One ``lerp_`` (c + (1 - m)(batch_center - c)),
    as `fdino.ema_update_` does for the teacher: the training step calls this, so its rounding is
    the step's (``m c + (1 - m) b`` computed as written rounds differently).
    """
    return center.lerp_(batch_center, 1.0 - momentum)
