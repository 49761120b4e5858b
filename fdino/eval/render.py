"""Pixel plumbing for the PNG outputs: un-normalize, colour-map, tile into a grid, write.

Grids are assembled as tensors and written with PIL (no matplotlib figure), so their size is
exact and predictable: a grid of R x C cells of side S with padding P is
``(R * (S + P) + P)`` pixels high and ``(C * (S + P) + P)`` wide, plus ``CAPTION`` pixels per
row when the cells carry captions. Small images are enlarged by an integer factor
(`cell_scale`) so that 16 px inputs still give a readable figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CAPTION = 14  # pixels of caption band under a captioned cell (PIL's default bitmap font is ~11 px)
MIN_CELL = 96  # small images are enlarged by an integer factor to at least this side


def cell_scale(side: int, min_cell: int = MIN_CELL) -> int:
    """Integer enlargement factor for images of ``side`` pixels: ``max(1, ceil(min_cell / side))``."""
    return max(1, math.ceil(min_cell / max(int(side), 1)))


def grid_size(
    rows: int, cols: int, cell: int | tuple[int, int], *, pad: int = 2, captions: bool = False
) -> tuple[int, int]:
    """``(height, width)`` in pixels of a grid written by `save_grid`."""
    ch, cw = (cell, cell) if isinstance(cell, int) else cell
    band = CAPTION if captions else 0
    return rows * (ch + band + pad) + pad, cols * (cw + pad) + pad


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the input normalization: ``[N, 3, H, W]`` normalized -> float in [0, 1]."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.detach().float().cpu() * s + m).clamp_(0.0, 1.0)


def enlarge(x: torch.Tensor, size: tuple[int, int], *, smooth: bool = False) -> torch.Tensor:
    """``[N, C, h, w] -> [N, C, H, W]``: nearest (patch blocks stay visible) or bilinear."""
    x = x.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if smooth:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return F.interpolate(x, size=size, mode="nearest")


def colormap(values: torch.Tensor, name: str = "inferno") -> torch.Tensor:
    """Values in [0, 1] ``[..., h, w]`` -> RGB ``[..., 3, h, w]`` through a matplotlib colour map."""
    from matplotlib import colormaps  # noqa: PLC0415  (import cost only when drawing)

    lut = torch.as_tensor(colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3], dtype=torch.float32)  # (256, 3)
    index = (values.float().clamp(0.0, 1.0) * 255).round().long()
    return lut[index].movedim(-1, -3)


def normalize_max(x: torch.Tensor) -> torch.Tensor:
    """Scale each ``[h, w]`` map by its maximum (heat maps are compared by shape, not scale)."""
    peak = x.flatten(-2).amax(dim=-1)[..., None, None]
    return x / peak.clamp_min(1e-12)


def grid_image(
    cells: Sequence[Sequence[torch.Tensor | None]],
    *,
    pad: int = 2,
    captions: Sequence[Sequence[str]] | None = None,
    background: float = 1.0,
):
    """Tile RGB cells ``[3, h, w]`` in [0, 1] (rows of equal length; None leaves a blank) into a PIL image.

    All cells are placed in slots of the largest cell's size; ``captions[r][c]`` is written
    under cell (r, c).
    """
    rows, cols = len(cells), max((len(r) for r in cells), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("save_grid needs at least one cell")
    present = [c for row in cells for c in row if c is not None]
    ch = max(c.shape[-2] for c in present)
    cw = max(c.shape[-1] for c in present)
    band = CAPTION if captions is not None else 0
    height, width = grid_size(rows, cols, (ch, cw), pad=pad, captions=captions is not None)
    canvas = torch.full((3, height, width), float(background))
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            top, left = pad + r * (ch + band + pad), pad + c * (cw + pad)
            canvas[:, top : top + cell.shape[-2], left : left + cell.shape[-1]] = cell.float().clamp(0.0, 1.0)
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    from PIL import Image, ImageDraw  # noqa: PLC0415

    image = Image.fromarray(array)
    if captions is not None:
        draw = ImageDraw.Draw(image)
        for r, row in enumerate(captions):
            for c, text in enumerate(row):
                if text:
                    top, left = pad + r * (ch + band + pad) + ch, pad + c * (cw + pad)
                    draw.text((left + 1, top + 1), str(text), fill=(0, 0, 0))
    return image


def save_grid(
    cells: Sequence[Sequence[torch.Tensor | None]],
    path: str | Path,
    *,
    pad: int = 2,
    captions: Sequence[Sequence[str]] | None = None,
    background: float = 1.0,
) -> Path:
    """`grid_image` saved as a PNG; returns the path written (parent folders are created)."""
    image = grid_image(cells, pad=pad, captions=captions, background=background)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


__all__ = [
    "grid_image",
    "cell_scale",
    "grid_size",
    "denormalize",
    "enlarge",
    "colormap",
    "normalize_max",
    "save_grid",
    "CAPTION",
    "MIN_CELL",
]
