"""fdino's functional train_step equals the classic imperative DINO step (fp32, CPU, eager)."""

from __future__ import annotations

import pytest
import torch
from classic_dino import ClassicDino

import fdino
from fdino import presets

# Nonzero lr from the first step, the last layer frozen for exactly the first step, and a teacher
# temperature warm-up, so every scheduled mechanism differs between the three steps.
VIT = presets.smoke(
    lr=0.05,
    warmup_epochs=0.0,
    freeze_last_layer=0.2,
    warmup_teacher_temp=0.02,
    teacher_temp=0.06,
    warmup_teacher_temp_epochs=0.4,
    weight_decay=0.1,
    clip_grad=0.5,
)
# A BatchNorm ResNet with the paper's ResNet head options. Some of its gradient entries are
# rounding noise (~1e-8: a bias before BatchNorm, dead channels), and Adam's first step moves any
# entry with |g| >> eps by about lr * sign(g), so fp32 noise would become lr-sized differences
# between two correct implementations. A larger eps keeps noise-level entries from moving.
RESNET = VIT.replace(
    arch="resnet18",
    patch_size=None,
    head_use_bn=True,
    norm_last_layer=False,
    adam_eps=1e-3,
    backbone_kwargs=(("layers", (1, 1, 1, 1)), ("channels", (8, 8, 16, 16)), ("stem_width", 8)),
)


def make_batches(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    return [[torch.randn(cfg.batch_size, 3, s, s, generator=g) for s in sizes] for _ in range(n)]


@pytest.mark.parametrize("cfg", [VIT, RESNET], ids=["vit", "resnet"])
def test_three_steps_equal_the_classic_implementation(cfg):
    state = fdino.init_state(cfg, device="cpu")
    classic = ClassicDino(cfg, state.student, state.student_buffers)
    for batch in make_batches(cfg, 3):
        classic_loss = classic.step(batch)
        state, metrics = fdino.train_step_eager(state, batch)
        assert float(metrics["loss"]) == pytest.approx(classic_loss, rel=1e-5)
    student = dict(classic.student.named_parameters())
    teacher = dict(classic.teacher.named_parameters())
    for name in state.student:
        mine, ref = (state.student[name], student[name].detach()), (state.teacher[name], teacher[name])
        if name.endswith("attn.qkv.bias"):
            # The key third of qkv.bias has an analytically zero gradient (softmax ignores a shift shared by
            # every key), so its gradient is fp32 noise that Adam scales up towards lr-sized steps: on CPUs
            # without AVX-512 the two implementations' noise differs by ~1.1e-5 there (<= 1.2e-6 elsewhere).
            for ours, theirs in (mine, ref):
                dim = ours.numel() // 3
                key = slice(dim, 2 * dim)
                torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-4, msg=name)
                ours, theirs = ours.clone(), theirs.clone()
                ours[key] = theirs[key] = 0  # the query and value thirds keep the tolerance below
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=name)
            continue
        torch.testing.assert_close(*mine, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(*ref, rtol=0, atol=1e-5, msg=name)
    for name, buf in classic.student.named_buffers():
        torch.testing.assert_close(state.student_buffers[name].float(), buf.float(), rtol=0, atol=1e-5, msg=name)
    for name, buf in classic.teacher.named_buffers():
        torch.testing.assert_close(state.teacher_buffers[name].float(), buf.float(), rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(state.center, classic.center[0], rtol=0, atol=1e-5)
    assert int(state.step) == 3


def test_last_layer_is_frozen_for_the_configured_steps_only():
    state = fdino.init_state(VIT, device="cpu")
    before = state.student["head.last_layer.weight_v"].clone()
    batches = make_batches(VIT, 2)
    state, _ = fdino.train_step_eager(state, batches[0])
    assert torch.equal(state.student["head.last_layer.weight_v"], before)
    assert float(state.opt.count["head.last_layer.weight_v"]) == 0.0
    assert float(state.opt.exp_avg["head.last_layer.weight_v"].abs().sum()) == 0.0
    state, _ = fdino.train_step_eager(state, batches[1])
    assert not torch.equal(state.student["head.last_layer.weight_v"], before)
    assert float(state.opt.count["head.last_layer.weight_v"]) == 1.0
