"""`fdino train` warns once, with fixes, when the teacher collapses; a healthy run does not.

Two ways to collapse (paper sec. 5.3): without centering one dimension takes over (one-hot
teacher), and with a teacher softer than the student the outputs flatten (uniform teacher).
"""

from __future__ import annotations

import warnings

import pytest

from fdino import collapse_report, presets
from fdino.train import TrainOptions, run

# A tiny ViT on 16 px crops of the built-in data set: a few hundred steps take seconds.
BASE = presets.smoke(batch_size=16, lr=0.02, warmup_epochs=0.0, epochs=1, freeze_last_layer=0.0)


def train(tmp_path, name, cfg, steps=200):
    opts = TrainOptions(
        data="shapes10",
        run_dir=str(tmp_path / name),
        compile=False,
        workers=0,
        log_every=10,
        ckpt_every=10**6,
        max_steps=steps,
        eval_samples=100,
        progress=False,
        tensorboard=False,
        attention_images=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(cfg, opts)
    return summary, [w for w in caught if "collapse warning" in str(w.message)]


@pytest.mark.parametrize(
    "name,changes,expected",
    [
        ("no_centering", dict(center_momentum=1.0), "one dimension dominates"),
        ("soft_teacher", dict(teacher_temp=0.3, warmup_teacher_temp=0.3, student_temp=0.1), "uniform teacher"),
    ],
)
def test_collapsing_configurations_warn_once_with_fixes(tmp_path, name, changes, expected):
    summary, caught = train(tmp_path, name, BASE.replace(**changes))
    assert len(caught) == 1, "warn exactly once"
    assert expected in summary["collapse_warning"] and "Likely fixes" in summary["collapse_warning"]


def test_default_configuration_does_not_warn(tmp_path):
    summary, caught = train(tmp_path, "default", BASE)
    assert caught == [] and summary["collapse_warning"] is None


@pytest.mark.parametrize(
    "metrics,expected",
    [
        ({"teacher_entropy": 4.158, "kl": 0.001, "teacher_effective_dims": 64.0}, "uniform teacher"),
        ({"teacher_entropy": 0.0, "kl": 0.002, "teacher_effective_dims": 1.0}, "one dimension dominates"),
        # A small network early in a healthy run: flat-ish teacher but still teaching (KL well above 0).
        ({"teacher_entropy": 3.98, "kl": 0.06, "teacher_effective_dims": 62.0}, None),
        ({"teacher_entropy": 4.158, "kl": 0.3, "teacher_effective_dims": 64.0}, None),
    ],
)
def test_collapse_report_thresholds(metrics, expected):
    message = collapse_report(metrics, out_dim=64)
    assert (message is None) if expected is None else (expected in message)
