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
from .budget import (
    CALIBRATION_SHARE,
    CALIBRATION_STEPS,
    UNTIMED_STEPS,
    Budget,
    BudgetFit,
    MeasuredCosts,
    fit_schedule_steps,
    predicted_seconds,
)
from .distributed import DistInfo, rank0_value
from .state import TrainState, clone_state
from .train_options import TrainOptions

PROBE_DIR = ".budget-probe"


def time_steps(
    step_fn,
    state: TrainState,
    loader,
    device,
    *,
    reducer,
    info: DistInfo,
    steps: int,
    min_seconds: float = 0.0,
    untimed: int = UNTIMED_STEPS,
) -> float:
    """Seconds per step, loader included, on a copy of ``state``: ``untimed`` steps first (compilation, and the
    batches the loader workers prefetched meanwhile, which would make the loader look free), then at least
    ``steps`` steps and ``min_seconds`` seconds timed. Every rank takes the same number of steps."""
    probe = clone_state(state)
    stream = loader.steps(0)

    def step() -> torch.Tensor:
        nonlocal probe
        _, _, crops, _ = next(stream)
        crops = [c.to(device, non_blocking=True) for c in crops]
        probe, metrics = step_fn(probe, crops, reducer=reducer, world_size=info.world_size)
        return metrics["loss"]

    try:
        for _ in range(untimed):
            float(step())  # waits for each (the first compiles)
        started, timed = time.perf_counter(), 0
        # Rank 0's clock decides when to stop, so that every rank runs the same steps (collectives inside).
        while timed < steps or not rank0_value(int(time.perf_counter() - started >= min_seconds), info):
            loss = step()
            timed += 1
        float(loss)
        return (time.perf_counter() - started) / timed
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
        step_fn, state, loader, device, reducer=reducer, info=info, steps=CALIBRATION_STEPS,
        min_seconds=CALIBRATION_SHARE * budget.seconds,
    )  # fmt: skip
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
