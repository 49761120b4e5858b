"""The built-in shapes10 data set: determinism, shapes, balance, and a raw-pixel k-NN that is neither
trivial nor chance (so a learned feature has something to beat, and something to learn)."""

from __future__ import annotations

import pytest
import torch

from fdino.data import SHAPES10_CLASSES, build_dataset, make_shapes10, shapes10


def weighted_knn_top1(bank, bank_labels, queries, query_labels, *, k=20, temperature=0.07, n_classes=10):
    """Weighted k-NN (Wu et al. 2018, as in DINO's eval_knn): cosine similarity on centered inputs,
    votes exp(sim / T) summed per class over the k nearest bank entries."""
    bank, queries = bank.flatten(1).float(), queries.flatten(1).float()
    mean = bank.mean(0)
    bank = torch.nn.functional.normalize(bank - mean, dim=1)
    queries = torch.nn.functional.normalize(queries - mean, dim=1)
    sim, idx = (queries @ bank.T).topk(k, dim=1)
    votes = torch.zeros(len(queries), n_classes).scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
    return (votes.argmax(1) == query_labels).float().mean().item()


def test_generation_is_deterministic_and_splits_are_independent():
    generate = make_shapes10.__wrapped__  # bypass the cache: really generate twice
    a_img, a_lab = generate(300, size=32, seed=1, split="train")
    b_img, b_lab = generate(300, size=32, seed=1, split="train")
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    c_img, _ = generate(300, size=32, seed=2, split="train")
    d_img, _ = generate(300, size=32, seed=1, split="test")
    assert (a_img != c_img).any() and (a_img != d_img).any()
    state = torch.get_rng_state()
    generate(10, size=32, seed=0, split="train")
    assert torch.equal(torch.get_rng_state(), state), "generation must not touch the global RNG"


def test_shapes_dtype_balance_and_sizes():
    train, test = shapes10("train"), shapes10("test")
    assert (len(train), len(test)) == (10_000, 2_000)
    assert train.images.shape == (10_000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes == SHAPES10_CLASSES and len(set(SHAPES10_CLASSES)) == 10
    assert torch.bincount(train.labels).tolist() == [1000] * 10
    assert torch.bincount(test.labels).tolist() == [200] * 10
    # the whole dynamic range is used (colours, both polarities) and images are not blank
    assert train.images.float().std(dim=(1, 2, 3)).min() > 5
    big = build_dataset("shapes10", n=25, image_size=64, seed=3).dataset
    assert big.images.shape == (25, 3, 64, 64)
    counts = torch.bincount(big.labels, minlength=10)
    assert counts.sum() == 25 and counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="size=4"):
        make_shapes10(10, size=4)
    with pytest.raises(ValueError, match="split='val'"):
        shapes10("val")


def test_raw_pixel_knn_is_neither_trivial_nor_chance():
    """Measured 44.7% (module docstring); chance is 10%. Nuisances must keep raw pixels far from
    perfect, while the classes (outlines) stay recognizable."""
    train, test = shapes10("train"), shapes10("test")
    top1 = weighted_knn_top1(train.images, train.labels, test.images, test.labels)
    assert 0.30 <= top1 <= 0.60, top1
