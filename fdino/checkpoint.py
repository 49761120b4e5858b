"""Checkpoints: the whole `TrainState` plus the training loop's position, written atomically.

A checkpoint file ``ckpt-<step>.pt`` holds only plain containers (dicts, lists, numbers, strings)
and tensors, and is read with ``torch.load(weights_only=True)``: loading can never execute code.
Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the
final name, so a crash mid-write leaves the previous checkpoints intact. Each file carries a SHA-256
of its tensors' bytes and its loop state (`payload_digest`), checked on load: a truncated, empty or
bit-flipped file is reported by name and resuming falls back to the newest valid checkpoint
(`load_newest_valid`). It also carries a copy of the run's ``run.json`` (``payload["run"]``), from which
a lost ``run.json`` is rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import DinoConfig
from .optim import optimizer_state_type
from .run_folder import fsync_dir, temp_name
from .state import TrainState

FORMAT = "fdino-checkpoint-v1"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read or whose checksum does not match; ``path`` and ``reason`` say which."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"checkpoint {path} is unusable: {reason}")
        self.path, self.reason = Path(path), reason


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, ...); the previous checkpoints are intact."""


def state_to_dict(state: TrainState) -> dict[str, Any]:
    """A `TrainState` as plain containers (for torch.save / weights_only loading)."""
    return {
        "config": state.cfg.to_dict(),
        "student": dict(state.student),
        "student_buffers": dict(state.student_buffers),
        "teacher": dict(state.teacher),
        "teacher_buffers": dict(state.teacher_buffers),
        # {field: {name: tensor}} of the optimizer's state: exp_avg, exp_avg_sq, count (AdamW) or momentum_buffer.
        "opt": {field: dict(tree) for field, tree in state.opt._asdict().items()},
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
    cfg = DinoConfig.from_dict(data["config"])
    kind = optimizer_state_type(cfg.optimizer)
    if set(data["opt"]) != set(kind._fields):
        raise ValueError(
            f"the checkpoint's optimizer state holds {sorted(data['opt'])}, but its config's "
            f"optimizer={cfg.optimizer!r} keeps {list(kind._fields)}: the file was edited or written by another "
            "program; start a new run"
        )
    opt = kind(**{k: {n: move(t) for n, t in data["opt"][k].items()} for k in kind._fields})
    return TrainState(
        cfg=cfg,
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


def payload_digest(payload: dict[str, Any]) -> str:
    """SHA-256 over the state's tensors (names, dtypes, shapes, bytes) and the loop and run records."""
    h = hashlib.sha256()

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                visit(f"{prefix}/{key}", value[key])
        elif isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            h.update(f"{prefix}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{prefix}={json.dumps(value, sort_keys=True, default=repr)}".encode())

    visit("state", payload["state"])
    if payload.get("probe") is not None:  # the online linear probe (fdino.train_probe); absent: digest as before
        visit("probe", payload["probe"])
    h.update(json.dumps([payload.get("loop", {}), payload.get("run")], sort_keys=True, default=repr).encode())
    return h.hexdigest()


def save_checkpoint(
    run_dir: str | Path,
    state: TrainState,
    loop: dict[str, Any] | None = None,
    *,
    keep: int = 3,
    run_meta: dict[str, Any] | None = None,
    probe: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``ckpt-<step>.pt`` atomically, then keep only the newest ``keep`` checkpoints.

    ``loop`` holds the training loop's position and host-side state (epoch, batch index, data
    seed, counters): plain Python values and tensors only. ``run_meta``: the run.json to keep a copy
    of. ``probe``: the online linear probe's tensors (`fdino.train_probe`), saved only when given.
    A failed write raises `CheckpointWriteError` and deletes nothing.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    step = int(state.step)
    path = checkpoint_path(run_dir, step)
    payload = {"format": FORMAT, "state": state_to_dict(state), "loop": dict(loop or {}), "run": run_meta}
    if probe is not None:
        payload["probe"] = probe
    payload["sha256"] = payload_digest(payload)
    atomic_torch_save(payload, path)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a unique temp file, fsync, rename over ``path``; no temp file is left on failure."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        kept = [p.name for p in list_checkpoints(path.parent)]
        what = "no space left on the device" if err.errno == errno.ENOSPC else f"{type(err).__name__}: {err}"
        raise CheckpointWriteError(
            err.errno,
            f"could not write {path} ({what}); nothing was deleted, the previous checkpoints are intact "
            f"({', '.join(kept) or 'none yet'}). Free space (or fix the folder), then resume: "
            f"fdino train --resume {path.parent}",
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def read_payload(path: str | Path) -> dict[str, Any]:
    """A checkpoint file's verified contents, or `CorruptCheckpointError` saying what is wrong with it."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(path, "empty file (zero bytes)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncation and bit flips surface as many types (zip, unpickler, storage)
        raise CorruptCheckpointError(path, f"unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CorruptCheckpointError(path, f"not an fdino checkpoint (expected format {FORMAT!r})")
    # Checkpoints from before checksums have none; the ones with one must match it.
    if "sha256" in payload and payload_digest(payload) != payload["sha256"]:
        raise CorruptCheckpointError(path, "its contents do not match their SHA-256 (a damaged file)")
    return payload


def load_checkpoint(path: str | Path, device: str | torch.device | None = None) -> tuple[TrainState, dict[str, Any]]:
    """``(state, loop)`` from a checkpoint file, or from a run folder's newest valid checkpoint."""
    if Path(path).is_dir():
        state, loop, _ = load_newest_valid(path, device)
        return state, loop
    payload = read_payload(resolve_checkpoint(path))
    return state_from_dict(payload["state"], device), payload.get("loop", {})


def _newest_valid_payload(run_dir: str | Path) -> tuple[dict[str, Any], Path]:
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no checkpoint (ckpt-*.pt) in run folder {run_dir}")
    problems = []
    for path in reversed(found):
        try:
            return read_payload(path), path
        except CorruptCheckpointError as err:
            problems.append(str(err))
            warnings.warn(f"{err}; trying the previous checkpoint", stacklevel=3)
    raise CorruptCheckpointError(run_dir, "no checkpoint in it is valid: " + "; ".join(problems))


def load_newest_valid(
    run_dir: str | Path, device: str | torch.device | None = None
) -> tuple[TrainState, dict[str, Any], Path]:
    """``(state, loop, path)`` of the newest checkpoint that verifies; each damaged newer one is named in a warning."""
    payload, path = _newest_valid_payload(run_dir)
    return state_from_dict(payload["state"], device), payload.get("loop", {}), path


def newest_valid_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of a run folder that verifies (what the model loaders read)."""
    return _newest_valid_payload(run_dir)[1]


def newest_run_meta(run_dir: str | Path) -> dict[str, Any] | None:
    """The copy of run.json in the newest valid checkpoint that holds one (None: none does)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            meta = read_payload(path).get("run")
        except CorruptCheckpointError:
            continue
        if meta is not None:
            return meta
    return None


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
