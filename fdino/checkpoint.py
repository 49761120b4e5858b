"""Checkpoints: the whole `TrainState` plus the training loop's position, written atomically.

A checkpoint file ``ckpt-<step>.pt`` holds only plain containers (dicts, lists, numbers, strings)
and tensors, and is read with ``torch.load(weights_only=True)``: loading can never execute code.
Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the
final name, so a crash mid-write leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .config import DinoConfig
from .optim import AdamWState
from .state import TrainState

FORMAT = "fdino-checkpoint-v1"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def state_to_dict(state: TrainState) -> dict[str, Any]:
    """A `TrainState` as plain containers (for torch.save / weights_only loading)."""
    return {
        "config": state.cfg.to_dict(),
        "student": dict(state.student),
        "student_buffers": dict(state.student_buffers),
        "teacher": dict(state.teacher),
        "teacher_buffers": dict(state.teacher_buffers),
        "opt": {
            "exp_avg": dict(state.opt.exp_avg),
            "exp_avg_sq": dict(state.opt.exp_avg_sq),
            "count": dict(state.opt.count),
        },
        "center": state.center,
        "step": state.step,
        "rng": state.rng,
    }


def state_from_dict(data: dict[str, Any], device: str | torch.device | None = None) -> TrainState:
    """Inverse of `state_to_dict`; tensors go to ``device`` (the RNG counter stays on the CPU)."""
    move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
    trees = {
        k: {n: move(t) for n, t in data[k].items()}
        for k in ("student", "student_buffers", "teacher", "teacher_buffers")
    }
    opt = AdamWState(**{k: {n: move(t) for n, t in data["opt"][k].items()} for k in ("exp_avg", "exp_avg_sq", "count")})
    return TrainState(
        cfg=DinoConfig.from_dict(data["config"]),
        opt=opt,
        center=move(data["center"]),
        step=move(data["step"]),
        rng=data["rng"].cpu(),
        **trees,
    )


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:08d}.pt"


def checkpoint_step(path: str | Path) -> int:
    """The step in a checkpoint's file name (``ckpt-<step>.pt``)."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not named like a checkpoint (ckpt-<step>.pt)")
    return int(m.group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    run_dir: str | Path, state: TrainState, loop: dict[str, Any] | None = None, *, keep: int = 3
) -> Path:
    """Write ``ckpt-<step>.pt`` atomically and keep only the newest ``keep`` checkpoints.

    ``loop`` holds the training loop's position and host-side state (epoch, batch index, data
    seed, counters): plain Python values and tensors only.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    step = int(state.step)
    path = checkpoint_path(run_dir, step)
    payload = {"format": FORMAT, "state": state_to_dict(state), "loop": dict(loop or {})}
    atomic_torch_save(payload, path)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, device: str | torch.device | None = None) -> tuple[TrainState, dict[str, Any]]:
    """``(state, loop)`` from a checkpoint file or a run folder (its newest checkpoint)."""
    path = resolve_checkpoint(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an fdino checkpoint (expected format {FORMAT!r})")
    return state_from_dict(payload["state"], device), payload.get("loop", {})


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest checkpoint of a run folder; clear errors otherwise."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no checkpoint (ckpt-*.pt) in run folder {path}")
        return found[-1]
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def backbone_weights(state: TrainState, which: str = "teacher") -> dict[str, torch.Tensor]:
    """The backbone's parameters and buffers (timm key names) of the teacher or the student."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}: choose 'teacher' (the one to use, as in the paper) or 'student'")
    params = state.teacher if which == "teacher" else state.student
    buffers = state.teacher_buffers if which == "teacher" else state.student_buffers
    prefix = "backbone."
    return {k[len(prefix) :]: v for k, v in {**params, **buffers}.items() if k.startswith(prefix)}
