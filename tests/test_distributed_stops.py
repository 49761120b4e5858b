"""Distributed stops (issue 20, item 7): under torchrun with 2 gloo ranks, all ranks stop together.

`--max-minutes` is decided by rank 0 and broadcast, so no rank is left waiting in a collective; a killed
rank ends the job within a bounded time; the run resumes afterwards from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_cli import COMMON, make_folder

from fdino import checkpoint as ckpt

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "fdino",
        *args,
    ]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"), per_class=16)  # 32 images: 4 steps/epoch at 2 x 4


def train_args(images: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", *COMMON, "--data", str(images), "--run-dir", str(run_dir), "--no-compile", *extra]


def test_max_minutes_stops_every_rank_at_the_same_step_with_a_final_checkpoint(tmp_path, images):
    run_dir = tmp_path / "run"
    args = train_args(images, run_dir, "--max-steps", "100000", "--epochs", "100000", "--max-minutes", "0.1")
    args += ["--ckpt-every", "100000", "--eval-every", "0", "--dist-timeout-minutes", "1"]
    started = time.monotonic()
    proc = subprocess.run(torchrun(*args), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - started < 200
    saved = ckpt.list_checkpoints(run_dir)
    assert len(saved) == 1, "the stop writes the final checkpoint"
    state, loop = ckpt.load_checkpoint(saved[-1])
    assert 0 < int(state.step) == loop["step"] < 100000
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == loop["step"]
    # The stopped run resumes under torchrun and continues from there.
    resumed = subprocess.run(
        torchrun("train", "--resume", str(run_dir), "--no-progress", "--max-minutes", "0", "--max-steps",
                 str(loop["step"] + 2)),
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert int(ckpt.load_checkpoint(run_dir)[0].step) == loop["step"] + 2


def _rank_pid(parent_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank (a child of the launcher's agent)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if f"RANK={rank}".encode() in environ and ppid == parent_pid:
            return int(proc.name)
    return None


def test_a_killed_rank_ends_the_job_in_bounded_time_and_the_run_resumes(tmp_path, images):
    run_dir = tmp_path / "run"
    args = train_args(images, run_dir, "--max-steps", "100000", "--epochs", "100000", "--ckpt-every", "2")
    args += ["--eval-every", "0", "--dist-timeout-minutes", "1", "--keep-checkpoints", "100"]
    launcher = subprocess.Popen(torchrun(*args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(ckpt.list_checkpoints(run_dir)) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline, "the job did not get going"
            time.sleep(0.1)
        victim = _rank_pid(launcher.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = launcher.communicate(timeout=120)
        assert time.monotonic() - killed_at < 90, "the surviving rank must not wait for the dead one indefinitely"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0
    assert "rank" in err.lower() and ("-9" in err or "SIGKILL" in err), err[-3000:]
    last = int(ckpt.load_checkpoint(run_dir)[0].step)
    resumed = subprocess.run(
        torchrun("train", "--resume", str(run_dir), "--no-progress", "--max-steps", str(last + 2)),
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert int(ckpt.load_checkpoint(run_dir)[0].step) == last + 2
