"""`LoopState`: the loop's host-side state as checkpoints store it, older checkpoints included."""

from __future__ import annotations

import pytest

from fdino import init_state, presets
from fdino.checkpoint import load_checkpoint, save_checkpoint
from fdino.loop_state import COLLAPSE_READINGS, KnnReading, LoopState, StepTimer

# What `fdino train` wrote into ckpt["loop"] before LoopState (a labeled run, no collapse reading yet).
OLD_LOOP = {
    "step": 16,
    "elapsed": 12.5,
    "images": 64,
    "history": [{"step": 0, "knn_top1": 12.5}],
    "knn_init": 12.5,
    "knn_raw_pixels": 30.0,
    "epoch": 2,
    "batch": 4,
}


def test_reads_the_loop_dict_of_older_checkpoints():
    loop = LoopState.from_dict(OLD_LOOP, steps_per_epoch=6)
    assert (loop.step, loop.epoch, loop.batch, loop.images, loop.elapsed) == (16, 2, 4, 64, 12.5)
    assert loop.knn_history == (KnnReading(step=0, top1=12.5),)
    assert (loop.knn_init, loop.knn_raw_pixels, loop.collapse_streak, loop.collapse_warning) == (12.5, 30.0, 0, None)
    unlabeled = LoopState.from_dict(
        {"step": 3, "elapsed": 1.0, "images": 12, "history": [], "epoch": 0, "batch": 3}, steps_per_epoch=6
    )
    assert unlabeled.knn_init is None and unlabeled.knn_history == ()


def test_round_trips_through_a_checkpoint_file(tmp_path):
    state = init_state(presets.smoke())
    loop = LoopState(steps_per_epoch=5, images=8, elapsed=3.0).with_knn(0, 20.0)
    loop, _ = loop.with_collapse_reading("collapse warning: x")
    saved = save_checkpoint(tmp_path, state, loop.to_dict())
    _, raw = load_checkpoint(saved)
    assert LoopState.from_dict(raw, steps_per_epoch=5) == loop
    assert {**OLD_LOOP, "skipped_batches": 0, "collapse_streak": 0, "collapse_warning": None} == LoopState.from_dict(
        OLD_LOOP, steps_per_epoch=6
    ).to_dict()  # the same keys as before


def test_a_changed_epoch_length_or_an_unknown_key_is_refused():
    with pytest.raises(ValueError, match="batches per epoch"):
        LoopState.from_dict(OLD_LOOP, steps_per_epoch=5)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra'\]"):
        LoopState.from_dict({**OLD_LOOP, "extra": 1}, steps_per_epoch=6)
    with pytest.raises(ValueError, match="no 'step'"):
        LoopState.from_dict({}, steps_per_epoch=6)


def test_steps_knn_and_collapse_readings():
    loop = LoopState(steps_per_epoch=4)
    for _ in range(5):
        loop = loop.after_step(images=8)
    assert (loop.step, loop.images, loop.epoch, loop.batch) == (5, 40, 1, 1)
    loop = loop.with_knn(5, 10.0).with_knn(5, 11.0)  # a second reading at a step replaces the first
    assert loop.knn_history == (KnnReading(step=5, top1=11.0),)
    warned = []
    for message in ["m"] * (COLLAPSE_READINGS - 1) + [None] + ["m"] * (COLLAPSE_READINGS + 2):
        loop, warn = loop.with_collapse_reading(message)
        warned.append(warn)
    assert warned.count(True) == 1 and warned.index(True) == 2 * COLLAPSE_READINGS - 1  # after a full streak, once
    assert loop.collapse_warning == "m"


def test_step_timer_times_the_first_step_alone():
    timer = StepTimer.start()
    assert timer.images_per_s(4) == 0.0
    timer = timer.after_step(timer.started)
    assert timer.first_step_s is not None and timer.steady_steps == 0 and timer.images_per_s(4) == 0.0
    timer = timer.after_step(0.0).after_step(0.0)
    assert timer.steady_steps == 2 and timer.images_per_s(4) > 0
