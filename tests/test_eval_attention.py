"""CLS attention maps (fdino.eval.attention): the recomputation from qkv agrees with timm's explicit
softmax(q k^T / sqrt(d)) path, for fused (SDPA) backbones, registers and qk-norm included."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import grid_cell, png_pixels, tiny_vit
from hypothesis import given
from hypothesis import strategies as st
from matplotlib import colormaps
from PIL import Image

from fdino.eval import attention_masks, cls_attention, save_attention_grid
from fdino.eval.render import cell_scale, denormalize, grid_size

VARIANTS = {
    "plain": {},
    "registers+qk_norm": {"reg_tokens": 4, "qk_norm": True},
    "no_embed_class+registers": {"no_embed_class": True, "reg_tokens": 2, "class_token": True},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def explicit_attention(vit: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run the last block with fused attention off and read the softmax it materializes.

    timm's non-fused path computes softmax(q k^T * scale) and passes it through ``attn_drop``
    (identity in eval mode), so a hook there sees the full ``[B, heads, T, T]`` matrix.
    """
    attn = vit.blocks[-1].attn
    seen = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("p", o.detach()))
    fused = attn.fused_attn
    attn.fused_attn = False
    try:
        with torch.no_grad():
            vit.forward_features(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
    row = seen["p"][:, :, 0, vit.num_prefix_tokens :]  # CLS query, patch keys
    return row / row.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cls_attention_matches_the_explicit_softmax(variant):
    vit = tiny_vit(**VARIANTS[variant])
    assert vit.blocks[-1].attn.fused_attn, "the point is to read maps out of an SDPA backbone"
    images = torch.randn(3, 3, 16, 20)  # non-square: 4 x 5 patches
    maps = cls_attention(vit, images)
    assert maps.shape == (3, 2, 4, 5) and maps.dtype == torch.float32
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(3, 2))
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.flatten(2), explicit_attention(vit, images), rtol=1e-5, atol=1e-6)


def test_attention_is_not_uniform_and_depends_on_the_image():
    vit = tiny_vit()
    a, b = cls_attention(vit, torch.randn(1, 3, 16, 16)), cls_attention(vit, torch.randn(1, 3, 16, 16))
    assert not torch.allclose(a, b)
    assert a.std() > 0


def test_non_vit_and_cls_free_backbones_are_refused():
    with pytest.raises(ValueError, match="ViT"):
        cls_attention(timm.create_model("resnet18", num_classes=0), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="CLS"):
        cls_attention(tiny_vit(class_token=False, global_pool="avg"), torch.randn(1, 3, 16, 16))


@given(
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    heads=st.integers(1, 3),
    mass=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_masks_keep_the_fewest_largest_patches_reaching_the_mass(h, w, heads, mass, seed):
    g = torch.Generator().manual_seed(seed)
    att = torch.rand(heads, h, w, generator=g, dtype=torch.float64) ** 3
    att = att / att.sum(dim=(-2, -1), keepdim=True)
    masks = attention_masks(att, mass)
    assert masks.shape == att.shape and masks.dtype == torch.bool
    for a, m in zip(att.flatten(1), masks.flatten(1)):
        kept = a[m]
        assert kept.sum() >= mass - 1e-9  # holds the mass
        assert kept.sum() - kept.min() < mass + 1e-9  # and no kept patch is spare
        if (~m).any():
            assert a[~m].max() <= kept.min() + 1e-12  # the largest patches are kept


def test_attention_grid_png_has_the_documented_size_and_content(tmp_path):
    vit = tiny_vit()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    images = torch.randn(2, 3, 16, 16)
    path = save_attention_grid(vit, images, tmp_path / "sub" / "attn.png", mean=mean, std=std)
    pixels = np.asarray(Image.open(path))
    cell = 16 * cell_scale(16)
    heads = 2
    assert pixels.shape == (*grid_size(1 + 2 * heads, 2, cell), 3)  # rows: image, heat maps, masks
    assert pixels.astype(np.float64).var() > 0
    assert pixels[2 : 2 + cell, 2 : 2 + cell].astype(np.float64).var() > 0  # the image cell is not blank

    # What each cell shows (attention_cells: overlay = 0.4 image + 0.6 heat, patch blocks of 24 px).
    pixels = png_pixels(path, size=grid_size(1 + 2 * heads, 2, cell))
    attention, masks = cls_attention(vit, images), attention_masks(cls_attention(vit, images))
    shown = F.interpolate(denormalize(images, mean, std), size=(cell, cell), mode="bilinear", align_corners=False)
    lut = colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255
    block = cell // 4  # 4 x 4 patches of 4 px, enlarged x6
    heats = []
    for i in range(2):
        image = grid_cell(pixels, 0, i, cell)
        np.testing.assert_allclose(image, shown[i].permute(1, 2, 0).numpy() * 255, atol=1)  # the input itself
        for h in range(heads):
            overlay = grid_cell(pixels, 1 + h, i, cell)
            assert np.abs(overlay - image).mean() > 20  # the heat map is drawn over the image
            heat = ((overlay - 0.4 * image) / 0.6).reshape(4, block, 4, block, 3)
            assert np.ptp(heat, axis=(1, 3)).max() <= 3  # one colour per patch
            want = lut[(attention[i, h] / attention[i, h].max() * 255).round().long().numpy()]
            np.testing.assert_allclose(heat.mean(axis=(1, 3)), want, atol=2)  # inferno of this head's map
            heats.append(heat.mean(axis=(1, 3)))
            masked = grid_cell(pixels, 1 + heads + h, i, cell)
            keep = masks[i, h].repeat_interleave(block, 0).repeat_interleave(block, 1).numpy()[..., None]
            assert 0 < keep.mean() < 1  # some patches kept, some dimmed
            dimmed = 0.25 * image + np.array([0.1, 0.1, 0.35]) * 255  # outside the mask: dark blue
            np.testing.assert_allclose(masked, np.where(keep, image, dimmed), atol=1)
    assert np.abs(heats[0] - heats[heads]).max() > 1  # another image, another heat map
