"""The batched training job and the sweep's batched mode: ordinary run folders, equal to single runs, resumable."""

from __future__ import annotations

import json
import os

import pytest
import torch

import fdino
from fdino import checkpoint as ckpt
from fdino import presets, train
from fdino.batched.measure import measure
from fdino.batched.train import common_checkpoint_step, train_batched
from fdino.data import build_dataset
from fdino.run_folder import RunFolderBusy, RunLock
from fdino.sweep import SweepSpec, Variant, run_folder, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

# Seeds 0, 0, 1: two variants share their crops, the third renders its own.
CFGS = [
    presets.smoke(seed=0),
    presets.smoke(seed=0, teacher_temp=0.07, lr=1e-3, centering="none"),
    presets.smoke(seed=1, teacher_momentum=0.99, teacher_update="previous_epoch"),
]


@pytest.fixture(scope="module")
def images(two_class_folder):
    return two_class_folder


def options(images, **changes):
    fields = dict(data=str(images), max_steps=6, compile=False, workers=0, progress=False, tensorboard=False,
                  eval_every=3, eval_samples=16, attention_images=0, ckpt_every=2, deterministic=True)  # fmt: skip
    return train.TrainOptions(**{**fields, **changes})


def teacher(run_dir):
    state, _ = ckpt.load_checkpoint(ckpt.list_checkpoints(run_dir)[-1], device="cpu")
    return state


