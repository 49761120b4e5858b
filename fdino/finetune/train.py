"""Fine-tune a backbone with a linear head on labels (and, from a random start, the supervised baseline).

`finetune` is the loop: augmented views (`fdino.finetune.views`) through the backbone and a linear
head, cross-entropy with label smoothing, AdamW or SGD over the parameter groups of
`fdino.finetune.layers` (layer-wise lr decay, frozen blocks), lr warm-up then cosine decay per step,
the test split evaluated on centre crops. The backbone it is given is copied, never changed.

With ``freeze="all"`` the backbone runs in eval mode without gradients and the loop is the paper's
linear evaluation (`fdino.eval.linear.linear_eval_images`, same views, same data order, same head
initialization): `linear_protocol` gives the same head, which the tests hold to.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data import EvalTransform
from ..eval.features import extract_features
from ..eval.linear import LinearProbe, init_linear, probe_accuracy
from .layers import param_groups, parse_freeze, set_requires_grad
from .recipe import FinetuneConfig
from .views import view_loader


class FinetuneResult(NamedTuple):
    """What a fine-tune produced: the trained backbone and head, and how well they classify."""

    backbone: nn.Module
    """The fine-tuned backbone (eval mode, no gradients)."""
    head: LinearProbe
    """The linear head on the backbone's feature: ``logits = feats @ weight.T + bias``."""
    top1: float
    """Top-1 accuracy (%) on the test split at the end."""
    top5: float
    """Top-5 accuracy (%) on the test split at the end."""
    curve: list[dict[str, float]]
    """Per epoch: ``epoch``, ``step``, ``loss`` (mean), ``lr`` (peak group), and ``top1`` where evaluated."""
    steps: int
    """Optimizer steps taken."""
    seconds: float
    """Training wall time (evaluations excluded)."""
    stopped_by: str
    """'epochs', 'max_steps' or 'max_minutes'."""

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images ``[B, 3, S, S]`` -> class logits ``[B, C]``."""
        with torch.no_grad():
            return self.head.logits(self.backbone(images))


def lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine to ``min_lr`` at ``total``.

    With ``warmup = 0`` and ``min_lr = 0`` this is `fdino.eval.linear.cosine_lr`, the probe's schedule.
    """
    if step < warmup:
        return peak * step / warmup
    progress = min(step - warmup, total - warmup) / max(total - warmup, 1)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _freeze_frozen_norms(backbone: nn.Module) -> None:
    """Batch norms whose parameters are all frozen keep their running statistics (eval mode)."""
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


