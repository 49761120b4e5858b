"""Self-attention of the CLS token in the last block (Caron et al. 2021, figures 1, 3 and 4).

timm's `Attention` calls `F.scaled_dot_product_attention` when ``fused_attn`` is on, which never
materializes the attention matrix. So the weights are recomputed here from the block's own
input: a forward pre-hook captures the tokens entering the last block's ``attn`` (already
through ``norm1``), and q, k come from ``attn.qkv`` followed by ``attn.q_norm`` / ``attn.k_norm``
exactly as in the module's forward. Only the CLS row is formed (``[B, heads, 1, T]``), not the
full ``T x T`` matrix.

The CLS token also attends to itself and to any register tokens (``num_prefix_tokens``); the
maps here keep the patch entries only and renormalize them, so each head is a distribution
over the ``h x w`` patches (the paper's figures drop the CLS entry the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..models import is_vit
from .render import cell_scale, colormap, denormalize, enlarge, normalize_max, save_grid

PAPER_MASS = 0.6  # the paper's masks keep the patches holding 60% of a head's attention mass


def attention_module(backbone: nn.Module, block: int = -1) -> nn.Module:
    """The ``attn`` of ``backbone.blocks[block]``, checked to be a fused-qkv timm attention."""
    if not is_vit(backbone):
        raise ValueError(f"attention maps need a timm ViT; got {type(backbone).__name__}")
    if getattr(backbone, "cls_token", None) is None:
        raise ValueError("attention maps show the CLS token's attention; this ViT has no CLS token")
    attn = getattr(backbone.blocks[block], "attn", None)
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Linear) or not hasattr(attn, "num_heads"):
        raise ValueError(
            f"the last block's attention ({type(attn).__name__}) has no fused qkv projection; "
            f"supported: timm.models.vision_transformer.Attention and compatible modules"
        )
    for name in ("q_bias", "v_bias", "relative_position_bias_table", "rope"):
        if getattr(attn, name, None) is not None:  # extra terms this recomputation would miss
            raise ValueError(f"{type(attn).__name__} uses {name!r}, which cls_attention does not model")
    return attn


@torch.no_grad()
def cls_attention(backbone: nn.Module, images: torch.Tensor, *, block: int = -1) -> torch.Tensor:
    """Attention of the CLS token to every patch, per head: ``[N, 3, H, W] -> [N, heads, h, w]``.

    ``h, w`` is the patch grid (``H // patch``, ``W // patch``); each ``[h, w]`` map sums to 1.
    Works with fused (SDPA) and explicit attention alike; the result is float32.
    """
    attn = attention_module(backbone, block)
    captured: dict[str, torch.Tensor] = {}

    def grab_input(module, args, kwargs):  # the normed tokens the attention sees: (B, T, C)
        captured["x"] = args[0] if args else kwargs["x"]

    was_training = backbone.training
    backbone.eval()
    handle = attn.register_forward_pre_hook(grab_input, with_kwargs=True)
    try:
        backbone.forward_features(images)
    finally:
        handle.remove()
        backbone.train(was_training)
    x = captured["x"]
    b, t, _ = x.shape
    heads = attn.num_heads
    head_dim = attn.qkv.out_features // (3 * heads)
    qkv = attn.qkv(x).reshape(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hd)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    scale = getattr(attn, "scale", head_dim**-0.5)
    logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)  # (B, nh, 1, T)
    probs = logits.softmax(dim=-1)[:, :, 0]  # (B, nh, T)
    patches = probs[:, :, backbone.num_prefix_tokens :]  # drop CLS (+ registers)
    patches = patches / patches.sum(dim=-1, keepdim=True)
    h, w = backbone.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
    if h * w != patches.shape[-1]:
        raise ValueError(
            f"{patches.shape[-1]} patch tokens do not form the {h} x {w} grid of {tuple(images.shape[-2:])} images"
        )
    return patches.reshape(b, heads, h, w)


def attention_masks(attention: torch.Tensor, mass: float = PAPER_MASS) -> torch.Tensor:
    """The paper's thresholded masks: per map, the fewest largest patches holding ``mass``.

    ``attention``: ``[..., h, w]``, each map summing to 1 (renormalized here anyway).
    Returns bool ``[..., h, w]``. As in the reference code, patches are sorted ascending and
    kept where the cumulative mass exceeds ``1 - mass``, so the kept set holds >= ``mass``.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass={mass!r} is invalid: allowed a number in (0, 1]")
    flat = attention.flatten(-2).double()
    flat = flat / flat.sum(dim=-1, keepdim=True)
    values, order = flat.sort(dim=-1)
    keep_sorted = values.cumsum(dim=-1) > (1.0 - mass)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep.reshape(attention.shape)


def attention_cells(
    image: torch.Tensor, attention: torch.Tensor, masks: torch.Tensor, *, scale: int, alpha: float = 0.6
) -> list[torch.Tensor]:
    """One image's column: the image, each head's heat map over it, then each head's mask.

    image ``[3, H, W]`` in [0, 1]; attention ``[heads, h, w]``; masks bool ``[heads, h, w]``.
    """
    size = (image.shape[-2] * scale, image.shape[-1] * scale)
    big = enlarge(image[None], size, smooth=True)[0]
    heat = enlarge(colormap(normalize_max(attention)), size)  # (nh, 3, S, S), patch blocks
    overlays = (1 - alpha) * big + alpha * heat
    keep = enlarge(masks[:, None].float(), size)  # (nh, 1, S, S)
    tint = torch.tensor([0.1, 0.1, 0.35]).view(3, 1, 1)
    masked = keep * big + (1 - keep) * (0.25 * big + tint)  # outside the mask: dark blue
    return [big, *overlays, *masked]


def save_attention_grid(
    backbone: nn.Module,
    images: torch.Tensor,
    path: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    mass: float = PAPER_MASS,
    min_cell: int = 96,
) -> Path:
    """PNG of the last block's CLS attention: one column per image.

    Rows: the image, then each head's heat map over it, then each head's 60%-mass mask; so
    ``1 + 2 * heads`` rows of cells ``S = side * cell_scale(side, min_cell)`` pixels
    (`fdino.eval.render.grid_size` gives the PNG's size). ``images``: normalized ``[N, 3, H, W]``
    on the backbone's device; ``mean``/``std`` undo the normalization for display.
    """
    attention = cls_attention(backbone, images).cpu()
    masks = attention_masks(attention, mass)
    pixels = denormalize(images, mean, std)
    scale = cell_scale(max(images.shape[-2:]), min_cell)
    columns = [attention_cells(pixels[i], attention[i], masks[i], scale=scale) for i in range(len(images))]
    rows = [list(row) for row in zip(*columns)]
    return save_grid(rows, path)


__all__ = [
    "cls_attention",
    "attention_masks",
    "attention_module",
    "attention_cells",
    "save_attention_grid",
    "PAPER_MASS",
]
