"""The supervised baseline: the same backbone as a DINO run, trained from scratch on the labels.

`train_supervised` builds the backbone a `DinoConfig` names at a fresh (seeded) initialization and
runs `fdino.finetune.finetune` with nothing frozen, on one DINO global-crop view per image
(``augment="dino"``: the augmentation family the self-supervised run saw), for a budget in epochs,
steps or minutes. Its answer is the number self-supervision has to beat: "did pretraining pay off
on my data?" (`fdino.finetune.fewshot` asks it at every label fraction).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from ..config import DinoConfig
from ..data.augment import IMAGENET_MEAN, IMAGENET_STD
from ..models import create_backbone, is_vit, timm_kwargs
from ..weights import ExportInfo
from .recipe import FinetuneConfig, recipe_for
from .train import FinetuneResult, finetune


def supervised_recipe(cfg: DinoConfig, **overrides: Any) -> FinetuneConfig:
    """The from-scratch recipe for ``cfg``'s backbone: the fine-tuning recipe of its kind with DINO
    views, no layer decay (nothing pretrained to protect) and the run's own stochastic depth."""
    with torch.device("meta"):
        probe = create_backbone(cfg, drop_path_rate=0.0)
    base = {"augment": "dino", "layer_decay": 1.0, "drop_path": float(cfg.drop_path_rate), "freeze": "none"}
    return recipe_for(probe, **(base | overrides))


def supervised_info(cfg: DinoConfig, backbone: torch.nn.Module) -> ExportInfo:
    """How `fdino.weights.load_model` rebuilds a supervised backbone of ``cfg``."""
    kwargs = timm_kwargs(cfg, drop_path_rate=0.0, vit=is_vit(backbone))
    kwargs.pop("num_classes")
    return ExportInfo(
        arch=cfg.arch,
        model_kwargs=kwargs,
        dino_config=cfg.to_dict(),
        which="supervised",
        image_size=cfg.global_crop_size,
        feature_dim=int(backbone.num_features),
    )


def train_supervised(
    cfg: DinoConfig,
    train_data: Dataset,
    test_data: Dataset,
    ft: FinetuneConfig | None = None,
    *,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    on_epoch=None,
) -> tuple[FinetuneResult, ExportInfo]:
    """Train ``cfg``'s backbone from scratch (seed ``ft.seed``) with a linear head on ``train_data``.

    Returns the result and the `ExportInfo` to save it with (`fdino.finetune.save_classifier`).
    """
    ft = supervised_recipe(cfg) if ft is None else ft
    if ft.freeze != "none":
        raise ValueError(f"the supervised baseline trains every layer; got freeze={ft.freeze!r} (use 'none')")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ft.seed)
        backbone = create_backbone(cfg, drop_path_rate=ft.drop_path)
    result = finetune(
        backbone, train_data, test_data, ft, image_size=cfg.global_crop_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        num_classes=num_classes, device=device, num_workers=num_workers, dino_cfg=cfg, on_epoch=on_epoch,
    )  # fmt: skip
    return result, supervised_info(cfg, result.backbone)


__all__ = ["supervised_info", "supervised_recipe", "train_supervised"]
