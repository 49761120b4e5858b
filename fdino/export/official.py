"""Pretrained weights in the official DINO layout (facebookresearch/dino) -> timm backbones.

The official release has two kinds of files:
  * backbone-only weights (``dino_deitsmall16_pretrain.pth``, ``dino_resnet50_pretrain.pth``): the
    teacher's backbone, plain key names (``cls_token``, ``blocks.0.attn.qkv.weight``,
    ``layer1.0.conv1.weight``, ...);
  * full training checkpoints (``checkpoint.pth``, ``*_full_checkpoint.pth``): a dict with
    ``"student"`` (DDP-wrapped: ``module.backbone.*``, ``module.head.*``), ``"teacher"``
    (``backbone.*`` / ``head.*``, plus ``module.`` for ResNets trained with SyncBN), ``"optimizer"``,
    ``"epoch"``, ``"dino_loss"`` (the center), ``"fp16_scaler"`` and ``"args"`` -- an
    ``argparse.Namespace``, which ``torch.load(weights_only=True)`` refuses unless allow-listed
    (`SAFE_GLOBALS`); nothing else is allow-listed, so loading still cannot run code.

Key names: the official ViT (its ``vision_transformer.py`` derives from timm's) and the official
ResNet-50 (torchvision's ``resnet50``) use exactly timm's names for ``vit_*_patch{8,16}_224`` and
``resnet50``, so the conversion is: unwrap, strip ``module.`` / ``backbone.``, drop the DINO head
(``head.*``) and classifier (``fc.*``), then check every key and shape against the timm model
(strict). `RENAMES` is where a renamed key would go; `timm_to_official` is the inverse.

Numerics: at the native 224 px the timm backbone computes the official features (tests check
this against an independent re-implementation of the official forward). At other resolutions
both interpolate the position table bicubically but the official code offsets the scale factor
by 0.1 patch, so features differ slightly there.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The official `args` object: a plain attribute bag, safe to rebuild (it has no __reduce__ code).
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

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
_PREFIXES = ("module.", "backbone.", "_orig_mod.")
_DROPPED = ("head.", "fc.")  # DINO projection head (MultiCropWrapper.head); torchvision classifier
# official name (regex) -> timm name; empty because both layouts agree (see the module docstring).
RENAMES: tuple[tuple[str, str], ...] = ()


def torch_load_official(path: str | Path) -> Any:
    """``torch.load`` of an official file: ``weights_only`` with ``argparse.Namespace`` allowed."""
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        try:  # mmap: a 1 GB full checkpoint costs no memory until the teacher is read
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_weights(checkpoint: Any, which: str = "teacher") -> dict[str, torch.Tensor]:
    """The raw state dict inside an official file: the ``which`` network of a full checkpoint,
    a ``"state_dict"`` / ``"model"`` entry, or the file itself (backbone-only weights)."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r} is invalid: allowed 'teacher' (the one to use) or 'student'")
    data = checkpoint
    if isinstance(data, Mapping) and isinstance(data.get(which), Mapping):
        data = data[which]
    for key in ("state_dict", "model"):
        if isinstance(data, Mapping) and not _is_state_dict(data) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not _is_state_dict(data):
        keys = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"no state dict of tensors found (looked at '{which}', 'state_dict', 'model' and the "
                         f"top level; the file holds {keys})")
    return dict(data)


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove leading ``module.`` (DDP), ``backbone.`` (MultiCropWrapper), ``_orig_mod.`` (compile)."""
    out = {}
    for name, tensor in state.items():
        while name.startswith(_PREFIXES):
            name = name[len(next(p for p in _PREFIXES if name.startswith(p))):]
        out[name] = tensor
    return out


def guess_timm_arch(state: Mapping[str, torch.Tensor], args: Any = None) -> str:
    """The timm name for official weights: from the checkpoint's ``args`` (arch, patch_size) if
    present, else from the weights (ViT width and patch size, or a ResNet-50's ``layer4``)."""
    if args is not None and getattr(args, "arch", None):
        arch = str(args.arch).replace("deit", "vit")  # the official code renames deit_* to vit_*
        patch = int(getattr(args, "patch_size", 16)) if arch.startswith("vit") else None
        if (arch, patch) in OFFICIAL_ARCHS:
            return OFFICIAL_ARCHS[(arch, patch)]
        raise ValueError(f"official arch {arch!r} (patch {patch}) has no timm equivalent here; known: "
                         f"{sorted(f'{a}/{p}' if p else a for a, p in OFFICIAL_ARCHS)}")
    state = strip_prefixes(state)
    if "cls_token" in state and "patch_embed.proj.weight" in state:
        width, patch = int(state["cls_token"].shape[-1]), int(state["patch_embed.proj.weight"].shape[-1])
        name = _VIT_WIDTHS.get(width)
        if name is not None and (name, patch) in OFFICIAL_ARCHS:
            return OFFICIAL_ARCHS[(name, patch)]
        raise ValueError(f"ViT weights of width {width} and patch {patch} match no official DINO model; pass arch=")
    if "layer4.2.conv3.weight" in state and "layer4.3.conv1.weight" not in state and "layer3.5.conv1.weight" in state:
        return "resnet50"
    raise ValueError("cannot tell the architecture of these weights; pass arch= (a timm model name)")


def official_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official key names -> timm key names: prefixes stripped, head/classifier dropped, renamed."""
    out = {}
    for name, tensor in strip_prefixes(state).items():
        if name.startswith(_DROPPED):
            continue
        for pattern, repl in RENAMES:
            name = re.sub(pattern, repl, name)
        out[name] = tensor
    return out


def timm_to_official(state: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """timm backbone weights in the official layout (``prefix="backbone."`` or ``"module.backbone."``
    for the networks of a full checkpoint); the inverse of `official_to_timm` for backbone keys."""
    out = {}
    for name, tensor in state.items():
        for pattern, repl in RENAMES:  # (inverse renames would go here; the table is empty)
            name = re.sub(repl, pattern, name)
        out[prefix + name] = tensor
    return out


def _check_fit(arch: str, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k}: {tuple(state[k].shape)} vs timm "
                                                       f"{tuple(own[k].shape)}" for k in wrong[:4]))
        raise ValueError(f"official DINO weights do not fit timm {arch!r}: {'; '.join(parts)} "
                         f"(another arch? guess_timm_arch says {_safe_guess(state)!r})")


def _safe_guess(state: Mapping[str, torch.Tensor]) -> str | None:
    try:
        return guess_timm_arch(state)
    except ValueError:
        return None


def build_timm_backbone(arch: str, state: Mapping[str, torch.Tensor], *, dynamic_img_size: bool = True,
                        share: bool = False) -> nn.Module:
    """A timm ``arch`` (no classifier, eval mode) holding timm-named ``state``, loaded strictly.

    ViTs are built for the weights' own position table (224 px for the official models) with
    ``dynamic_img_size`` so they also run at other resolutions (interpolated positions). The
    module is created on the ``meta`` device and takes the given tensors (no random
    initialization to throw away: seconds for ViT-B on a CPU); with ``share=False`` it gets copies.
    """
    import timm  # noqa: PLC0415

    kwargs: dict[str, Any] = {"num_classes": 0}
    if arch.startswith("vit"):
        patch = int(state["patch_embed.proj.weight"].shape[-1]) if "patch_embed.proj.weight" in state else None
        n = int(state["pos_embed"].shape[1]) - 1 if "pos_embed" in state else 0
        if patch and math.isqrt(n) ** 2 == n and n > 0:
            kwargs.update(patch_size=patch, img_size=math.isqrt(n) * patch)
        kwargs["dynamic_img_size"] = dynamic_img_size
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError as err:  # timm's error for unknown names
        raise ValueError(f"arch={arch!r} is not a timm model; list names with timm.list_models()") from err
    _check_fit(arch, model, state)
    tensors = {k: v if share else v.clone() for k, v in state.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # non-persistent buffers are not in a state dict: build this arch the slow way
        model = timm.create_model(arch, pretrained=False, **kwargs)
        model.load_state_dict(dict(state), strict=True)
    return model.eval()


def load_official_backbone(source: str | Path | Mapping[str, Any], *, arch: str | None = None,
                           which: str = "teacher") -> tuple[nn.Module, str]:
    """``(timm backbone in eval mode, timm arch name)`` from official DINO weights.

    Args:
        source: a ``.pth`` file path, or an already loaded checkpoint / state dict.
        arch: timm model name (``vit_small_patch16_224``, ``vit_base_patch16_224``, ``resnet50``,
            ...); inferred from the checkpoint's ``args`` or the weights when None.
        which: ``"teacher"`` (what the paper evaluates and releases) or ``"student"``; used for full
            checkpoints only.
    """
    from_file = isinstance(source, (str, Path))
    checkpoint = torch_load_official(source) if from_file else source
    raw = select_weights(checkpoint, which)
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    state = official_to_timm(raw)
    arch = arch or guess_timm_arch(state, args)
    # Tensors read from a file belong to nobody else: the module takes them without a copy.
    return build_timm_backbone(arch, state, share=from_file), arch


def is_official_checkpoint(path: str | Path) -> bool:
    """True for a ``.pth``/``.pt`` file that plain ``weights_only`` loading refuses only because of
    the official ``args`` Namespace, i.e. a full official training checkpoint."""
    path = Path(path)
    if path.is_dir() or path.suffix not in (".pth", ".pt"):
        return False
    try:
        data = torch_load_official(path)
    except Exception:  # noqa: BLE001 - not loadable at all: not ours to claim
        return False
    return isinstance(data, Mapping) and isinstance(data.get("args"), argparse.Namespace)


def load_official_for_eval(path: str | Path, *, arch: str | None = None, which: str = "teacher",
                           device: str | torch.device = "cpu"):
    """`fdino.eval.loading.EvalModel` for official weights: ImageNet normalization, 224 px (ViT:
    the position table's size), frozen parameters."""
    from ..eval.loading import IMAGENET_MEAN, IMAGENET_STD, EvalModel  # noqa: PLC0415
    from ..models import is_vit  # noqa: PLC0415

    backbone, _ = load_official_backbone(path, arch=arch, which=which)
    backbone = backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    size = int(backbone.patch_embed.img_size[0]) if is_vit(backbone) else 224
    return EvalModel(backbone, None, IMAGENET_MEAN, IMAGENET_STD, size)


__all__ = ["OFFICIAL_ARCHS", "SAFE_GLOBALS", "RENAMES", "torch_load_official", "select_weights", "strip_prefixes",
           "guess_timm_arch", "official_to_timm", "timm_to_official", "build_timm_backbone",
           "load_official_backbone", "is_official_checkpoint", "load_official_for_eval"]
