"""STL-10 read straight from its binary files: no torchvision, no MD5 pass over 3 GB per load.

Format (Coates, Lee & Ng 2011, https://cs.stanford.edu/~acoates/stl10/; the ``stl10_binary``
folder of stl10_binary.tar.gz): ``*_X.bin`` hold uint8 images of 3 x 96 x 96, the R, G and B
planes one after another, each plane column-major (MATLAB order), so a plane read row-major is
the transposed image; ``*_y.bin`` one uint8 label per image in 1..10; ``class_names.txt`` one
name a line. train_X/train_y: 5,000 images, test_X/test_y: 8,000, unlabeled_X: 100,000.

The arrays equal torchvision's ``STL10(...).data`` and ``.labels`` (tests hold them equal):
images ``[N, 3, 96, 96]`` as a transposed view of the file order, labels 0-based, -1 for the
unlabeled images.

Memory: train+unlabeled is 105,000 images = 2.9 GB, read straight into one array (torchvision
reads both files and then concatenates, which peaks at twice that).
"""

from __future__ import annotations

import os

import numpy as np

from .arrays import ArrayDataset

SPLITS = ("train", "train+unlabeled", "unlabeled", "test")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
FOLDER = "stl10_binary"
CLASS_NAMES_FILE = "class_names.txt"
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
# (images file, labels file or None) per part of each split, in the order torchvision concatenates them
_SPLIT_FILES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "train": (("train_X.bin", "train_y.bin"),),
    "test": (("test_X.bin", "test_y.bin"),),
    "unlabeled": (("unlabeled_X.bin", None),),
    "train+unlabeled": (("train_X.bin", "train_y.bin"), ("unlabeled_X.bin", None)),
}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"STL-10 split={split!r} is invalid: allowed one of {SPLITS}")


def find_stl10_binary(root: str | os.PathLike, split: str) -> str | None:
    """The folder holding ``split``'s files: ``root/stl10_binary`` (torchvision's layout) or ``root``
    itself; None when neither has them all."""
    _check_split(split)
    names = [name for part in _SPLIT_FILES[split] for name in part if name is not None]
    for folder in (os.path.join(os.fspath(root), FOLDER), os.fspath(root)):
        if all(os.path.isfile(os.path.join(folder, name)) for name in names):
            return folder
    return None


def count_images(path: str | os.PathLike) -> int:
    """How many 96x96x3 images an ``*_X.bin`` file holds, from its size."""
    size = os.path.getsize(path)
    if size % IMAGE_BYTES:
        raise ValueError(
            f"{os.fspath(path)}: {size} bytes is not a whole number of STL-10 images ({IMAGE_BYTES} bytes "
            "each); the file is truncated or not STL-10: download stl10_binary.tar.gz again"
        )
    return size // IMAGE_BYTES


def read_into(path: str | os.PathLike, out: np.ndarray) -> None:
    """Fill the C-contiguous ``out`` with the bytes of ``path``, which must have exactly that many."""
    path = os.fspath(path)
    view = memoryview(out).cast("B")
    if os.path.getsize(path) != len(view):
        raise ValueError(f"{path}: {os.path.getsize(path)} bytes, expected {len(view)}")
    with open(path, "rb", buffering=0) as f:
        # One read() returns at most ~2 GB on Linux and unlabeled_X.bin is 2.8 GB: loop.
        filled = 0
        while filled < len(view):
            got = f.readinto(view[filled:])
            if not got:
                raise ValueError(f"{path}: ended after {filled} of {len(view)} bytes (was it truncated while reading?)")
            filled += got


def read_labels(path: str | os.PathLike, count: int) -> np.ndarray:
    """``*_y.bin`` -> int64 labels 0..9; the file stores them 1-based, one byte each."""
    path = os.fspath(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if len(raw) != count:
        raise ValueError(f"{path}: {len(raw)} labels for {count} images; the pair of files does not match")
    if len(raw) and (raw.min() < 1 or raw.max() > len(STL10_CLASSES)):
        raise ValueError(f"{path}: labels must lie in 1..{len(STL10_CLASSES)}, got {raw.min()}..{raw.max()}")
    return raw.astype(np.int64) - 1


def read_stl10_split(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 3, 96, 96], labels int64 [N])`` of ``split`` from the files in ``folder``.

    The images are a transposed view (strides of the column-major planes), as torchvision's are.
    """
    _check_split(split)
    parts = [(os.path.join(folder, x), y and os.path.join(folder, y)) for x, y in _SPLIT_FILES[split]]
    counts = [count_images(x) for x, _ in parts]
    planes = np.empty((sum(counts), 3, SIDE, SIDE), np.uint8)  # file order: each plane column-major
    labels = np.full(sum(counts), -1, np.int64)
    start = 0
    for (images_path, labels_path), count in zip(parts, counts):
        read_into(images_path, planes[start : start + count])
        if labels_path is not None:
            labels[start : start + count] = read_labels(labels_path, count)
        start += count
    return planes.transpose(0, 1, 3, 2), labels


def read_class_names(folder: str | os.PathLike) -> tuple[str, ...]:
    """``class_names.txt`` in ``folder`` when present, else `STL10_CLASSES` (the same ten names)."""
    path = os.path.join(os.fspath(folder), CLASS_NAMES_FILE)
    if not os.path.isfile(path):
        return STL10_CLASSES
    with open(path, encoding="utf-8") as f:
        names = tuple(f.read().splitlines())
    if len(names) != len(STL10_CLASSES):
        raise ValueError(f"{path}: expected {len(STL10_CLASSES)} class names, one a line, got {len(names)}")
    return names


def stl10_binary_dataset(root: str | os.PathLike, split: str = "train") -> ArrayDataset:
    """STL-10's ``split`` ("train", "test", "unlabeled", "train+unlabeled") from ``root/stl10_binary``
    or ``root``, as an `ArrayDataset` (labels -1 for unlabeled images)."""
    folder = find_stl10_binary(root, split)
    if folder is None:
        needed = sorted({name for part in _SPLIT_FILES[split] for name in part if name is not None})
        raise FileNotFoundError(
            f"STL-10 {split}: {needed} not found in {os.path.join(os.fspath(root), FOLDER)!r} or {os.fspath(root)!r}; "
            "unpack stl10_binary.tar.gz (https://cs.stanford.edu/~acoates/stl10/) under root"
        )
    images, labels = read_stl10_split(folder, split)
    return ArrayDataset(images, labels, read_class_names(folder))


__all__ = [
    "SPLITS",
    "STL10_CLASSES",
    "find_stl10_binary",
    "count_images",
    "read_stl10_split",
    "read_labels",
    "read_class_names",
    "stl10_binary_dataset",
]
