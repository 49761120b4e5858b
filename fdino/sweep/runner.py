"""Running a sweep: one fdino training run per (variant, seed), resumable, then the report.

Layout of the sweep folder::

    sweep.json                      the spec (a rerun with another spec in the same folder is refused)
    <variant>/seed-<n>/             an ordinary fdino run folder (run.json, metrics.jsonl, ckpt-*.pt, ...)
    results.json, results.md, curves.png, heatmap.png (2-D grids)

A finished run (its summary.json exists) is not trained again; an interrupted one resumes from
its newest checkpoint, mid-epoch, exactly as ``fdino train --resume`` does.

Variants that differ only in batchable fields (`fdino.batched.BATCHABLE`: seeds, temperatures,
momentums, lr, ...) can train as one batched run (`fdino.batched.train_batched`) that writes the
same folders. ``batched="auto"`` decides per group from a short measurement on this device
(`fdino.batched.measure`), "on" and "off" force it; the sweep says which it chose.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from .. import checkpoint as ckpt
from .. import train
from ..batched import batch_groups
from ..batched.hyper import unbatchable
from ..batched.measure import measure
from ..batched.train import train_batched
from ..budget import parse_budget
from ..config import DinoConfig
from ..data import build_dataset
from ..state import default_device
from .report import write_report
from .spec import BATCHED_MODES, SweepSpec

SPEC_FILE = "sweep.json"


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(spec), default=list))


def run_folder(out_dir: Path, variant_name: str, seed: int) -> Path:
    """``out_dir/<variant as a folder name>/seed-<seed>``."""
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "_", variant_name).strip("_") or "variant"
    return out_dir / slug / f"seed-{seed}"


def run_sweep(
    spec: SweepSpec,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    batched: str = "auto",
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every run of ``spec`` that is not finished yet, then write the report; returns results.json's dict.

    ``batched``: "auto" (measure, then batch the groups where it is faster), "on" or "off".
    """
    if batched not in BATCHED_MODES:
        raise ValueError(f"batched={batched!r}: choose one of {BATCHED_MODES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / SPEC_FILE
    wanted = spec_to_dict(spec)
    if spec_path.exists() and not overwrite:
        if json.loads(spec_path.read_text()) != wanted:
            raise FileExistsError(
                f"{out_dir} holds another sweep ({spec_path} differs from this spec); use another folder, or "
                "--overwrite to start this one there (finished runs of the same variant and seed are kept only "
                "if their config is unchanged)"
            )
    spec_path.write_text(json.dumps(wanted, indent=2) + "\n")
    runs = list(spec.runs())
    pending = []
    for i, (variant, seed, cfg, opts) in enumerate(runs, 1):
        run_dir = run_folder(out_dir, variant.name, seed)
        label = f"[{i}/{len(runs)}] {variant.name}, seed {seed}"
        if _finished(run_dir, cfg, opts):
            say(f"{label}: finished earlier, kept")
        else:
            pending.append((label, cfg, opts, run_dir))
    timed = _time_budget(spec)
    if timed and pending and batched != "off":
        # Each run measures this machine and fits its own schedule length to the time: one batched
        # schedule for all would not be the recipe a single `fdino train --budget` runs.
        say(f"budget {timed}: the runs train one by one, each fitting its schedule to the budget")
    for group in batch_groups([cfg for _, cfg, _, _ in pending]):
        members = [pending[i] for i in group]
        if len(members) > 1 and not timed and _batch_this(members, batched, say):
            _train_together(members, say)
        else:
            for label, cfg, opts, run_dir in members:
                _train_one(label, cfg, opts, run_dir, say)
    return write_report(spec, out_dir, [(v, s, run_folder(out_dir, v.name, s)) for v, s, _, _ in runs])


def _train_one(label: str, cfg, opts: train.TrainOptions, run_dir: Path, say) -> None:
    # The compiled single step is one graph per config, and dynamo keeps at most recompile_limit (8)
    # graphs per function: from the 9th variant of a sweep on, the step would silently run eager.
    # A variant never reuses another's graph, so forgetting them all loses nothing.
    if opts.compile:
        torch._dynamo.reset()
    if ckpt.list_checkpoints(run_dir) and _same_config(run_dir, cfg, opts):
        say(f"{label}: resuming {run_dir}")
        train.resume(run_dir)
    else:
        say(f"{label}: training in {run_dir}")
        train.run(cfg, dataclasses.replace(opts, run_dir=str(run_dir)), overwrite=True)


def _batch_this(members, batched: str, say) -> bool:
    if batched != "auto":
        return batched == "on"
    cfgs, opts = [m[1] for m in members], members[0][2]
    if unbatchable(cfgs[0]) is not None:
        return False  # not vmapped (fdino.batched.step.check_batched_batch says why)
    data = build_dataset(opts.data, root=opts.data_root, split="train", image_size=cfgs[0].global_crop_size)
    device = train.resolve_device(opts.device, default_device())
    choice = measure(cfgs, data.dataset, device)
    say(choice.message(len(cfgs)))
    return choice.batched


def _train_together(members, say) -> None:
    """One batched run of the group; resumed when every member has a checkpoint of its config."""
    cfgs, opts, run_dirs = [m[1] for m in members], members[0][2], [m[3] for m in members]
    resume = all(ckpt.list_checkpoints(d) and _same_config(d, c, opts) for c, d in zip(cfgs, run_dirs))
    for label, _, _, run_dir in members:
        say(f"{label}: {'resuming' if resume else 'training'} in {run_dir} (batched with {len(members) - 1} more)")
    train_batched(cfgs, opts, run_dirs, resume=resume)


def _time_budget(spec: SweepSpec) -> str:
    """The sweep's budget when it is a time ('' for none or a number of steps)."""
    budget = parse_budget(str(dict(spec.options).get("budget", "")))
    return budget.text if budget is not None and budget.seconds is not None else ""


def _same_config(run_dir: Path, cfg, opts: train.TrainOptions) -> bool:
    """The run folder was started with ``cfg`` (steps_per_epoch aside: the trainer fills it in; precision
    'auto' matches the precision the trainer chose for it; the schedule length a budget fitted matches
    when the run was given the same budget)."""
    meta = run_dir / "run.json"
    if not meta.exists():
        return False
    try:  # in today's spelling: fields added since it was written at their defaults, old aliases folded
        run_meta = json.loads(meta.read_text())
        saved = DinoConfig.from_dict(run_meta["config"]).to_dict()
    except (ValueError, TypeError, KeyError):
        return False
    saved.pop("steps_per_epoch", None)
    wanted = cfg.to_dict()
    wanted.pop("steps_per_epoch", None)
    if wanted["precision"] == "auto":
        saved["precision"] = "auto"
    if opts.budget and (run_meta.get("options") or {}).get("budget") == opts.budget:
        wanted["schedule_steps"] = saved.get("schedule_steps")
    return json.loads(json.dumps(wanted)) == json.loads(json.dumps(saved))


def _finished(run_dir: Path, cfg, opts: train.TrainOptions) -> bool:
    return (run_dir / "summary.json").exists() and _same_config(run_dir, cfg, opts)


__all__ = ["SPEC_FILE", "run_folder", "run_sweep", "spec_to_dict"]
