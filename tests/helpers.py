"""Small helpers shared by test files (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU twin runs instead")

# Per-dtype tolerances for comparisons against a float64 reference: (rtol, atol).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 2e-3),
    torch.float16: (5e-3, 5e-4),
}


# A 2-block ViT of width 32 on 16 px images (patch 4): timm's real ViT code, seconds to run.
TINY_VIT = dict(patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2)


def tiny_vit(**kwargs) -> torch.nn.Module:
    """`TINY_VIT` (``kwargs`` override it) in eval mode, from a fixed seed: the same weights every call."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True, **{**TINY_VIT, **kwargs}
    ).eval()


def load_bench_module(name: str):
    """A script of ``bench/`` imported by file path (``bench/`` is not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ema_update_reference_(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """The reference code's per-parameter EMA loop (paper eq. 2), the twin of `fdino.ema_update_`."""
    with torch.no_grad():
        for t, s in zip(teacher, student):
            t.mul_(momentum).add_((1.0 - momentum) * s)


# --- PNG outputs ---------------------------------------------------------------------------------------
def png_pixels(source, *, size: tuple[int, int] | None = None, min_std: float = 10.0, min_colors: int = 16):
    """A written PNG (path or bytes) as float64 RGB ``[H, W, 3]`` in 0..255, checked to show something.

    Fails unless the data is a PNG, of ``size`` = (height, width) when given, with pixel std above
    ``min_std`` and more than ``min_colors`` distinct colours: a blank, one-colour or two-tone picture
    fails, as does one whose size the caller knows and the file does not have.
    """
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        assert image.format == "PNG", f"not a PNG: {image.format}"
        pixels = np.asarray(image.convert("RGB"))
    if size is not None:
        assert pixels.shape[:2] == tuple(size), f"PNG is {pixels.shape[:2]} (h, w), expected {tuple(size)}"
    std = float(pixels.std())
    assert std > min_std, f"PNG is (nearly) blank: pixel std {std:.2f} <= {min_std}"
    colors = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colors > min_colors, f"PNG has only {colors} distinct colours (need > {min_colors})"
    return pixels.astype(np.float64)


def grid_cell(pixels, row: int, col: int, cell: int | tuple[int, int], *, pad: int = 2, band: int = 0):
    """Cell ``(row, col)`` of a `fdino.eval.render.save_grid` picture: ``[h, w, 3]`` (``band``: caption px)."""
    ch, cw = (cell, cell) if isinstance(cell, int) else cell
    top, left = pad + row * (ch + band + pad), pad + col * (cw + pad)
    return pixels[top : top + ch, left : left + cw]


def tile_count(band) -> int:
    """Runs of drawn (not pure white) columns across a band ``[h, W, 3]`` of a grid: its tiles side by side."""
    import numpy as np

    drawn = (band < 255).any(axis=(0, 2)).astype(int)
    return int((np.diff(np.r_[0, drawn]) == 1).sum())


def enlarged(path, side: int):
    """An image file as fdino's pictures show it: bilinear to ``side`` px, ``[side, side, 3]`` in 0..255."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy() * 255
