"""The main job: train DINO on a data set, watch it learn, stop at any moment, resume exactly.

    summary = fdino.train.run(cfg, TrainOptions(data="shapes10", run_dir="runs/demo"))

The run folder holds ``run.json`` (config and options), ``metrics.jsonl``, the trackers' records
(TensorBoard events in ``tb/``; optionally MLflow in ``mlruns/``, W&B in ``wandb/``), checkpoints
``ckpt-<step>.pt`` (state + loader position, atomic, newest few kept), ``summary.json``,
``curves.png``, snapshots per k-NN evaluation in ``embeddings/`` and ``attention/``. ``resume(run_dir)``
continues from the newest checkpoint mid-epoch: the data order and augmentations are functions of
(seed, epoch, index) and the step's randomness comes from the state, so an interrupted and resumed
run ends bitwise equal to an uninterrupted one (CPU, deterministic mode).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import run_folder as rf
from .budget import parse_budget
from .checks import check_int
from .compile_cache import compile_cache_stats, enable_compile_cache
from .config import DinoConfig
from .data import build_dataset, multicrop_loader
from .diagnostics import collapse_report
from .distributed import DistInfo, broadcast_state_, init_from_env, mean_reducer, rank0_decides, shutdown
from .loop_state import LoopState, StepTimer
from .precision import precision_note, resolve_precision
from .run_log import MetricsLog, finish_report, remove_snapshots
from .state import init_state
from .step import train_step, train_step_eager
from .trackers import check_available, make_trackers
from .train_budget import fit_to_budget
from .train_eval import EvalSets, evaluate_and_snapshot, save_attention
from .train_guard import (  # noqa: F401 (NonFiniteLossError, params_finite: API)
    NonFiniteLossError,
    check_finite,
    params_finite,
    read_step_metrics,
    save_checked,
)
from .train_options import RESUMABLE_OVERRIDES, TrainOptions, resolve_device
from .train_probe import OnlineProbe
from .weights.start import start_from_weights


def _writes_folder() -> bool:
    """Rank 0 (or a plain process) writes the run folder; torchrun's other ranks only read it."""
    return int(os.environ.get("RANK", "0")) == 0


def _folder_lock(run_dir: Path):
    return rf.RunLock(run_dir) if _writes_folder() else nullcontext()


def run(cfg: DinoConfig, opts: TrainOptions, *, overwrite: bool = False) -> dict[str, Any]:
    """Start a new run in ``opts.run_dir`` and train; returns the summary.

    With ``overwrite`` the old run in the folder is set aside, deleted once the new run's first checkpoint
    is on disk, and put back if the new run fails before that.
    """
    run_dir = Path(opts.run_dir)
    with _folder_lock(run_dir):
        if _writes_folder():
            rf.recover(run_dir, ckpt.list_checkpoints)
        if ckpt.list_checkpoints(run_dir) and not overwrite:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints; resume it with --resume {run_dir} or start over with --overwrite"
            )
        try:
            return _train(cfg, opts, meta=None, overwrite=overwrite)
        except BaseException:
            if _writes_folder() and overwrite and rf.restore_replaced(run_dir):
                warnings.warn(
                    f"{run_dir}: the new run failed before its first checkpoint; the old run is restored", stacklevel=2
                )
            raise


