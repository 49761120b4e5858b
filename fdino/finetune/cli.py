"""``fdino finetune``, ``fdino supervised`` and ``fdino eval fewshot``: did self-supervision pay off?

Each command is a thin edge over `fdino.finetune` (files written here, math there). Models come
through `fdino.weights.load_model` like every other command's, and the folders they write load
back the same way (``fdino eval knn OUT``, ``fdino finetune OUT``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shapes10", help="labeled data set name or image folder (train + held-out split)")
    g.add_argument("--data-root", help="where torchvision data sets / the Fashion-MNIST files live")
    g.add_argument("--labels-per-class", type=int, help="train on this many labels of each class")
    g.add_argument("--label-fraction", type=float, help="train on this fraction of the labels (class-balanced)")
    g.add_argument("--subset-seed", type=int, default=0, help="which class-balanced subset is drawn")


def _add_recipe(p: argparse.ArgumentParser, *, recipe_default: str = "auto") -> None:
    g = p.add_argument_group("recipe (defaults: the chosen recipe's)")
    g.add_argument(
        "--recipe", default=recipe_default, choices=("auto", "vit", "cnn", "linear"),
        help="auto: vit for ViTs, cnn otherwise; linear: the paper's linear evaluation (frozen backbone)",
    )  # fmt: skip
    for flag, kind, text in (
        ("--epochs", int, "passes over the labeled images"),
        ("--max-steps", int, "stop after this many steps (the schedules span them)"),
        ("--max-minutes", float, "stop after this many minutes of training"),
        ("--lr", float, "peak learning rate per 256 images"),
        ("--batch-size", int, "images per step"),
        ("--weight-decay", float, "weight decay"),
        ("--layer-decay", float, "layer-wise lr decay (1: off)"),
        ("--drop-path", float, "stochastic depth rate"),
        ("--label-smoothing", float, "cross-entropy label smoothing"),
        ("--warmup-epochs", float, "linear lr warm-up"),
        ("--seed", int, "head init, views and data order"),
    ):
        g.add_argument(flag, type=kind, help=text)
    g.add_argument("--freeze", help="none | all | blocks:K (embedding + first K blocks / stages frozen)")
    g.add_argument("--augment", choices=("crop_flip", "dino"), help="training views")
    p.add_argument("--device", default=_DEVICE, help="torch device")
    p.add_argument("--num-workers", type=int, default=0, help="data loading processes")


_RECIPE_FIELDS = (
    "epochs", "max_steps", "max_minutes", "lr", "batch_size", "weight_decay", "layer_decay", "drop_path",
    "label_smoothing", "warmup_epochs", "seed", "freeze", "augment",
)  # fmt: skip


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _RECIPE_FIELDS if getattr(args, k, None) is not None}


def _splits(args: argparse.Namespace, image_size: int):
    from ..data import build_dataset  # noqa: PLC0415
    from .fewshot import dataset_labels  # noqa: PLC0415
    from .subsets import label_subset  # noqa: PLC0415

    train = build_dataset(args.data, root=args.data_root, split="memory", image_size=image_size)
    test = build_dataset(args.data, root=args.data_root, split="query", image_size=image_size)
    data, subset = train.dataset, None
    if args.labels_per_class is not None or args.label_fraction is not None:
        if args.labels_per_class is not None and args.label_fraction is not None:
            raise ValueError("give --labels-per-class or --label-fraction, not both")
        idx = label_subset(
            dataset_labels(data), per_class=args.labels_per_class, fraction=args.label_fraction, seed=args.subset_seed
        )
        data, subset = torch.utils.data.Subset(data, idx.tolist()), idx
    return train, test, data, subset


def _progress(label: str):
    def show(entry: dict) -> None:
        acc = f"  test top-1 {entry['top1']:.2f}%" if "top1" in entry else ""
        print(f"  {label} epoch {entry['epoch']}  step {entry['step']}  loss {entry['loss']:.4f}{acc}", flush=True)

    return show


def _finish(out: Path, result, info, *, classes, report: dict) -> int:
    from .files import save_classifier  # noqa: PLC0415

    report |= {"top1": result.top1, "top5": result.top5, "steps": result.steps, "seconds": result.seconds}
    report["stopped_by"] = result.stopped_by
    paths = save_classifier(out, result.backbone, result.head, info, classes=classes, report=report, curve=result.curve)
    print(f"test top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  ({result.steps} steps, {result.seconds:.0f} s)")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    import dataclasses  # noqa: PLC0415

    from ..weights.cli_args import model_from_args  # noqa: PLC0415
    from .recipe import recipe_for  # noqa: PLC0415
    from .train import finetune, with_drop_path  # noqa: PLC0415

    model = model_from_args(args, device=args.device)
    cfg = recipe_for(model.backbone, args.recipe, **_overrides(args))
    train, test, data, subset = _splits(args, model.image_size)
    print(f"fine-tuning {args.model} on {args.data}: {len(data)} labeled / {len(test)} test images, {cfg}")
    backbone = with_drop_path(model, cfg.drop_path) if cfg.freeze != "all" else model.backbone
    result = finetune(
        backbone, data, test.dataset, cfg, image_size=model.image_size, mean=model.mean, std=model.std,
        num_classes=train.num_classes or None, device=args.device, num_workers=args.num_workers,
        dino_cfg=model.cfg, on_epoch=_progress("fine-tune"),
    )  # fmt: skip
    info = dataclasses.replace(model.info, which="finetuned")
    report = {
        "title": f"fine-tuned {Path(str(args.model)).name} on {args.data}", "command": "finetune",
        "source": str(args.model), "data": args.data, "config": cfg.to_dict(), "labeled_images": len(data),
        "subset": None if subset is None else subset.tolist(),
    }  # fmt: skip
    return _finish(Path(args.out), result, info, classes=train.classes, report=report)


def _dino_config(args: argparse.Namespace):
    from ..presets import preset  # noqa: PLC0415
    from ..weights import load_model  # noqa: PLC0415

    if args.like is None:
        return preset(args.preset)
    cfg = load_model(args.like).cfg
    if cfg is None:
        raise ValueError(f"--like {args.like}: not an fdino model, so its backbone config is unknown; use --preset")
    return cfg


def run_supervised(args: argparse.Namespace) -> int:
    from .supervised import supervised_recipe, train_supervised  # noqa: PLC0415

    cfg = _dino_config(args)
    ft = supervised_recipe(cfg, **_overrides(args))
    train, test, data, subset = _splits(args, cfg.global_crop_size)
    print(f"supervised {cfg.arch} from scratch on {args.data}: {len(data)} labeled / {len(test)} test images, {ft}")
    result, info = train_supervised(
        cfg, data, test.dataset, ft, num_classes=train.num_classes or None, device=args.device,
        num_workers=args.num_workers, on_epoch=_progress("supervised"),
    )  # fmt: skip
    report = {
        "title": f"supervised {args.like or args.preset} on {args.data}", "command": "supervised",
        "data": args.data, "config": ft.to_dict(), "dino_config": cfg.to_dict(), "labeled_images": len(data),
        "subset": None if subset is None else subset.tolist(),
    }  # fmt: skip
    return _finish(Path(args.out), result, info, classes=train.classes, report=report)


def run_fewshot(args: argparse.Namespace) -> int:
    from ..data import build_dataset  # noqa: PLC0415
    from ..presets import preset  # noqa: PLC0415
    from ..weights.cli_args import model_from_args  # noqa: PLC0415
    from .fewshot import FewshotConfig, fewshot, matched_supervised_steps, save_fewshot  # noqa: PLC0415
    from .recipe import recipe_for  # noqa: PLC0415
    from .supervised import supervised_recipe  # noqa: PLC0415

    model = model_from_args(args, device=args.device)
    sup_cfg = preset(args.supervised_preset) if args.supervised_preset else model.cfg
    cfg = FewshotConfig(
        fractions=args.fractions, draws=args.draws, methods=tuple(args.methods), knn_k=args.k,
        steps=args.steps, supervised_steps=args.supervised_steps or 0, first_draw=args.first_draw,
        linear_epochs=args.linear_epochs, finetune=recipe_for(model.backbone, args.recipe, **_overrides(args)),
        supervised=supervised_recipe(sup_cfg, **_overrides(args)) if sup_cfg is not None else None,
    )  # fmt: skip
    train = build_dataset(args.data, root=args.data_root, split="memory", image_size=model.image_size)
    test = build_dataset(args.data, root=args.data_root, split="query", image_size=model.image_size)
    print(f"few-label evaluation of {args.model} on {args.data}: {len(train)} train / {len(test)} test images")
    if args.pretrain_minutes is not None:
        if args.supervised_steps:
            raise ValueError("--pretrain-minutes and --supervised-steps both set the baseline's steps: give one")
        if "supervised" not in cfg.methods:
            raise ValueError("--pretrain-minutes sets the supervised baseline's budget: add 'supervised' to --methods")
        steps = matched_supervised_steps(
            sup_cfg, train.dataset, cfg, 60 * args.pretrain_minutes, device=args.device, num_workers=args.num_workers
        )
        cfg = dataclasses.replace(cfg, supervised_steps=steps)
        print(f"supervised baseline: {steps} steps = {cfg.steps} + {args.pretrain_minutes:g} min of pretraining "
              "in supervised steps on this machine (equal budgets)")  # fmt: skip
    started = time.perf_counter()

    def show(row: dict) -> None:
        print(f"  {row['method']:<10} {row['fraction']:g} ({row['labels']} labels) draw {row['draw']}: "
              f"top-1 {row['top1']:.2f}%", flush=True)  # fmt: skip

    result = fewshot(
        model, train.dataset, test.dataset, cfg, supervised_cfg=sup_cfg, device=args.device,
        num_workers=args.num_workers, on_row=show,
    )  # fmt: skip
    result |= {"source": str(args.model), "data": args.data, "seconds": time.perf_counter() - started}
    paths = save_fewshot(args.out, result, f"{Path(str(args.model)).name} on {args.data}: few labels")
    print(Path(paths["markdown"]).read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _friendly(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError) as err:
            print(f"fdino {args.command}: error: {err}", file=sys.stderr)
            return 2

    return run


def add_fewshot_parser(ev_sub) -> None:
    """``fdino eval fewshot`` (registered under ``fdino eval`` by `fdino.eval.cli`)."""
    from ..weights.cli_args import add_model_arguments  # noqa: PLC0415
    from .fewshot import METHODS  # noqa: PLC0415

    p = ev_sub.add_parser(
        "fewshot",
        help="k-NN, linear probe and fine-tuning at 1-100%% of the labels vs a supervised baseline",
        description="Few-label evaluation: every method on the same class-balanced label subsets "
        "(several draws), against the same backbone trained from scratch and raw pixels. Writes "
        "fewshot.md, fewshot.json and fewshot.png to --out.",
    )
    add_model_arguments(p)
    p.add_argument("--data", default="shapes10", help="labeled data set (may differ from the pretraining data)")
    p.add_argument("--data-root", help="where torchvision data sets / the Fashion-MNIST files live")
    p.add_argument("--fractions", type=_floats, default=(0.01, 0.05, 0.1, 1.0), help="label fractions")
    p.add_argument("--draws", type=int, default=3, help="label subsets per fraction")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="what to measure")
    p.add_argument("--steps", type=int, default=300, help="steps of every fine-tune (and supervised run)")
    budget = p.add_argument_group("the supervised baseline's budget (default: --steps, the fine-tune's)")
    budget.add_argument("--supervised-steps", type=int, help="steps of every supervised run")
    budget.add_argument(
        "--pretrain-minutes", type=float,
        help="minutes the model's pretraining took: the baseline trains --steps plus that many minutes "
        "(its step time measured here first), so pretraining + fine-tuning and the baseline get equal time",
    )  # fmt: skip
    p.add_argument("--first-draw", type=int, default=0, help="seed of the first label draw")
    p.add_argument("--k", type=int, default=20, help="k of the k-NN")
    p.add_argument("--linear-epochs", type=int, default=100, help="epochs of the linear probe on features")
    p.add_argument("--supervised-preset", help="backbone of the supervised baseline (default: the model's own)")
    p.add_argument("--out", default="runs/fewshot", help="output folder")
    _add_recipe(p)
    p.set_defaults(func=_friendly(run_fewshot), command="eval fewshot")


def register(subparsers) -> None:
    """Add ``finetune`` and ``supervised`` to the ``fdino`` parser."""
    from ..presets import PRESETS  # noqa: PLC0415
    from ..weights.cli_args import add_model_arguments  # noqa: PLC0415

    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a backbone with a linear head on labels (freeze none|all|blocks:K)",
        description="Fine-tune any model source with a linear head: the ViT recipe (AdamW, layer-wise lr "
        "decay, drop path, label smoothing), the CNN recipe, or the paper's linear protocol; on all labels "
        "or a class-balanced subset. Writes a model folder every other command loads.",
    )
    add_model_arguments(p)
    _add_data(p)
    _add_recipe(p)
    p.add_argument("--out", default="runs/finetune", help="output folder (model.safetensors, classifier, report)")
    p.set_defaults(func=_friendly(run_finetune))

    p = subparsers.add_parser(
        "supervised",
        help="the baseline: the same backbone trained from scratch on the labels",
        description="Train a preset's backbone (or an fdino model's, --like) from scratch with labels, "
        "DINO's augmentation family, for a budget in epochs, steps or minutes.",
    )
    p.add_argument("--preset", default="small32_resnet", choices=sorted(PRESETS), help="backbone and crop size")
    p.add_argument("--like", help="take the backbone config of this fdino run / model instead of --preset")
    _add_data(p)
    _add_recipe(p)
    p.add_argument("--out", default="runs/supervised", help="output folder")
    p.set_defaults(func=_friendly(run_supervised))


__all__ = ["add_fewshot_parser", "register"]
