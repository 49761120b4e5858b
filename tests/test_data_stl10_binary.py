"""STL-10's binary files read directly, on tiny files written here in the format: bitwise equal to
torchvision's STL10 for every split, right side up against images written by hand, clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision

from fdino.data import stl10_binary
from fdino.data.stl10_binary import (
    STL10_CLASSES,
    find_stl10_binary,
    read_stl10_split,
    stl10_binary_dataset,
)

COUNTS = {"train": 4, "test": 3, "unlabeled": 5}


def _file_bytes(hwc: np.ndarray) -> bytes:
    """STL-10's order, written from images [N, 96, 96, 3]: per image the R, G, B planes, each column-major."""
    return b"".join(np.ascontiguousarray(image[:, :, c].T).tobytes() for image in hwc for c in range(3))


@pytest.fixture
def stl10_root(tmp_path):
    """root/stl10_binary with tiny train, test and unlabeled parts; returns (root, images, labels)."""
    base = tmp_path / "stl10_binary"
    base.mkdir()
    rng = np.random.default_rng(0)
    images = {part: rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8) for part, n in COUNTS.items()}
    labels = {"train": [1, 10, 3, 3], "test": [2, 9, 10]}  # 1-based on disk
    for part, hwc in images.items():
        (base / f"{part}_X.bin").write_bytes(_file_bytes(hwc))
    for part, y in labels.items():
        (base / f"{part}_y.bin").write_bytes(bytes(y))
    (base / "class_names.txt").write_text("\n".join(f"name{k}" for k in range(10)) + "\n")
    return tmp_path, images, labels


@pytest.mark.parametrize("split", stl10_binary.SPLITS)
def test_bitwise_equal_to_torchvision(stl10_root, monkeypatch, split):
    root = stl10_root[0]
    # torchvision checks the real files' MD5s; these only need to exist.
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    reference = torchvision.datasets.STL10(root, split=split)
    images, labels = read_stl10_split(root / "stl10_binary", split)
    assert images.dtype == reference.data.dtype == np.uint8 and images.shape == reference.data.shape
    assert np.array_equal(images, reference.data) and np.array_equal(labels, reference.labels.astype(np.int64))
    dataset = stl10_binary_dataset(root, split)
    assert dataset.classes == tuple(reference.classes) == tuple(f"name{k}" for k in range(10))
    image, label = dataset[len(dataset) - 1]
    ref_image, ref_label = reference[len(reference) - 1]
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(ref_image))) and label == ref_label


def test_images_right_side_up_and_labels_zero_based(stl10_root):
    root, hwc, labels = stl10_root
    train = stl10_binary_dataset(root, "train+unlabeled")
    assert len(train) == 9 and train.labels.tolist() == [0, 9, 2, 2, -1, -1, -1, -1, -1]
    expected = np.concatenate([hwc["train"], hwc["unlabeled"]])
    assert torch.equal(train.images.permute(0, 2, 3, 1), torch.from_numpy(expected))
    test = stl10_binary_dataset(root / "stl10_binary", "test")  # the stl10_binary folder itself works too
    assert test.labels.tolist() == [1, 8, 9] and torch.equal(
        test[2][0].permute(1, 2, 0), torch.from_numpy(hwc["test"][2])
    )


def test_class_names_default_to_the_ten_stl10_names(stl10_root):
    root = stl10_root[0]
    (root / "stl10_binary" / "class_names.txt").unlink()
    assert stl10_binary_dataset(root, "test").classes == STL10_CLASSES
    (root / "stl10_binary" / "class_names.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="expected 10 class names, one a line, got 2"):
        stl10_binary_dataset(root, "test")


def test_missing_files_say_which_and_where(stl10_root):
    root = stl10_root[0]
    (root / "stl10_binary" / "unlabeled_X.bin").unlink()
    assert find_stl10_binary(root, "train") is not None and find_stl10_binary(root, "unlabeled") is None
    with pytest.raises(
        FileNotFoundError, match=r"STL-10 train\+unlabeled: \['train_X.bin', 'train_y.bin', 'unlabeled_X.bin'\]"
    ):
        stl10_binary_dataset(root, "train+unlabeled")
    with pytest.raises(ValueError, match="split='val' is invalid"):
        find_stl10_binary(root, "val")


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("test_X.bin", b"\0" * (3 * 96 * 96 + 5), "is not a whole number of STL-10 images"),
        ("test_y.bin", bytes([1, 2]), "2 labels for 3 images"),
        ("test_y.bin", bytes([1, 0, 2]), r"labels must lie in 1..10, got 0..2"),
        ("test_y.bin", bytes([1, 11, 2]), r"got 1..11"),
    ],
)
def test_malformed_files_are_clear_errors(stl10_root, file, content, message):
    root = stl10_root[0]
    (root / "stl10_binary" / file).write_bytes(content)
    with pytest.raises(ValueError, match=f"{file}: .*{message}"):
        stl10_binary_dataset(root, "test")


def test_reads_that_return_short_are_continued(stl10_root, monkeypatch):
    """One read() returns at most ~2 GB on Linux, less than unlabeled_X.bin: the reader must loop."""
    root, hwc, _ = stl10_root

    class ShortReads(io.FileIO):
        def readinto(self, buffer):
            return super().readinto(memoryview(buffer)[:1000])

    monkeypatch.setattr(stl10_binary, "open", lambda path, mode, buffering: ShortReads(path, mode), raising=False)
    images, _ = read_stl10_split(root / "stl10_binary", "unlabeled")
    assert np.array_equal(images.transpose(0, 2, 3, 1), hwc["unlabeled"])
