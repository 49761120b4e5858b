"""One loader for every evaluation command: an fdino checkpoint or plain backbone weights.

Sources:
  * an fdino run folder or ``ckpt-*.pt`` file: the teacher's (or student's) backbone, rebuilt
    from the stored `DinoConfig` (`fdino.checkpoint.load_backbone`);
  * plain weights: a state dict of a timm backbone in ``.pt``/``.pth`` (torch.save) or
    ``.safetensors``, with ``arch`` naming the timm model. Nested dicts such as the official
    DINO checkpoints (``{"teacher": {"backbone.blocks.0...": ...}}``) and common prefixes
    (``module.``, ``backbone.``, ``_orig_mod.``) are unwrapped, classifier/projection-head keys
    the backbone does not have are dropped (with a warning), every backbone key must be present.

Only ``weights_only`` loading is used: a checkpoint can never execute code.
"""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..checkpoint import FORMAT, load_backbone
from ..config import DinoConfig
from ..models import is_vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.")
_NESTED = ("state_dict", "model", "backbone")


class EvalModel(NamedTuple):
    """A frozen backbone and how to feed it: unpack as ``backbone, cfg, mean, std, image_size``."""

    backbone: nn.Module
    """timm backbone without classifier, in eval mode."""
    cfg: DinoConfig | None
    """The training config for fdino checkpoints, None for plain weights."""
    mean: tuple[float, float, float]
    """Per-channel normalization mean the backbone expects."""
    std: tuple[float, float, float]
    """Per-channel normalization standard deviation."""
    image_size: int
    """Evaluation resolution: the training global-crop size, or the ViT's img_size (224 for CNNs)."""


def _is_fdino_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return True
    if path.suffix not in (".pt", ".pth"):
        return False
    payload = _torch_load(path)
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def _torch_load(path: Path) -> Any:
    # Official DINO training checkpoints keep their argparse.Namespace under "args"; that one
    # class is allow-listed, everything else still goes through weights_only loading.
    from ..export.official import SAFE_GLOBALS

    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            try:  # mmap: peeking at a multi-GB file costs no memory and almost no time
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds pickled Python objects (e.g. a whole nn.Module), which are not loaded "
                         f"for safety; save its state_dict() instead") from err


def read_state_dict(path: str | Path, *, which: str = "teacher") -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped to one flat ``{name: tensor}`` backbone dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        data: Any = load_file(str(path))
    else:
        data = _torch_load(path)
    if isinstance(data, dict) and isinstance(data.get(which), dict):
        data = data[which]  # official DINO checkpoints: {"student": ..., "teacher": ..., "optimizer": ...}
    for key in _NESTED:
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} holds no state dict of tensors (looked at the top level, '{which}' and "
                         f"{list(_NESTED)})")
    out = {}
    for name, tensor in data.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        out[name] = tensor
    return out


