"""Feature extraction for evaluation (fdino.eval.features) and representation statistics."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import tiny_vit
from torch.utils.data import DataLoader, TensorDataset

from fdino.data import ArrayDataset, EvalTransform
from fdino.eval import batch_features, extract_features, representation_stats

pytestmark = pytest.mark.usefixtures("one_thread")


# --- features -------------------------------------------------------------------------------------------
def test_dataset_and_loader_give_the_backbone_cls_features_in_order():
    vit = tiny_vit()
    images, labels = torch.randn(10, 3, 16, 16), torch.arange(10) % 3
    direct = vit(images)
    a, ya = extract_features(vit, TensorDataset(images, labels), batch_size=4)
    b, yb = extract_features(vit, DataLoader(TensorDataset(images, labels), batch_size=3))
    torch.testing.assert_close(a, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, direct, rtol=1e-5, atol=1e-5)
    assert ya.tolist() == yb.tolist() == labels.tolist()
    assert a.device.type == "cpu" and a.dtype == torch.float32
    # For timm ViTs the pooled output is the CLS token after the final norm (the DINO feature).
    with torch.no_grad():
        cls = vit.forward_features(images)[:, 0]  # all tokens after the final norm; row 0 is CLS
    torch.testing.assert_close(direct, cls, rtol=1e-5, atol=1e-5)


def test_last_blocks_concatenation_and_avgpool_follow_the_linear_protocol():
    vit = tiny_vit(depth=3)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        tokens = vit._pos_embed(vit.patch_embed(x))
        outs = []
        for blk in vit.blocks:
            tokens = blk(tokens)
            outs.append(vit.norm(tokens))
        expected = torch.cat([outs[-2][:, 0], outs[-1][:, 0], outs[-1][:, 1:].mean(dim=1)], dim=1)
        got = batch_features(vit, x, n_last_blocks=2, avgpool=True)
        one = batch_features(vit, x, n_last_blocks=1, avgpool=True)
    assert got.shape == (4, 3 * 32) and one.shape == (4, 2 * 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one[:, :32], vit(x), rtol=1e-5, atol=1e-5)


def test_cnn_features_are_pooled_and_vit_options_are_refused():
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    feats, _ = extract_features(cnn, TensorDataset(torch.randn(3, 3, 32, 32), torch.zeros(3)), batch_size=2)
    assert feats.shape == (3, 512)
    with pytest.raises(ValueError, match="need a ViT"):
        batch_features(cnn, torch.randn(1, 3, 32, 32), n_last_blocks=4)


def test_transform_path_and_mode_restoration():
    vit = tiny_vit().train()
    data = ArrayDataset(torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8), [0, 1, 2, 3, 4])
    transform = EvalTransform(16)
    feats, labels = extract_features(vit, data, transform=transform, batch_size=2)
    assert feats.shape == (5, 32) and labels.tolist() == [0, 1, 2, 3, 4]
    assert vit.training, "extract_features must restore the caller's train/eval mode"
    with pytest.raises(TypeError, match="EvalTransform"):
        extract_features(vit, data)  # raw uint8 images and no transform
    vit.eval()
    torch.testing.assert_close(feats, vit(torch.stack([transform(data[i][0]) for i in range(5)])), rtol=1e-5, atol=1e-5)


def test_representation_stats_flag_collapse():
    g = torch.Generator().manual_seed(0)
    healthy = representation_stats(torch.randn(2000, 16, generator=g))
    assert abs(healthy["mean_cosine"]) < 0.01
    assert 0.95 < healthy["normalized_std"] < 1.05
    assert 14.0 < healthy["effective_rank"] <= 16.0
    direction = torch.randn(16, generator=g)
    collapsed = representation_stats(direction + 1e-4 * torch.randn(500, 16, generator=g))
    assert collapsed["mean_cosine"] > 0.999 and collapsed["normalized_std"] < 0.01
    assert representation_stats(direction.repeat(10, 1))["effective_rank"] == 0.0
    low_rank = torch.randn(300, 2, generator=g) @ torch.randn(2, 16, generator=g)
    assert 1.0 < representation_stats(low_rank)["effective_rank"] < 2.0 + 1e-6
    wide = representation_stats(torch.randn(5, 64, generator=g))  # N < D: the Gram matrix side
    assert 3.0 < wide["effective_rank"] <= 4.0 + 1e-6  # centering leaves N - 1 = 4 directions
