"""Command line: ``fdino <command>`` (also ``python -m fdino <command>``).

    fdino train --preset small32_resnet --data shapes10 --run-dir runs/demo
    fdino train --resume runs/demo
    fdino eval knn runs/demo        (and: eval linear, attention, embed, viz, search, export, serve)

Every `DinoConfig` field is a ``fdino train`` flag (``--out-dim 4096``, ``--global-crop-scale 0.3,1``,
``--backbone-kwargs depth=4,embed_dim=96``), applied on top of the chosen preset.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
import types
import typing
from typing import Any

from .config import DinoConfig, config_fields, field_doc
from .presets import PRESETS
from .train import DEVICES, TrainOptions

_TRAIN_OPTION_FLAGS = {
    "data": "--data", "data_root": "--data-root", "download": "--download", "run_dir": "--run-dir",
    "device": "--device", "workers": "--workers", "log_every": "--log-every", "ckpt_every": "--ckpt-every",
    "keep_checkpoints": "--keep-checkpoints", "eval_every": "--eval-every", "knn_k": "--knn-k",
    "eval_samples": "--eval-samples", "max_steps": "--max-steps", "max_minutes": "--max-minutes",
    "attention_images": "--attention-images",
}


def _field_type(f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(DinoConfig)
    hint = hints[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return hint


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so ``blur_sigma=(0.1,1.0),hue=0.5`` is two pairs."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _parse_value(name: str, kind: Any, text: str) -> Any:
    """Command-line text -> the field's Python type; errors name the flag and the expected form."""
    try:
        if name in ("backbone_kwargs", "augment"):
            pairs = [p for p in _split_top_level(text) if p.strip()]
            out = []
            for pair in pairs:
                key, _, raw = pair.partition("=")
                try:
                    value = ast.literal_eval(raw.strip())
                except (ValueError, SyntaxError):
                    value = raw.strip()
                out.append((key.strip(), value))
            return tuple(out)
        if text.lower() in ("none", "null") and name in ("patch_size", "img_size"):
            return None
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if typing.get_origin(kind) is tuple:
            return tuple(float(v) for v in text.split(","))
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: cannot read {text!r} as {kind}") from None


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DinoConfig overrides (applied on top of the preset)")
    defaults = DinoConfig()
    for f in config_fields():
        if f.name == "steps_per_epoch":
            continue  # derived from the data set size
        kind = _field_type(f)
        default = getattr(defaults, f.name)
        shown = ",".join(f"{k}={v}" for k, v in default) if f.name in ("backbone_kwargs", "augment") else (
            ",".join(str(v) for v in default) if isinstance(default, tuple) else default)
        group.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None, metavar=f.name.upper(),
            type=lambda text, n=f.name, k=kind: _parse_value(n, k, text),
            help=f"{field_doc(f.name)} (DinoConfig default: {shown})")


def add_train_parser(subparsers) -> None:
    presets_help = "; ".join(f"{name}: {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in PRESETS.items())
    p = subparsers.add_parser(
        "train", help="train DINO on a data set (the main job)",
        description="Train DINO; resume with --resume RUN_DIR. Presets: " + presets_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small32_resnet", choices=sorted(PRESETS), help="base configuration")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that has checkpoints")
    # Defaults come from TrainOptions (set below), so the CLI and `fdino.train.run` cannot drift.
    p.add_argument("--data", help="shapes10 (built in), cifar10, cifar100, stl10, fashion-mnist, or an image folder")
    p.add_argument("--data-root", help="where torchvision data sets / IDX files are")
    p.add_argument("--download", action="store_true", help="let torchvision download the data set")
    p.add_argument("--run-dir", help="output folder (default runs/<data>-<preset>)")
    p.add_argument("--device", choices=DEVICES, help="where to train")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="use the eager step instead of torch.compile (debugging, or very short runs)")
    p.add_argument("--workers", type=int, help="data loader worker processes")
    p.add_argument("--log-every", type=int, help="steps between metric logs")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept")
    p.add_argument("--eval-every", type=int, help="steps between k-NN evaluations (0: start and end)")
    p.add_argument("--knn-k", type=int, help="k of the k-NN evaluation")
    p.add_argument("--eval-samples", type=int, help="memory-bank images for k-NN (0: all)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (0: whole schedule)")
    p.add_argument("--max-minutes", type=float, help="stop after this much wall time (0: none)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (exact resume)")
    p.add_argument("--attention-images", type=int, help="images with attention maps at the end")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard events")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(**{f.name: f.default for f in dataclasses.fields(TrainOptions) if f.name != "run_dir"}, run_dir=None)
    _add_config_flags(p)
    p.set_defaults(func=run_train)


def _explicit(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def run_train(args: argparse.Namespace) -> int:
    from . import train

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    argv = getattr(args, "_argv", [])
    try:
        if args.resume:
            if overrides:
                raise ValueError(f"--resume takes the run's saved config; drop {sorted(overrides)}")
            runtime = {name: getattr(args, name) for name in train.RESUMABLE_OVERRIDES
                       if _explicit(argv, "--" + name.replace("_", "-")) or (
                           name in ("compile", "tensorboard", "progress") and getattr(args, name) is False)}
            train.resume(args.resume, **runtime)
            return 0
        cfg = PRESETS[args.preset](**overrides)
        run_dir = args.run_dir or f"runs/{args.data.strip('/').replace('/', '_')}-{args.preset}"
        fields = {f.name for f in dataclasses.fields(train.TrainOptions)}
        opts = train.TrainOptions(**{k: v for k, v in vars(args).items() if k in fields and k != "run_dir"},
                                  run_dir=run_dir)
        train.run(cfg, opts, overwrite=args.overwrite)
        return 0
    except train.NonFiniteLossError as err:
        print(f"fdino train: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"fdino train: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdino", description="fast, pure-functional DINO")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    add_train_parser(sub)
    for module in ("fdino.eval.cli", "fdino.export.cli", "fdino.serve.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("fdino"):
                continue  # that part of fdino is not installed in this checkout
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = argv
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