@pytest.fixture(scope="module")
def batched_and_single(images, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = [root / f"batched-{i}" for i in range(len(CFGS))]
    summaries = train_batched(CFGS, options(images), dirs)
    singles = []
    for i, cfg in enumerate(CFGS):
        single_dir = root / f"single-{i}"
        train.run(cfg, options(images, run_dir=str(single_dir)))
        singles.append(single_dir)
    return dirs, singles, summaries


def test_each_variant_writes_an_ordinary_run_equal_to_its_single_run(batched_and_single):
    dirs, singles, summaries = batched_and_single
    for i, (mine, single) in enumerate(zip(dirs, singles)):
        a, b = teacher(mine), teacher(single)
        assert a.cfg == b.cfg and int(a.step) == int(b.step) == 6
        for tree in ("student", "teacher", "student_buffers"):
            for k, v in getattr(b, tree).items():
                torch.testing.assert_close(getattr(a, tree)[k], v, rtol=1e-4, atol=1e-5, msg=f"variant {i} {k}")
        ours, theirs = (
            json.loads((mine / "summary.json").read_text()),
            json.loads((single / "summary.json").read_text()),
        )
        assert ours["batched_variants"] == 3 and ours["steps"] == theirs["steps"] == 6
        assert [r["step"] for r in ours["knn_history"]] == [0, 3, 6]
        assert ours["knn_top1_raw_pixels"] == theirs["knn_top1_raw_pixels"]
        assert ours["knn_top1_init"] == theirs["knn_top1_init"]
        assert len([line for line in (mine / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 1
        assert summaries[i]["run_dir"] == str(mine)
    # The run folder is an ordinary one: `fdino train --resume` would read it.
    assert json.loads((dirs[1] / "run.json").read_text())["config"]["centering"] == "none"


def test_interrupted_batched_run_resumes_to_the_uninterrupted_result(batched_and_single, images, tmp_path):
    dirs, _, _ = batched_and_single
    again = [tmp_path / f"v{i}" for i in range(len(CFGS))]
    train_batched(CFGS, options(images, max_steps=3), again)
    ckpt.list_checkpoints(again[0])[-1].unlink()  # killed while saving: step 3 is not common to every folder
    assert common_checkpoint_step(again) == 2
    train_batched(CFGS, options(images), again, resume=True)
    for mine, uninterrupted in zip(again, dirs):
        assert fdino.tree_allclose(teacher(mine), teacher(uninterrupted), rtol=0, atol=1e-6)


def test_configs_that_cannot_batch_are_refused(images, tmp_path):
    with pytest.raises(ValueError, match=r"differs from variant 0 in \['out_dim'\]"):
        train_batched([CFGS[0], CFGS[0].replace(out_dim=32)], options(images), [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="one run folder per variant"):
        train_batched(CFGS, options(images), [tmp_path / "a"])


def test_a_folder_in_use_stops_the_batched_run_before_anything_is_written(images, tmp_path):
    dirs = [tmp_path / name for name in ("a", "b", "c")]
    with RunLock(dirs[1]), pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
        train_batched(CFGS, options(images), dirs)
    assert not any(ckpt.list_checkpoints(d) or (d / "run.json").exists() for d in dirs)


def test_the_measured_choice_reports_both_ways(images):
    data = build_dataset(str(images), split="train", image_size=16).dataset
    choice = measure(CFGS, data, "cpu", repeats=1)
    assert choice.batched_s > 0 and choice.sequential_s > 0 and choice.render_s > 0
    assert choice.batched == (choice.batched_s < choice.sequential_s)
    assert "3 variants train as" in choice.message(3) and "--batched on|off" in choice.message(3)


def test_batched_sweep_matches_the_sequential_sweep(images, tmp_path):
    spec = SweepSpec(
        name="b",
        preset="smoke",
        seeds=(0, 1),
        options=tuple((k, v) for k, v in options(images, max_steps=4).to_dict().items() if k != "run_dir"),
        variants=(Variant("cold", (("teacher_temp", 0.03),)), Variant("hot", (("teacher_temp", 0.07),))),
    )
    said_on, said_off, said_auto = [], [], []
    on = run_sweep(spec, tmp_path / "on", batched="on", say=said_on.append)
    off = run_sweep(spec, tmp_path / "off", batched="off", say=said_off.append)
    assert sum("batched with 3 more" in line for line in said_on) == 4
    assert not any("batched with" in line for line in said_off)
    for name in ("cold", "hot"):
        for seed in (0, 1):
            a, b = teacher(run_folder(tmp_path / "on", name, seed)), teacher(run_folder(tmp_path / "off", name, seed))
            assert fdino.tree_allclose(a.teacher, b.teacher, rtol=1e-4, atol=1e-5)
        assert on["variants"][name]["seeds_done"] == off["variants"][name]["seeds_done"] == 2
        assert (on["variants"][name]["batched_variants"], off["variants"][name]["batched_variants"]) == (4, 1)
    assert "| a batch of 4 |" in (tmp_path / "on" / "results.md").read_text()
    assert "| alone |" in (tmp_path / "off" / "results.md").read_text()
    # One batched group's wall time counts once, not once per variant.
    walls = [r["wall_time_s"] for e in on["variants"].values() for r in e["runs"].values()]
    assert on["training_time_s"] == pytest.approx(sum(walls) / 4, abs=0.1)
    # auto measures, says what it chose, and trains either way.
    run_sweep(spec, tmp_path / "auto", batched="auto", say=said_auto.append)
    assert any("4 variants train as" in line for line in said_auto)
    assert all((run_folder(tmp_path / "auto", n, s) / "summary.json").exists() for n in ("cold", "hot") for s in (0, 1))
    with pytest.raises(ValueError, match="batched='sometimes'"):
        run_sweep(spec, tmp_path / "x", batched="sometimes")


def test_bench_script_runs_and_reports_ratios(images, tmp_path, monkeypatch):
    from helpers import load_bench_module

    bench = load_bench_module("bench_batched")
    argv = ["bench_batched", "--device", "cpu", "--preset", "smoke", "--variants", "1,2", "--steps", "1",
            "--data", str(images), "--workers", "0", "--eager", "--out", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    bench.main()
    table = (tmp_path / "batched-cpu-smoke-eager.md").read_text()
    rows = json.loads((tmp_path / "batched-cpu-smoke-eager.json").read_text())["rows"]
    assert [r["variants"] for r in rows] == [1, 2] and table.count("x** |") == 6
    assert all(r[k]["batched_s"] > 0 and r[k]["sequential_s"] > 0 for r in rows for k in ("step", "e2e_own_seeds"))
