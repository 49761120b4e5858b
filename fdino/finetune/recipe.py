"""How a backbone is fine-tuned: one frozen config, and the recipes a researcher starts from.

  * `vit_recipe`: the ViT fine-tuning recipe the DINO paper follows (DeiT / BEiT lineage, as in
    MAE's fine-tuning code): AdamW, linear warm-up then cosine decay, layer-wise lr decay 0.65,
    weight decay 0.05, drop path 0.1, label smoothing 0.1.
  * `cnn_recipe`: the standard ResNet recipe: SGD with momentum 0.9, cosine lr, weight decay 1e-4,
    label smoothing 0.1, no layer decay.
  * `linear_protocol`: the paper's linear evaluation (`fdino.eval.linear`) as a fine-tune with every
    backbone parameter frozen: SGD momentum 0.9, lr 0.001 x batch / 256, cosine to 0, no weight
    decay, crop + flip views. ``--freeze all`` with it reproduces ``fdino eval linear --mode paper``.

Learning rates are per 256 images and scaled by ``batch_size / 256`` (the paper's linear scaling
rule), as in DinoConfig. Epochs are over the labeled subset being trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..checks import check_int, check_real
from ..models import is_vit
from .layers import parse_freeze
from .views import AUGMENTS

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Every setting of a fine-tune (or of the supervised baseline, which is a fine-tune from scratch)."""

    optimizer: str = "adamw"
    """'adamw' or 'sgd' (momentum `momentum`, PyTorch semantics)."""
    lr: float = 5e-4
    """Peak learning rate per 256 images; the peak is lr x batch_size / 256."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine decay."""
    warmup_epochs: float = 1.0
    """Linear warm-up from 0 to the peak over this many epochs."""
    batch_size: int = 128
    """Images per step (smaller labeled subsets use all they have)."""
    epochs: int = 20
    """Passes over the labeled training images; the schedules span them."""
    max_steps: int = 0
    """Stop after this many steps (0: the epochs decide); the schedules then span max_steps."""
    max_minutes: float = 0.0
    """Stop after this many minutes of training (0: no limit); the schedules keep their length."""
    weight_decay: float = 0.05
    """Weight decay (not on biases, norms, the CLS token and position embeddings)."""
    momentum: float = 0.9
    """SGD momentum (also AdamW's beta1 is left at PyTorch's 0.9)."""
    layer_decay: float = 0.65
    """Layer-wise lr decay: block i of L trains at lr x layer_decay^(L + 1 - (i + 1)); 1 switches it off."""
    drop_path: float = 0.1
    """Stochastic depth rate of the backbone during fine-tuning (the backbone is rebuilt with it)."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    freeze: str = "none"
    """'none' (train everything), 'all' (a linear probe) or 'blocks:K' (embedding + first K blocks/stages frozen)."""
    augment: str = "crop_flip"
    """Training views: 'crop_flip' (the paper's linear-eval views) or 'dino' (one DINO global-crop view)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range of the training views."""
    head_init_std: float = 0.01
    """The linear head's weights start ~ N(0, std^2), its bias at 0 (the paper's probe init)."""
    eval_every_epochs: int = 1
    """Epochs between test-split evaluations for the curve (0: only at the end)."""
    seed: int = 0
    """Head initialization, view randomness and data order."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"FinetuneConfig.optimizer={self.optimizer!r} is invalid: allowed one of {OPTIMIZERS}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"FinetuneConfig.augment={self.augment!r} is invalid: allowed one of {AUGMENTS}")
        check_real("FinetuneConfig.lr", self.lr, 0.0)
        check_real("FinetuneConfig.min_lr", self.min_lr, 0.0)
        check_real("FinetuneConfig.warmup_epochs", self.warmup_epochs, 0.0)
        check_int("FinetuneConfig.batch_size", self.batch_size, 1)
        check_int("FinetuneConfig.epochs", self.epochs, 1)
        check_int("FinetuneConfig.max_steps", self.max_steps, 0)
        check_real("FinetuneConfig.max_minutes", self.max_minutes, 0.0)
        check_real("FinetuneConfig.weight_decay", self.weight_decay, 0.0)
        check_real("FinetuneConfig.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_real("FinetuneConfig.layer_decay", self.layer_decay, 0.0, 1.0, lo_open=True)
        check_real("FinetuneConfig.drop_path", self.drop_path, 0.0, 1.0, hi_open=True)
        check_real("FinetuneConfig.label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)
        check_real("FinetuneConfig.head_init_std", self.head_init_std, 0.0)
        check_int("FinetuneConfig.eval_every_epochs", self.eval_every_epochs, 0)
        check_int("FinetuneConfig.seed", self.seed, 0)
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"FinetuneConfig.crop_scale={self.crop_scale!r} is invalid: allowed 0 < lo <= hi <= 1")
        object.__setattr__(self, "crop_scale", (float(lo), float(hi)))
        parse_freeze(self.freeze)  # raises with the allowed forms

    def replace(self, **changes: Any) -> FinetuneConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / 256


def vit_recipe(**overrides: Any) -> FinetuneConfig:
    """AdamW, warm-up + cosine, layer decay 0.65, wd 0.05, drop path 0.1, label smoothing 0.1."""
    return FinetuneConfig(**overrides)


def cnn_recipe(**overrides: Any) -> FinetuneConfig:
    """SGD momentum 0.9, lr 0.1 per 256 with cosine decay, wd 1e-4, label smoothing 0.1, no layer decay."""
    base = dict(
        optimizer="sgd", lr=0.1, min_lr=0.0, warmup_epochs=0.0, weight_decay=1e-4,
        layer_decay=1.0, drop_path=0.0, label_smoothing=0.1,
    )  # fmt: skip
    return FinetuneConfig(**(base | overrides))


def linear_protocol(**overrides: Any) -> FinetuneConfig:
    """The paper's linear evaluation as a fine-tune: frozen backbone, SGD, lr 0.001 per 256, cosine to 0."""
    base = dict(
        optimizer="sgd", lr=0.001, min_lr=0.0, warmup_epochs=0.0, weight_decay=0.0, momentum=0.9,
        layer_decay=1.0, drop_path=0.0, label_smoothing=0.0, freeze="all", augment="crop_flip",
    )  # fmt: skip
    return FinetuneConfig(**(base | overrides))


RECIPES = {"vit": vit_recipe, "cnn": cnn_recipe, "linear": linear_protocol}


def recipe_for(backbone: nn.Module, name: str = "auto", **overrides: Any) -> FinetuneConfig:
    """The recipe ``name`` ('auto': 'vit' for timm ViTs, 'cnn' otherwise) with ``overrides``."""
    if name == "auto":
        name = "vit" if is_vit(backbone) else "cnn"
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is unknown: allowed 'auto' or one of {sorted(RECIPES)}")
    return RECIPES[name](**overrides)


__all__ = ["FinetuneConfig", "OPTIMIZERS", "RECIPES", "cnn_recipe", "linear_protocol", "recipe_for", "vit_recipe"]
