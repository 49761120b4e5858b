"""``fdino sweep``: run a sweep file, or a built-in study of the paper's ablations, on any data set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from .spec import BATCHED_MODES, STUDIES  # noqa: PLC0415  (the command list is built without the sweep's imports)

    p = subparsers.add_parser(
        "sweep",
        help="train many variants x seeds of a config and compare them (ablations, grids)",
        description="Train every variant of a sweep (a TOML/JSON spec file, or --study NAME: one of the paper's "
        "ablations) once per seed, each as an ordinary fdino run under OUT/<variant>/seed-<n>, then write "
        "results.md, results.json, curves.png (k-NN, teacher entropy and KL against the step; raw pixels and the "
        "network at init as baselines) and heatmap.png for 2-D grids. Finished runs are kept, interrupted ones "
        f"resume. Studies: {', '.join(STUDIES)}.",
    )
    p.add_argument("spec", nargs="?", type=Path, help="sweep file (.toml or .json); see fdino.sweep.spec")
    p.add_argument("--study", choices=sorted(STUDIES), help="a built-in study instead of a file")
    p.add_argument("--out", type=Path, help="sweep folder (default: runs/sweep-<name>)")
    p.add_argument("--overwrite", action="store_true", help="replace another sweep's spec in --out")
    p.add_argument(
        "--batched",
        choices=BATCHED_MODES,
        default="auto",
        help="train variants that differ only in scalars (seeds, temperatures, momentums, lr, ...) as one vmapped "
        "batch: auto (default) measures which is faster on this device and says so; on; off (one after another)",
    )
    g = p.add_argument_group("with --study (a file sets these itself)")
    g.add_argument("--preset", default="small32_resnet", help="base preset (default: small32_resnet)")
    g.add_argument("--data", default="shapes10", help="data set name or image folder (default: shapes10)")
    g.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    g.add_argument("--epochs", type=int, help="DinoConfig.epochs of every variant (the schedules' length)")
    g.add_argument("--max-steps", type=int, default=0, help="stop every run after this many steps (0: all)")
    g.add_argument("--eval-every", type=int, default=200, help="steps between k-NN evaluations (default: 200)")
    g.add_argument("--no-compile", action="store_true", help="train with the eager step")
    g.add_argument("--workers", type=int, default=2, help="data loading processes per run (default: 2)")
    p.set_defaults(func=run_sweep_command)


def _spec_from_args(args: argparse.Namespace):
    from .spec import load_spec, study_spec  # noqa: PLC0415

    if (args.spec is None) == (args.study is None):
        raise ValueError("give a sweep file or --study NAME (one of them)")
    if args.spec is not None:
        return load_spec(args.spec)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
    options = {"data": args.data, "max_steps": args.max_steps, "eval_every": args.eval_every,
               "compile": not args.no_compile, "workers": args.workers, "progress": False}  # fmt: skip
    config = {"epochs": args.epochs} if args.epochs else {}
    return study_spec(
        args.study, preset=args.preset, seeds=seeds, options=tuple(options.items()), config=tuple(config.items())
    )


def run_sweep_command(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointWriteError  # noqa: PLC0415
    from ..run_folder import RunFolderBusy  # noqa: PLC0415
    from .runner import run_sweep  # noqa: PLC0415

    try:
        spec = _spec_from_args(args)
        out = args.out or Path("runs") / f"sweep-{spec.name}"
        run_sweep(spec, out, overwrite=args.overwrite, batched=args.batched)
    except (ValueError, FileNotFoundError, FileExistsError, RunFolderBusy, CheckpointWriteError) as err:
        print(f"fdino sweep: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    print((out / "results.md").read_text())
    return 0


__all__ = ["register", "run_sweep_command"]
