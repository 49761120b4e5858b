"""Linear probe (fdino.eval.linear): known answers on cached features, and the paper's
augmented-image recipe on a tiny frozen ViT."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import tiny_vit
from hypothesis import given
from hypothesis import strategies as st

from fdino.data import ArrayDataset
from fdino.data.augment import random_resized_crop_box
from fdino.eval import linear_eval_images, linear_probe, train_linear_probe
from fdino.eval.linear import cosine_lr

pytestmark = pytest.mark.usefixtures("one_thread")


def clusters(n_per_class: int, num_classes: int, dim: int, *, seed: int, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)) * 3 + offset
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centers[labels] + 0.3 * torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize("batch_size", [64, None])
@pytest.mark.parametrize("standardize", [True, False])
def test_separable_clusters_reach_100_percent(batch_size, standardize):
    # Far from the origin, plain SGD is ill-conditioned (30 full-batch steps do not suffice);
    # standardization removes that, so only the standardized probe gets the hard case.
    offset = 50.0 if standardize else 0.0
    train, train_y = clusters(60, 5, 12, seed=1, offset=offset)
    test, test_y = clusters(20, 5, 12, seed=2, offset=offset)
    lr = None if standardize else 0.05
    result = linear_probe(
        train, train_y, test, test_y, epochs=30, batch_size=batch_size, standardize=standardize, lr=lr
    )
    assert result["top1"] == 100.0 and result["top5"] == 100.0 and result["train_top1"] == 100.0
    probe = result["probe"]
    assert probe.weight.shape == (5, 12) and probe.bias.shape == (5,)


def test_shuffled_labels_score_chance_on_held_out_data():
    g = torch.Generator().manual_seed(3)
    train, test = torch.randn(2000, 32, generator=g), torch.randn(2000, 32, generator=g)
    train_y, test_y = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    result = linear_probe(train, train_y, test, test_y, epochs=10, num_classes=10)
    assert abs(result["top1"] - 10.0) < 3.5
    assert result["train_top1"] > result["top1"]  # it memorizes some noise, but it cannot generalize it


def test_standardization_is_folded_into_a_probe_on_raw_features():
    train, train_y = clusters(50, 3, 6, seed=4, offset=10.0)
    probe = train_linear_probe(train, train_y, epochs=5, standardize=True, seed=0)
    mean, std = train.mean(0), train.std(0)
    # Retrain the same thing by hand on standardized features and compare the logits.
    probe_std = train_linear_probe((train - mean) / std, train_y, epochs=5, standardize=False, lr=0.1, seed=0)
    torch.testing.assert_close(probe.logits(train), probe_std.logits((train - mean) / std), rtol=1e-3, atol=1e-3)


def test_paper_cosine_schedule():
    assert cosine_lr(0, 100, 0.5) == 0.5
    assert cosine_lr(50, 100, 0.5) == pytest.approx(0.25)
    assert cosine_lr(100, 100, 0.5) == pytest.approx(0.0)


@given(height=st.integers(1, 64), width=st.integers(1, 64), lo=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_random_resized_crop_boxes_fit_the_image(height, width, lo, seed):
    top, left, h, w = random_resized_crop_box(height, width, (lo, 1.0), random.Random(seed))
    assert 0 < h <= height and 0 < w <= width
    assert 0 <= top <= height - h and 0 <= left <= width - w


def colour_images(n_per_class: int, seed: int) -> ArrayDataset:
    """Class 0: reddish images, class 1: bluish, with pixel noise (uint8, 20 x 20)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([[200, 40, 40], [40, 40, 200]], dtype=torch.float32)
    labels = torch.arange(2).repeat_interleave(n_per_class)
    images = base[labels][:, :, None, None] + 30 * torch.randn(len(labels), 3, 20, 20, generator=g)
    return ArrayDataset(images.clamp(0, 255).to(torch.uint8), labels, ("red", "blue"))


def test_paper_recipe_on_augmented_images_through_a_frozen_vit():
    vit = tiny_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    losses = []
    result = linear_eval_images(
        vit,
        colour_images(24, seed=0),
        colour_images(10, seed=1),
        image_size=16,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        epochs=6,
        batch_size=16,
        lr=0.5,
        n_last_blocks=2,
        on_epoch=lambda e, loss: losses.append(loss),
    )
    assert result["top1"] == 100.0
    assert result["probe"].weight.shape == (2, 64)  # 2 blocks' CLS tokens concatenated
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items()), "the backbone must stay frozen"
