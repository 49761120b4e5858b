"""Kill a training run at random moments, resume each, count how many end bitwise equal to an uninterrupted run.

    python bench/faults.py --kills 20 --out bench/results/faults-cpu

The run: the eager smoke preset in deterministic mode on a generated 24-image folder, a checkpoint every
3 steps. Every other kill waits for a checkpoint's temp file to appear and strikes while it is being
written; the others strike at a uniformly random moment of the run (start-up included). After each
SIGKILL the run is resumed (or started again, when the kill came before its first checkpoint) and its
final state is compared with the uninterrupted run's, bitwise. Writes faults.md / faults.json in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fdino import checkpoint as ckpt
from fdino.state import tree_allclose

STEPS = 48


def make_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(12):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            pixels[..., c] = 255
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def train_cmd(data: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "fdino", "train", "--preset", "smoke", "--data", str(data), "--run-dir", str(run_dir),
        "--workers", "0", "--no-progress", "--no-tensorboard", "--no-compile", "--deterministic",
        "--max-steps", str(STEPS), "--epochs", "10", "--ckpt-every", "3", "--eval-every", "0",
        "--eval-samples", "24", "--attention-images", "0", "--no-embedding-snapshots", "--drop-path-rate", "0.2",
    ]  # fmt: skip


def temp_files(run_dir: Path) -> list[Path]:
    return list(run_dir.glob(".*.tmp-*")) if run_dir.is_dir() else []


def kill_once(cmd: list[str], run_dir: Path, *, inside_save: bool, at: float, env) -> dict:
    """Start ``cmd``, SIGKILL it (inside a checkpoint write, or ``at`` seconds in), report what it left."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    while proc.poll() is None:
        if inside_save and temp_files(run_dir) or not inside_save and time.monotonic() - started >= at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0002 if inside_save else 0.01)
    proc.wait()
    found = ckpt.list_checkpoints(run_dir)
    return {
        "mode": "inside a checkpoint write" if inside_save else "random moment",
        "killed_after_s": round(time.monotonic() - started, 2),
        "killed": proc.returncode == -signal.SIGKILL,
        "temp_file_left": bool(temp_files(run_dir)),
        "newest_checkpoint": ckpt.checkpoint_step(found[-1]) if found else None,
    }


def finish(cmd: list[str], run_dir: Path, env) -> int:
    """Resume (or start again when no checkpoint was written); the process's exit code."""
    resume = [sys.executable, "-m", "fdino", "train", "--resume", str(run_dir), "--no-progress"]
    return subprocess.run(resume if ckpt.list_checkpoints(run_dir) else cmd, env=env, capture_output=True).returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for faults.md / faults.json (default: print only)")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_folder(root / "images")
        started = time.monotonic()
        subprocess.run(train_cmd(data, root / "whole"), env=env, check=True, capture_output=True)
        run_seconds = time.monotonic() - started
        reference, _ = ckpt.load_checkpoint(root / "whole")
        rows = []
        for i in range(args.kills):
            run_dir = root / f"killed-{i}"
            cmd = train_cmd(data, run_dir)
            row = kill_once(cmd, run_dir, inside_save=i % 2 == 1, at=rng.uniform(0, 0.9 * run_seconds), env=env)
            row["resume_exit_code"] = finish(cmd, run_dir, env)
            final, _ = ckpt.load_checkpoint(run_dir)
            row["bitwise_equal"] = (
                row["resume_exit_code"] == 0 and int(final.step) == STEPS and tree_allclose(final, reference)
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    equal = sum(r["bitwise_equal"] for r in rows)
    report = {"steps": STEPS, "uninterrupted_run_s": round(run_seconds, 1), "kills": rows, "bitwise_equal": equal}
    print(f"{equal} of {len(rows)} killed runs ended bitwise equal to the uninterrupted run")
    if args.out:
        write_report(Path(args.out), report)


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Kill campaign: SIGKILL at random moments, resume, compare bitwise",
        "",
        f"`python bench/faults.py --kills {len(report['kills'])}`: the eager smoke preset, deterministic, "
        f"{report['steps']} steps (uninterrupted: {report['uninterrupted_run_s']} s), a checkpoint every 3 steps.",
        "",
        f"**{report['bitwise_equal']} of {len(report['kills'])}** killed runs ended bitwise equal to the "
        "uninterrupted run.",
        "",
        "| # | kill | after (s) | newest checkpoint at the kill | temp file left | resumed bitwise equal |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(report["kills"]):
        newest = "none" if r["newest_checkpoint"] is None else r["newest_checkpoint"]
        lines.append(
            f"| {i} | {r['mode']} | {r['killed_after_s']} | {newest} | {'yes' if r['temp_file_left'] else 'no'} | "
            f"{'yes' if r['bitwise_equal'] else 'NO'} |"
        )
    (out / "faults.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
