"""The training job for N variants of one structure as one batched run; each writes an ordinary run folder.

    summaries = train_batched(cfgs, TrainOptions(data="shapes10"), ["runs/a", "runs/b", "runs/c"])

Variant i's folder holds what `fdino.train.run` writes (run.json, metrics.jsonl, checkpoints,
summary.json, curves.png), so every other command (eval, export, the sweep report, ``fdino train
--resume``) reads it as a single run. Variants that share a seed share their crops: the crops
are rendered once per seed, not once per variant (one loader per seed; the same data order and
augmentations a single run of that seed sees). ``resume=True`` continues from the newest step at
which every variant has a checkpoint. ``opts.workers`` loader processes are shared out among the
seeds' loaders (at least one each when ``workers > 0``).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from ..budget import parse_budget
from ..config import DinoConfig
from ..data import build_dataset, multicrop_loader
from ..diagnostics import collapse_report
from ..loop_state import LoopState, StepTimer
from ..run_folder import RunLock
from ..run_log import MetricsLog, finish_report
from ..state import default_device, init_state
from ..trackers import check_available, make_trackers
from ..train import (
    TrainOptions,
    progress_bar,
    read_step_metrics,
    resolve_device,
    start_run_folder,
)
from ..train_eval import EvalSets, evaluate_knn, save_attention
from ..train_guard import save_checked
from ..weights.start import start_from_weights
from .hyper import differing_fields
from .state import BatchedState, stack_states, unstack
from .step import batched_train_step, batched_train_step_eager


def common_checkpoint_step(run_dirs: Sequence[Path]) -> int | None:
    """The newest step at which every run folder has a checkpoint (None: there is none)."""
    steps = None
    for run_dir in run_dirs:
        found = {ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(run_dir)}
        steps = found if steps is None else steps & found
    return max(steps) if steps else None


def _apply_step_budget(cfgs: Sequence[DinoConfig], opts: TrainOptions) -> list[DinoConfig]:
    """``opts.budget`` as `fdino.train.run` reads it: a number of steps fixes every schedule's length;
    a time cannot be fitted here (one batched schedule is not what a single run would fit)."""
    budget = parse_budget(opts.budget)
    if budget is None:
        return list(cfgs)
    if budget.seconds is not None:
        raise ValueError(
            f"budget {budget.text!r} is a time: a batched run cannot fit each variant's schedule to it. Train the "
            "variants one by one (fdino train --budget, or fdino sweep, which does so for a time budget), or give "
            "the budget as a number of steps"
        )
    return [cfg.replace(schedule_steps=budget.steps) for cfg in cfgs]


def _check_group(cfgs: Sequence[DinoConfig], run_dirs: Sequence[Path]) -> None:
    if not cfgs or len(cfgs) != len(run_dirs):
        raise ValueError(f"give one run folder per variant: {len(cfgs)} configs, {len(run_dirs)} folders")
    if len(set(run_dirs)) != len(run_dirs):
        raise ValueError("two variants share a run folder; give each its own")
    for i, cfg in enumerate(cfgs[1:], 1):
        fields = differing_fields(cfgs[0], cfg)
        if fields:
            raise ValueError(f"variant {i} differs from variant 0 in {fields}: it cannot train in the same batch")


def train_batched(
    cfgs: Sequence[DinoConfig], opts: TrainOptions, run_dirs: Sequence[str | Path], *, resume: bool = False
) -> list[dict[str, Any]]:
    """Train every config of ``cfgs`` (one structure; see `fdino.batched.batch_groups`) in one batched run.

    ``opts.run_dir`` is ignored: variant i writes ``run_dirs[i]``. Without ``resume`` (or when the
    folders hold no common checkpoint) every variant starts fresh and replaces what its folder held.
    Returns each variant's summary. Each folder is locked for the whole run (`fdino.run_folder.RunLock`):
    a second sweep, or an `fdino train`, writing one of them stops with a message naming this process.
    """
    run_dirs = [Path(d) for d in run_dirs]
    cfgs = _apply_step_budget(cfgs, opts)
    _check_group(cfgs, run_dirs)
    with ExitStack() as locks:
        for run_dir in run_dirs:
            locks.enter_context(RunLock(run_dir))
        return _train_locked(cfgs, opts, run_dirs, resume=resume)


def _train_locked(
    cfgs: Sequence[DinoConfig], opts: TrainOptions, run_dirs: list[Path], *, resume: bool
) -> list[dict[str, Any]]:
    device = torch.device(resolve_device(opts.device, default_device()))
    if opts.deterministic:
        torch.use_deterministic_algorithms(True)
    check_available(opts.tracker_names)

    # --- input: one loader per seed -------------------------------------------------------------------
    train_src = build_dataset(
        opts.data, root=opts.data_root, split="train", download=opts.download, image_size=cfgs[0].global_crop_size
    )
    seeds = list(dict.fromkeys(cfg.seed for cfg in cfgs))
    first_of = {seed: next(c for c in cfgs if c.seed == seed) for seed in seeds}
    # The workers are shared out among the seeds' loaders (one process each at least): a run of 9 seeds must
    # not start 9 x workers processes on a machine sized for one run.
    workers = -(-opts.workers // len(seeds))
    loaders = {s: multicrop_loader(first_of[s], train_src.dataset, num_workers=workers) for s in seeds}
    steps_per_epoch = len(loaders[seeds[0]])
    if steps_per_epoch < 1:
        raise ValueError(
            f"{opts.data} has {len(train_src)} images, fewer than one batch of {cfgs[0].batch_size}; lower --batch-size"
        )
    cfgs = [cfg.replace(steps_per_epoch=steps_per_epoch) for cfg in cfgs]
    variant_seed = [seeds.index(cfg.seed) for cfg in cfgs]

    # --- state ----------------------------------------------------------------------------------------
    start = common_checkpoint_step(run_dirs) if resume else None
    if start is None:
        states = [init_state(cfg, device=device) for cfg in cfgs]
        if opts.init_weights:  # every variant starts from the same backbone, as `fdino train` would
            states = [start_from_weights(state, opts.init_weights) for state in states]
        loops = [LoopState(steps_per_epoch=steps_per_epoch) for _ in cfgs]
        for cfg, run_dir in zip(cfgs, run_dirs):
            start_run_folder(run_dir, run_meta(cfg, opts, run_dir), overwrite=True)
    else:
        states, loops = [], []
        for cfg, run_dir in zip(cfgs, run_dirs):
            state, saved = ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, start), device=device)
            if state.cfg != cfg:
                raise ValueError(f"{run_dir} was started with another config; train it again without resume")
            states.append(state)
            loops.append(LoopState.from_dict(saved, steps_per_epoch=steps_per_epoch))
    bstate = stack_states(states)
    del states
    step_fn = batched_train_step if opts.compile else batched_train_step_eager

    # --- outputs and the evaluation at initialization ---------------------------------------------------
    # k-NN numbers only: no per-evaluation snapshots (embeddings/, attention/step-N.png) for a sweep's
    # variants, which would cost V pictures per evaluation; `fdino train` one variant to watch it learn.
    evals = EvalSets.build(opts, cfgs[0], device)
    knn_on = evals.labeled
    if knn_on and any(loop.knn_init is None for loop in loops):
        raw = evals.raw_pixel_knn()
        for i, loop in enumerate(loops):
            if loop.knn_init is None:
                top1 = evaluate_knn(evals, unstack(bstate, i))
                loops[i] = dataclasses.replace(loop, knn_init=top1, knn_raw_pixels=raw).with_knn(0, top1)
    run_opts = [dataclasses.replace(opts, run_dir=str(d)) for d in run_dirs]
    logs = [
        MetricsLog(d, enabled=True, trackers=make_trackers(opts.tracker_names, d, _params(c, o), loops[0].step))
        for c, o, d in zip(cfgs, run_opts, run_dirs)
    ]

    # --- loop -------------------------------------------------------------------------------------------
    total = cfgs[0].total_steps if opts.max_steps <= 0 else min(opts.max_steps, cfgs[0].total_steps)
    step = loops[0].step
    elapsed_before = [loop.elapsed for loop in loops]
    timer = StepTimer.start()
    bar = progress_bar(total, step, enabled=opts.progress)
    last_values: list[dict[str, float]] = [{} for _ in cfgs]
    streams = [loaders[s].steps(step) for s in seeds]
    try:
        while step < total:
            drawn = [next(stream) for stream in streams]
            epoch = drawn[0][1]
            batch = _stack_crops([crops for _, _, crops, _ in drawn], variant_seed, device)
            step_started = time.perf_counter()
            bstate, metrics = step_fn(bstate, batch)
            if timer.first_step_s is None:
                metrics["loss"].sum().item()  # the first step includes compilation: time it alone
            timer = timer.after_step(step_started)
            loops = [loop.after_step(images=cfgs[0].batch_size) for loop in loops]
            step += 1
            bar.update(1)
            if step % opts.log_every == 0 or step == total:
                last_values, loops = _log(metrics, step, epoch, cfgs, loops, timer, logs, run_dirs, bar)
            if knn_on and opts.eval_every and step % opts.eval_every == 0:
                tops = [evaluate_knn(evals, unstack(bstate, i)) for i in range(len(cfgs))]
                loops = [loop.with_knn(step, top1) for loop, top1 in zip(loops, tops)]
                for log, top1 in zip(logs, tops):
                    log.scalar("knn/top1", top1, step)
                bar.write(f"step {step}: teacher {opts.knn_k}-NN top-1 " + ", ".join(f"{t:.1f}%" for t in tops))
            out_of_time = opts.max_minutes > 0 and timer.seconds() > 60 * opts.max_minutes
            if step % opts.ckpt_every == 0 or step == total or out_of_time:
                loops = [dataclasses.replace(lp, elapsed=e + timer.seconds()) for lp, e in zip(loops, elapsed_before)]
                _save_all(bstate, metrics, loops, run_dirs, opts)
            if out_of_time:
                break
    except BaseException:
        for log in logs:
            log.close(failed=True)
        raise
    finally:
        bar.close()
    loops = [dataclasses.replace(lp, elapsed=e + timer.seconds()) for lp, e in zip(loops, elapsed_before)]

    # --- summaries ----------------------------------------------------------------------------------------
    summaries = []
    for i, (cfg, o, run_dir, log) in enumerate(zip(cfgs, run_opts, run_dirs, logs)):
        state = unstack(bstate, i)
        loop = loops[i].with_knn(loops[i].step, evaluate_knn(evals, state)) if knn_on else loops[i]
        attention = save_attention(run_dir, evals, state, opts.attention_images)
        summary = finish_report(
            run_dir, cfg, o, loop, timer,
            knn_queries=len(evals.query) if knn_on else None, knn_split=evals.note, attention=attention,
            skipped=loaders[cfg.seed].skipped, last_metrics=last_values[i],
            extra={"batched_variants": len(cfgs)},
        )  # fmt: skip
        log.artifacts([run_dir / "curves.png", run_dir / "summary.json", *([attention] if attention else [])])
        log.close()
        summaries.append(summary)
    return summaries


def _params(cfg: DinoConfig, opts: TrainOptions) -> dict[str, Any]:
    return {"config": cfg.to_dict(), "options": opts.to_dict()}


def _stack_crops(per_seed: list[list[torch.Tensor]], variant_seed: list[int], device) -> list[torch.Tensor]:
    """V crops ``[N, B, C, H, W]``: each variant its seed's crops (a view, no copy, when all share one seed)."""
    n = len(variant_seed)
    if len(per_seed) == 1:
        return [c.to(device, non_blocking=True).expand(n, *c.shape) for c in per_seed[0]]
    moved = [[c.to(device, non_blocking=True) for c in crops] for crops in per_seed]
    return [torch.stack([moved[s][v] for s in variant_seed]) for v in range(len(moved[0]))]


