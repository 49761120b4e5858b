"""The reference code's warm-ups (``lr_warmup="official"``, ``teacher_temp_warmup="per_epoch"``) equal, step for
step, numpy re-implementations of facebookresearch/dino's ``utils.cosine_scheduler`` and DINOLoss's
teacher-temperature table, written here from their equations; fdino's weight decay and teacher momentum
equal ``cosine_scheduler`` without warm-up as they are. The new fields are schedule-only: they never
change the compiled graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fdino import presets, schedules
from fdino.step import graph_config


def official_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """utils.cosine_scheduler: np.linspace(start, base, W) over the first W = warmup_epochs * niter_per_ep
    iterations, then final + (base - final) (1 + cos(pi i / n)) / 2 over the n remaining ones."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    decay = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, decay))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def official_teacher_temp(warmup_teacher_temp, teacher_temp, warmup_epochs, epochs):
    """DINOLoss.teacher_temp_schedule: one value per epoch."""
    return np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
            np.ones(epochs - warmup_epochs) * teacher_temp,
        )
    )


def _values(fn, cfg):
    return fn(cfg, torch.arange(cfg.total_steps)).double().numpy()


def _official_cfg(epochs, niter, warmup, temp_warmup):
    return presets.smoke(
        epochs=epochs,
        steps_per_epoch=niter,
        batch_size=4,
        lr=0.03,
        min_lr=1e-6,
        warmup_epochs=float(warmup),
        lr_warmup="official",
        weight_decay=0.04,
        weight_decay_end=0.4,
        teacher_momentum=0.996,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=float(temp_warmup),
        teacher_temp_warmup="per_epoch",
    )


@given(
    epochs=st.integers(2, 12),
    niter=st.integers(1, 9),
    warmup=st.integers(0, 3),
    temp_warmup=st.integers(0, 4),
)
def test_schedules_equal_the_reference_code_step_for_step(epochs, niter, warmup, temp_warmup):
    warmup, temp_warmup = min(warmup, epochs - 1), min(temp_warmup, epochs)
    cfg = _official_cfg(epochs, niter, warmup, temp_warmup)
    peak = 0.03 * cfg.batch_size / 256.0
    # fdino's schedules are fp32 tensors: compare with the float64 reference rounded to fp32 (1 ulp).
    want = {
        "lr": official_cosine_scheduler(peak, 1e-6, epochs, niter, warmup_epochs=warmup),
        "wd": official_cosine_scheduler(0.04, 0.4, epochs, niter),
        "momentum": official_cosine_scheduler(0.996, 1.0, epochs, niter),
        "teacher_temp": official_teacher_temp(0.04, 0.07, temp_warmup, epochs)[np.arange(epochs * niter) // niter],
    }
    got = {
        "lr": _values(schedules.learning_rate, cfg),
        "wd": _values(schedules.weight_decay, cfg),
        "momentum": _values(schedules.teacher_momentum, cfg),
        "teacher_temp": _values(schedules.teacher_temperature, cfg),
    }
    for name in want:
        np.testing.assert_allclose(got[name], want[name].astype(np.float32), rtol=1.2e-7, atol=0, err_msg=name)


def test_the_official_warm_up_peaks_one_step_earlier_than_fdinos():
    """Step W - 1 is the peak in the reference code; fdino's default ramp reaches it at W (a real difference
    the test above would see)."""
    cfg = _official_cfg(epochs=10, niter=5, warmup=2, temp_warmup=3)
    warm = schedules.warmup_steps(cfg)
    assert warm == 10
    assert float(schedules.learning_rate(cfg, warm - 1)) == pytest.approx(cfg.peak_lr, rel=1e-7)
    fdino_ramp = cfg.replace(lr_warmup="fdino")
    assert float(schedules.learning_rate(fdino_ramp, warm - 1)) == pytest.approx(cfg.peak_lr * 9 / 10, rel=1e-7)
    # Per epoch: constant within an epoch, jumping at its end; per step: a new value every step.
    per_epoch = _values(schedules.teacher_temperature, cfg)[:15]
    assert np.all(per_epoch[:5] == np.float32(0.04)) and np.all(per_epoch[10:15] == np.float32(0.07))
    assert per_epoch[5] == pytest.approx(0.055, rel=1e-6)
    per_step = _values(schedules.teacher_temperature, cfg.replace(teacher_temp_warmup="per_step"))[:15]
    assert len(set(per_step.tolist())) == 15


def test_a_single_warm_up_step_or_epoch_starts_at_the_warm_up_value():
    """np.linspace(a, b, 1) is [a]: W = 1 gives lr 0 at step 0, one warm-up epoch gives the start value."""
    cfg = _official_cfg(epochs=3, niter=1, warmup=1, temp_warmup=1)
    assert float(schedules.learning_rate(cfg, 0)) == 0.0
    assert float(schedules.learning_rate(cfg, 1)) == pytest.approx(cfg.peak_lr, rel=1e-7)
    assert [float(schedules.teacher_temperature(cfg, s)) for s in range(3)] == pytest.approx([0.04, 0.07, 0.07])


def test_warm_up_forms_are_schedule_only_fields():
    """Changing them reuses the compiled graph (fdino.step.SCHEDULE_FIELDS)."""
    cfg = presets.smoke()
    changed = cfg.replace(lr_warmup="official", teacher_temp_warmup="per_epoch", warmup_teacher_temp_epochs=1.0)
    assert graph_config(changed) == graph_config(cfg)
    assert graph_config(cfg.replace(optimizer="sgd")) != graph_config(cfg)  # the optimizer is structure


def test_the_defaults_are_fdinos_warm_ups():
    cfg = presets.smoke()
    assert (cfg.lr_warmup, cfg.teacher_temp_warmup, cfg.optimizer, cfg.optimizer_momentum) == (
        "fdino",
        "per_step",
        "adamw",
        0.9,
    )
