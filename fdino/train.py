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
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .checks import check_int, check_real
from .config import DinoConfig
from .data import build_dataset, multicrop_loader
from .diagnostics import collapse_report
from .distributed import DistInfo, broadcast_state_, init_from_env, mean_reducer, shutdown
from .loop_state import LoopState, StepTimer
from .run_log import MetricsLog, finish_report, remove_snapshots
from .state import TrainState, init_state
from .step import train_step, train_step_eager
from .trackers import check_available, make_trackers, parse_trackers
from .train_eval import EvalSets, evaluate_and_snapshot, save_attention


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss or the parameters stopped being finite."""


DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """How to run a training job (the config says what to train)."""

    data: str = "shapes10"
    """Data set name (shapes10, cifar10, cifar100, stl10, fashion-mnist) or an image folder."""
    data_root: str | None = None
    """Where torchvision data sets / Fashion-MNIST files are (default $FDINO_DATA or ~/.cache/fdino)."""
    download: bool = False
    """Let torchvision download a missing data set (needs a network)."""
    run_dir: str = "runs/demo"
    """Folder for checkpoints, logs, plots (`fdino train` without it: runs/<data>-<preset>)."""
    device: str = dataclasses.field(default="auto", metadata={"choices": DEVICES})
    """'auto' (CUDA if present, else CPU), 'cuda' or 'cpu'."""
    compile: bool = True
    """Use the compiled train_step (torch.compile); off: the eager reference step."""
    workers: int = 2
    """DataLoader worker processes."""
    log_every: int = 10
    """Steps between metric reads (the only host syncs of the loop)."""
    ckpt_every: int = 100
    """Steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept on disk."""
    eval_every: int = 1000
    """Steps between k-NN evaluations of the teacher, besides the start and the end (0: those two only)."""
    knn_k: int = 20
    """k of the weighted k-NN evaluation."""
    eval_samples: int = 2000
    """Memory-bank and query images used by k-NN during training (0: all)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0: the whole schedule)."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint) once this much wall time has passed in this process (0: no limit)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): bitwise reproducible runs and resumes."""
    attention_images: int = 4
    """Images whose attention maps are saved at each k-NN evaluation and at the end (ViT backbones)."""
    embedding_snapshots: bool = True
    """At each k-NN evaluation: PCA of the query features in embeddings/, attention maps in attention/, to trackers."""
    embedding_tsne: bool = False
    """Add a t-SNE of the query features to each snapshot (exact: ~20 s per evaluation on 2 CPU cores)."""
    tensorboard: bool = True
    """Write TensorBoard events to run_dir/tb (off: drops tensorboard from the trackers)."""
    trackers: str = "tensorboard"
    """Experiment trackers, comma-separated: tensorboard, mlflow (run_dir/mlruns), wandb (offline); 'none'."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        # Checked here, not mid-run: a bad value must fail before any compile or data work starts.
        for name, lo in (
            ("workers", 0),
            ("log_every", 1),
            ("ckpt_every", 1),
            ("keep_checkpoints", 1),
            ("eval_every", 0),
            ("knn_k", 1),
            ("eval_samples", 0),
            ("max_steps", 0),
            ("attention_images", 0),
        ):
            check_int(f"TrainOptions.{name}", getattr(self, name), lo=lo)
        check_real("TrainOptions.max_minutes", self.max_minutes, lo=0)  # 0: no limit
        if self.device not in DEVICES:
            raise ValueError(f"TrainOptions.device={self.device!r} is invalid: choose one of {DEVICES}")
        parse_trackers(self.trackers)

    @property
    def tracker_names(self) -> tuple[str, ...]:
        """The trackers this run writes to: ``trackers`` less tensorboard when ``tensorboard`` is off."""
        return tuple(n for n in parse_trackers(self.trackers) if self.tensorboard or n != "tensorboard")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options that may change when a run is resumed (how it runs, not what it computes).
RESUMABLE_OVERRIDES = (
    "device",
    "compile",
    "workers",
    "log_every",
    "ckpt_every",
    "keep_checkpoints",
    "eval_every",
    "max_steps",
    "max_minutes",
    "progress",
    "tensorboard",
    "trackers",
    "deterministic",
    "embedding_snapshots",
    "embedding_tsne",
)


def resolve_device(name: str, info_device: torch.device) -> str:
    """``name`` is one of DEVICES (TrainOptions checks it); 'auto' follows the distributed setup."""
    if name == "auto":
        return info_device.type
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available; use --device cpu")
    return name


def run(cfg: DinoConfig, opts: TrainOptions, *, overwrite: bool = False) -> dict[str, Any]:
    """Start a new run in ``opts.run_dir`` and train; returns the summary."""
    run_dir = Path(opts.run_dir)
    if ckpt.list_checkpoints(run_dir) and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints; resume it with --resume {run_dir} or start over with --overwrite"
        )
    return _train(cfg, opts, resume_from=None, overwrite=overwrite)


def resume(run_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its newest checkpoint (mid-epoch)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} is missing: {run_dir} is not an fdino run folder")
    meta = json.loads(meta_path.read_text())
    bad = sorted(set(overrides) - set(RESUMABLE_OVERRIDES))
    if bad:
        raise ValueError(
            f"cannot change {bad} when resuming (they change what is computed); allowed: {list(RESUMABLE_OVERRIDES)}"
        )
    opts = TrainOptions(**{**meta["options"], **overrides, "run_dir": str(run_dir)})
    cfg = DinoConfig.from_dict(meta["config"])
    return _train(cfg, opts, resume_from=ckpt.resolve_checkpoint(run_dir))


def _train(cfg: DinoConfig, opts: TrainOptions, *, resume_from: Path | None, overwrite: bool = False) -> dict[str, Any]:
    info = init_from_env(None if opts.device == "auto" else opts.device)
    try:
        return _train_process(cfg, opts, info, resume_from, overwrite)
    finally:
        shutdown()


def _train_process(
    cfg: DinoConfig, opts: TrainOptions, info: DistInfo, resume_from: Path | None, overwrite: bool
) -> dict[str, Any]:
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
    if resume_from is None:
        state, loop = init_state(cfg, device=device), LoopState(steps_per_epoch=steps_per_epoch)
    else:
        state, saved_loop = ckpt.load_checkpoint(resume_from, device=device)
        if state.cfg != cfg:
            raise ValueError(f"{resume_from} was written with another config than {run_dir / 'run.json'}")
        loop = LoopState.from_dict(saved_loop, steps_per_epoch=steps_per_epoch)
        if int(state.step) != loop.step:
            raise ValueError(f"{resume_from} is inconsistent: state.step={int(state.step)} but loop step={loop.step}")
    reducer = None
    if info.enabled:
        broadcast_state_(state)
        # Different stochastic-depth draws per worker; rank 0 keeps the saved stream.
        state.rng[0] += info.rank * 1_000_003
        reducer = mean_reducer()
    step_fn = train_step if opts.compile else train_step_eager

    # --- outputs (rank 0 only) -----------------------------------------------------------------------
    if info.is_main and resume_from is None:
        start_run_folder(run_dir, cfg, opts, overwrite=overwrite)
    elif info.is_main:
        remove_snapshots(run_dir, after=loop.step)  # a killed run's past its checkpoint; this run redoes them
    evals = EvalSets.build(opts, cfg, device) if info.is_main else None
    knn_on = evals is not None and evals.labeled

    # --- evaluation at initialization ----------------------------------------------------------------
    init_snapshot = None  # its files are written now, its tracker records once the trackers exist
    if knn_on and loop.knn_init is None:
        knn_init, init_snapshot = evaluate_and_snapshot(run_dir, evals, state, 0, opts)
        loop = dataclasses.replace(loop, knn_init=knn_init, knn_raw_pixels=evals.raw_pixel_knn()).with_knn(0, knn_init)

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
        for _, epoch, crops, _labels in itertools.islice(loader.steps(loop.step), max(total - loop.step, 0)):
            crops = [c.to(device, non_blocking=True) for c in crops]
            step_started = time.perf_counter()
            state, metrics = step_fn(state, crops, reducer=reducer, world_size=info.world_size)
            if timer.first_step_s is None:
                float(metrics["loss"])  # the first step includes compilation: wait for it to time it alone
            timer = timer.after_step(step_started)
            loop = loop.after_step(images=cfg.batch_size)
            step = loop.step
            bar.update(1)
            if step % opts.log_every == 0 or step == total:
                last_values = read_step_metrics(metrics, step, run_dir)
                loop = log_reading(last_values, step, epoch, cfg, loop, timer, log, bar)
            if knn_on and opts.eval_every and step % opts.eval_every == 0:
                top1, snapshot = evaluate_and_snapshot(run_dir, evals, state, step, opts)
                loop = loop.with_knn(step, top1)
                log.snapshot(snapshot)
                log.scalar("knn/top1", loop.knn_history[-1].top1, step)
                bar.write(f"step {step}: teacher {opts.knn_k}-NN top-1 {loop.knn_history[-1].top1:.2f}%")
            out_of_time = opts.max_minutes > 0 and timer.seconds() > 60 * opts.max_minutes
            if step % opts.ckpt_every == 0 or step == total or out_of_time:
                loop = dataclasses.replace(loop, elapsed=elapsed_before + timer.seconds())
                _save(run_dir, state, metrics, loop, info, opts)
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
            top1, snapshot = evaluate_and_snapshot(run_dir, evals, state, loop.step, opts)
            loop = loop.with_knn(loop.step, top1)
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
        )
        log.artifacts([run_dir / "curves.png", run_dir / "summary.json", *([attention] if attention else [])])
    except BaseException:
        log.close(failed=True)
        raise
    log.close()
    return summary


def start_run_folder(run_dir: Path, cfg: DinoConfig, opts: TrainOptions, *, overwrite: bool) -> None:
    """run.json of a new run; with ``overwrite``, the old run's checkpoints and metrics go first."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in ckpt.list_checkpoints(run_dir):
            old.unlink()
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    remove_snapshots(run_dir)  # a new run's folder may hold those of one that died before its first checkpoint
    meta = {"config": cfg.to_dict(), "options": opts.to_dict()}
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_step_metrics(metrics: dict[str, torch.Tensor], step: int, run_dir: Path) -> dict[str, float]:
    values = {k: float(v) for k, v in metrics.items()}  # the loop's only per-log host sync
    if not math.isfinite(values["loss"]):
        last = ckpt.list_checkpoints(run_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"non-finite loss ({values['loss']}) at step {step}; stopped, {where}. Likely causes: a learning rate "
            "too high for this batch size, fp16 overflow (use bf16), or corrupt inputs. Resume from the "
            "checkpoint with a lower --lr or a longer --warmup-epochs."
        )
    return values


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


def params_finite(state: TrainState) -> bool:
    norms = torch._foreach_norm(list(state.student.values()) + list(state.teacher.values()))
    return bool(torch.isfinite(torch.stack(norms)).all() and torch.isfinite(state.center).all())


def _save(
    run_dir: Path,
    state: TrainState,
    metrics: dict[str, torch.Tensor],
    loop: LoopState,
    info: DistInfo,
    opts: TrainOptions,
) -> None:
    """Checkpoint on rank 0, only a state whose loss and parameters are finite."""
    if not info.is_main:
        return
    read_step_metrics(metrics, loop.step, run_dir)
    if not params_finite(state):
        raise NonFiniteLossError(
            f"parameters became non-finite at step {loop.step}; not saved, previous checkpoints kept"
        )
    ckpt.save_checkpoint(run_dir, state, loop.to_dict(), keep=opts.keep_checkpoints)  # rank 0: no RNG offset


def progress_bar(total: int, initial: int, *, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, desc="fdino train")
