"""Few-label evaluation: k-NN, linear probe and fine-tuning at a few label fractions, against the
supervised baseline at the same label counts and against raw pixels.

For each label fraction (1%, 5%, 10%, 100% by default) and each draw (a seed), one class-balanced
subset of the training split's labels (`fdino.finetune.subsets.label_subset`, deterministic in the
draw) is what every method may use; the test split is the same held-out images for all. Features
for k-NN and the linear probe are computed once; the fine-tunes train for ``steps`` at every
fraction. The supervised baseline trains for ``supervised_steps``: ``steps`` gives the two the same
training budget, and `matched_supervised_steps` adds the pretraining's minutes as supervised steps,
so that pretraining + fine-tuning and the baseline get the same minutes (the fair question: "was
pretraining worth its time?"). Every row records its steps and seconds, so the budgets are stated.
The training data may differ from what the model was pretrained on (transfer). Several pretraining
seeds pair with draws through ``first_draw`` (model i evaluated on draw i).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..config import DinoConfig
from ..data import EvalTransform
from ..eval.features import extract_features, raw_pixel_features
from ..eval.knn import center_features, knn_classify
from ..eval.linear import linear_probe
from ..sweep.report import mean_std
from .recipe import FinetuneConfig, recipe_for
from .subsets import label_subset
from .supervised import supervised_recipe, train_supervised
from .train import finetune, with_drop_path

METHODS = ("knn", "linear", "finetune", "supervised", "raw_pixels")
_LABELS = {
    "knn": "k-NN (DINO features)",
    "linear": "linear probe (DINO features)",
    "finetune": "fine-tuned DINO backbone",
    "supervised": "supervised from scratch",
    "raw_pixels": "k-NN on raw pixels",
}


@dataclass(frozen=True, kw_only=True)
class FewshotConfig:
    """What `fewshot` measures."""

    fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 1.0)
    """Label fractions of the training split (class-balanced subsets)."""
    draws: int = 3
    """Subsets drawn per fraction (seeds first_draw..first_draw+draws-1); a fraction of 1 is drawn once
    for k-NN and pixels."""
    first_draw: int = 0
    """Seed of the first draw: pretraining seed i can take draw i, so its variance enters the mean +- std."""
    methods: tuple[str, ...] = METHODS
    """Any of `METHODS`."""
    knn_k: int = 20
    """k of the weighted k-NN (fewer labels than k: all of them)."""
    linear_epochs: int = 100
    """Epochs of the linear probe on cached features (the paper's 100)."""
    steps: int = 300
    """Optimizer steps of every fine-tune, whatever the fraction."""
    supervised_steps: int = 0
    """Optimizer steps of every supervised run (0: ``steps``; `matched_supervised_steps` adds pretraining)."""
    finetune: FinetuneConfig | None = None
    """Fine-tuning recipe (None: `recipe_for` the backbone); its seed becomes the draw."""
    supervised: FinetuneConfig | None = None
    """Supervised recipe (None: `supervised_recipe` of the model's DinoConfig); its seed becomes the draw."""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"FewshotConfig.methods={self.methods!r} is invalid: allowed a subset of {METHODS}")
        for f in self.fractions:
            if not 0 < f <= 1:
                raise ValueError(f"FewshotConfig.fractions has {f!r}: allowed fractions in (0, 1]")
        if self.draws < 1 or self.steps < 1 or self.knn_k < 1 or self.linear_epochs < 1:
            raise ValueError("FewshotConfig.draws, steps, knn_k and linear_epochs must be >= 1")
        if self.first_draw < 0 or self.supervised_steps < 0:
            raise ValueError("FewshotConfig.first_draw and supervised_steps must be >= 0 (supervised_steps 0: steps)")


def dataset_labels(data: Dataset) -> torch.Tensor:
    """Labels ``[N]`` of a map-style data set, without decoding images where it keeps them."""
    if isinstance(data, Subset):
        return dataset_labels(data.dataset)[torch.as_tensor(data.indices, dtype=torch.int64)]
    labels = getattr(data, "labels", None)
    if labels is None:
        labels = getattr(data, "targets", None)
    if labels is None:
        labels = [int(data[i][1]) for i in range(len(data))]
    return torch.as_tensor(labels, dtype=torch.int64).reshape(-1)


def _epochs_for(steps: int, n: int, batch_size: int) -> int:
    return max(1, math.ceil(steps / max(1, math.ceil(n / min(batch_size, n)))))


