"""Command line: ``fdino <command>`` (also ``python -m fdino <command>``).

    fdino train --preset small32_resnet --data shapes10 --run-dir runs/demo
    fdino train --resume runs/demo
    fdino train --config run.toml --max-steps 100
    fdino eval knn runs/demo        (and: eval linear, attention, embed, viz, search, export, serve)

Every `DinoConfig` field is a ``fdino train`` flag (``--out-dim 4096``, ``--global-crop-scale 0.3,1``,
``--backbone-kwargs depth=4,embed_dim=96``), applied on top of the chosen preset, and so is every
`TrainOptions` field (``--max-steps 100``, ``--no-compile``): both generated from the dataclasses,
help from each field's docstring. ``fdino train --config run.toml`` (or a run's ``run.json``) reads
the same fields from a file (`fdino.config_file`); flags given as well override the file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import sys
import typing
from typing import Any

from . import presets, train
from .checkpoint import CheckpointWriteError
from .config import DinoConfig, config_fields, field_doc
from .config_file import config_file, field_type
from .presets import PRESETS
from .run_folder import RESUMABLE_CONFIG, RunFolderBusy
from .train import TrainOptions

DEFAULT_PRESET = "small32_resnet"


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
        if f.name in ("steps_per_epoch", "schedule_steps"):
            continue  # derived from the data set size; set by --budget
        kind = field_type(DinoConfig, f)
        default = getattr(defaults, f.name)
        shown = (
            ",".join(f"{k}={v}" for k, v in default)
            if f.name in ("backbone_kwargs", "augment")
            else (",".join(str(v) for v in default) if isinstance(default, tuple) else default)
        )
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"cfg_{f.name}",
            default=None,
            metavar=f.name.upper(),
            type=lambda text, n=f.name, k=kind: _parse_value(n, k, text),
            help=f"{field_doc(f.name)} (DinoConfig default: {shown})",
        )


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per TrainOptions field; unset flags stay None, so the config file and resume can tell what was given."""
    group = parser.add_argument_group("TrainOptions (how the run executes)")
    for f in dataclasses.fields(TrainOptions):
        kind = field_type(TrainOptions, f)
        help_text = f"{field_doc(f.name, TrainOptions)} (TrainOptions default: {f.default})".replace("%", "%%")
        flag = f"--{f.name.replace('_', '-')}"
        if kind is bool:
            group.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(
                flag,
                dest=f.name,
                default=None,
                help=help_text,
                choices=choices,
                metavar="{" + ",".join(choices) + "}" if choices else f.name.upper(),
                type=lambda text, n=f.name, k=kind: _parse_value(n, k, text),
            )


def add_train_parser(subparsers) -> None:
    presets_help = "; ".join(f"{name}: {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in PRESETS.items())
    p = subparsers.add_parser(
        "train",
        help="train DINO on a data set (the main job)",
        description="Train DINO; resume with --resume RUN_DIR. Settings, later ones winning: the preset, the "
        "--config file, the flags. Presets: " + presets_help,
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help=f"base configuration (default: the config file's preset, else {DEFAULT_PRESET})",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="settings file: TOML with an optional top-level preset and [config] (DinoConfig) and "
        "[options] (TrainOptions) tables, or any run's run.json; flags override it",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run folder that has checkpoints (the old run is deleted once the new one has its "
        "first checkpoint, and restored if the new one fails before that)",
    )
    p.add_argument(
        "--skip-batches",
        type=int,
        default=0,
        metavar="N",
        help="with --resume: step over the next N batches (e.g. the one that made the loss non-finite); recorded in "
        "run.json. --resume also takes these config flags, recorded as a change at the checkpoint's step: "
        + ", ".join("--" + n.replace("_", "-") for n in RESUMABLE_CONFIG),
    )
    _add_option_flags(p)
    _add_config_flags(p)
    p.set_defaults(func=run_train)


def _given_options(args: argparse.Namespace) -> dict[str, Any]:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)}
    return {name: value for name, value in given.items() if value is not None}


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def new_run_settings(args: argparse.Namespace) -> tuple[DinoConfig, TrainOptions]:
    """(config, options) of a new run from parsed ``fdino train`` arguments: preset < --config file < flags."""
    file = config_file(args.config) if args.config else {"preset": None, "config": {}, "options": {}}
    preset = args.preset or file["preset"] or DEFAULT_PRESET
    cfg = DinoConfig.from_dict({**presets.preset(preset).to_dict(), **file["config"], **_config_overrides(args)})
    options = {**file["options"], **_given_options(args)}
    if "run_dir" not in options:
        data = options.get("data", TrainOptions.data)
        options["run_dir"] = f"runs/{data.strip('/').replace('/', '_')}-{preset}"
    return cfg, TrainOptions(**options)


