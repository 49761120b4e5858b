"""The training job's host-side state: where the loop is, what it has measured, how fast it runs.

`LoopState` is what a checkpoint stores next to the `TrainState` (``ckpt["loop"]``, as plain
values through `to_dict` / `from_dict`); `StepTimer` is this process's clock and is not saved.
Both are frozen: the loop replaces them (``loop = loop.after_step(...)``) instead of mutating.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

# Readings in a row that must show collapse before warning: one noisy batch is not a collapse.
COLLAPSE_READINGS = 3


@dataclass(frozen=True, kw_only=True)
class KnnReading:
    """The teacher's weighted k-NN top-1 (%) after ``step`` optimizer steps, and the online linear probe's."""

    step: int
    top1: float
    probe_top1: float | None = None
    """Held-out top-1 (%) of the online linear probe on the same queries (None: no probe)."""


@dataclass(frozen=True, kw_only=True)
class LoopState:
    """Position and measurements of a training run, saved in every checkpoint."""

    steps_per_epoch: int
    """Batches per epoch (per rank); `epoch` and `batch` are derived from `step` with it."""
    step: int = 0
    """Optimizer steps done (equals ``int(TrainState.step)``)."""
    images: int = 0
    """Images seen by this rank so far (steps x batch size)."""
    elapsed: float = 0.0
    """Training wall time in seconds over all processes, up to the last update of this field."""
    knn_history: tuple[KnnReading, ...] = ()
    """k-NN readings at initialization, every ``eval_every`` steps and at the end, by step."""
    knn_init: float | None = None
    """k-NN top-1 (%) of the network at initialization (None: unlabeled data, not evaluated)."""
    knn_raw_pixels: float | None = None
    """k-NN top-1 (%) on raw pixels, the baseline any learned feature must beat."""
    skipped_batches: int = 0
    """Batches stepped over at resumes (``--skip-batches``): the data position is ``step + skipped_batches``."""
    collapse_streak: int = 0
    """Consecutive metric readings that showed collapse."""
    collapse_warning: str | None = None
    """The collapse warning, once given (it is given once per run)."""

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.step // self.steps_per_epoch

    @property
    def data_position(self) -> int:
        """The global batch index the loader continues from (skipped batches count, steps do not repeat them)."""
        return self.step + self.skipped_batches

    @property
    def batch(self) -> int:
        """The next batch's index within its epoch (= batches of that epoch already done)."""
        return self.step % self.steps_per_epoch

    def after_step(self, *, images: int) -> LoopState:
        return dataclasses.replace(self, step=self.step + 1, images=self.images + images)

    def with_knn(self, step: int, top1: float, probe_top1: float | None = None) -> LoopState:
        """Record a k-NN reading (and the probe's); a second reading at the same step replaces the first."""
        kept = tuple(r for r in self.knn_history if r.step != step)
        reading = KnnReading(step=step, top1=top1, probe_top1=probe_top1)
        return dataclasses.replace(self, knn_history=(*kept, reading))

    def with_collapse_reading(self, message: str | None) -> tuple[LoopState, bool]:
        """Count a metric reading (``message`` when it shows collapse); True: warn now (once per run)."""
        streak = self.collapse_streak + 1 if message else 0
        warn = bool(message) and streak >= COLLAPSE_READINGS and self.collapse_warning is None
        return dataclasses.replace(
            self, collapse_streak=streak, collapse_warning=message if warn else self.collapse_warning
        ), warn

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the checkpoint (``torch.load(weights_only=True)`` reads them back)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "images": self.images,
            "elapsed": self.elapsed,
            "history": [knn_record(r) for r in self.knn_history],
            "knn_init": self.knn_init,
            "knn_raw_pixels": self.knn_raw_pixels,
            "skipped_batches": self.skipped_batches,
            "collapse_streak": self.collapse_streak,
            "collapse_warning": self.collapse_warning,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, steps_per_epoch: int) -> LoopState:
        """Inverse of `to_dict`; also reads the loop dicts of older checkpoints (optional keys absent).

        ``epoch`` / ``batch`` are derived from ``step``: stored ones must agree, else the checkpoint
        was written with another data set size.
        """
        unknown = sorted(set(data) - set(_CHECKPOINT_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in a checkpoint's loop state; known: {list(_CHECKPOINT_KEYS)}")
        if "step" not in data:
            raise ValueError("the checkpoint's loop state has no 'step': it was not written by fdino train")
        loop = cls(
            steps_per_epoch=steps_per_epoch,
            step=int(data["step"]),
            images=int(data.get("images", 0)),
            elapsed=float(data.get("elapsed", 0.0)),
            knn_history=tuple(
                KnnReading(step=int(h["step"]), top1=float(h["knn_top1"]), probe_top1=h.get("probe_top1"))
                for h in data.get("history", ())
            ),
            knn_init=data.get("knn_init"),
            knn_raw_pixels=data.get("knn_raw_pixels"),
            skipped_batches=int(data.get("skipped_batches", 0)),
            collapse_streak=int(data.get("collapse_streak", 0)),
            collapse_warning=data.get("collapse_warning"),
        )
        stored = (data.get("epoch", loop.epoch), data.get("batch", loop.batch))
        if stored != (loop.epoch, loop.batch):
            raise ValueError(
                f"the checkpoint is at epoch {stored[0]}, batch {stored[1]} (step {loop.step}), but with "
                f"{steps_per_epoch} batches per epoch step {loop.step} is epoch {loop.epoch}, batch "
                f"{loop.batch}: the data set or the batch size changed since it was written"
            )
        return loop


def knn_record(reading: KnnReading) -> dict[str, Any]:
    """A reading as plain values (checkpoints, summary.json); ``probe_top1`` only when a probe ran."""
    record: dict[str, Any] = {"step": reading.step, "knn_top1": reading.top1}
    if reading.probe_top1 is not None:
        record["probe_top1"] = reading.probe_top1
    return record


_CHECKPOINT_KEYS = (
    "step",
    "epoch",
    "batch",
    "images",
    "elapsed",
    "history",
    "knn_init",
    "knn_raw_pixels",
    "skipped_batches",
    "collapse_streak",
    "collapse_warning",
)


@dataclass(frozen=True, kw_only=True)
class StepTimer:
    """This process's clock: the first step alone (it includes compilation), then steady throughput."""

    started: float
    """`time.perf_counter()` when the loop began."""
    first_step_s: float | None = None
    """Seconds of the first step of this process, compilation included (None: not done yet)."""
    steady_start: float = 0.0
    """`time.perf_counter()` at the end of the first step."""
    steady_steps: int = 0
    """Steps after the first one."""

    @classmethod
    def start(cls) -> StepTimer:
        return cls(started=time.perf_counter())

    def after_step(self, step_started: float) -> StepTimer:
        """Count a step that began at ``step_started`` (read the first step's outputs before: it is timed alone)."""
        if self.first_step_s is None:
            now = time.perf_counter()
            return dataclasses.replace(self, first_step_s=now - step_started, steady_start=now)
        return dataclasses.replace(self, steady_steps=self.steady_steps + 1)

    def seconds(self) -> float:
        """Wall seconds since the loop began."""
        return time.perf_counter() - self.started

    def images_per_s(self, batch_size: int) -> float:
        """Throughput after the first step (0 until a second step is done)."""
        if not self.steady_steps:
            return 0.0
        return self.steady_steps * batch_size / max(time.perf_counter() - self.steady_start, 1e-9)
