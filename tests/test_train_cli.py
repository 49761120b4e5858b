"""`fdino train` end to end: a compiled CLI run, SIGKILL and exact resume, the non-finite stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import grid_cell, png_pixels
from matplotlib import colors
from PIL import Image

import fdino
from fdino import cli
from fdino.checkpoint import list_checkpoints, load_checkpoint
from fdino.compile_cache import default_cache_dir
from fdino.eval.render import cell_scale, grid_size

# Fast, eager, deterministic, no eval noise: what the process-level tests share.
COMMON = [
    "--preset",
    "smoke",
    "--workers",
    "0",
    "--no-progress",
    "--no-tensorboard",
    "--eval-samples",
    "40",
    "--attention-images",
    "1",
]


def make_folder(root: Path, per_class: int = 12, classes: int = 2, size: int = 20) -> Path:
    """A labeled image folder; 24 images = 6 steps per epoch at batch 4."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            pixels[..., c] = 255  # a class-specific colour channel
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def fdino_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fdino", "train", *COMMON, *args]


def test_cli_train_compiled_end_to_end(tmp_path):
    data = make_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    code = cli.main(
        [
            "train",
            *COMMON,
            "--data",
            str(data),
            "--run-dir",
            str(run_dir),
            "--max-steps",
            "8",
            "--ckpt-every",
            "4",
            "--log-every",
            "2",
            "--lr",
            "0.01",
            "--eval-every",
            "3",
        ]
    )
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["skipped_files"] == 0
    assert summary["knn_top1_teacher"] is not None and summary["knn_top1_raw_pixels"] is not None
    # periodic k-NN: at init, every 3 steps, and at the end; the last entry is the final number
    history = summary["knn_history"]
    assert [h["step"] for h in history] == [0, 3, 6, 8]
    assert history[0]["knn_top1"] == summary["knn_top1_init"] and history[-1]["knn_top1"] == summary["knn_top1_teacher"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt-00000004.pt", "ckpt-00000008.pt"]
    assert (run_dir / "curves.png").stat().st_size > 0 and (run_dir / "attention" / "teacher.png").stat().st_size > 0
    # curves.png (10 x 3.8 in at 100 dpi): the loss line across the left plot, the k-NN line across the right.
    curves = png_pixels(run_dir / "curves.png", size=(380, 1000))
    for name, half in (("tab:blue", curves[:, :500]), ("tab:green", curves[:, 500:])):
        xs = np.nonzero(np.abs(half - np.array(colors.to_rgb(name)) * 255).max(axis=-1) < 30)[1]
        assert len(xs) > 100 and np.ptp(xs) > 300, f"curves.png: no {name} line across its plot"
    # The teacher's attention on 1 held-out image (20 px files, evaluated at 16): image, 2 heat maps, 2 masks.
    cell = 16 * cell_scale(16)
    attention = png_pixels(run_dir / "attention" / "teacher.png", size=grid_size(1 + 2 * 2, 1, cell))
    for row in range(1, 5):
        drawn = np.abs(grid_cell(attention, row, 0, cell) - grid_cell(attention, 0, 0, cell)).mean()
        assert drawn > 10, f"attention row {row} shows only the image"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["config"]["steps_per_epoch"] == 6 and meta["options"]["compile"] is True
    # The compiled graphs came from (or went to) the persistent inductor cache; the summary says which.
    graphs = summary["compile"]
    assert Path(graphs["cache_dir"]) == default_cache_dir().resolve()
    assert graphs["note"].startswith(f"compiled graphs: {graphs['graphs_loaded']} loaded from the cache, ")


def test_sigkill_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    data = make_folder(tmp_path / "images")
    # 200 steps of 6 per epoch; a checkpoint every 4 steps, all kept, so the kill lands mid-run.
    args = [
        "--data",
        str(data),
        "--max-steps",
        "200",
        "--ckpt-every",
        "4",
        "--keep-checkpoints",
        "100",
        "--epochs",
        "40",
        "--no-compile",
        "--deterministic",
        "--lr",
        "0.01",
        "--drop-path-rate",
        "0.2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(fdino_cmd(*args, "--run-dir", str(whole)), check=True, env=env, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        fdino_cmd(*args, "--run-dir", str(killed)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not any(int(p.stem.split("-")[1]) >= 16 for p in list_checkpoints(killed)):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    newest = int(list_checkpoints(killed)[-1].stem.split("-")[1])
    assert 16 <= newest < 200 and newest % 6, "the kill must interrupt the run mid-way and mid-epoch"

    subprocess.run(
        [sys.executable, "-m", "fdino", "train", "--resume", str(killed), "--no-progress"],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    a, loop_a = load_checkpoint(whole)
    b, loop_b = load_checkpoint(killed)
    assert int(a.step) == int(b.step) == 200 and loop_a["epoch"] == loop_b["epoch"] == 33
    assert fdino.tree_allclose(a, b)  # bitwise: rtol = atol = 0


def test_non_finite_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from fdino.data import MultiCropLoader

    original = MultiCropLoader.epoch

    def poisoned(self, epoch, start_batch=0):
        for i, (crops, labels) in enumerate(original(self, epoch, start_batch)):
            if epoch * len(self) + start_batch + i >= 5:  # the 6th step sees NaN pixels
                crops = [torch.full_like(c, float("nan")) for c in crops]
            yield crops, labels

    monkeypatch.setattr(MultiCropLoader, "epoch", poisoned)
    run_dir = tmp_path / "run"
    code = cli.main(
        [
            "train",
            *COMMON,
            "--data",
            str(make_folder(tmp_path / "images")),
            "--run-dir",
            str(run_dir),
            "--max-steps",
            "12",
            "--ckpt-every",
            "2",
            "--log-every",
            "3",
            "--no-compile",
        ]
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "ckpt-00000004.pt" in err and "--resume" in err and "--lr LOWER" in err
    saved = list_checkpoints(run_dir)
    assert [p.name for p in saved] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    state, _ = load_checkpoint(saved[-1])
    assert all(torch.isfinite(t).all() for t in state.student.values())


def test_existing_run_needs_resume_or_overwrite_and_resume_keeps_the_config(tmp_path, capsys):
    data = str(make_folder(tmp_path / "images"))
    run_dir = str(tmp_path / "run")
    base = ["train", *COMMON, "--data", data, "--run-dir", run_dir, "--no-compile", "--ckpt-every", "2"]
    assert cli.main([*base, "--max-steps", "2"]) == 0
    assert cli.main([*base, "--max-steps", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["train", "--resume", run_dir, "--out-dim", "32"]) == 2
    assert "drop ['--out-dim']" in capsys.readouterr().err
    assert cli.main(["train", "--resume", run_dir, "--max-steps", "4", "--no-progress"]) == 0
    assert int(load_checkpoint(run_dir)[0].step) == 4
    assert cli.main([*base, "--max-steps", "2", "--overwrite"]) == 0
    assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt-00000002.pt"]


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["train", *COMMON, "--data", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r")])
    assert code == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--out-dim", "128", 128),
        ("--global-crop-scale", "0.3,1", (0.3, 1.0)),
        ("--backbone-kwargs", "depth=3,embed_dim=48", (("depth", 3), ("embed_dim", 48))),
        ("--norm-last-layer", "false", False),
    ],
)
def test_config_flags_parse_to_dinoconfig_types(flag, value, expected):
    args = cli.build_parser().parse_args(["train", flag, value])
    name = flag[2:].replace("-", "_")
    assert getattr(args, f"cfg_{name}") == expected


@pytest.mark.parametrize(
    "flag,value,field",
    [
        ("--log-every", "0", "log_every"),
        ("--eval-every", "-1", "eval_every"),
        ("--keep-checkpoints", "0", "keep_checkpoints"),
        ("--max-minutes", "-2", "max_minutes"),
    ],
)
def test_bad_run_options_fail_before_any_work_naming_the_option(tmp_path, capsys, flag, value, field):
    run_dir = tmp_path / "r"
    code = cli.main(["train", *COMMON, "--data", "shapes10", "--run-dir", str(run_dir), flag, value])
    assert code == 2
    err = capsys.readouterr().err
    assert f"TrainOptions.{field}=" in err and "allowed" in err
    assert not run_dir.exists(), "nothing may be written for a run that cannot start"


class _FailingImport:
    """A meta-path finder that makes importing ``module`` fail as if ``missing`` were not installed."""

    def __init__(self, module: str, missing: str) -> None:
        self.module, self.missing = module, missing

    def find_spec(self, name, path=None, target=None):
        if name == self.module:
            raise ModuleNotFoundError(f"No module named {self.missing!r}", name=self.missing)
        return None


def test_an_import_error_inside_fdino_surfaces_instead_of_hiding_a_subcommand(monkeypatch):
    # fdino.eval.cli imports fdino.eval.knn: a broken module of fdino's own must not look like a missing extra.
    monkeypatch.delitem(sys.modules, "fdino.eval.cli", raising=False)
    monkeypatch.setitem(sys.modules, "fdino.eval.knn", None)
    with pytest.raises(ModuleNotFoundError, match="fdino.eval.knn"):
        cli.build_parser()


def test_a_missing_optional_package_disables_its_commands_naming_the_extra(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "fdino.serve.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_FailingImport("fdino.serve.cli", "fastapi"), *sys.meta_path])
    assert cli.main(["serve", "runs/demo", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "'fastapi'" in err and "pip install 'fdino[serve]'" in err
    # A package that is no optional extra's (here: torch) is not a reason to disable a command.
    monkeypatch.setattr(sys, "meta_path", [_FailingImport("fdino.serve.cli", "torch"), *sys.meta_path[1:]])
    with pytest.raises(ModuleNotFoundError, match="torch"):
        cli.build_parser()
