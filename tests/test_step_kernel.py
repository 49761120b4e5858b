"""The compiled train_step with the fused Triton loss kernel (interpreter on CPU) matches the
step with the reference loss, and really launches the kernel."""

from __future__ import annotations

import torch

import fdino
from fdino import presets
from fdino.kernels.dino_loss import MAX_CROPS, launch_count
from fdino.loss import KERNEL_MAX_CROPS, kernel_applies, resolve_impl

# Tiny shapes (the interpreter is slow); adam_eps: see test_step_compiled (noise-level gradients).
KERNEL_CFG = presets.smoke(loss_impl="triton", lr=0.05, warmup_epochs=0.0, adam_eps=1e-5, out_dim=48)
REFERENCE_CFG = KERNEL_CFG.replace(loss_impl="reference")


def batches(n):
    g = torch.Generator().manual_seed(3)
    sizes = [KERNEL_CFG.global_crop_size] * 2 + [KERNEL_CFG.local_crop_size] * KERNEL_CFG.n_local_crops
    return [[torch.randn(KERNEL_CFG.batch_size, 3, s, s, generator=g) for s in sizes] for _ in range(n)]


def test_compiled_step_with_kernel_matches_reference_loss_step():
    data = batches(3)
    kernel_state = fdino.init_state(KERNEL_CFG, device="cpu")
    reference_state = fdino.init_state(REFERENCE_CFG, device="cpu")
    launches_before = launch_count()
    for batch in data:
        kernel_state, m_kernel = fdino.train_step(kernel_state, batch)
        reference_state, m_reference = fdino.train_step_eager(reference_state, batch)
        torch.testing.assert_close(m_kernel["loss"], m_reference["loss"], rtol=1e-5, atol=1e-6)
    # 3 forward launches + 1 backward launch per step: the compiled graph calls the kernel.
    assert launch_count() - launches_before == 4 * len(data)
    for name in kernel_state.student:
        torch.testing.assert_close(
            kernel_state.student[name], reference_state.student[name], rtol=1e-4, atol=1e-5, msg=name
        )
    torch.testing.assert_close(kernel_state.center, reference_state.center, rtol=1e-5, atol=1e-6)


def test_auto_falls_back_to_the_reference_where_the_kernel_does_not_apply():
    assert KERNEL_MAX_CROPS == MAX_CROPS
    assert resolve_impl("auto", torch.zeros(4 * 3, 8), torch.zeros(2 * 3, 8), 2) == "reference"  # CPU
    assert kernel_applies("cuda", 12, 2)
    assert not kernel_applies("cuda", MAX_CROPS + 1, 2)
    assert not kernel_applies("cuda", 12, 3)
    assert not kernel_applies("cpu", 12, 2)