def evaluate(
    backbone: nn.Module,
    head: LinearProbe,
    data: Dataset,
    *,
    image_size: int,
    mean,
    std,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> dict[str, float]:
    """``{"top1", "top5"}`` (%) of backbone + head on the centre crops of a labeled data set."""
    transform = EvalTransform(image_size, mean=tuple(mean), std=tuple(std))
    feats, labels = extract_features(
        backbone, data, batch_size=batch_size, device=device, num_workers=num_workers, transform=transform
    )
    return probe_accuracy(head, feats, labels)


def _num_classes(train_data: Dataset, num_classes: int | None) -> int:
    if num_classes:
        return int(num_classes)
    classes = getattr(train_data, "classes", None) or getattr(getattr(train_data, "dataset", None), "classes", None)
    if classes:
        return len(classes)
    raise ValueError("finetune needs num_classes= (the training data set does not name its classes)")


def finetune(
    backbone: nn.Module,
    train_data: Dataset,
    test_data: Dataset,
    cfg: FinetuneConfig,
    *,
    image_size: int,
    mean,
    std,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    dino_cfg=None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``backbone`` with a new linear head on ``train_data``; test on ``test_data``.

    Args:
        backbone: a timm backbone returning ``[B, D]`` features (e.g. ``load_model(...).backbone``);
            copied. Drop path only acts if the module was built with it (see `finetune_model`).
        train_data, test_data: map-style ``(image, label)`` data sets (uint8 tensors or PIL images),
            e.g. a `label_subset` of the train split and the held-out split.
        cfg: the recipe (`vit_recipe`, `cnn_recipe`, `linear_protocol`, ...).
        image_size, mean, std: the backbone's input side and normalization.
        dino_cfg: the `DinoConfig` the backbone was trained with, for ``augment="dino"`` views.
        on_epoch: called with each epoch's curve entry (progress bars, logs).
    """
    device = torch.device(device)
    # Stochastic depth and dropout draw from the global generator: seed it for this run only, so a
    # fine-tune is a function of cfg.seed and the caller's random stream is left where it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        return _finetune(
            backbone, train_data, test_data, cfg, image_size=image_size, mean=mean, std=std,
            num_classes=num_classes, device=device, num_workers=num_workers, dino_cfg=dino_cfg, on_epoch=on_epoch,
        )  # fmt: skip


def _finetune(backbone, train_data, test_data, cfg, *, image_size, mean, std, num_classes, device, num_workers,
              dino_cfg, on_epoch) -> FinetuneResult:  # fmt: skip
    freeze = parse_freeze(cfg.freeze)
    classes = _num_classes(train_data, num_classes)
    if len(train_data) == 0:
        raise ValueError("finetune got an empty training set (check the label fraction / labels per class)")
    model = copy.deepcopy(backbone).to(device)
    set_requires_grad(model, freeze)
    linear_only = freeze == "all"
    batch_size = min(cfg.batch_size, len(train_data))
    loader, sampler = view_loader(
        train_data, augment=cfg.augment, image_size=image_size, batch_size=batch_size, seed=cfg.seed,
        mean=mean, std=std, crop_scale=cfg.crop_scale, cfg=dino_cfg, num_workers=num_workers,
    )  # fmt: skip
    steps_per_epoch = len(sampler)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    peak = cfg.lr * batch_size / 256
    with torch.no_grad():
        dim = int(model(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-1])
    w, b = init_linear(dim, classes, seed=cfg.seed)
    head = nn.Linear(dim, classes).to(device)
    with torch.no_grad():
        head.weight.copy_(w * (cfg.head_init_std / 0.01))
        head.bias.copy_(b)
    groups = param_groups(
        model, head, lr=peak, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay, freeze=freeze
    )
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=peak, betas=(cfg.momentum, 0.999))
    else:
        opt = torch.optim.SGD(groups, lr=peak, momentum=cfg.momentum)

    def test_head() -> LinearProbe:
        return LinearProbe(head.weight.detach().cpu().clone(), head.bias.detach().cpu().clone())

    curve: list[dict[str, float]] = []
    step, seconds, stopped_by, final = 0, 0.0, "epochs", None
    for epoch in range(cfg.epochs):
        sampler.epoch = epoch
        model.train(not linear_only)
        _freeze_frozen_norms(model)
        losses, started = [], time.perf_counter()
        lr = peak
        for images, labels in loader:
            lr = lr_at(step, total, warmup, peak, cfg.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if linear_only:
                with torch.no_grad():
                    feats = model(images).float()
            else:
                feats = model(images)
            loss = F.cross_entropy(head(feats), labels, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            step += 1
            if cfg.max_steps and step >= total:
                stopped_by = "max_steps"
                break
            if cfg.max_minutes and seconds + time.perf_counter() - started >= 60 * cfg.max_minutes:
                stopped_by = "max_minutes"
                break
        seconds += time.perf_counter() - started
        entry: dict[str, float] = {
            "epoch": epoch + 1, "step": step, "loss": float(torch.stack(losses).mean()), "lr": lr,
        }  # fmt: skip
        last = stopped_by != "epochs" or epoch + 1 == cfg.epochs
        final = None
        if cfg.eval_every_epochs and ((epoch + 1) % cfg.eval_every_epochs == 0 or last):
            final = evaluate(
                model, test_head(), test_data, image_size=image_size, mean=mean, std=std,
                device=device, num_workers=num_workers,
            )  # fmt: skip
            entry["top1"] = final["top1"]
        if not math.isfinite(entry["loss"]):
            raise FloatingPointError(
                f"fine-tuning diverged at epoch {epoch + 1} (loss {entry['loss']}): lower FinetuneConfig.lr"
            )
        curve.append(entry)
        if on_epoch is not None:
            on_epoch(entry)
        if stopped_by != "epochs":
            break
    model.eval().requires_grad_(False)
    if final is None:  # the last epoch was not evaluated for the curve
        final = evaluate(
            model, test_head(), test_data, image_size=image_size, mean=mean, std=std,
            device=device, num_workers=num_workers,
        )  # fmt: skip
    return FinetuneResult(model, test_head(), final["top1"], final["top5"], curve, step, seconds, stopped_by)


def with_drop_path(loaded: Any, rate: float) -> nn.Module:
    """``loaded.backbone`` (a `fdino.weights.LoadedModel`) rebuilt with stochastic depth ``rate``.

    Drop path is a constructor argument in timm, so a backbone loaded for evaluation (built
    without it) is rebuilt from its own weights; rate 0 returns the loaded module itself.
    """
    if rate <= 0:
        return loaded.backbone
    from ..weights import build_timm_backbone  # noqa: PLC0415

    kwargs = {**loaded.info.model_kwargs, "drop_path_rate": float(rate)}
    weights = {k: v.detach().clone() for k, v in loaded.backbone.state_dict().items()}
    return build_timm_backbone(loaded.info.arch, weights, model_kwargs=kwargs, share=True)[0]


__all__ = ["FinetuneResult", "evaluate", "finetune", "lr_at", "with_drop_path"]
