"""Is one batched run of N variants faster than N runs one after another, here? A short measurement.

Batching the math does not pay by itself on a few CPU cores (the vmapped step of N variants can
take longer than N single steps); what it saves is the input pipeline (crops rendered once per
seed instead of once per variant) and, on a GPU, the launch overhead of small models. So the
choice is measured, not assumed: a few eager steps of both kinds on crops of the run's shapes, and
the time to render one batch, combined into seconds per step of all variants:

    sequential = N x (single step + render)      batched = batched step + seeds x render

Eager steps stand in for compiled ones (compiling both to decide would cost minutes); the bench
(bench/bench_batched.py) measures the compiled steps and the whole job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..config import DinoConfig
from ..data import multicrop_loader
from ..state import init_state
from ..step import train_step_eager
from .state import init_batched
from .step import batched_train_step_eager


@dataclass(frozen=True)
class Choice:
    """The measurement and what it chose (seconds per step of all N variants)."""

    batched: bool
    sequential_s: float
    batched_s: float
    render_s: float

    def message(self, n: int) -> str:
        way = "one batched run" if self.batched else "one run after another"
        return (
            f"{n} variants train as {way}: measured here {self.batched_s:.3f} s per step batched against "
            f"{self.sequential_s:.3f} s one by one (render {self.render_s:.3f} s per batch); --batched on|off overrides"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocations, first-call caches
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def random_crops(cfg: DinoConfig, device: torch.device, n: int | None = None) -> list[torch.Tensor]:
    """Crops of ``cfg``'s shapes (``[B, 3, S, S]``, or ``[n, B, 3, S, S]``) with random pixels."""
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    lead = (cfg.batch_size,) if n is None else (n, cfg.batch_size)
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*lead, 3, s, s, generator=g).to(device) for s in sizes]


def render_seconds(cfg: DinoConfig, dataset: Dataset, repeats: int = 2) -> float:
    """Seconds to render one multi-crop batch in this process (what each extra seed's loader costs)."""
    loader = multicrop_loader(cfg, dataset, num_workers=0)
    stream = loader.steps(0)
    next(stream)
    start = time.perf_counter()
    for _ in range(repeats):
        next(stream)
    return (time.perf_counter() - start) / repeats


def measure(cfgs: Sequence[DinoConfig], dataset: Dataset, device: torch.device | str, *, repeats: int = 2) -> Choice:
    """Time ``repeats`` eager steps of each kind for ``cfgs`` (one structure) and one batch render."""
    device = torch.device(device)
    cfgs = list(cfgs)
    render = render_seconds(cfgs[0], dataset, repeats)
    states = [init_state(c, device=device) for c in cfgs]
    crops = random_crops(cfgs[0], device)

    def one_by_one():
        for i, state in enumerate(states):
            states[i], _ = train_step_eager(state, crops)

    bstate = init_batched(cfgs, device=device)
    stacked = [c.expand(len(cfgs), *c.shape) for c in crops]

    def together():
        batched_train_step_eager(bstate, stacked)

    single = _timed(one_by_one, repeats, device)
    batched = _timed(together, repeats, device)
    seeds = len({c.seed for c in cfgs})
    sequential_s = single + len(cfgs) * render
    batched_s = batched + seeds * render
    return Choice(batched=batched_s < sequential_s, sequential_s=sequential_s, batched_s=batched_s, render_s=render)


__all__ = ["Choice", "measure", "random_crops", "render_seconds"]
