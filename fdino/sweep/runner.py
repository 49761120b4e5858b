"""Running a sweep: one fdino training run per (variant, seed), resumable, then the report.

Layout of the sweep folder::

    sweep.json                      the spec (a rerun with another spec in the same folder is refused)
    <variant>/seed-<n>/             an ordinary fdino run folder (run.json, metrics.jsonl, ckpt-*.pt, ...)
    results.json, results.md, curves.png, heatmap.png (2-D grids)

A finished run (its summary.json exists) is not trained again; an interrupted one resumes from
its newest checkpoint, mid-epoch, exactly as ``fdino train --resume`` does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from .. import train
from .report import write_report
from .spec import SweepSpec

SPEC_FILE = "sweep.json"


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(spec), default=list))


def run_folder(out_dir: Path, variant_name: str, seed: int) -> Path:
    """``out_dir/<variant as a folder name>/seed-<seed>``."""
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "_", variant_name).strip("_") or "variant"
    return out_dir / slug / f"seed-{seed}"


def run_sweep(
    spec: SweepSpec, out_dir: str | Path, *, overwrite: bool = False, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train every run of ``spec`` that is not finished yet, then write the report; returns results.json's dict."""
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
    for i, (variant, seed, cfg, opts) in enumerate(runs, 1):
        run_dir = run_folder(out_dir, variant.name, seed)
        label = f"[{i}/{len(runs)}] {variant.name}, seed {seed}"
        if _finished(run_dir, cfg):
            say(f"{label}: finished earlier, kept")
            continue
        if ckpt.list_checkpoints(run_dir) and _same_config(run_dir, cfg):
            say(f"{label}: resuming {run_dir}")
            train.resume(run_dir)
        else:
            say(f"{label}: training in {run_dir}")
            train.run(cfg, dataclasses.replace(opts, run_dir=str(run_dir)), overwrite=True)
    return write_report(spec, out_dir, [(v, s, run_folder(out_dir, v.name, s)) for v, s, _, _ in runs])


def _same_config(run_dir: Path, cfg) -> bool:
    """The run folder was started with ``cfg`` (steps_per_epoch aside: the trainer fills it in)."""
    meta = run_dir / "run.json"
    if not meta.exists():
        return False
    saved = dict(json.loads(meta.read_text())["config"])
    saved.pop("steps_per_epoch", None)
    wanted = cfg.to_dict()
    wanted.pop("steps_per_epoch", None)
    return json.loads(json.dumps(wanted)) == saved


def _finished(run_dir: Path, cfg) -> bool:
    return (run_dir / "summary.json").exists() and _same_config(run_dir, cfg)


__all__ = ["SPEC_FILE", "run_folder", "run_sweep", "spec_to_dict"]
