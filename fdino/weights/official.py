"""The official DINO release (facebookresearch/dino): its architectures and key layout vs timm's.

Release files (``dino_deitsmall16_pretrain.pth``, ``dino_resnet50_pretrain.pth``) hold the teacher's
backbone under plain names; full training checkpoints (``checkpoint.pth``) hold ``"student"``
(DDP-wrapped: ``module.backbone.*``, ``module.head.*``), ``"teacher"`` (``backbone.*``, ``head.*``;
``module.`` too for ResNets trained with SyncBN), the optimizer, the center and an
``argparse.Namespace`` under ``"args"``. The official ViT and ResNet-50 use exactly timm's key
names for ``vit_*_patch{8,16}_224`` and ``resnet50``, so converting is unwrapping
(`fdino.weights.files.unwrap_state_dict`) and dropping the DINO head; `timm_to_official` writes
the official layout (tests use it to build official files).

Numerics: at the native 224 px the timm backbone computes the official features (tests check
this against a re-implementation of the official forward). At other resolutions both interpolate
the position table bicubically, but the official code offsets the scale by 0.1 patch.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from .files import strip_prefixes

# (official arch name, patch size) -> timm model name.
OFFICIAL_ARCHS: dict[tuple[str, int | None], str] = {
    ("vit_tiny", 16): "vit_tiny_patch16_224",
    ("vit_small", 16): "vit_small_patch16_224",
    ("vit_small", 8): "vit_small_patch8_224",
    ("vit_base", 16): "vit_base_patch16_224",
    ("vit_base", 8): "vit_base_patch8_224",
    ("resnet50", None): "resnet50",
}
_VIT_WIDTHS = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}


def guess_timm_arch(state: Mapping[str, torch.Tensor], args: Any = None) -> str:
    """The timm name of official weights: from the checkpoint's ``args`` (arch, patch_size) when
    given, else from the weights (ViT width and patch size, or a ResNet-50's block counts)."""
    if isinstance(args, argparse.Namespace) and getattr(args, "arch", None):
        arch = str(args.arch).replace("deit", "vit")  # the official code renamed deit_* to vit_*
        patch = int(getattr(args, "patch_size", 16)) if arch.startswith("vit") else None
        if (arch, patch) in OFFICIAL_ARCHS:
            return OFFICIAL_ARCHS[(arch, patch)]
        raise ValueError(
            f"official arch {arch!r} (patch {patch}) has no timm equivalent here; known: "
            f"{sorted(f'{a}/{p}' if p else a for a, p in OFFICIAL_ARCHS)}"
        )
    state = strip_prefixes(state)
    if "cls_token" in state and "patch_embed.proj.weight" in state:
        width, patch = int(state["cls_token"].shape[-1]), int(state["patch_embed.proj.weight"].shape[-1])
        name = _VIT_WIDTHS.get(width)
        if name is not None and (name, patch) in OFFICIAL_ARCHS:
            return OFFICIAL_ARCHS[(name, patch)]
        raise ValueError(
            f"ViT weights of width {width} and patch {patch} match no official DINO model; pass arch= "
            f"(--arch) with the timm model name"
        )
    if "layer4.2.conv3.weight" in state and "layer4.3.conv1.weight" not in state and "layer3.5.conv1.weight" in state:
        return "resnet50"
    raise ValueError(
        "cannot tell the architecture of these weights; pass arch= (--arch), a timm model name such as "
        "vit_small_patch16_224"
    )


def timm_to_official(state: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """timm backbone weights in the official layout: ``prefix="backbone."`` (a teacher) or
    ``"module.backbone."`` (the DDP student of a full checkpoint); the names themselves agree."""
    return {prefix + name: tensor for name, tensor in state.items()}


__all__ = ["OFFICIAL_ARCHS", "guess_timm_arch", "timm_to_official"]
