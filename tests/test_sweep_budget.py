"""fdino sweep with a budget: each run fits its own schedule (a time) or all share a length (steps),
finished runs are recognised by the budget they were fitted to, and the report says how much of each
schedule was done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fdino.batched.train import train_batched
from fdino.config import DinoConfig
from fdino.sweep import SweepSpec, Variant, run_folder, run_sweep
from fdino.sweep.report import results_markdown
from fdino.train import TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def budget_spec(images, budget: str, seeds=(0,)) -> SweepSpec:
    return SweepSpec(
        name="budgeted",
        preset="smoke",
        seeds=seeds,
        options=(("data", str(images)), ("budget", budget), ("compile", False), ("workers", 0), ("progress", False),
                 ("tensorboard", False), ("eval_every", 0), ("eval_samples", 16), ("attention_images", 0)),
        variants=(Variant("t=0.04", (("teacher_temp", 0.04),)), Variant("t=0.07", (("teacher_temp", 0.07),))),
    )  # fmt: skip


def test_step_budget_fixes_every_schedule_and_reruns_keep_the_runs(two_class_folder, tmp_path):
    said = []
    results = run_sweep(budget_spec(two_class_folder, "3"), tmp_path, batched="off", say=said.append)
    for name in ("t=0.04", "t=0.07"):
        run = run_folder(tmp_path, name, 0)
        assert json.loads((run / "run.json").read_text())["config"]["schedule_steps"] == 3
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 3 and summary["budget"]["schedule_completed"] == 1.0
        assert results["variants"][name]["steps"] == (3, 0.0)
        assert results["variants"][name]["schedule_completed"] == (1.0, 0.0)
    md = results_markdown(results)
    assert "budget 3 per run" in md and "| schedule done |" in md and "100 +- 0%" in md
    # Run again: the folders were fitted to the same budget, so they count as finished (not retrained).
    said.clear()
    run_sweep(budget_spec(two_class_folder, "3"), tmp_path, batched="off", say=said.append)
    assert sum("finished earlier, kept" in line for line in said) == 2


def test_time_budget_trains_one_by_one_and_matches_the_fitted_length(two_class_folder, tmp_path, monkeypatch):
    trained = []

    def fake_run(cfg, opts, **_):  # what train.run leaves behind: run.json with the fitted length
        trained.append(opts.budget)
        fitted = cfg.replace(schedule_steps=7)
        run_dir = Path(opts.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = {"config": fitted.to_dict(), "options": {"budget": opts.budget}}
        (run_dir / "run.json").write_text(json.dumps(meta))
        (run_dir / "summary.json").write_text(json.dumps({"steps": 7, "budget": {"schedule_completed": 1.0}}))

    monkeypatch.setattr("fdino.train.run", fake_run)
    monkeypatch.setattr("fdino.sweep.runner.measure", lambda *a, **k: pytest.fail("a time budget must not batch"))
    said = []
    run_sweep(budget_spec(two_class_folder, "20m", seeds=(0, 1)), tmp_path / "out", batched="on", say=said.append)
    assert trained == ["20m"] * 4 and any("train one by one" in line for line in said)
    said.clear()
    run_sweep(budget_spec(two_class_folder, "20m", seeds=(0, 1)), tmp_path / "out", batched="on", say=said.append)
    assert trained == ["20m"] * 4 and sum("finished earlier, kept" in line for line in said) == 4
    # Another budget is another recipe: its runs are not the ones on disk (the spec check says so first).
    with pytest.raises(FileExistsError, match="holds another sweep"):
        run_sweep(budget_spec(two_class_folder, "5m", seeds=(0, 1)), tmp_path / "out", say=said.append)
    trained.clear()
    run_sweep(budget_spec(two_class_folder, "5m", seeds=(0, 1)), tmp_path / "out", overwrite=True, say=lambda _: None)
    assert trained == ["5m"] * 4


def test_batched_training_refuses_a_time_budget(tmp_path):
    cfg = DinoConfig()
    with pytest.raises(ValueError, match="a batched run cannot fit each variant's schedule"):
        train_batched([cfg, cfg.replace(seed=1)], TrainOptions(budget="20m"), [tmp_path / "a", tmp_path / "b"])
