"""Fused DINO loss (paper eq. 1 and Algorithm 1) as Triton kernels: launcher and autograd wrapper.

``dino_loss_triton`` has the semantics of ``fdino.loss.dino_loss_reference`` for two global crops:
it returns ``(loss, batch_center)`` and sends gradients to the student logits only (the teacher and
the center are stop-gradient targets). It reads each student row once in the forward and once in
the backward, computes one log-sum-exp per student row instead of one per (teacher, student) pair,
never materializes log-probabilities, and writes the gradient directly:

    per image:  sum_{i != j} H(q_i, p_j) = sum_j [ n_j * lse(s_j / tau_s) - <Qbar_j, s_j> / tau_s ]
    dL/ds_j   = g * (n_j * p_j - Qbar_j) / (tau_s * P * B)

with ``Qbar_j = sum_{i != j} q_i``, ``n_j`` the number of teachers paired with crop j and
``P = 2 * (V - 1)`` pairs (see ``_dino_loss_kernels`` for the overflow-free form actually summed).

Structure (works under ``torch.compile`` and ``torch.func.grad``):
- two ``torch.library.custom_op`` ops, ``fdino::dino_loss_fwd`` and ``fdino::dino_loss_bwd``, launch
  the kernels; dynamo treats them as opaque and traces shapes through their ``register_fake``
  implementations, so the same code runs compiled, eager, on a GPU, or on CPU tensors in the Triton
  interpreter (``TRITON_INTERPRET=1``);
- ``_DinoLossFunction``, an ``autograd.Function`` in the ``forward`` + ``setup_context`` form (the
  form ``torch.func`` accepts), ties them together.

Launches per call: forward 3 (partials, combine, finalize), backward 1. Bytes per call (s = bytes
per student element): forward reads S once (V*B*K*s) and T twice (2 * 2B*K*4: once for the loss
statistics, once for the batch center), backward reads S and T once and writes dS (V*B*K*s).
``KERNEL_LAUNCHES`` counts launches per kernel; ``launch_count()`` sums them.

Limits: 2 <= V <= 16 crops, exactly 2 global crops; the gradient is not itself differentiable (no
double backward) and there is no vmap rule. K a multiple of 16 (and 16-byte aligned tensors) is
the fast path: Triton then vectorizes the loads and pipelines the K loop; other K are correct but
slower. Launch configurations were chosen from register and shared-memory counts of the compiled
kernels (sm_90), not tuned by timing.
"""

import collections
import math
import os
from typing import NamedTuple

import torch
import triton

from fdino.checks import check_int, is_int
from fdino.loss_inputs import KERNEL_MAX_CROPS, Temperature, check_loss_inputs

from ._dino_loss_kernels import _bwd_kernel, _fwd_combine_kernel, _fwd_finalize_kernel, _fwd_partials_kernel

__all__ = [
    "KERNEL_LAUNCHES",
    "MAX_CROPS",
    "LaunchConfig",
    "dino_loss_triton",
    "dino_loss_triton_unchecked",
    "launch_config",
    "launch_count",
]

MAX_CROPS = KERNEL_MAX_CROPS  # V_PAD <= 16 rows of a [V_PAD, BLOCK_K] tile; fdino.loss_inputs says why
MAX_SPLIT = 128  # K-chunks per image in the forward (the combine step holds them all in one tile)
_TILE_ELEMS = 4096  # elements of one [V_PAD, BLOCK_K] student tile: 16 per thread with 8 warps
_TARGET_PROGRAMS = 2048  # forward programs to aim for: ~5 waves of 132 SMs x 3 resident, a short tail
_CENTER_BLOCK_C = 128  # batch center: columns per program
_CENTER_BLOCK_R = 32  # batch center: rows per step of the in-order row loop

KERNEL_LAUNCHES: collections.Counter = collections.Counter()


def launch_count(name: str | None = None) -> int:
    """Triton launches so far: of kernel ``name`` (e.g. ``"_bwd_kernel"``), or of all of them."""
    return KERNEL_LAUNCHES[name] if name is not None else sum(KERNEL_LAUNCHES.values())