def _infer_vit_geometry(probe: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """patch_size and img_size of ViT weights from the patch projection and the position table."""
    found: dict[str, int] = {}
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        found["patch_size"] = int(proj.shape[-1])
    pos = state.get("pos_embed")
    if pos is not None and "patch_size" in found:
        n = pos.shape[1] - (0 if getattr(probe, "no_embed_class", False) else probe.num_prefix_tokens)
        side = math.isqrt(n)
        if side * side == n:
            found["img_size"] = side * found["patch_size"]
    return found


def create_plain_backbone(arch: str, state: dict[str, torch.Tensor], *, patch_size: int | None = None,
                          img_size: int | None = None, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A timm ``arch`` without classifier holding ``state`` (missing keys are an error)."""
    import timm  # noqa: PLC0415

    kwargs = dict(model_kwargs or {})
    try:
        with torch.device("meta"):
            probe = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:
        raise ValueError(f"arch={arch!r} is not a timm model; list names with timm.list_models()") from err
    if is_vit(probe):
        geometry = _infer_vit_geometry(probe, state)
        kwargs.setdefault("patch_size", patch_size or geometry.get("patch_size"))
        # The model is built for the weights' own position table; img_size is only the fallback
        # when the table does not say (dynamic_img_size interpolates to other resolutions).
        kwargs.setdefault("img_size", geometry.get("img_size") or img_size)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.setdefault("dynamic_img_size", True)  # evaluate at any resolution (interpolated positions)
    elif patch_size is not None:
        raise ValueError(f"patch_size is set but arch={arch!r} is not a ViT")
    backbone = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    own = backbone.state_dict()
    extra = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise ValueError(f"the weights do not fit timm {arch!r} {kwargs}: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} (pass model_kwargs / --model-kwargs such as "
                         f"embed_dim=, depth=, num_heads= to match them)")
    if extra:
        heads = [k for k in extra if not k.startswith(("head.", "fc.", "classifier."))]
        if heads:
            warnings.warn(f"ignoring {len(extra)} weights that {arch!r} has no place for: {extra[:8]}", stacklevel=3)
    try:
        backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    except RuntimeError as err:  # shape mismatches: name the likely fix
        raise ValueError(f"the weights do not fit timm {arch!r} {kwargs}: {err}") from err
    return backbone


def backbone_from_state(state: Any, *, which: str = "teacher", device: str | torch.device | None = None) -> nn.Module:
    """The teacher's (or student's) backbone of an in-memory `TrainState` as an eval-mode module.

    For evaluation during training: no checkpoint round trip, and no copy: the module is built
    on the meta device and its parameters are the state's own tensors (``assign=True``), so
    use it under ``torch.no_grad()`` and do not modify it. ``device`` moves it (a copy) if given.
    """
    from ..checkpoint import backbone_weights  # noqa: PLC0415
    from ..models import create_backbone  # noqa: PLC0415

    with torch.device("meta"):
        backbone = create_backbone(state.cfg.replace(grad_checkpointing=False), drop_path_rate=0.0)
    backbone.load_state_dict(backbone_weights(state, which), strict=True, assign=True)
    backbone = backbone.eval()
    return backbone.to(device) if device is not None else backbone


def load_model_for_eval(source: str | Path, *, arch: str | None = None, which: str = "teacher",
                        device: str | torch.device = "cpu", patch_size: int | None = None,
                        img_size: int | None = None, model_kwargs: dict[str, Any] | None = None,
                        mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> EvalModel:
    """The frozen backbone of ``source`` with its normalization and evaluation resolution.

    Args:
        source: an fdino run folder or ``ckpt-*.pt``; or a weights file (``.pt``, ``.pth``,
            ``.safetensors``) together with ``arch``.
        arch: timm model name for plain weights (ignored, with a warning, for fdino checkpoints).
        which: "teacher" (the paper evaluates the teacher) or "student".
        patch_size, img_size: ViT geometry for plain weights (inferred from the weights if unset).
        model_kwargs: further `timm.create_model` arguments for plain weights (embed_dim, depth, ...).
        mean, std: override the normalization (default: ImageNet's, as DINO trains with).
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r} is invalid: allowed 'teacher' or 'student'")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model source {str(path)!r} does not exist (a run folder, ckpt-*.pt, or weights)")
    if _is_fdino_checkpoint(path):
        if arch is not None:
            warnings.warn(f"arch={arch!r} ignored: {path} is an fdino checkpoint with its own config", stacklevel=2)
        backbone, cfg = load_backbone(path, which=which, device=device)
        size = img_size or cfg.global_crop_size
    else:
        if arch is None:
            raise ValueError(f"{path} is not an fdino checkpoint; plain weights need arch= (--arch), the timm "
                             f"model name, e.g. 'vit_small_patch16_224'")
        state = read_state_dict(path, which=which)
        backbone = create_plain_backbone(arch, state, patch_size=patch_size, img_size=img_size,
                                         model_kwargs=model_kwargs)
        backbone = backbone.to(device).eval()
        cfg = None
        size = img_size or (int(backbone.patch_embed.img_size[0]) if is_vit(backbone) else 224)
    for p in backbone.parameters():
        p.requires_grad_(False)
    return EvalModel(backbone, cfg, tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD), int(size))


__all__ = ["EvalModel", "load_model_for_eval", "backbone_from_state", "read_state_dict", "create_plain_backbone", "IMAGENET_MEAN",
           "IMAGENET_STD"]