def train_settings(argv: list[str]) -> tuple[DinoConfig, TrainOptions]:
    """What ``fdino train ARGV`` would start a new run with; reads the --config file, trains nothing."""
    return new_run_settings(build_parser().parse_args(["train", *argv]))


def run_train(args: argparse.Namespace) -> int:
    try:
        if args.resume:
            changes = _config_overrides(args)
            fixed = [f"--{n.replace('_', '-')}" for n in sorted(changes) if n not in RESUMABLE_CONFIG]
            fixed += [f"--{n}" for n in ("preset", "config") if getattr(args, n)]
            if fixed:
                raise ValueError(
                    f"--resume takes the run's saved config; drop {fixed} (a resume may change only "
                    f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE_CONFIG)} and --skip-batches)"
                )
            train.resume(args.resume, skip_batches=args.skip_batches, **_given_options(args), **changes)
            return 0
        if args.skip_batches:
            raise ValueError("--skip-batches steps over batches of a resumed run; use it with --resume RUN_DIR")
        cfg, opts = new_run_settings(args)
        train.run(cfg, opts, overwrite=args.overwrite)
        return 0
    except train.NonFiniteLossError as err:
        print(f"fdino train: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileExistsError, FileNotFoundError, RunFolderBusy, CheckpointWriteError) as err:
        print(f"fdino train: error: {err}", file=sys.stderr)
        return 2


# Subcommand modules, and the extra (pyproject optional-dependencies) whose packages they may import.
_SUBCOMMANDS = {
    "fdino.eval.cli": None,
    "fdino.sweep.cli": None,
    "fdino.report": None,
    "fdino.finetune.cli": None,
    "fdino.export.cli": "export",
    "fdino.serve.cli": "serve",
    "fdino.app.cli": "app",
}
_EXTRA_PACKAGES = {
    "export": ("onnx", "onnxruntime", "onnxscript"),
    "serve": ("fastapi", "uvicorn", "multipart", "python_multipart"),
    "app": ("gradio", "gradio_client"),
}
_EXTRA_COMMANDS = {"export": ("export", "quantize"), "serve": ("serve",), "app": ("app",)}


def _register_unavailable(sub, extra: str, missing: str) -> None:
    """Commands of ``extra`` that explain what to install instead of running."""
    message = f"needs the optional package {missing!r}: pip install 'fdino[{extra}]'"

    def unavailable(args: argparse.Namespace) -> int:
        print(f"fdino {args.command}: {message}", file=sys.stderr)
        return 2

    for command in _EXTRA_COMMANDS[extra]:
        p = sub.add_parser(command, help=f"(unavailable: {message})", description=message)
        p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=unavailable)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdino", description="fast, pure-functional DINO")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    add_train_parser(sub)
    for module, extra in _SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            # Only a missing third-party package of the module's optional extra disables its commands;
            # anything else (an error inside fdino above all) must surface.
            top = (err.name or "").split(".")[0]
            if extra is None or top not in _EXTRA_PACKAGES[extra]:
                raise
            _register_unavailable(sub, extra, top)
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
