"""build_dataset resolves downsampled ImageNet (imagenet32 / imagenet64) and STL-10's binary files.

The files are written here in each format by the writers of the readers' own tests, so these tests
check only the registration: names and aliases, roles -> splits, the image size a name stands for,
the default root, and the clear errors for missing files.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from test_data_imagenet_downsampled import _batch, _hwc_images, _write
from test_data_stl10_binary import _file_bytes

from fdino.data import DATASET_NAMES, build_dataset
from fdino.data.sources import canonical_name, resolve_split

IMAGENET_NAMES = {
    "imagenet32": ["imagenet32", "imagenet-32", "imagenet32x32", "ImageNet32"],
    "imagenet64": ["imagenet64", "imagenet-64", "imagenet64x64", " IMAGENET-64 "],
}


def _imagenet_files(root, side: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Two train batches and a val file of ``side`` px in the zips' layout; returns the HWC images."""
    images = {name: _hwc_images(n, side, seed + k) for k, (name, n) in enumerate([("1", 3), ("2", 2), ("val", 2)])}
    _write(root / f"Imagenet{side}_train" / "train_data_batch_1", _batch(images["1"], [1, 2, 3]))
    _write(root / f"Imagenet{side}_train" / "train_data_batch_2", _batch(images["2"], [1000, 5]))
    _write(root / f"Imagenet{side}_val" / "val_data", _batch(images["val"], [7, 8], train=False))
    return images


@pytest.mark.parametrize("key", sorted(IMAGENET_NAMES))
def test_imagenet_downsampled_names_aliases_and_roles(tmp_path, key):
    side = int(key[-2:])
    images = _imagenet_files(tmp_path, side)
    _imagenet_files(tmp_path, 96 - side, seed=10)  # the other size beside it: the name picks its own files
    assert key in DATASET_NAMES
    for name in IMAGENET_NAMES[key]:
        assert canonical_name(name) == key
        train, memory, query = (build_dataset(name, root=tmp_path, split=role) for role in ("train", "memory", "query"))
        assert (train.name, train.split, memory.split, query.split) == (key, "train", "train", "val")
        assert (len(train), len(memory), len(query)) == (5, 5, 2) and train.num_classes == 1000
        assert train.dataset.labels.tolist() == [0, 1, 2, 999, 4] and query.dataset.labels.tolist() == [6, 7]
        image, label = query.dataset[1]
        assert image.shape == (3, side, side) and label == 7
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(images["val"][1]))
        assert torch.equal(train.dataset[3][0].permute(1, 2, 0), torch.from_numpy(images["2"][0]))
    assert len(build_dataset(key, root=tmp_path, split="val")) == 2  # the data set's own split name


def test_imagenet_downsampled_default_root_is_fdino_data(tmp_path, monkeypatch):
    _imagenet_files(tmp_path, 32)
    monkeypatch.setenv("FDINO_DATA", str(tmp_path))
    assert len(build_dataset("imagenet32", split="query")) == 2


def test_imagenet_downsampled_missing_files_and_bad_splits_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="downsampled ImageNet: .*is not a folder"):
        build_dataset("imagenet32", root=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no train_data_batch_1 .. train_data_batch_10.*Imagenet64_train.zip"):
        build_dataset("imagenet64", root=tmp_path)  # an empty folder
    _imagenet_files(tmp_path, 64)
    with pytest.raises(FileNotFoundError, match="no val_data.*Imagenet32_val.zip"):
        build_dataset("imagenet32", root=tmp_path, split="query")  # only 64 px files there
    with pytest.raises(ValueError, match=r"split='test' is invalid for imagenet32.*'train', 'val'"):
        resolve_split("imagenet32", "test")
    with pytest.raises(FileNotFoundError, match="imagenet32.*imagenet64"):  # the list of names in the error
        build_dataset(tmp_path / "no-such-folder")


@pytest.fixture
def stl10_files(tmp_path):
    """STL-10's binary files (tiny) in ``root/stl10_binary``; returns (root, HWC images per part)."""
    base = tmp_path / "stl10_binary"
    base.mkdir()
    rng = np.random.default_rng(0)
    images = {part: rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8) for part, n in [("train", 2), ("test", 3)]}
    images["unlabeled"] = rng.integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    for part, hwc in images.items():
        (base / f"{part}_X.bin").write_bytes(_file_bytes(hwc))
    (base / "train_y.bin").write_bytes(bytes([3, 10]))  # 1-based on disk
    (base / "test_y.bin").write_bytes(bytes([1, 2, 3]))
    return tmp_path, images


@pytest.mark.parametrize("name", ["stl10", "stl-10", "STL10"])
def test_stl10_is_read_from_its_binary_files_without_torchvision(stl10_files, monkeypatch, name):
    root, images = stl10_files

    def refuse(*args, **kwargs):
        raise AssertionError("torchvision's STL10 was used although the binary files are there")

    monkeypatch.setattr(torchvision.datasets, "STL10", refuse)
    train, memory, query = (build_dataset(name, root=root, split=role) for role in ("train", "memory", "query"))
    assert (train.split, memory.split, query.split) == ("train+unlabeled", "train", "test")
    assert (len(train), len(memory), len(query)) == (6, 2, 3)
    assert train.dataset.labels.tolist() == [2, 9, -1, -1, -1, -1] and query.dataset.labels.tolist() == [0, 1, 2]
    assert torch.equal(train.dataset[4][0].permute(1, 2, 0), torch.from_numpy(images["unlabeled"][2]))
    assert len(build_dataset(name, root=root / "stl10_binary", split="unlabeled")) == 4  # the folder itself


def test_stl10_without_binary_files_keeps_torchvisions_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="stl10 not found.*download=True"):
        build_dataset("stl10", root=tmp_path)