def fewshot(
    model: Any,
    train_data: Dataset,
    test_data: Dataset,
    cfg: FewshotConfig = FewshotConfig(),
    *,
    supervised_cfg: DinoConfig | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every method at every label fraction and draw; ``{"rows": [...], "summary": [...]}``.

    Args:
        model: a `fdino.weights.LoadedModel` (the pretrained backbone to evaluate).
        train_data, test_data: labeled map-style data sets (the training split and the held-out split).
        supervised_cfg: the backbone the supervised baseline trains (default: ``model.cfg``, the
            DinoConfig of an fdino model; required for "supervised" with other sources).
        on_row: called with each measured row (progress).
    """
    methods = cfg.methods
    if "supervised" in methods:
        supervised_cfg = supervised_cfg or model.cfg
        if supervised_cfg is None:
            raise ValueError(
                "the supervised baseline needs a DinoConfig for its backbone: pass supervised_cfg= "
                "(CLI: --supervised-preset) or leave 'supervised' out of the methods"
            )
    labels = dataset_labels(train_data)
    test_labels = dataset_labels(test_data)
    num_classes = int(max(labels.max(), test_labels.max())) + 1
    view = EvalTransform(model.image_size, mean=model.mean, std=model.std)
    feats = test_feats = raw = raw_test = None
    if {"knn", "linear"} & set(methods):
        feats, _ = extract_features(model.backbone, train_data, device=device, num_workers=num_workers, transform=view)
        test_feats, _ = extract_features(
            model.backbone, test_data, device=device, num_workers=num_workers, transform=view
        )
    if "raw_pixels" in methods:
        pixels = EvalTransform(model.image_size, mean=(0.0,) * 3, std=(1.0,) * 3)
        raw, _ = raw_pixel_features(train_data, transform=pixels, num_workers=num_workers)
        raw_test, _ = raw_pixel_features(test_data, transform=pixels, num_workers=num_workers)
    ft_base = cfg.finetune or recipe_for(model.backbone)
    trainable = with_drop_path(model, ft_base.drop_path) if "finetune" in methods else None
    sup_base = (cfg.supervised or supervised_recipe(supervised_cfg)) if "supervised" in methods else None

    rows: list[dict[str, Any]] = []
    for fraction in cfg.fractions:
        for draw in range(cfg.first_draw, cfg.first_draw + cfg.draws):
            idx = label_subset(labels, fraction=fraction, seed=draw)
            subset_labels = labels[idx]
            subset = Subset(train_data, idx.tolist())
            # With every label, k-NN and pixels have nothing random left to draw: measure them once.
            deterministic_again = fraction == 1.0 and draw > cfg.first_draw
            for method in methods:
                if deterministic_again and method in ("knn", "raw_pixels"):
                    continue
                started, steps = time.perf_counter(), 0
                if method == "knn":
                    k = min(cfg.knn_k, len(idx))
                    acc = knn_classify(
                        feats[idx], subset_labels, test_feats, test_labels, ks=(k,), num_classes=num_classes
                    )[k]
                elif method == "raw_pixels":
                    k = min(cfg.knn_k, len(idx))
                    bank, queries = center_features(raw[idx], raw_test)
                    acc = knn_classify(bank, subset_labels, queries, test_labels, ks=(k,), num_classes=num_classes)[k]
                elif method == "linear":
                    res = linear_probe(
                        feats[idx], subset_labels, test_feats, test_labels,
                        num_classes=num_classes, epochs=cfg.linear_epochs, seed=draw,
                    )  # fmt: skip
                    acc = {"top1": res["top1"], "top5": res["top5"]}
                elif method == "finetune":
                    ft = ft_base.replace(
                        seed=draw,
                        max_steps=cfg.steps,
                        epochs=_epochs_for(cfg.steps, len(idx), ft_base.batch_size),
                        eval_every_epochs=0,
                    )
                    res = finetune(
                        trainable, subset, test_data, ft, image_size=model.image_size, mean=model.mean, std=model.std,
                        num_classes=num_classes, device=device, num_workers=num_workers, dino_cfg=model.cfg,
                    )  # fmt: skip
                    acc, steps = {"top1": res.top1, "top5": res.top5}, res.steps
                else:  # supervised
                    sup_steps = cfg.supervised_steps or cfg.steps
                    sup = sup_base.replace(
                        seed=draw,
                        max_steps=sup_steps,
                        epochs=_epochs_for(sup_steps, len(idx), sup_base.batch_size),
                        eval_every_epochs=0,
                    )
                    res, _ = train_supervised(
                        supervised_cfg, subset, test_data, sup, num_classes=num_classes, device=device,
                        num_workers=num_workers,
                    )  # fmt: skip
                    acc, steps = {"top1": res.top1, "top5": res.top5}, res.steps
                seconds = time.perf_counter() - started  # training and its test evaluation
                row = {"method": method, "fraction": fraction, "labels": len(idx), "draw": draw, **acc}
                row |= {"steps": steps, "seconds": seconds}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return {"rows": rows, "summary": summarize(rows), "config": dataclasses.asdict(cfg), "num_classes": num_classes}


def matched_supervised_steps(
    supervised_cfg: DinoConfig,
    train_data: Dataset,
    cfg: FewshotConfig,
    pretrain_seconds: float,
    *,
    probe_steps: int = 20,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> int:
    """``cfg.steps`` plus as many supervised steps as fit in ``pretrain_seconds`` on this machine.

    With it as ``supervised_steps`` the baseline trains as long as pretraining + fine-tuning did. The
    step time is measured by a short supervised run of ``probe_steps`` on ``train_data`` (the
    baseline's own recipe, batch and views), since it depends on the machine, the backbone and the loader.
    """
    if pretrain_seconds < 0 or probe_steps < 1:
        raise ValueError(f"pretrain_seconds={pretrain_seconds} must be >= 0 and probe_steps={probe_steps} >= 1")
    base = cfg.supervised or supervised_recipe(supervised_cfg)
    probe = base.replace(
        max_steps=probe_steps, epochs=_epochs_for(probe_steps, len(train_data), base.batch_size), eval_every_epochs=0
    )
    labels = dataset_labels(train_data)
    res, _ = train_supervised(
        supervised_cfg, train_data, Subset(train_data, [0]), probe, num_classes=int(labels.max()) + 1,
        device=device, num_workers=num_workers,
    )  # fmt: skip
    return cfg.steps + math.ceil(pretrain_seconds * res.steps / max(res.seconds, 1e-9))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean +- std of top-1 over draws, per (method, fraction)."""
    keys = sorted({(r["method"], r["fraction"]) for r in rows}, key=lambda k: (METHODS.index(k[0]), k[1]))
    out = []
    for method, fraction in keys:
        mine = [r for r in rows if r["method"] == method and r["fraction"] == fraction]
        mean, std = mean_std([r["top1"] for r in mine])
        out.append(
            {
                "method": method,
                "fraction": fraction,
                "labels": mine[0]["labels"],
                "draws": len(mine),
                "top1_mean": mean,
                "top1_std": std,
                "steps": max(r.get("steps", 0) for r in mine),
                "seconds_mean": sum(r.get("seconds", 0.0) for r in mine) / len(mine),
            }
        )
    return out


def format_markdown(result: dict[str, Any], title: str) -> str:
    """The summary as a table: one row per method, one column per label fraction."""
    summary = result["summary"]
    fractions = sorted({s["fraction"] for s in summary})
    labels = {s["fraction"]: s["labels"] for s in summary}
    lines = [f"# {title}", "", "Top-1 (%) on the held-out split, mean +- std over label draws.", ""]
    lines.append("| method | " + " | ".join(f"{f:g} ({labels[f]} labels)" for f in fractions) + " |")
    lines.append("|---|" + "---|" * len(fractions))
    for method in [m for m in METHODS if any(s["method"] == m for s in summary)]:
        cells = []
        for f in fractions:
            hit = [s for s in summary if s["method"] == method and s["fraction"] == f]
            cells.append(f"{hit[0]['top1_mean']:.1f} +- {hit[0]['top1_std']:.1f}" if hit else "-")
        lines.append(f"| {_LABELS[method]} | " + " | ".join(cells) + " |")
    lines += ["", "Budgets (per run, mean over fractions and draws; training plus its test evaluation):", ""]
    for method in [m for m in METHODS if any(s["method"] == m for s in summary)]:
        mine = [s for s in summary if s["method"] == method]
        steps = max(s["steps"] for s in mine)
        seconds = sum(s["seconds_mean"] for s in mine) / len(mine)
        lines.append(f"- {_LABELS[method]}: " + (f"{steps} steps, " if steps else "") + f"{seconds:.0f} s")
    return "\n".join(lines) + "\n"


def save_fewshot(out: str | Path, result: dict[str, Any], title: str) -> dict[str, Path]:
    """``fewshot.md``, ``fewshot.json`` and ``fewshot.png`` (top-1 against the label fraction) in ``out``."""
    import matplotlib  # noqa: PLC0415  (slow import, only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (after choosing the headless backend)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "fewshot.md", "json": out / "fewshot.json", "plot": out / "fewshot.png"}
    paths["markdown"].write_text(format_markdown(result, title))
    paths["json"].write_text(json.dumps({"title": title, **result}, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in [m for m in METHODS if any(s["method"] == m for s in result["summary"])]:
        mine = [s for s in result["summary"] if s["method"] == method]
        ax.errorbar(
            [s["fraction"] for s in mine], [s["top1_mean"] for s in mine], yerr=[s["top1_std"] for s in mine],
            marker="o", capsize=3, label=_LABELS[method], linestyle="--" if method == "raw_pixels" else "-",
        )  # fmt: skip
    ax.set(xscale="log", xlabel="fraction of training labels", ylabel="test top-1 (%)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=100)
    plt.close(fig)
    return paths


__all__ = [
    "FewshotConfig", "METHODS", "dataset_labels", "fewshot", "format_markdown", "matched_supervised_steps",
    "save_fewshot", "summarize",
]  # fmt: skip
