"""Building a timm backbone (no classifier, eval mode) around given weights, with errors that say
what does not fit and what to pass instead."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..models import is_vit

# Keys a backbone built with num_classes=0 has no place for, and that are dropped silently: the
# DINO projection head (``head.*``, also timm's classifier name) and torchvision / timm classifiers.
HEAD_PREFIXES = ("head.", "fc.", "classifier.")


def create_timm(arch: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)`` with a clear error
    for an unknown name (build on the ``meta`` device to probe an architecture for free)."""
    import timm  # noqa: PLC0415

    try:
        return timm.create_model(arch, pretrained=False, **{**kwargs, "num_classes": 0})
    except RuntimeError as err:  # timm's error for unknown names
        raise ValueError(f"arch={arch!r} is not a timm model; list names with timm.list_models()") from err


def vit_geometry(probe: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``patch_size`` and ``img_size`` of ViT weights, read off the patch projection and the
    position table (``probe``, the arch on ``meta``, says how many prefix tokens the table holds)."""
    found: dict[str, int] = {}
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        found["patch_size"] = int(proj.shape[-1])
    pos = state.get("pos_embed")
    if pos is not None and "patch_size" in found:
        n = pos.shape[1] - (0 if getattr(probe, "no_embed_class", False) else probe.num_prefix_tokens)
        side = math.isqrt(n)
        if n > 0 and side * side == n:
            found["img_size"] = side * found["patch_size"]
    return found


def _fit_problems(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    parts = []
    if missing:
        parts.append(f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if wrong:
        parts.append(
            "shape mismatch "
            + ", ".join(f"{k}: {tuple(state[k].shape)} vs timm {tuple(own[k].shape)}" for k in wrong[:4])
        )
    return parts


def build_timm_backbone(
    arch: str,
    state: Mapping[str, torch.Tensor],
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    patch_size: int | None = None,
    img_size: int | None = None,
    share: bool = False,
    strict: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(backbone in eval mode, the timm kwargs it was built with)`` holding ``state``.

    ViTs are built for the weights' own patch size and position table (``img_size`` is only the
    fallback when the table does not say), with ``dynamic_img_size`` so they run at any resolution.
    Every backbone key must be present with its shape; head and classifier keys are dropped, other
    extra keys with a warning (``strict=True``: an error, for callers that need every weight used).
    The module is created on ``meta`` and takes the tensors (``share=True``: no copy, for tensors
    that belong to nobody else, e.g. just read from a file).
    """
    kwargs = dict(model_kwargs or {})
    with torch.device("meta"):
        probe = create_timm(arch, **kwargs)
    if is_vit(probe):
        geometry = vit_geometry(probe, state)
        kwargs.setdefault("patch_size", patch_size or geometry.get("patch_size"))
        kwargs.setdefault("img_size", geometry.get("img_size") or img_size)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.setdefault("dynamic_img_size", True)
    elif patch_size is not None:
        raise ValueError(f"patch_size is set but arch={arch!r} is not a ViT; unset it (--patch-size)")
    with torch.device("meta"):
        model = create_timm(arch, **kwargs)
    own = model.state_dict()
    problems = _fit_problems(own, state)
    if problems:
        from .official import guess_timm_arch  # noqa: PLC0415  (only to word the error)

        try:
            hint = f"the weights look like {guess_timm_arch(state)!r}; "
        except ValueError:
            hint = ""
        raise ValueError(
            f"the weights do not fit timm {arch!r} {kwargs}: {'; '.join(problems)} ({hint}pass another "
            f"arch, or model_kwargs / --model-kwargs such as embed_dim=, depth=, num_heads= to match them)"
        )
    extra = sorted(k for k in state if k not in own)
    unknown = [k for k in extra if not k.startswith(HEAD_PREFIXES)]
    if unknown and strict:
        raise ValueError(
            f"{len(unknown)} weights have no place in timm {arch!r} {kwargs}: {unknown[:8]}"
            f"{' ...' if len(unknown) > 8 else ''} (pass the arch and model_kwargs / --model-kwargs they were "
            "trained with, e.g. depth=)"
        )
    if unknown:
        warnings.warn(f"ignoring {len(unknown)} weights that {arch!r} has no place for: {unknown[:8]}", stacklevel=3)
    tensors = {k: state[k] if share else state[k].clone() for k in own}
    model.load_state_dict(tensors, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        # Non-persistent buffers are not in a state dict: build this arch with real tensors instead.
        model = create_timm(arch, **kwargs)
        model.load_state_dict(tensors, strict=True)
    return freeze(model), kwargs


def freeze(backbone: nn.Module) -> nn.Module:
    """Eval mode, no parameter requires a gradient: a backbone to use, not to train."""
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone.eval()


__all__ = ["HEAD_PREFIXES", "build_timm_backbone", "create_timm", "freeze", "vit_geometry"]
