"""``fdino train --budget 20m``: the whole schedule, fitted into a wall-clock budget (or a number of steps).

A run cut short by ``--max-minutes`` stops mid-schedule: its learning rate never decays, the teacher
momentum never reaches its end value. A budget instead fixes the schedule's length
(`DinoConfig.schedule_steps`) so that warm-up, cosine decay, the weight-decay ramp, the teacher
momentum and the teacher-temperature warm-up all end inside it; every length the config gives in
epochs keeps its share of the run (`DinoConfig.schedule_epoch_steps`).

How the length is found (`fit_schedule_steps`): after the data, the state and the evaluation at
initialization are ready, the job times the step on a throwaway copy of the state (`UNTIMED_STEPS`
first, the first of which compiles; then at least `CALIBRATION_STEPS` steps and `CALIBRATION_SHARE` of
the budget, with the real loader), one checkpoint write and one k-NN
evaluation, and solves for the number of steps whose cost, with the evaluations and checkpoints
they bring, fits the time left after a safety margin. The copy leaves the run untouched: a run
fitted to T steps is bitwise the run of ``--budget T`` (steps). The length is recorded in run.json
(`schedule_steps`), so a resume continues the same schedule.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

# Steps run before the timing starts: the first compiles, and meanwhile the loader workers prefetch
# batches that would make the loader look free in the first timed steps (the demo's first fit, timed from
# step 1, predicted 0.086 s a step where the run took 0.099 s, and stopped at 87% of its schedule).
UNTIMED_STEPS = 10
# Then at least this many steps and this share of the budget are timed: a steadier mean for little.
CALIBRATION_STEPS = 20
CALIBRATION_SHARE = 0.02
# Share of the time left kept free: the step time drifts (thermal, other processes, evaluation sizes).
SAFETY_MARGIN = 0.05

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_TIME = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)\s*$")
_STEPS = re.compile(r"^\s*(\d+)\s*(?:steps?)?\s*$")


@dataclass(frozen=True)
class Budget:
    """A wall-clock budget in seconds, or a schedule length in steps (exactly one is set)."""

    text: str
    seconds: float | None = None
    steps: int | None = None


def parse_budget(text: str) -> Budget | None:
    """'20m', '2h', '90s', '1.5h' (time) or '5000' / '5000 steps' (steps); '' is no budget."""
    if not text or not text.strip():
        return None
    if m := _TIME.match(text):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
        if seconds <= 0:
            raise ValueError(f"--budget {text!r} is no time at all; give a positive time like 20m")
        return Budget(text=text.strip(), seconds=seconds)
    if m := _STEPS.match(text):
        steps = int(m.group(1))
        if steps < 1:
            raise ValueError(f"--budget {text!r}: give at least 1 step")
        return Budget(text=text.strip(), steps=steps)
    raise ValueError(
        f"--budget {text!r} is not a budget: give a time like 20m, 2h, 90s or 1.5h, or a number of steps like 5000"
    )


@dataclass(frozen=True)
class MeasuredCosts:
    """What the job measured before fitting (seconds)."""

    spent_s: float
    """Wall time already used: data, state, evaluation at init, compilation, calibration."""
    step_s: float
    """One training step after compilation, loader included (mean over the calibration steps)."""
    eval_s: float
    """One k-NN evaluation with its snapshots (0: the data set has no labels)."""
    checkpoint_s: float
    """One checkpoint write."""


@dataclass(frozen=True)
class BudgetFit:
    """The fitted schedule and why (recorded in run.json and the summary)."""

    budget: str
    budget_s: float
    schedule_steps: int
    costs: MeasuredCosts
    predicted_s: float
    """Wall time the fitted run should take, everything included."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predicted_seconds(steps: int, costs: MeasuredCosts, *, eval_every: int, ckpt_every: int) -> float:
    """Wall time of a run of ``steps`` steps from here: steps, periodic and final evaluations and checkpoints."""
    evals = (steps // eval_every if eval_every else 0) + 1  # + the final one
    checkpoints = math.ceil(steps / ckpt_every)
    return costs.spent_s + steps * costs.step_s + evals * costs.eval_s + checkpoints * costs.checkpoint_s


def fit_schedule_steps(
    budget_s: float, costs: MeasuredCosts, *, eval_every: int, ckpt_every: int, margin: float = SAFETY_MARGIN
) -> int:
    """The most steps whose predicted wall time stays within ``(1 - margin) * budget_s``.

    Raises a ValueError naming the time the job needs when not even one step fits.
    """
    limit = (1.0 - margin) * budget_s

    def fits(n: int) -> bool:
        return predicted_seconds(n, costs, eval_every=eval_every, ckpt_every=ckpt_every) <= limit

    if not fits(1):
        need = predicted_seconds(100, costs, eval_every=eval_every, ckpt_every=ckpt_every) / (1.0 - margin)
        raise ValueError(
            f"a budget of {budget_s:.0f} s leaves no time to train: setting up, compiling and timing took "
            f"{costs.spent_s:.0f} s and a step takes {costs.step_s:.3f} s; give at least {math.ceil(need)} s "
            f"for 100 steps (e.g. --budget {math.ceil(need / 60)}m)"
        )
    # Per-step cost is at least step_s > 0, so the answer lies below this bound; bisect the monotone fit.
    lo, hi = 1, max(2, int((limit - costs.spent_s) / max(costs.step_s, 1e-9)) + 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


__all__ = [
    "CALIBRATION_SHARE",
    "CALIBRATION_STEPS",
    "UNTIMED_STEPS",
    "SAFETY_MARGIN",
    "Budget",
    "BudgetFit",
    "MeasuredCosts",
    "fit_schedule_steps",
    "parse_budget",
    "predicted_seconds",
]
