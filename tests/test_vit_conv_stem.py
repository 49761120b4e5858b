"""The ViT with a convolutional stem (fdino.vit_conv_stem): the same token grid as patch size p, a
ViT everywhere fdino looks (attention maps, the one model loader, export), and a DINO step that
trains it (eager here; the compiled step is the same code path as any timm ViT)."""

from __future__ import annotations

import pytest
import torch

import fdino
from fdino.checkpoint import save_checkpoint
from fdino.eval.attention import cls_attention
from fdino.models import create_backbone, is_vit
from fdino.weights import export_safetensors, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_stem_cfg(**changes):
    return fdino.presets.smoke(arch="fdino_vit_conv_stem", **changes)


def test_token_grid_matches_a_patch_embedding_of_the_same_stride():
    cfg = conv_stem_cfg(patch_size=4, global_crop_size=32, local_crop_size=16)
    torch.manual_seed(0)
    backbone = create_backbone(cfg).eval()
    assert is_vit(backbone) and backbone.num_features == 32
    stem = backbone.patch_embed.backbone
    convs = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2)] and all(c.kernel_size == (3, 3) for c in convs)
    assert backbone.patch_embed.proj.kernel_size == (1, 1)  # the single 1x1 convolution to the width
    images = torch.randn(2, 3, 32, 32)
    tokens = backbone.forward_features(images)
    assert tokens.shape == (2, 1 + 8 * 8, 32)  # CLS + the 8 x 8 grid a patch-4 ViT has on 32 px
    assert backbone.forward_features(torch.randn(2, 3, 16, 16)).shape == (2, 1 + 4 * 4, 32)  # local crops
    maps = cls_attention(backbone, images)
    assert maps.shape == (2, 2, 8, 8)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, 2))


@pytest.mark.parametrize("patch_size", [6, 1])
def test_patch_size_must_be_a_power_of_two_of_at_least_2(patch_size):
    with pytest.raises(ValueError, match=f"patch_size={patch_size} must be a power of two >= 2"):
        create_backbone(conv_stem_cfg(patch_size=patch_size, global_crop_size=24))


def test_dino_steps_train_it_and_every_command_loads_it(tmp_path):
    cfg = conv_stem_cfg()
    state = fdino.init_state(cfg)
    batch = [torch.randn(cfg.batch_size, 3, cfg.global_crop_size, cfg.global_crop_size) for _ in range(2)]
    batch += [torch.randn(cfg.batch_size, 3, cfg.local_crop_size, cfg.local_crop_size) for _ in range(2)]
    stem_key = next(k for k in state.student if k.startswith("backbone.patch_embed.backbone.") and "conv" in k)
    before = state.student[stem_key].clone()
    for _ in range(2):
        state, metrics = fdino.train_step_eager(state, batch)
        assert torch.isfinite(metrics["loss"])
    assert not torch.equal(state.student[stem_key], before)  # the stem is trained, not frozen
    save_checkpoint(tmp_path / "run", state)
    loaded = load_model(tmp_path / "run")
    assert loaded.cfg.arch == "fdino_vit_conv_stem"
    export_safetensors(loaded.backbone, tmp_path / "b.safetensors", loaded.info)
    again = load_model(tmp_path / "b.safetensors")
    x = torch.randn(2, 3, cfg.global_crop_size, cfg.global_crop_size)
    with torch.no_grad():
        torch.testing.assert_close(again.backbone(x), loaded.backbone(x), rtol=0, atol=0)
