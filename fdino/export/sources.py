"""One entry point for export and serving: any model source -> frozen backbone + `ExportInfo`.

Sources, in the order they are recognized:
  * an fdino safetensors export (metadata says how to rebuild it): `fdino.export.weights`;
  * official DINO weights (facebookresearch/dino): full training checkpoints (their ``args``
    Namespace needs an allow-list), and release files whose architecture is recognized when no
    ``arch`` is given: `fdino.export.official`;
  * everything `fdino.eval.loading.load_model_for_eval` reads: fdino run folders and checkpoints,
    plain timm weights and official backbone-only weights (with ``arch``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..models import is_vit
from .weights import ExportInfo


class LoadedModel(NamedTuple):
    """A frozen backbone ready for inference, and what an export needs to know about it."""

    model: Any
    """`fdino.eval.loading.EvalModel`: ``backbone, cfg, mean, std, image_size``."""
    info: ExportInfo
    """Architecture, timm kwargs, config, normalization, feature width."""


def _vit_geometry(backbone: torch.nn.Module) -> dict[str, Any]:
    """The timm kwargs that fix a ViT's shape where the arch name does not (patch, table size)."""
    patch = int(backbone.patch_embed.patch_size[0])
    n = backbone.pos_embed.shape[1] - (0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens)
    side = math.isqrt(n)
    return {"patch_size": patch, "img_size": side * patch, "dynamic_img_size": bool(backbone.dynamic_img_size)}


def _official_arch(path: Path, arch: str | None, which: str) -> str | None:
    """The timm arch to load ``path`` with through `fdino.export.official`, or None to leave the file
    to `load_model_for_eval`: full official checkpoints (their ``args`` Namespace needs the
    allow-list) and, without ``arch``, weights whose architecture the official layout reveals."""
    from ..checkpoint import FORMAT  # noqa: PLC0415
    from .official import guess_timm_arch, official_to_timm, select_weights, torch_load_official  # noqa: PLC0415

    if not path.is_file() or path.suffix not in (".pt", ".pth"):
        return None
    try:
        data = torch_load_official(path)
    except Exception:  # noqa: BLE001 - let the eval loader report what is wrong with the file
        return None
    if not isinstance(data, dict) or data.get("format") == FORMAT:
        return None
    args = data.get("args")
    if arch is not None:
        return arch if isinstance(args, argparse.Namespace) else None
    try:
        return guess_timm_arch(official_to_timm(select_weights(data, which)), args)
    except ValueError:
        return None


def load_source(source: str | Path, *, arch: str | None = None, which: str = "teacher",
                device: str | torch.device = "cpu", model_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """Load any supported model source (see the module docstring) in eval mode on ``device``."""
    from ..eval.loading import EvalModel, load_model_for_eval  # noqa: PLC0415
    from .official import load_official_for_eval  # noqa: PLC0415
    from .weights import load_exported, read_export_info  # noqa: PLC0415

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model source {str(path)!r} does not exist (a run folder, ckpt-*.pt, or weights)")
    if path.suffix == ".safetensors" and read_export_info(path) is not None:
        backbone, info = load_exported(path, device=device)
        for p in backbone.parameters():
            p.requires_grad_(False)
        cfg = None
        if info.dino_config is not None:
            from ..config import DinoConfig  # noqa: PLC0415

            cfg = DinoConfig.from_dict(info.dino_config)
        return LoadedModel(EvalModel(backbone, cfg, info.mean, info.std, info.image_size), info)
    official = None if model_kwargs else _official_arch(path, arch, which)
    if official is not None:
        arch = official
        model = load_official_for_eval(path, arch=arch, which=which, device=device)
    else:
        model = load_model_for_eval(path, arch=arch, which=which, device=device, model_kwargs=model_kwargs)
    backbone = model.backbone
    if model.cfg is not None:
        from ..models import timm_kwargs  # noqa: PLC0415  (the kwargs create_backbone used)

        kwargs = timm_kwargs(model.cfg, drop_path_rate=0.0, vit=is_vit(backbone))
        kwargs.pop("num_classes", None)
        name = model.cfg.arch
    else:
        kwargs = dict(model_kwargs or {})
        if is_vit(backbone):
            kwargs.update(_vit_geometry(backbone))
        name = arch or backbone.pretrained_cfg.get("architecture") or type(backbone).__name__
    info = ExportInfo(arch=name, model_kwargs=kwargs, dino_config=model.cfg.to_dict() if model.cfg else None,
                      which=which, image_size=int(model.image_size), mean=tuple(model.mean), std=tuple(model.std),
                      feature_dim=int(backbone.num_features))
    return LoadedModel(model, info)


__all__ = ["LoadedModel", "load_source"]