def resume(run_dir: str | Path, *, skip_batches: int = 0, **overrides: Any) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its newest valid checkpoint (mid-epoch).

    ``overrides``: options of `RESUMABLE_OVERRIDES` (how it runs) and config fields of
    `fdino.run_folder.RESUMABLE_CONFIG` (recorded in run.json as a change at the checkpoint's step);
    ``skip_batches``: batches to step over from there (a batch that made the loss non-finite).
    """
    run_dir = Path(run_dir)
    check_int("skip_batches", skip_batches, lo=0)
    config_changes = {k: overrides.pop(k) for k in list(overrides) if k in rf.RESUMABLE_CONFIG}
    bad = sorted(set(overrides) - set(RESUMABLE_OVERRIDES))
    if bad:
        raise ValueError(
            f"cannot change {bad} when resuming (they change what is computed); allowed: "
            f"{list(RESUMABLE_OVERRIDES) + list(rf.RESUMABLE_CONFIG)} and skip_batches"
        )
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist: it is not an fdino run folder")
    with _folder_lock(run_dir):
        if _writes_folder():
            rf.recover(run_dir, ckpt.list_checkpoints)
        meta = rf.read_run_meta(run_dir, ckpt.newest_run_meta)
        opts = TrainOptions(**{**meta["options"], **overrides, "run_dir": str(run_dir)})
        cfg = DinoConfig.from_dict(meta["config"])
        change = (config_changes, skip_batches) if config_changes or skip_batches else None
        return _train(cfg, opts, meta=meta, change=change)


def _train(
    cfg: DinoConfig,
    opts: TrainOptions,
    *,
    meta: dict[str, Any] | None,
    overwrite: bool = False,
    change: tuple[dict[str, Any], int] | None = None,
) -> dict[str, Any]:
    """``meta``: the run.json of the run to resume (None: a new run)."""
    info = init_from_env(None if opts.device == "auto" else opts.device, timeout_minutes=opts.dist_timeout_minutes)
    try:
        return _train_process(cfg, opts, info, meta, overwrite, change)
    finally:
        shutdown()


def _train_process(
    cfg: DinoConfig,
    opts: TrainOptions,
    info: DistInfo,
    meta: dict[str, Any] | None,
    overwrite: bool,
    change: tuple[dict[str, Any], int] | None,
) -> dict[str, Any]:
    job_started = time.perf_counter()  # a --budget counts from here
    # Compiled graphs persist across runs (the ViT step takes minutes to build on a small CPU).
    compile_cache = (enable_compile_cache(), compile_cache_stats()) if opts.compile else None
    device = torch.device(resolve_device(opts.device, info.device))
    if device.type == "cuda" and info.enabled:
        device = info.device
    if opts.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir = Path(opts.run_dir)
    if info.is_main:
        check_available(opts.tracker_names)  # a missing extra fails before any data or compile work

    # --- input ---------------------------------------------------------------------------------------
    train_src = build_dataset(
        opts.data, root=opts.data_root, split="train", download=opts.download, image_size=cfg.global_crop_size
    )
    loader = multicrop_loader(
        cfg, train_src.dataset, num_workers=opts.workers, rank=info.rank, world_size=info.world_size
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{opts.data} has {len(train_src)} images, fewer than one batch of {cfg.batch_size}; lower --batch-size"
        )
    cfg = cfg.replace(steps_per_epoch=steps_per_epoch)

    # --- state ---------------------------------------------------------------------------------------
    new_run = meta is None
    saved_probe = None  # the online linear probe's tensors in the checkpoint resumed from
    budget = parse_budget(opts.budget) if new_run else None  # a resume keeps the length it was fitted to
    if new_run:
        # run.json records what ran: the precision 'auto' chose here, a step budget's length.
        precision = precision_note(cfg.precision, device)
        cfg = cfg.replace(precision=resolve_precision(cfg.precision, device))
        if budget is not None and budget.steps is not None:
            cfg = cfg.replace(schedule_steps=budget.steps)
        state, loop = init_state(cfg, device=device), LoopState(steps_per_epoch=steps_per_epoch)
        if opts.init_weights:  # only here: a resume continues from its checkpoint, never from the source
            state = start_from_weights(state, opts.init_weights)
        meta = {"config": cfg.to_dict(), "options": opts.to_dict(), "precision": precision}
    else:
        state, saved_loop, resume_from = ckpt.load_newest_valid(run_dir, device=device)
        saved_probe = ckpt.read_payload(resume_from).get("probe")
        if state.cfg != rf.config_at(meta, int(state.step)).replace(steps_per_epoch=steps_per_epoch):
            raise ValueError(f"{resume_from} was written with another config than {run_dir / 'run.json'}")
        loop = LoopState.from_dict(saved_loop, steps_per_epoch=steps_per_epoch)
        if int(state.step) != loop.step:
            raise ValueError(f"{resume_from} is inconsistent: state.step={int(state.step)} but loop step={loop.step}")
        if change is not None:  # --resume with new settings: from this checkpoint's step on, on record
            meta = rf.with_change(meta, loop.step, *change)
            state = state.replace(cfg=state.cfg.replace(**change[0]))
            loop = dataclasses.replace(loop, skipped_batches=loop.skipped_batches + change[1])
        cfg = state.cfg
    reducer = None
    if info.enabled:
        broadcast_state_(state)
        # Different stochastic-depth draws per worker; rank 0 keeps the saved stream.
        state.rng[0] += info.rank * 1_000_003
        reducer = mean_reducer()
    step_fn = train_step if opts.compile else train_step_eager

    # --- outputs (rank 0 only) -----------------------------------------------------------------------
    if info.is_main and new_run:
        start_run_folder(run_dir, meta, overwrite=overwrite)
    elif info.is_main:
        rf.write_run_meta(run_dir, meta)  # with this resume's change, if any
        remove_snapshots(run_dir, after=loop.step)  # a killed run's past its checkpoint; this run redoes them
    evals = EvalSets.build(opts, cfg, device) if info.is_main else None
    knn_on = evals is not None and evals.labeled
    probe = OnlineProbe.start(opts, evals, saved_probe, device) if info.is_main else None

    # --- evaluation at initialization ----------------------------------------------------------------
    init_snapshot = None  # its files are written now, its tracker records once the trackers exist
    eval_s = 0.0
    if knn_on and loop.knn_init is None:
        eval_started = time.perf_counter()
        knn_init, probe_init, init_snapshot = evaluate_and_snapshot(run_dir, evals, state, 0, opts, probe)
        eval_s = time.perf_counter() - eval_started
        loop = dataclasses.replace(loop, knn_init=knn_init, knn_raw_pixels=evals.raw_pixel_knn())
        loop = loop.with_knn(0, knn_init, probe_init)

    # --- a time budget: measure, then fix the schedule's length before the first real step -------------
    fit, deadline = None, None
    if budget is not None and budget.seconds is not None:
        fit = fit_to_budget(
            budget, job_started=job_started, eval_s=eval_s, step_fn=step_fn, state=state, loader=loader,
            device=device, reducer=reducer, info=info, opts=opts,
        )  # fmt: skip
        cfg = cfg.replace(schedule_steps=fit.schedule_steps)
        state = state.replace(cfg=cfg)
        meta = {**meta, "config": cfg.to_dict(), "budget": fit.to_dict()}
        if info.is_main:
            rf.write_run_meta(run_dir, meta)
            print(
                f"fdino train: budget {fit.budget}: {fit.schedule_steps} steps fit (step {fit.costs.step_s:.3f} s, "
                f"set-up and compilation {fit.costs.spent_s:.0f} s; predicted {fit.predicted_s:.0f} s)"
            )
        # A hard stop if the machine slows down after the fit: leave time for the final evaluation and checkpoint.
        deadline = job_started + fit.budget_s - fit.costs.eval_s - fit.costs.checkpoint_s

    run_params = {"config": cfg.to_dict(), "options": opts.to_dict()}
    trackers = make_trackers(opts.tracker_names, run_dir, run_params, loop.step) if info.is_main else []
    log = MetricsLog(run_dir, enabled=info.is_main, trackers=trackers)
    log.snapshot(init_snapshot)

    # --- loop ----------------------------------------------------------------------------------------
    total = cfg.total_steps if opts.max_steps <= 0 else min(opts.max_steps, cfg.total_steps)
    elapsed_before = loop.elapsed  # wall time of the processes before this one
    timer = StepTimer.start()
    bar = progress_bar(total, loop.step, enabled=opts.progress and info.is_main)
    last_values: dict[str, float] = {}
    try:
        for _, epoch, crops, labels in itertools.islice(loader.steps(loop.data_position), max(total - loop.step, 0)):
            crops = [c.to(device, non_blocking=True) for c in crops]
            step_started = time.perf_counter()
            state, metrics = step_fn(state, crops, reducer=reducer, world_size=info.world_size)
            if timer.first_step_s is None:
                float(metrics["loss"])  # the first step includes compilation: wait for it to time it alone
            timer = timer.after_step(step_started)
            loop = loop.after_step(images=cfg.batch_size)
            step = loop.step
            bar.update(1)
            if probe is not None:  # its own update on the detached teacher; DINO's state is only read
                probe.after_step(step, state, crops, labels)
            if step % opts.log_every == 0 or step == total:
                last_values = read_step_metrics(metrics, step, run_dir)
                last_values.update(probe.reading() if probe is not None else {})
                loop = log_reading(last_values, step, epoch, cfg, loop, timer, log, bar)
            if knn_on and opts.eval_every and step % opts.eval_every == 0:
                top1, probe_top1, snapshot = evaluate_and_snapshot(run_dir, evals, state, step, opts, probe)
                loop = loop.with_knn(step, top1, probe_top1)
                log.snapshot(snapshot)
                log.scalar("knn/top1", loop.knn_history[-1].top1, step)
                if probe_top1 is not None:
                    log.scalar("probe/top1", probe_top1, step)
                bar.write(f"step {step}: teacher {opts.knn_k}-NN top-1 {loop.knn_history[-1].top1:.2f}%")
            late = (opts.max_minutes > 0 and timer.seconds() > 60 * opts.max_minutes) or (
                deadline is not None and time.perf_counter() > deadline
            )
            out_of_time = (opts.max_minutes > 0 or deadline is not None) and rank0_decides(late, info)
            if step % opts.ckpt_every == 0 or step == total or out_of_time:
                loop = dataclasses.replace(loop, elapsed=elapsed_before + timer.seconds())
                if info.is_main:
                    save_checked(
                        run_dir, state, metrics, loop, keep=opts.keep_checkpoints, run_meta=meta,
                        probe=probe.to_dict() if probe is not None else None,
                    )  # fmt: skip
                else:  # the same checks on the same (all-reduced) values: every rank stops where rank 0 does
                    check_finite(state, metrics, loop.step, run_dir)
            if out_of_time:
                break
    except BaseException:
        log.close(failed=True)  # the trackers mark the run failed; a resume continues it
        raise
    finally:
        bar.close()
    loop = dataclasses.replace(loop, elapsed=elapsed_before + timer.seconds())

    # --- summary (rank 0) ----------------------------------------------------------------------------
    if not info.is_main:
        return {}
    try:
        if knn_on and loop.step not in {r.step for r in loop.knn_history}:  # else the loop evaluated it already
            top1, probe_top1, snapshot = evaluate_and_snapshot(run_dir, evals, state, loop.step, opts, probe)
            loop = loop.with_knn(loop.step, top1, probe_top1)
            log.snapshot(snapshot)
        attention = save_attention(run_dir, evals, state, opts.attention_images)
        summary = finish_report(
            run_dir,
            cfg,
            opts,
            loop,
            timer,
            knn_queries=len(evals.query) if knn_on else None,
            knn_split=evals.note if evals is not None else "",
            attention=attention,
            skipped=loader.skipped,
            last_metrics=last_values,
            extra=run_extras(cfg, opts, meta, loop, fit, job_started, compile_cache),
        )
        log.artifacts([run_dir / "curves.png", run_dir / "summary.json", *([attention] if attention else [])])
    except BaseException:
        log.close(failed=True)
        raise
    log.close()
    return summary


def run_extras(
    cfg: DinoConfig, opts: TrainOptions, meta: dict, loop: LoopState, fit, job_started: float, compile_cache=None
) -> dict:
    """Summary keys of how this process ran: the precision, the compiled graphs (built or loaded from the
    cache), the budget and how much of the schedule it completed."""
    extra: dict[str, Any] = {"precision": meta.get("precision", cfg.precision)}  # run.json says why, if 'auto
    if compile_cache is not None:
        cache_dir, before = compile_cache
        graphs = compile_cache_stats().since(before)
        extra["compile"] = {
            "cache_dir": str(cache_dir),
            "graphs_loaded": graphs.loaded,
            "graphs_built": graphs.compiled,
            "note": graphs.describe(),
        }
    if opts.budget:
        extra["budget"] = {
            "budget": opts.budget,
            "schedule_steps": cfg.total_steps,
            "schedule_completed": round(loop.step / cfg.total_steps, 4),
            "job_wall_s": round(time.perf_counter() - job_started, 1),
            "fit": fit.to_dict() if fit is not None else None,  # None: a resume (fitted by the first process)
        }
    return extra


def start_run_folder(run_dir: Path, meta: dict[str, Any], *, overwrite: bool) -> None:
    """run.json of a new run; with ``overwrite``, the old run is set aside first (see `run`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and any(p.name not in (rf.LOCK_NAME, rf.REPLACED) for p in run_dir.iterdir()):
        rf.set_aside(run_dir)
    remove_snapshots(run_dir)  # a new run's folder may hold those of one that died before its first checkpoint
    rf.write_run_meta(run_dir, meta)


def log_reading(
    values: dict[str, float],
    step: int,
    epoch: int,
    cfg: DinoConfig,
    loop: LoopState,
    timer: StepTimer,
    log: MetricsLog,
    bar,
) -> LoopState:
    """Write a metric reading to the log and the progress bar; warn once if it shows collapse."""
    rate = timer.images_per_s(cfg.batch_size)
    log.write(step, epoch, values, images_per_s=rate)
    bar.set_postfix(
        loss=f"{values['loss']:.3f}",
        lr=f"{values['lr']:.2e}",
        T_t=f"{values['teacher_temp']:.3f}",
        img_s=f"{rate:.0f}",
        refresh=False,
    )
    loop, warn = loop.with_collapse_reading(collapse_report(values, cfg.out_dim))
    if warn:
        warnings.warn(loop.collapse_warning, stacklevel=2)
        bar.write(loop.collapse_warning)
        log.event("collapse_warning", loop.collapse_warning)
    return loop


def progress_bar(total: int, initial: int, *, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, desc="fdino train")
