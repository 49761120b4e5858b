"""The training job's side of `fdino.budget`: time the step, a checkpoint and an evaluation, then fit.

The step is timed on a copy of the state with batches from a second pass over the loader, so the run
itself starts from the untouched state at step 0 and sees the same batches as a run given the
fitted length directly.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .budget import CALIBRATION_STEPS, Budget, BudgetFit, MeasuredCosts, fit_schedule_steps, predicted_seconds
from .distributed import DistInfo, rank0_value
from .state import TrainState, clone_state
from .train_options import TrainOptions

PROBE_DIR = ".budget-probe"


def time_steps(step_fn, state: TrainState, loader, device, *, reducer, world_size: int, steps: int) -> float:
    """Seconds per step (loader included) over ``steps`` steps after a first, compiling one, on a copy of ``state``."""
    probe = clone_state(state)
    stream = loader.steps(0)
    try:
        started = 0.0
        for i in range(steps + 1):
            _, _, crops, _ = next(stream)
            crops = [c.to(device, non_blocking=True) for c in crops]
            probe, metrics = step_fn(probe, crops, reducer=reducer, world_size=world_size)
            if i == 0:
                float(metrics["loss"])  # waits for the compiled first step: it is not a steady step
                started = time.perf_counter()
        float(metrics["loss"])
        return (time.perf_counter() - started) / steps
    finally:
        stream.close()  # stops the pass's loader workers


def time_checkpoint(run_dir: Path, state: TrainState) -> float:
    """Seconds to write one checkpoint of ``state`` (into a scratch folder of the run, removed after)."""
    probe_dir = run_dir / PROBE_DIR
    started = time.perf_counter()
    try:
        ckpt.save_checkpoint(probe_dir, state, {}, keep=1)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


def fit_to_budget(
    budget: Budget,
    *,
    job_started: float,
    eval_s: float,
    step_fn,
    state: TrainState,
    loader,
    device: torch.device,
    reducer,
    info: DistInfo,
    opts: TrainOptions,
) -> BudgetFit:
    """Measure and fit (rank 0 decides; every rank gets its length). ``job_started``: `time.perf_counter()`
    when the job began; ``eval_s``: the measured evaluation at initialization (0: none)."""
    step_s = time_steps(
        step_fn, state, loader, device, reducer=reducer, world_size=info.world_size, steps=CALIBRATION_STEPS
    )
    checkpoint_s = time_checkpoint(Path(opts.run_dir), state) if info.is_main else 0.0
    costs = MeasuredCosts(
        spent_s=time.perf_counter() - job_started, step_s=step_s, eval_s=eval_s, checkpoint_s=checkpoint_s
    )
    steps = 0
    if info.is_main:
        steps = fit_schedule_steps(budget.seconds, costs, eval_every=opts.eval_every, ckpt_every=opts.ckpt_every)
    steps = rank0_value(steps, info)
    predicted = predicted_seconds(steps, costs, eval_every=opts.eval_every, ckpt_every=opts.ckpt_every)
    return BudgetFit(
        budget=budget.text, budget_s=budget.seconds, schedule_steps=steps, costs=costs, predicted_s=predicted
    )


__all__ = ["PROBE_DIR", "fit_to_budget", "time_checkpoint", "time_steps"]
