"""What keeps a training job from losing work: finite checks before anything is saved, and the save.

Rank 0 reads the metrics at log steps (the loop's only host syncs) and checks the whole state before
each checkpoint: a non-finite loss or state stops the run with advice that works
(``fdino train --resume RUN --lr ...``, ``--skip-batches N``) and the previous checkpoints kept.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import run_folder as rf
from .loop_state import LoopState
from .state import TrainState


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss or the state stopped being finite."""


def _advice(run_dir: Path) -> str:
    last = ckpt.list_checkpoints(run_dir)
    where = f"the last good checkpoint is {last[-1].name}" if last else "no checkpoint was written yet"
    return (
        f"stopped, {where}. Likely causes: a learning rate too high for this batch size, fp16 overflow (use bf16), "
        f"or corrupt inputs. Resume from the checkpoint with a lower learning rate, `fdino train --resume {run_dir} "
        "--lr LOWER` (also --min-lr, --weight-decay, --clip-grad, --teacher-temp, --teacher-momentum, --max-steps), "
        "and step over the batches that follow it with --skip-batches N"
    )


def read_step_metrics(metrics: dict[str, torch.Tensor], step: int, run_dir: Path) -> dict[str, float]:
    values = {k: float(v) for k, v in metrics.items()}  # the loop's only per-log host sync
    if not math.isfinite(values["loss"]):
        raise NonFiniteLossError(f"non-finite loss ({values['loss']}) at step {step}; {_advice(run_dir)}")
    return values


def nonfinite_parts(state: TrainState) -> list[str]:
    """Which floating-point parts of the state hold a NaN or an infinity: parameters, buffers (BatchNorm
    statistics), optimizer moments, center."""
    parts = {
        "student": state.student,
        "teacher": state.teacher,
        "student_buffers": state.student_buffers,
        "teacher_buffers": state.teacher_buffers,
        **{f"opt.{field}": tree for field, tree in state.opt._asdict().items() if field != "count"},
        "center": {"center": state.center},
    }
    bad = []
    for part, tree in parts.items():
        tensors = [t for t in tree.values() if t.is_floating_point()]
        if tensors and not torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all():
            bad.append(part)
    return bad


def params_finite(state: TrainState) -> bool:
    return not nonfinite_parts(state)


def check_finite(state: TrainState, metrics: dict[str, torch.Tensor], step: int, run_dir: Path) -> None:
    """`NonFiniteLossError` unless the loss and every part of the state are finite."""
    read_step_metrics(metrics, step, run_dir)
    bad = nonfinite_parts(state)
    if bad:
        raise NonFiniteLossError(f"non-finite values in {', '.join(bad)} at step {step}; not saved, {_advice(run_dir)}")


def save_checked(
    run_dir: Path,
    state: TrainState,
    metrics: dict[str, torch.Tensor],
    loop: LoopState,
    *,
    keep: int,
    run_meta: dict[str, Any],
    probe: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Checkpoint (rank 0) a state whose loss and every part are finite; the first one of an ``--overwrite``
    run makes the replaced run go."""
    check_finite(state, metrics, loop.step, run_dir)
    path = ckpt.save_checkpoint(run_dir, state, loop.to_dict(), keep=keep, run_meta=run_meta, probe=probe)
    if (run_dir / rf.REPLACED).exists():
        rf.discard_replaced(run_dir)
    return path