class LaunchConfig(NamedTuple):
    """Pinned launch configuration (no autotuning: reproducible, and safe under ``torch.compile``).

    block_k: columns of one K tile (a power of two >= 16), forward and backward.
    n_split: K-chunks per image in the forward (1..MAX_SPLIT); chunks are combined in a fixed order.
    """

    block_k: int
    n_split: int


def launch_config(n_crops: int, batch: int, k: int) -> LaunchConfig:
    """The configuration ``dino_loss_triton`` uses for V = ``n_crops``, B = ``batch``, K = ``k``.

    It depends on the shape only (not on the device), so a given shape always reduces in the same
    order. Chosen by reasoning about register use and occupancy, not tuned on hardware.
    """
    v_pad = triton.next_power_of_2(n_crops)
    block_k = min(_TILE_ELEMS // v_pad, max(16, triton.next_power_of_2(k)))
    n_tiles = triton.cdiv(k, block_k)
    n_split = min(n_tiles, MAX_SPLIT, triton.cdiv(_TARGET_PROGRAMS, batch))
    return LaunchConfig(block_k=block_k, n_split=n_split)


def _launch(kernel, grid, *args, **meta) -> None:
    KERNEL_LAUNCHES[kernel.__name__] += 1
    kernel[grid](*args, **meta)


# ----------------------------------------------------------------------------- forward op


@torch.library.custom_op("fdino::dino_loss_fwd", mutates_args=())
def _dino_loss_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: torch.Tensor,
    teacher_temp: torch.Tensor,
    block_k: int,
    n_split: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss ``[]``, batch center ``[K]``, student row stats ``[V*B, 2]``, teacher row stats ``[2B, 2]``.

    Row stats are (max of the row in logit units, log2 of the sum of exp((x - max) / tau)), all fp32.
    Inputs are contiguous, teacher and center fp32, temperatures 0-d fp32 on the same device.
    """
    rows, k = student.shape
    batch = teacher.shape[0] // 2
    n_crops = rows // batch
    v_pad = triton.next_power_of_2(n_crops)
    # Every chunk gets at least one tile, so every chunk sees valid columns.
    n_tiles = triton.cdiv(k, block_k)
    tiles_per_split = triton.cdiv(n_tiles, min(n_split, n_tiles))
    n_split = triton.cdiv(n_tiles, tiles_per_split)

    f32 = dict(dtype=torch.float32, device=student.device)
    stud_part = torch.empty((batch, n_split, 2, v_pad), **f32)
    teach_part = torch.empty((batch, n_split, 2, 2), **f32)
    dots_part = torch.empty((batch, n_split, 2, v_pad), **f32)
    stats_s = torch.empty((rows, 2), **f32)
    stats_t = torch.empty((2 * batch, 2), **f32)
    img_loss = torch.empty((batch,), **f32)
    loss = torch.empty((), **f32)
    batch_center = torch.empty((k,), **f32)

    warps = 8 if v_pad * block_k >= _TILE_ELEMS else 4
    _launch(
        _fwd_partials_kernel,
        (n_split, batch),
        student,
        teacher,
        center,
        student_temp,
        teacher_temp,
        stud_part,
        teach_part,
        dots_part,
        batch,
        n_crops,
        k,
        n_split,
        tiles_per_split,
        BLOCK_K=block_k,
        V_PAD=v_pad,
        num_warps=warps,
    )
    _launch(
        _fwd_combine_kernel,
        (batch,),
        stud_part,
        teach_part,
        dots_part,
        student_temp,
        teacher_temp,
        stats_s,
        stats_t,
        img_loss,
        batch,
        n_crops,
        n_split,
        SPLIT_PAD=triton.next_power_of_2(n_split),
        V_PAD=v_pad,
        num_warps=4,
    )
    n_pairs = 2 * (n_crops - 1)
    _launch(
        _fwd_finalize_kernel,
        (triton.cdiv(k, _CENTER_BLOCK_C),),
        teacher,
        img_loss,
        loss,
        batch_center,
        2 * batch,
        batch,
        k,
        n_pairs * batch,
        BLOCK_R=min(_CENTER_BLOCK_R, triton.next_power_of_2(2 * batch)),
        BLOCK_C=_CENTER_BLOCK_C,
        BLOCK_B=min(1024, triton.next_power_of_2(batch)),
        num_warps=4,
    )
    return loss, batch_center, stats_s, stats_t


@_dino_loss_fwd.register_fake
def _dino_loss_fwd_fake(student, teacher, center, student_temp, teacher_temp, block_k, n_split):
    f32 = torch.float32
    return (
        student.new_empty((), dtype=f32),
        student.new_empty((student.shape[1],), dtype=f32),
        student.new_empty((student.shape[0], 2), dtype=f32),
        student.new_empty((teacher.shape[0], 2), dtype=f32),
    )


# ----------------------------------------------------------------------------- backward op


@torch.library.custom_op("fdino::dino_loss_bwd", mutates_args=())
def _dino_loss_bwd(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    stats_s: torch.Tensor,
    stats_t: torch.Tensor,
    student_temp: torch.Tensor,
    teacher_temp: torch.Tensor,
    block_k: int,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. the student logits, ``[V*B, K]`` in the student's dtype.

    ``grad_loss`` (0-d) is read by the kernel itself, so no value crosses to the host.
    """
    rows, k = student.shape
    batch = teacher.shape[0] // 2
    n_crops = rows // batch
    v_pad = triton.next_power_of_2(n_crops)
    grad_student = torch.empty_like(student)
    _launch(
        _bwd_kernel,
        (triton.cdiv(k, block_k), batch),
        grad_loss,
        student,
        teacher,
        center,
        student_temp,
        teacher_temp,
        stats_s,
        stats_t,
        grad_student,
        batch,
        n_crops,
        k,
        2 * (n_crops - 1),
        BLOCK_K=block_k,
        V_PAD=v_pad,
        num_warps=8 if v_pad * block_k >= _TILE_ELEMS else 4,
    )
    return grad_student


@_dino_loss_bwd.register_fake
def _dino_loss_bwd_fake(grad_loss, student, teacher, center, stats_s, stats_t, student_temp, teacher_temp, block_k):
    return torch.empty_like(student)


# ----------------------------------------------------------------------------- autograd


class _DinoLossFunction(torch.autograd.Function):
    """(student, teacher, center, tau_s, tau_t, block_k, n_split) -> (loss, batch_center, stats_s, stats_t).

    Only the student logits get a gradient; batch_center and the row stats are marked
    non-differentiable. ``forward`` + ``setup_context`` (not ``forward(ctx, ...)``) so that
    ``torch.func.grad`` and ``torch.compile`` can both trace it.
    """

    @staticmethod
    def forward(student, teacher, center, student_temp, teacher_temp, block_k, n_split):
        return torch.ops.fdino.dino_loss_fwd(student, teacher, center, student_temp, teacher_temp, block_k, n_split)

    @staticmethod
    def setup_context(ctx, inputs, output):
        student, teacher, center, student_temp, teacher_temp, block_k, _ = inputs
        _, batch_center, stats_s, stats_t = output
        ctx.save_for_backward(student, teacher, center, stats_s, stats_t, student_temp, teacher_temp)
        ctx.block_k = block_k
        ctx.mark_non_differentiable(batch_center, stats_s, stats_t)

    @staticmethod
    def backward(ctx, grad_loss, grad_center, grad_stats_s, grad_stats_t):
        # Detached: the gradient is not itself differentiable (DINO needs no double backward), and
        # under torch.func the saved student still requires grad at the transform's level, which
        # would route the op through an autograd wrapper that torch.func rejects.
        saved = [t.detach() for t in ctx.saved_tensors]
        grad_student = torch.ops.fdino.dino_loss_bwd(grad_loss.detach().contiguous(), *saved, ctx.block_k)
        return grad_student, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public entry


def dino_loss_triton(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    *,
    student_temp: Temperature,
    teacher_temp: Temperature,
    n_global_crops: int = 2,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused DINO loss; same arguments, results and gradients as ``fdino.loss.dino_loss_reference``.

    Args:
        student_logits: ``[V*B, K]`` crop-major, fp32/bf16/fp16 (fp64 is computed in fp32, as the
            reference does); 2 <= V <= 16, any K >= 1. Non-contiguous inputs are copied.
        teacher_logits: ``[2*B, K]``; upcast to fp32; no gradient.
        center: ``[K]``; upcast to fp32; no gradient.
        student_temp, teacher_temp: Python floats or 1-element tensors (read on the device, so a
            schedule never recompiles a compiled step; their positivity is then the caller's job).
        n_global_crops: must be 2 (the kernel hard-codes the two teacher rows per image).
        config: launch configuration; ``None`` (the default) uses the pinned ``launch_config``.
            Tests pass small tiles to exercise the multi-tile and multi-chunk paths.

    Returns:
        ``loss``: 0-d fp32 (eq. 1 averaged over the 2(V-1) pairs and B images);
        ``batch_center``: ``[K]`` fp32 column mean of the teacher logits.
    """
    _require_two_global_crops(n_global_crops)  # first: the row checks below assume the kernel's layout
    batch = check_loss_inputs(student_logits, teacher_logits, center, student_temp, teacher_temp, n_global_crops)
    return dino_loss_triton_unchecked(
        student_logits,
        teacher_logits,
        center,
        student_temp=student_temp,
        teacher_temp=teacher_temp,
        n_global_crops=n_global_crops,
        batch=batch,
        config=config,
    )


def dino_loss_triton_unchecked(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    *,
    student_temp: Temperature,
    teacher_temp: Temperature,
    n_global_crops: int,
    batch: int,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dino_loss_triton` for inputs that already passed ``check_loss_inputs`` (``batch``: what it returned).

    ``fdino.loss.dino_loss`` validates its inputs once and then calls this; only what is specific to
    the kernel (two global crops, K >= 1, at most MAX_CROPS crops, one device, the launch config)
    is checked here. Call `dino_loss_triton` instead unless you ran ``check_loss_inputs`` yourself.
    """
    _require_two_global_crops(n_global_crops)
    rows, k = student_logits.shape
    n_crops = rows // batch
    if k == 0:
        raise ValueError("dino_loss_triton: K must be >= 1, got K=0")
    if n_crops > MAX_CROPS:
        raise ValueError(
            f"dino_loss_triton: V={n_crops} crops is more than the kernel's maximum of {MAX_CROPS}; "
            "use impl='reference'"
        )
    device = student_logits.device
    for name, t in (("teacher_logits", teacher_logits), ("center", center)):
        if t.device != device:
            raise ValueError(f"dino_loss_triton: {name} is on {t.device} but student_logits is on {device}")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "dino_loss_triton: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before "
            "triton is imported); otherwise use impl='reference' or CUDA tensors"
        )
    if config is None:
        config = launch_config(n_crops, batch, k)
    _check_config(config)

    loss, batch_center, _, _ = _DinoLossFunction.apply(
        student_logits.contiguous(),
        teacher_logits.detach().to(torch.float32).contiguous(),
        center.detach().to(torch.float32).contiguous(),
        _temperature(student_temp, device),
        _temperature(teacher_temp, device),
        config.block_k,
        config.n_split,
    )
    return loss, batch_center


def _require_two_global_crops(n_global_crops: int) -> None:
    if n_global_crops != 2:
        raise ValueError(
            f"dino_loss_triton: n_global_crops must be 2 (the fused kernel pairs exactly two teacher crops "
            f"per image), got {n_global_crops!r}; use impl='reference' for other values"
        )


def _temperature(temp: Temperature, device: torch.device) -> torch.Tensor:
    """A 0-d fp32 tensor on ``device``: floats become constants, tensors are read by the kernels."""
    if isinstance(temp, torch.Tensor):
        return temp.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), float(temp), dtype=torch.float32, device=device)


def _check_config(config: LaunchConfig) -> None:
    block_k, n_split = config
    if not (is_int(block_k) and block_k >= 16 and math.log2(block_k).is_integer()):
        raise ValueError(f"dino_loss_triton: config.block_k must be a power of two >= 16, got {block_k!r}")
    check_int("dino_loss_triton: config.n_split", n_split, 1, MAX_SPLIT)