def _log(metrics, step, epoch, cfgs, loops, timer, logs, run_dirs, bar) -> tuple[list[dict[str, float]], list]:
    """Each variant's reading to its own log (one host read of every metric); returns the readings and the
    loops with their collapse readings."""
    loops = list(loops)
    host = {k: v.detach().cpu() for k, v in metrics.items()}
    rate = timer.images_per_s(cfgs[0].batch_size)
    readings = []
    for i, (cfg, log, run_dir) in enumerate(zip(cfgs, logs, run_dirs)):
        values = read_step_metrics({k: v[i] for k, v in host.items()}, step, run_dir)
        log.write(step, epoch, values, images_per_s=rate)
        loops[i], warn = loops[i].with_collapse_reading(collapse_report(values, cfg.out_dim))
        if warn:
            warnings.warn(f"{run_dir}: {loops[i].collapse_warning}", stacklevel=2)
            log.event("collapse_warning", loops[i].collapse_warning)
        readings.append(values)
    bar.set_postfix(loss=" ".join(f"{r['loss']:.2f}" for r in readings), img_s=f"{rate:.0f}", refresh=False)
    return readings, loops


def run_meta(cfg: DinoConfig, opts: TrainOptions, run_dir: Path) -> dict:
    """A variant's run.json: what `fdino train` writes for the same run."""
    return {"config": cfg.to_dict(), "options": dataclasses.replace(opts, run_dir=str(run_dir)).to_dict()}


def _save_all(bstate: BatchedState, metrics, loops, run_dirs, opts: TrainOptions) -> None:
    host = metrics["loss"].detach().cpu()
    for i, (loop, run_dir) in enumerate(zip(loops, run_dirs)):
        state = unstack(bstate, i)
        meta = run_meta(state.cfg, opts, run_dir)
        save_checked(run_dir, state, {"loss": host[i]}, loop, keep=opts.keep_checkpoints, run_meta=meta)


__all__ = ["common_checkpoint_step", "train_batched"]
