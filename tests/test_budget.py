"""Runs fitted to a budget (issue 21, item 1): parsing, the fit, the scaled schedule, one compiled graph for
every schedule, and a fitted run that equals the run of its length in steps and resumes onto it."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train_cli import COMMON, make_folder

import fdino
from fdino import checkpoint as ckpt
from fdino import cli, precision, schedules, train_budget
from fdino import step as step_module
from fdino.budget import MeasuredCosts, fit_schedule_steps, parse_budget, predicted_seconds
from fdino.distributed import DistInfo
from fdino.presets import preset
from fdino.train_budget import time_steps
from fdino.train_options import TrainOptions


@pytest.mark.parametrize(
    ("text", "seconds", "steps"),
    [("20m", 1200.0, None), ("2h", 7200.0, None), ("90s", 90.0, None), ("1.5h", 5400.0, None), ("5000", None, 5000),
     ("300 steps", None, 300)],
)  # fmt: skip
def test_budgets_read_as_times_or_steps(text, seconds, steps):
    budget = parse_budget(text)
    assert (budget.seconds, budget.steps) == (seconds, steps)


@pytest.mark.parametrize("text", ["20 minutes", "-5m", "0m", "0", "fast", "5e3"])
def test_a_bad_budget_names_the_forms_it_takes(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)
    with pytest.raises(ValueError, match="budget"):
        TrainOptions(budget=text)


costs_st = st.builds(
    MeasuredCosts,
    spent_s=st.floats(0, 200),
    step_s=st.floats(1e-3, 5),
    eval_s=st.floats(0, 60),
    checkpoint_s=st.floats(0, 5),
)


@settings(max_examples=200, deadline=None)
@given(costs=costs_st, budget_s=st.floats(60, 20000), eval_every=st.integers(0, 500), ckpt_every=st.integers(1, 500))
def test_the_fit_is_the_longest_schedule_that_fits(costs, budget_s, eval_every, ckpt_every):
    limit = 0.95 * budget_s
    try:
        n = fit_schedule_steps(budget_s, costs, eval_every=eval_every, ckpt_every=ckpt_every)
    except ValueError as err:
        assert predicted_seconds(1, costs, eval_every=eval_every, ckpt_every=ckpt_every) > limit
        assert "give at least" in str(err)
        return
    assert predicted_seconds(n, costs, eval_every=eval_every, ckpt_every=ckpt_every) <= limit
    assert predicted_seconds(n + 1, costs, eval_every=eval_every, ckpt_every=ckpt_every) > limit


def test_a_fitted_schedule_keeps_every_part_in_proportion():
    cfg = preset("smoke", epochs=10, steps_per_epoch=100, warmup_epochs=2.0, freeze_last_layer=1.0,
                 warmup_teacher_temp_epochs=5.0, teacher_momentum=0.99)  # fmt: skip
    fitted = cfg.replace(schedule_steps=250)  # a quarter of the 1,000-step schedule
    assert (fitted.total_steps, fitted.schedule_epoch_steps) == (250, 25.0)
    assert (schedules.warmup_steps(fitted), schedules.freeze_last_layer_steps(fitted)) == (50, 25)
    for a, b in [(0, 0), (100, 25), (200, 50), (600, 150), (1000, 250)]:
        full, short = schedules.all_schedules(cfg, a), schedules.all_schedules(fitted, b)
        for name in full:
            assert torch.allclose(full[name], short[name], rtol=1e-6, atol=1e-9), (name, a, b)
    assert float(schedules.learning_rate(fitted, 250)) == pytest.approx(cfg.min_lr)
    assert float(schedules.teacher_momentum(fitted, 250)) == 1.0
    # schedule_steps = 0 is the data's epochs exactly (no float drift into the step counts).
    assert cfg.schedule_epoch_steps == 100.0 and cfg.total_steps == 1000


@pytest.fixture
def compile_counter(monkeypatch):
    """torch.compile of fdino.step counted with dynamo's CompileCounter (no inductor: seconds, not minutes)."""
    counter = torch._dynamo.testing.CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    torch._dynamo.reset()
    step_module._compiled.cache_clear()
    yield counter
    torch._dynamo.reset()
    step_module._compiled.cache_clear()


