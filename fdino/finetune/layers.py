"""Which parameters a fine-tune trains, and at what learning rate (layer-wise lr decay).

Layer-wise lr decay is the ViT fine-tuning recipe of BEiT (Bao et al. 2022, ``LayerDecayValueAssigner``)
and MAE (He et al. 2022, ``util/lr_decay.py``): number the layers from the input, the embedding 0,
block i ``i + 1``, everything after the last block (final norm, pooling norm, classifier head)
``L + 1``, and scale each parameter's lr by ``layer_decay ** (L + 1 - layer_id)``. The head trains at
the full lr and the embedding at ``layer_decay ** (L + 1)``: the layers nearest the input, whose
features transfer best, move least. `num_layers` returns ``L + 1``, the exponent's base.

A ResNet gets the same treatment with its stages as the blocks: the stem (``conv1``, ``bn1``) is
layer 0, ``layer{k}`` is layer k, anything else (``fc``) ``L + 1``.

Freezing uses the same numbering: ``blocks:K`` freezes every parameter with layer id <= K, i.e. the
embedding (or stem) and the first K blocks (or stages); ``none`` and ``all`` need no numbering, so
``layer_decay=1`` with ``freeze="none"`` or ``"all"`` works on any module.

Weight decay follows DINO's ``get_params_groups``: none on biases and other 1-D parameters (norm
weights); like MAE's ``no_weight_decay`` list, none on the ViT's learned tokens and position
embedding either (``cls_token``, ``pos_embed``, ``reg_token``, ``dist_token``).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..checks import check_real, is_int
from ..models import is_regularized, is_vit

FreezeSpec = str | int
"""``"none"``, ``"all"``, ``"blocks:K"``, or the parsed ``K`` (an int >= 0)."""

FREEZE_FORMS = "'none', 'all' or 'blocks:K' with K an integer >= 0"

# Parameters of the ViT's input side: before block 0, hence layer 0. `norm_pre` (timm's optional
# pre-norm, CLIP-style) normalizes the embedded tokens before the first block, so it belongs here too.
_VIT_EMBED_TOKENS = frozenset({"cls_token", "pos_embed", "reg_token", "dist_token"})
_VIT_EMBED_MODULES = frozenset({"patch_embed", "norm_pre"})
_RESNET_STEM = frozenset({"conv1", "bn1"})
_RESNET_STAGE = re.compile(r"layer(\d+)")


def _arch(backbone: nn.Module) -> str:
    cfg = getattr(backbone, "pretrained_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{name} ({type(backbone).__name__})" if name else type(backbone).__name__


def _resnet_stages(backbone: nn.Module) -> int:
    """Number of ``layer{k}`` stages (k = 1, 2, ...) of a ResNet-shaped module; 0 if it is not one."""
    if not (hasattr(backbone, "conv1") and hasattr(backbone, "layer1")):
        return 0
    stages = 1
    while hasattr(backbone, f"layer{stages + 1}"):
        stages += 1
    return stages


def _unsupported(backbone: nn.Module) -> ValueError:
    return ValueError(
        f"layer decay and 'blocks:K' freezing support timm ViTs and ResNets only, not {_arch(backbone)}: "
        "they number its layers from the input; use layer_decay=1 and freeze='none' or 'all' with this backbone"
    )


def num_layers(backbone: nn.Module) -> int:
    """``L + 1``, with ``L`` the number of ViT blocks or ResNet stages: the layer id of the top (head) layer."""
    if is_vit(backbone):
        return len(backbone.blocks) + 1
    stages = _resnet_stages(backbone)
    if stages:
        return stages + 1
    raise _unsupported(backbone)


def layer_id(name: str, backbone: nn.Module) -> int:
    """The layer id of backbone parameter ``name``, in ``[0, L + 1]`` (see the module docstring).

    ViT: ``cls_token``, ``pos_embed``, ``reg_token``, ``dist_token``, ``patch_embed.*``, ``norm_pre.*``
    -> 0; ``blocks.{i}.*`` -> i + 1; anything else (``norm``, ``fc_norm``, ``head``) -> L + 1.
    ResNet: ``conv1.*``, ``bn1.*`` (the stem, deep stems included) -> 0; ``layer{k}.*`` -> k; anything
    else (``fc``) -> L + 1. Other architectures raise ValueError.
    """
    top = num_layers(backbone)
    parts = name.split(".")
    if is_vit(backbone):
        if parts[0] in _VIT_EMBED_TOKENS or parts[0] in _VIT_EMBED_MODULES:
            return 0
        if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
            return int(parts[1]) + 1
        return top
    if parts[0] in _RESNET_STEM:
        return 0
    stage = _RESNET_STAGE.fullmatch(parts[0])
    if stage and 1 <= int(stage.group(1)) < top:
        return int(stage.group(1))
    return top


def parse_freeze(spec: str) -> int | str:
    """``"none"`` -> ``"none"``, ``"all"`` -> ``"all"``, ``"blocks:K"`` -> ``K`` (an int >= 0)."""
    if spec in ("none", "all"):
        return spec
    match = re.fullmatch(r"blocks:(\d+)", spec) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(f"freeze={spec!r} is invalid: allowed {FREEZE_FORMS}")
    return int(match.group(1))


def _freeze_value(freeze: FreezeSpec) -> int | str:
    """A `parse_freeze` form or its parsed value, as the parsed value."""
    if is_int(freeze):
        if freeze < 0:
            raise ValueError(f"freeze={freeze!r} is invalid: allowed {FREEZE_FORMS}, or K itself")
        return freeze
    return parse_freeze(freeze)


def frozen_names(backbone: nn.Module, freeze: FreezeSpec) -> set[str]:
    """Names of the backbone parameters that do not train under ``freeze``.

    ``"none"``: none. ``"all"``: all. ``K`` (or ``"blocks:K"``): those with layer id <= K, the
    embedding (or stem) and the first K blocks (or stages); ``K = 0`` freezes the patch embedding
    (or stem) alone, ``K = L`` everything but the final norm. ``K > L`` raises ValueError.
    """
    value = _freeze_value(freeze)
    if value == "none":
        return set()
    names = [name for name, _ in backbone.named_parameters()]
    if value == "all":
        return set(names)
    blocks = num_layers(backbone) - 1
    if value > blocks:
        raise ValueError(
            f"freeze='blocks:{value}' is invalid: {_arch(backbone)} has {blocks} blocks/stages, "
            f"so K must be in [0, {blocks}] (or freeze='all')"
        )
    return {name for name in names if layer_id(name, backbone) <= value}


def set_requires_grad(backbone: nn.Module, freeze: FreezeSpec) -> None:
    """In place: ``requires_grad=False`` on the parameters `frozen_names` lists, ``True`` on the rest."""
    frozen = frozen_names(backbone, freeze)
    for name, param in backbone.named_parameters():
        param.requires_grad_(name not in frozen)


def _decays(name: str, param: nn.Parameter, *, backbone: bool) -> bool:
    if backbone and name in _VIT_EMBED_TOKENS:
        return False
    return is_regularized(name, param)


def param_groups(
    backbone: nn.Module,
    head: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    freeze: FreezeSpec = "none",
) -> list[dict[str, Any]]:
    """``torch.optim`` parameter groups for fine-tuning ``head(backbone(x))``.

    Every trainable parameter of ``backbone`` and ``head`` is in exactly one group; the backbone's
    frozen ones (`frozen_names`) are in none. (Call `set_requires_grad` with the same ``freeze`` so
    autograd skips them too; this function reads names, not ``requires_grad``.) The head always
    trains, as the top layer ``L + 1``. A parameter shared by backbone and head is listed once.

    Each group is a dict with ``params`` (a list of parameters), ``lr_scale`` =
    ``layer_decay ** (L + 1 - layer_id)``, ``lr`` = ``lr * lr_scale`` (a schedule that sets the lr
    per step should set ``peak_t * lr_scale`` from the group's ``lr_scale``), ``weight_decay`` (0
    for 1-D parameters, biases and the ViT tokens, ``weight_decay`` otherwise) and ``name``: with
    ``layer_decay < 1`` one group per (layer id, decay or not), named ``"layer3/decay"`` or
    ``"layer0/no_decay"``, in increasing layer order; with ``layer_decay = 1`` every layer has
    scale 1, so the groups are ``"all/decay"`` and ``"all/no_decay"`` and no layer ids are needed:
    that works for any module. Empty groups are left out.

    Raises ValueError for ``lr < 0``, ``weight_decay < 0``, ``layer_decay`` outside ``(0, 1]``, a bad
    ``freeze`` (see `parse_freeze`), layer decay or ``blocks:K`` on an unsupported architecture,
    or nothing left to train.
    """
    check_real("lr", lr, lo=0.0)
    check_real("weight_decay", weight_decay, lo=0.0)
    check_real("layer_decay", layer_decay, 0.0, 1.0, lo_open=True)
    frozen = frozen_names(backbone, freeze)
    by_layer = layer_decay != 1.0
    top = num_layers(backbone) if by_layer else 0

    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    seen = {id(p) for name, p in backbone.named_parameters() if name in frozen}
    named = [(True, name, p) for name, p in backbone.named_parameters()] + [
        (False, name, p) for name, p in head.named_parameters()
    ]
    for in_backbone, name, param in named:
        if id(param) in seen:
            continue
        seen.add(id(param))
        layer = (layer_id(name, backbone) if in_backbone else top) if by_layer else 0
        groups.setdefault((layer, _decays(name, param, backbone=in_backbone)), []).append(param)
    if not groups:
        raise ValueError(
            f"nothing to train: freeze={freeze!r} freezes the whole backbone and the head has no parameters; "
            "freeze fewer layers or give the head parameters"
        )

    result = []
    for layer, decay in sorted(groups, key=lambda key: (key[0], not key[1])):
        scale = float(layer_decay ** (top - layer)) if by_layer else 1.0
        prefix = f"layer{layer}" if by_layer else "all"
        result.append(
            {
                "params": groups[layer, decay],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": float(weight_decay) if decay else 0.0,
                "name": f"{prefix}/{'decay' if decay else 'no_decay'}",
            }
        )
    return result


__all__ = [
    "FREEZE_FORMS",
    "FreezeSpec",
    "frozen_names",
    "layer_id",
    "num_layers",
    "param_groups",
    "parse_freeze",
    "set_requires_grad",
]
