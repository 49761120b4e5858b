"""Loaders: index plans, exact mid-epoch resume, worker independence, sharding, skipped files."""

from __future__ import annotations

import itertools
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fdino.config import DinoConfig
from fdino.data import (
    ArrayDataset,
    EvalLoader,
    EvalTransform,
    ImageFolder,
    MultiCrop,
    MultiCropLoader,
    ResumableBatchSampler,
    batches_per_epoch,
    derive_seed,
    epoch_batches,
    multicrop_loader,
    small_image_multicrop,
)

TRANSFORM = MultiCrop(small_image_multicrop(n_local_crops=2))  # 2 x 32 px + 2 x 16 px


@pytest.fixture(scope="module")
def tiny():
    """40 random 24x24 images with labels 0..3."""
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(
        torch.randint(0, 256, (40, 3, 24, 24), generator=g, dtype=torch.uint8),
        torch.arange(40) % 4,
        ("a", "b", "c", "d"),
    )


def _epoch(loader, epoch, start=0):
    return list(loader.epoch(epoch, start_batch=start))


def _same(batches_a, batches_b) -> bool:
    return len(batches_a) == len(batches_b) and all(
        torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(ca, cb))
        for (ca, la), (cb, lb) in zip(batches_a, batches_b)
    )


# --- index plans -----------------------------------------------------------------------------------------
def test_derive_seed_is_stable_and_separates_streams():
    assert derive_seed(0, "crops", 1, 2) == derive_seed(0, "crops", 1, 2)
    seeds = {derive_seed(s, "crops", e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= x < 2**63 for x in seeds)
    assert derive_seed(1, 23) != derive_seed(12, 3) and derive_seed(1, "2") != derive_seed(1, 2)


@given(
    n=st.integers(1, 300),
    batch=st.integers(1, 16),
    world=st.integers(1, 4),
    seed=st.integers(0, 2**40),
    epoch=st.integers(0, 1000),
)
def test_shards_are_disjoint_equal_and_cover_full_global_batches(n, batch, world, seed, epoch):
    if n < batch * world:
        with pytest.raises(ValueError, match="fewer than one global batch"):
            epoch_batches(n, batch_size=batch, seed=seed, epoch=epoch, world_size=world)
        return
    shards = [
        epoch_batches(n, batch_size=batch, seed=seed, epoch=epoch, rank=r, world_size=world) for r in range(world)
    ]
    steps = batches_per_epoch(n, batch, world)
    assert all(s.shape == (steps, batch) for s in shards)
    flat = torch.cat([s.reshape(-1) for s in shards])
    assert len(set(flat.tolist())) == len(flat) == steps * batch * world  # disjoint, none repeated
    assert n - len(flat) < batch * world  # covering: only an incomplete global batch is dropped
    # Global batch j (all ranks together) is the same set of images for any world size.
    single = epoch_batches(n, batch_size=batch * world, seed=seed, epoch=epoch)
    for j in range(steps):
        assert sorted(torch.cat([s[j] for s in shards]).tolist()) == sorted(single[j].tolist())


def test_epochs_get_different_permutations_and_bad_arguments_are_named():
    a = epoch_batches(100, batch_size=10, seed=0, epoch=0)
    assert not torch.equal(a, epoch_batches(100, batch_size=10, seed=0, epoch=1))
    assert torch.equal(a, epoch_batches(100, batch_size=10, seed=0, epoch=0))
    with pytest.raises(ValueError, match="rank=2"):
        epoch_batches(100, batch_size=10, seed=0, epoch=0, rank=2, world_size=2)
    sampler = ResumableBatchSampler(100, batch_size=10)
    with pytest.raises(ValueError, match="start_batch=11"):
        sampler.set_epoch(0, 11)
    sampler.set_epoch(3, 4)
    assert len(sampler) == 6
    assert list(sampler)[0] == [(3, i) for i in epoch_batches(100, batch_size=10, seed=0, epoch=3)[4].tolist()]


# --- loader determinism ------------------------------------------------------------------------------------
def test_batches_are_full_with_crops_first_and_labels(tiny):
    loader = MultiCropLoader(tiny, TRANSFORM, batch_size=16, seed=0)
    batches = _epoch(loader, 0)
    assert len(loader) == len(batches) == 2  # 40 // 16, incomplete tail dropped
    for crops, labels in batches:
        assert [tuple(c.shape) for c in crops] == [(16, 3, 32, 32)] * 2 + [(16, 3, 16, 16)] * 2
        assert labels.dtype == torch.int64 and labels.shape == (16,)


def test_resume_from_any_batch_equals_the_uninterrupted_tail(tiny):
    loader = MultiCropLoader(tiny, TRANSFORM, batch_size=8, seed=5)
    full = _epoch(loader, 2)
    for k in (1, 3, 5):
        fresh = MultiCropLoader(tiny, TRANSFORM, batch_size=8, seed=5)  # as after a restart
        assert _same(_epoch(fresh, 2, start=k), full[k:])
    assert _epoch(loader, 2, start=len(loader)) == []


def test_steps_cross_epochs_with_the_epoch_batches_from_any_start(tiny):
    loader = MultiCropLoader(tiny, TRANSFORM, batch_size=8, seed=5)  # 5 batches per epoch
    by_epoch = _epoch(loader, 0) + _epoch(loader, 1) + _epoch(loader, 2)
    for start in (0, 3, 5, 7):  # epoch start, mid-epoch, the next epoch's start, mid next epoch
        fresh = MultiCropLoader(tiny, TRANSFORM, batch_size=8, seed=5)  # as after a restart
        got = list(itertools.islice(fresh.steps(start), 15 - start))
        assert [s for s, *_ in got] == list(range(start, 15))
        assert [e for _, e, *_ in got] == [s // 5 for s in range(start, 15)]
        assert _same([(crops, labels) for *_, crops, labels in got], by_epoch[start:])
    with pytest.raises(ValueError, match="start_step"):
        next(loader.steps(-1))


def test_same_seed_same_batches_and_epochs_differ(tiny):
    a = _epoch(MultiCropLoader(tiny, TRANSFORM, batch_size=8, seed=1), 0)
    b = _epoch(MultiCropLoader(tiny, TRANSFORM, batch_size=8, seed=1), 0)
    assert _same(a, b)
    loader = MultiCropLoader(tiny, TRANSFORM, batch_size=40, seed=1)
    ((c0, l0),) = _epoch(loader, 0)
    ((c1, l1),) = _epoch(loader, 1)
    # The same 40 images in both epochs: find image 7 in each and compare its crops.
    i0, i1 = epoch_batches(40, batch_size=40, seed=1, epoch=0)[0], epoch_batches(40, batch_size=40, seed=1, epoch=1)[0]
    j0, j1 = int((i0 == 7).nonzero()), int((i1 == 7).nonzero())
    assert not torch.equal(c0[0][j0], c1[0][j1]), "epoch must change the crops of an image"


def test_crops_of_a_sample_depend_only_on_seed_epoch_index(tiny):
    """Per-sample purity: the loader's crops of image i equal MultiCrop(image_i, derive_seed(...))."""
    loader = MultiCropLoader(tiny, TRANSFORM, batch_size=8, seed=9)
    (crops, _), *_ = _epoch(loader, 4)
    first = epoch_batches(40, batch_size=8, seed=9, epoch=4)[0]
    for b, i in enumerate(first.tolist()[:3]):
        alone = TRANSFORM(tiny[i][0], derive_seed(9, "crops", 4, i))
        assert all(torch.allclose(crops[k][b], alone[k], atol=1e-5) for k in range(4))


def test_workers_give_identical_batches_and_keep_global_rng(tiny):
    state = torch.get_rng_state()
    single = _epoch(MultiCropLoader(tiny, TRANSFORM, batch_size=8, seed=3), 1)
    workers = MultiCropLoader(tiny, TRANSFORM, batch_size=8, seed=3, num_workers=2)
    assert _same(_epoch(workers, 1), single)
    # persistent workers: break mid-epoch, then the next epoch and a resume are still exact
    it = workers.epoch(0)
    next(it)
    del it
    assert _same(_epoch(workers, 1, start=2), single[2:])
    assert torch.equal(torch.get_rng_state(), state), "loaders must not advance the caller's RNG"


def test_multicrop_loader_from_dino_config(tiny):
    cfg = DinoConfig(n_local_crops=3, global_crop_size=24, local_crop_size=12, batch_size=16, seed=2)
    loader = multicrop_loader(cfg, tiny, world_size=2, rank=1)
    batches = _epoch(loader, 0)
    assert len(batches) == 2  # 40 // (8 per rank * 2 ranks)
    crops, labels = batches[0]
    assert len(crops) == 5 and crops[0].shape == (8, 3, 24, 24) and crops[4].shape == (8, 3, 12, 12)
    with pytest.raises(ValueError, match="world_size=3"):
        multicrop_loader(cfg, tiny, world_size=3)


# --- skipped files -----------------------------------------------------------------------------------------
def _folder_with_bad_files(root) -> ImageFolder:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        os.makedirs(root / cls)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "cat" / "zero.png").write_bytes(b"")
    (root / "dog" / "text.jpg").write_text("not an image at all")
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    return ImageFolder(root)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_are_skipped_counted_and_batches_stay_full(tmp_path, num_workers):
    ds = _folder_with_bad_files(tmp_path)
    assert len(ds) == 15
    loader = MultiCropLoader(ds, TRANSFORM, batch_size=5, seed=0, num_workers=num_workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            batches = _epoch(loader, epoch)
            assert len(batches) == 3 and all(c[0].shape[0] == 5 for c, _ in batches)
    assert loader.num_skipped == 3
    assert {os.path.basename(p) for p in loader.skipped} == {"zero.png", "text.jpg", "truncated.png"}
    assert sum("skipping unreadable image" in str(w.message) for w in caught) == 3  # once per file


def test_eval_loader_keeps_order_and_last_partial_batch(tiny, tmp_path):
    loader = EvalLoader(tiny, EvalTransform(24), batch_size=16)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [16, 16, 8]
    assert torch.equal(torch.cat([b[1] for b in batches]), tiny.labels)
    folder = EvalLoader(_folder_with_bad_files(tmp_path), EvalTransform(16), batch_size=4, num_workers=2)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        images = torch.cat([b[0] for b in folder])
    assert images.shape == (15, 3, 16, 16) and folder.num_skipped == 3
