"""Schedules against their closed forms at the boundaries; EMA, clipping and freezing pieces."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ema_update_reference_
from hypothesis import given
from hypothesis import strategies as st

from fdino import DinoConfig, ema_update_, schedules
from fdino.optim import adamw_frozen_aware_, clip_grads_per_param_

CFG = DinoConfig(
    epochs=10,
    steps_per_epoch=100,
    batch_size=512,
    lr=5e-4,
    min_lr=1e-6,
    warmup_epochs=2.0,
    weight_decay=0.04,
    weight_decay_end=0.4,
    teacher_momentum=0.996,
    teacher_momentum_end=1.0,
    warmup_teacher_temp=0.04,
    teacher_temp=0.07,
    warmup_teacher_temp_epochs=3.0,
    freeze_last_layer=1.0,
)


def value(fn, step):
    return float(fn(CFG, torch.tensor(step, dtype=torch.int64)))


def test_learning_rate_boundaries():
    peak = 5e-4 * 512 / 256
    assert value(schedules.learning_rate, 0) == 0.0
    assert value(schedules.learning_rate, 100) == pytest.approx(peak / 2, rel=1e-6)
    assert value(schedules.learning_rate, 200) == pytest.approx(peak, rel=1e-6)  # end of warm-up: the peak
    mid = 200 + (1000 - 200) // 2
    assert value(schedules.learning_rate, mid) == pytest.approx((peak + 1e-6) / 2, rel=1e-6)
    assert value(schedules.learning_rate, 1000) == pytest.approx(1e-6, rel=1e-5)
    assert value(schedules.learning_rate, 5000) == pytest.approx(1e-6, rel=1e-5)  # holds after the end


def test_weight_decay_and_momentum_boundaries():
    assert value(schedules.weight_decay, 0) == pytest.approx(0.04)
    assert value(schedules.weight_decay, 500) == pytest.approx(0.22)
    assert value(schedules.weight_decay, 1000) == pytest.approx(0.4)
    assert value(schedules.teacher_momentum, 0) == pytest.approx(0.996)
    assert value(schedules.teacher_momentum, 500) == pytest.approx(0.998)
    assert value(schedules.teacher_momentum, 1000) == 1.0


def test_teacher_temperature_and_freezing_boundaries():
    assert value(schedules.teacher_temperature, 0) == pytest.approx(0.04)
    assert value(schedules.teacher_temperature, 150) == pytest.approx(0.055)
    assert value(schedules.teacher_temperature, 300) == pytest.approx(0.07)
    assert value(schedules.teacher_temperature, 999) == pytest.approx(0.07)
    assert bool(schedules.last_layer_frozen(CFG, torch.tensor(99)))
    assert not bool(schedules.last_layer_frozen(CFG, torch.tensor(100)))


@given(st.integers(0, 1200))
def test_schedules_match_closed_forms_everywhere(step):
    peak, total, warm = 5e-4 * 2, 1000, 200
    s = min(step, total)
    lr = (
        peak * step / warm
        if step < warm
        else 1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
    )
    assert value(schedules.learning_rate, step) == pytest.approx(lr, rel=1e-5, abs=1e-9)
    m = 1 - (1 - 0.996) * (1 + math.cos(math.pi * s / total)) / 2
    assert value(schedules.teacher_momentum, step) == pytest.approx(m, rel=1e-7)


def test_schedule_values_are_device_tensors_of_the_step():
    step = torch.tensor(7)
    for name, v in schedules.all_schedules(CFG, step).items():
        assert isinstance(v, torch.Tensor) and v.ndim == 0 and v.dtype == torch.float32, name


def test_ema_momentum_one_is_identity_and_zero_copies():
    teacher = [torch.randn(3, 4), torch.randn(5)]
    student = [torch.randn(3, 4), torch.randn(5)]
    before = [t.clone() for t in teacher]
    ema_update_(teacher, student, torch.tensor(1.0))
    assert all(torch.equal(t, b) for t, b in zip(teacher, before))
    ema_update_(teacher, student, torch.tensor(0.0))
    assert all(torch.equal(t, s) for t, s in zip(teacher, student))


@given(st.floats(0.0, 1.0), st.integers(0, 1000))
def test_fused_ema_equals_per_parameter_loop(momentum, seed):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(4, 3, generator=g), torch.randn(7, generator=g)]
    student = [torch.randn(4, 3, generator=g), torch.randn(7, generator=g)]
    fused = [t.clone() for t in teacher]
    ema_update_(fused, student, torch.tensor(momentum))
    ema_update_reference_(teacher, student, torch.tensor(momentum, dtype=torch.float32).item())
    for a, b in zip(fused, teacher):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_per_parameter_clipping_matches_the_reference_semantics():
    grads = [torch.full((4,), 3.0), torch.full((2,), 0.1)]  # norms 6 and ~0.14
    total = clip_grads_per_param_(grads, 3.0)
    assert float(total) == pytest.approx(math.sqrt(36 + 0.02), rel=1e-6)
    assert float(grads[0].norm()) == pytest.approx(3.0 * 6 / (6 + 1e-6), rel=1e-6)  # clipped on its own
    assert torch.equal(grads[1], torch.full((2,), 0.1))  # below the threshold: untouched


def test_frozen_group_is_left_completely_untouched():
    params, grads = [torch.randn(3, 2)], [torch.randn(3, 2)]
    m, v, count = [torch.randn(3, 2)], [torch.rand(3, 2)], [torch.tensor(4.0)]
    before = [t.clone() for t in (*params, *m, *v, *count)]
    kw = dict(lr=torch.tensor(0.1), wd=torch.tensor(0.1), regularized=[True], betas=(0.9, 0.999), eps=1e-8)
    adamw_frozen_aware_(params, grads, m, v, count, frozen=torch.tensor(True), **kw)
    assert all(torch.equal(a, b) for a, b in zip((*params, *m, *v, *count), before))
    adamw_frozen_aware_(params, grads, m, v, count, frozen=torch.tensor(False), **kw)
    assert not torch.equal(params[0], before[0]) and float(count[0]) == 5.0
