"""`load_model`: the one way every command (eval, export, quantize, serve) reads a model.

Sources (`SOURCE_KINDS`), recognized in this order:
  * ``fdino-checkpoint``: an fdino run folder (its newest ``ckpt-*.pt``) or a checkpoint file; the
    backbone is rebuilt from the stored `DinoConfig`;
  * ``fdino-export``: a ``.safetensors`` file written by ``fdino export`` (its metadata rebuilds it),
    or a folder holding one as ``model.safetensors`` (``fdino finetune`` / ``fdino supervised`` output);
  * ``official``: official DINO weights (facebookresearch/dino): full training checkpoints and
    release files, the architecture read from their ``args`` or their weights when ``arch`` is None;
  * ``timm``: any other timm backbone state dict (``.pt``/``.pth``/``.safetensors``) with ``arch``.
A source may also be an already loaded checkpoint or state dict (a mapping): same rules, copied.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import FORMAT as CHECKPOINT_FORMAT
from ..checkpoint import backbone_weights, list_checkpoints, newest_valid_checkpoint, state_from_dict
from ..config import DinoConfig
from ..models import is_vit, timm_kwargs
from .build import build_timm_backbone, create_timm
from .export_file import FOLDER_MODEL_FILE, ExportInfo, read_export_info
from .files import check_which, read_weights_file, unwrap_state_dict
from .official import guess_timm_arch

SOURCE_KINDS = ("fdino-checkpoint", "fdino-export", "official", "timm")
MODEL_SOURCES_HELP = (
    "the model: an fdino run folder or ckpt-*.pt file; an fdino export (.safetensors written by 'fdino export', "
    "or a folder written by 'fdino finetune' / 'fdino supervised'); "
    "official DINO weights (release .pth files and full training checkpoints; the architecture is recognized); "
    "or other timm backbone weights (.pt/.pth/.safetensors) with --arch"
)


@dataclass(frozen=True)
class LoadedModel:
    """A frozen backbone (eval mode, no gradients) and how to feed it."""

    backbone: nn.Module
    """timm backbone without classifier."""
    info: ExportInfo
    """Architecture, timm kwargs, training config, which network, input size and normalization."""
    kind: str
    """Where it came from: one of `SOURCE_KINDS`."""
    cfg: DinoConfig | None = None
    """The training config (fdino checkpoints and exports of them), else None."""

    @property
    def image_size(self) -> int:
        return self.info.image_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.info.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.info.std


def _from_config(cfg: DinoConfig, weights: Mapping[str, torch.Tensor], *, share: bool) -> tuple[nn.Module, dict]:
    """The backbone `fdino.models.create_backbone` builds for ``cfg`` (no stochastic depth) with ``weights``."""
    with torch.device("meta"):
        vit = is_vit(create_timm(cfg.arch, **dict(cfg.backbone_kwargs)))
    kwargs = timm_kwargs(cfg, drop_path_rate=0.0, vit=vit)
    kwargs.pop("num_classes")
    return build_timm_backbone(cfg.arch, weights, model_kwargs=kwargs, share=share)


def _open(source: str | Path | Mapping[str, Any]) -> tuple[Any, ExportInfo | None, str, bool]:
    """``(content, export info or None, name for messages, whether the tensors are ours to keep)``."""
    if isinstance(source, Mapping):
        return source, None, "the given weights", False  # the caller's tensors: copy them
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model source {str(source)!r} does not exist ({MODEL_SOURCES_HELP})")
    if path.is_dir():
        folder_model = path / FOLDER_MODEL_FILE
        path = folder_model if folder_model.is_file() and not list_checkpoints(path) else newest_valid_checkpoint(path)
    export_info = read_export_info(path) if path.suffix == ".safetensors" else None
    try:
        content = read_weights_file(path)
    except ValueError:
        raise
    except Exception as err:  # a broken file raises whatever the unpickler trips over
        raise ValueError(f"{path} is not a readable weights file ({type(err).__name__}: {err})") from err
    return content, export_info, str(source), True


def _from_export(
    info: ExportInfo, weights: Mapping[str, torch.Tensor], strict: bool
) -> tuple[nn.Module, DinoConfig | None]:
    if info.dino_config is None:
        backbone = build_timm_backbone(info.arch, weights, model_kwargs=info.model_kwargs, share=True, strict=strict)
        return backbone[0], None
    cfg = DinoConfig.from_dict(info.dino_config)
    return _from_config(cfg, weights, share=True)[0], cfg


def _from_checkpoint(content: Mapping[str, Any], which: str, share: bool) -> tuple[nn.Module, ExportInfo, DinoConfig]:
    state = state_from_dict(content["state"])
    backbone, kwargs = _from_config(state.cfg, backbone_weights(state, which), share=share)
    info = ExportInfo(
        arch=state.cfg.arch,
        model_kwargs=kwargs,
        dino_config=state.cfg.to_dict(),
        which=which,
        image_size=state.cfg.global_crop_size,
        feature_dim=int(backbone.num_features),
    )
    return backbone, info, state.cfg


def _from_weights(content: Any, name: str, *, which: str, arch: str | None, share: bool, **build: Any):
    """``(backbone, info, kind)`` for official DINO or plain timm weights."""
    weights = unwrap_state_dict(content, which)
    args = content.get("args") if isinstance(content, Mapping) else None
    official = isinstance(args, argparse.Namespace)  # a full official training checkpoint
    if arch is None:
        try:
            arch, official = guess_timm_arch(weights, args), True
        except ValueError as err:
            raise ValueError(f"{name} is not an fdino checkpoint or export, and {err}") from None
    backbone, kwargs = build_timm_backbone(arch, weights, share=share, **build)
    size = int(backbone.patch_embed.img_size[0]) if is_vit(backbone) else 224
    info = ExportInfo(arch=arch, model_kwargs=kwargs, which=which, image_size=size, feature_dim=backbone.num_features)
    return backbone, info, "official" if official else "timm"


def load_model(
    source: str | Path | Mapping[str, Any],
    *,
    which: str = "teacher",
    arch: str | None = None,
    device: str | torch.device = "cpu",
    patch_size: int | None = None,
    img_size: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    strict: bool = False,
) -> LoadedModel:
    """The frozen backbone of ``source`` (see the module docstring) on ``device``.

    Args:
        which: "teacher" (what the paper evaluates and releases) or "student", for training checkpoints.
        arch: timm model name for weights that do not say what they are (ignored, with a warning,
            for fdino checkpoints and exports).
        patch_size, img_size: ViT geometry for plain weights (read off the weights when unset);
            ``img_size`` also overrides the evaluation resolution of any source.
        model_kwargs: further ``timm.create_model`` arguments for plain weights (embed_dim, depth, ...).
        mean, std: override the input normalization (default: the source's, ImageNet's for plain weights).
        strict: weights the backbone has no place for (other than a projection head or classifier) are
            an error, not a warning (``fdino train --init-weights`` uses every backbone weight).
    """
    check_which(which)
    content, info, name, share = _open(source)
    fdino_checkpoint = isinstance(content, Mapping) and content.get("format") == CHECKPOINT_FORMAT
    if (info is not None or fdino_checkpoint) and arch is not None:
        warnings.warn(f"arch={arch!r} ignored: {name} is an fdino model that names its own", stacklevel=2)
    if info is not None:
        (backbone, cfg), kind = _from_export(info, content, strict), "fdino-export"
    elif fdino_checkpoint:
        (backbone, info, cfg), kind = _from_checkpoint(content, which, share), "fdino-checkpoint"
    else:
        backbone, info, kind = _from_weights(
            content, name, which=which, arch=arch, share=share,
            model_kwargs=model_kwargs, patch_size=patch_size, img_size=img_size, strict=strict,
        )  # fmt: skip
        cfg = None
    overrides = {"image_size": None if img_size is None else int(img_size)}
    overrides |= {k: tuple(v) for k, v in (("mean", mean), ("std", std)) if v is not None}
    info = dataclasses.replace(info, **{k: v for k, v in overrides.items() if v is not None})
    return LoadedModel(backbone.to(device), info, kind, cfg)


__all__ = ["LoadedModel", "MODEL_SOURCES_HELP", "SOURCE_KINDS", "load_model"]