def test_a_new_schedule_reuses_the_compiled_graph(compile_counter):
    cfg = preset("smoke", batch_size=2)
    crops = [torch.randn(2, 3, s, s) for s in [16, 16, 8, 8]]
    for changed in (cfg, cfg.replace(schedule_steps=7, lr=1e-3, teacher_temp=0.05, freeze_last_layer=0.5)):
        fdino.train_step(fdino.init_state(changed), [c.clone() for c in crops])
    assert compile_counter.frame_count == 1
    fdino.train_step(fdino.init_state(cfg.replace(clip_grad=0.5)), [c.clone() for c in crops])  # in the graph
    assert compile_counter.frame_count == 2


def test_timing_the_step_leaves_the_state_and_the_loader_untouched(tmp_path):
    cfg = preset("smoke", steps_per_epoch=6)
    data = fdino.data.build_dataset(str(make_folder(tmp_path / "img")), split="train", image_size=16).dataset
    loader = fdino.data.multicrop_loader(cfg, data, num_workers=0)
    state = fdino.init_state(cfg)
    before = fdino.clone_state(state)
    info = DistInfo()
    step_s = time_steps(fdino.train_step_eager, state, loader, "cpu", reducer=None, info=info, steps=3, untimed=2)
    assert step_s > 0
    assert fdino.tree_allclose(state, before) and int(state.step) == 0 and state.rng.tolist() == before.rng.tolist()


def train(images, run_dir, *extra):
    argv = ["train", *COMMON, "--data", str(images), "--run-dir", str(run_dir), "--no-compile", "--deterministic",
            "--ckpt-every", "3", "--eval-every", "4", *extra]  # fmt: skip
    assert cli.main(argv) == 0


def test_a_run_fitted_to_minutes_equals_the_run_of_its_steps_and_resumes_onto_it(tmp_path, capsys, monkeypatch):
    # The step is timed for real, then taken as 400 s: a 2-hour budget fits some 16 steps, not thousands, on
    # any machine (the set-up time, also measured, moves that by a step or two).
    measured = train_budget.time_steps
    monkeypatch.setattr(train_budget, "time_steps", lambda *a, **k: measured(*a, **k) and 400.0)
    images = make_folder(tmp_path / "img")
    fitted = tmp_path / "fitted"
    train(images, fitted, "--budget", "2h", "--max-steps", "4")  # stops early: the resume must keep its schedule
    meta = json.loads((fitted / "run.json").read_text())
    steps = meta["config"]["schedule_steps"]
    assert steps > 4 and meta["budget"]["schedule_steps"] == steps
    assert "steps fit" in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(fitted), "--max-steps", "0"]) == 0
    summary = json.loads((fitted / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == steps
    assert summary["budget"]["schedule_completed"] == 1.0 and summary["budget"]["fit"] is None  # fitted before
    assert "100% of the" in capsys.readouterr().out

    by_steps = tmp_path / "by-steps"
    train(images, by_steps, "--budget", str(steps))
    assert json.loads((by_steps / "run.json").read_text())["config"]["schedule_steps"] == steps
    a = ckpt.load_checkpoint(ckpt.list_checkpoints(fitted)[-1])[0]
    b = ckpt.load_checkpoint(ckpt.list_checkpoints(by_steps)[-1])[0]
    assert a.cfg == b.cfg and fdino.tree_allclose(a, b)  # bitwise (rtol = atol = 0)


# --- precision="auto" ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "expected"),
    [("fpu avx512f avx512_bf16", "bf16"), ("fpu amx_bf16 amx_tile", "bf16"), ("fpu avx2", "fp32")],
)
def test_auto_precision_picks_bf16_only_on_cpus_with_native_bf16(tmp_path, monkeypatch, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(precision, "cpu_bf16_flags", functools.partial(precision.cpu_bf16_flags.__wrapped__, cpuinfo))
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    assert precision.precision_note("auto", "cpu").startswith(f"auto -> {expected}")


def test_a_bf16_cpu_step_tracks_the_fp32_steps_loss():
    cfg = preset("smoke", batch_size=8)
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randn(8, 3, s, s, generator=g) for s in [16, 16, 8, 8]] for _ in range(8)]
    losses = {}
    for name in ("fp32", "bf16"):
        state, losses[name] = fdino.init_state(cfg.replace(precision=name)), []
        for batch in batches:
            state, metrics = fdino.train_step_eager(state, [c.clone() for c in batch])
            losses[name].append(float(metrics["loss"]))
    fp32, bf16 = torch.tensor(losses["fp32"]), torch.tensor(losses["bf16"])
    assert not torch.equal(fp32, bf16)  # bf16 did run
    assert torch.allclose(bf16, fp32, rtol=0.02), (fp32, bf16)
