"""`build_dataset`: one entry point from a name or a folder to a labeled map-style data set.

Names: "shapes10" (built in, the default), "cifar10", "cifar100", "stl10", "fashion-mnist",
"imagenet32", "imagenet64" (downsampled ImageNet's batch files, `fdino.data.imagenet_downsampled`);
any other string is a folder path (`fdino.data.folder`). STL-10 is read straight from its binary
files when they are under ``root`` (`fdino.data.stl10_binary`), else through torchvision. Every
source gives a `DataSource` whose ``dataset[i]`` is ``(image, label)`` with label -1 when unknown;
images are uint8 ``[3, H, W]`` tensors (in-memory sets and cached folders) or RGB PIL images
(folders decoded on each access).
A folder used at a small image size is decoded once into a memory-mapped cache
(`fdino.data.decoded_cache`: same items, same pixels, no decoding per epoch).

Splits by *role*, so the training loop never needs to know a data set's split names:
  "train"  - what self-supervised training reads (STL-10: its train + 100k unlabeled images),
  "memory" - the labeled k-NN memory bank / linear-probe train split,
  "query"  - the labeled k-NN queries / evaluation split (downsampled ImageNet: its val split).
A data set's own split names ("test", "unlabeled", "train+unlabeled", "val") work as well.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .arrays import ArrayDataset
from .decoded_cache import DecodeCacheOptions, decoded_folder
from .folder import ImageFolder, scan_image_folder, split_subfolders
from .idx import DEBIAN_FASHION_MNIST_DIR, find_idx_pair, idx_dataset
from .imagenet_downsampled import imagenet_downsampled
from .shapes import shapes10
from .stl10_binary import find_stl10_binary, stl10_binary_dataset

ROLES = ("train", "memory", "query")
_ROLE_SPLITS = {
    "shapes10": {"train": "train", "memory": "train", "query": "test"},
    "cifar10": {"train": "train", "memory": "train", "query": "test"},
    "cifar100": {"train": "train", "memory": "train", "query": "test"},
    "fashion-mnist": {"train": "train", "memory": "train", "query": "test"},
    "stl10": {"train": "train+unlabeled", "memory": "train", "query": "test"},
    "imagenet32": {"train": "train", "memory": "train", "query": "val"},
    "imagenet64": {"train": "train", "memory": "train", "query": "val"},
}
_SPLITS = {
    "stl10": ("train", "train+unlabeled", "unlabeled", "test"),
    "imagenet32": ("train", "val"),
    "imagenet64": ("train", "val"),
}
_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "stl-10": "stl10",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "shapes": "shapes10",
    "imagenet-32": "imagenet32",
    "imagenet32x32": "imagenet32",
    "imagenet-64": "imagenet64",
    "imagenet64x64": "imagenet64",
}
DATASET_NAMES = tuple(_ROLE_SPLITS)


@dataclass(frozen=True)
class DataSource:
    """A loaded split: ``dataset[i] -> (image, label)``, the class names, and what was loaded."""

    dataset: Dataset
    classes: tuple[str, ...]
    name: str
    split: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.dataset)


def default_root() -> str:
    """Where torchvision data sets live unless ``root=`` says otherwise: $FDINO_DATA or ~/.cache/fdino."""
    return os.environ.get("FDINO_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "fdino")


def canonical_name(name_or_path: str) -> str | None:
    """The built-in name that ``name_or_path`` denotes (case and aliases folded), else None."""
    key = name_or_path.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in _ROLE_SPLITS else None


def resolve_split(name: str, split: str) -> str:
    """A role ("train", "memory", "query") or a concrete split name -> the concrete split name."""
    if split in ROLES:
        return _ROLE_SPLITS[name][split]
    allowed = _SPLITS.get(name, ("train", "test"))
    if split not in allowed:
        raise ValueError(f"split={split!r} is invalid for {name}: allowed one of {ROLES + allowed}")
    return split


def build_dataset(
    name_or_path: str | os.PathLike = "shapes10",
    *,
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = False,
    seed: int = 0,
    image_size: int = 32,
    n: int | None = None,
    decode_cache: DecodeCacheOptions | None = None,
) -> DataSource:
    """Resolve a data set by name or folder path and load one split.

    Args:
        name_or_path: a name from `DATASET_NAMES` (aliases such as "cifar-10" accepted) or a folder.
        root: where torchvision data sets are (or go, with ``download=True``); for
            "fashion-mnist" also a folder with the four IDX files; for "stl10" also a folder with
            (or with ``stl10_binary/`` holding) the binary files; for "imagenet32" / "imagenet64" the
            folder with the batch files or their ``Imagenet32_train`` ... subfolders (never
            downloaded: image-net.org needs a login). Default `default_root()`.
        split: a role ("train", "memory", "query") or a data set's own split name.
        download: let torchvision fetch a missing data set (needs a network).
        seed, n: shapes10 only: generator seed, number of images.
        image_size: shapes10: the side in pixels; folders: the training image size, which decides
            whether the decoded images are cached (see `DecodeCacheOptions`).
        decode_cache: folders only: when and where decoded images are cached; default
            `DecodeCacheOptions.from_env()` (FDINO_DECODE_CACHE, ..._DIR, ..._MAX_GB).
    """
    key = canonical_name(os.fspath(name_or_path))
    if key is None:
        source = _folder_source(os.fspath(name_or_path), split)
        dataset = decoded_folder(source.dataset, image_size=image_size, options=decode_cache)
        return DataSource(dataset, source.classes, source.name, source.split)
    concrete = resolve_split(key, split)
    base = os.fspath(root) if root is not None else default_root()
    if key == "shapes10":
        ds = shapes10(concrete, n=n, size=image_size, seed=seed)
    elif key == "fashion-mnist":
        ds = _fashion_mnist(root, concrete, download)
    elif key in ("imagenet32", "imagenet64"):
        ds = imagenet_downsampled(base, concrete, image_size=int(key[-2:]))
    elif key == "stl10" and find_stl10_binary(base, concrete) is not None:
        # The binary files are there: read them directly (no torchvision MD5 pass over 3 GB per load).
        ds = stl10_binary_dataset(base, concrete)
    else:
        ds = _torchvision(key, base, concrete, download)
    return DataSource(ds, ds.classes, key, concrete)


# --- folders ------------------------------------------------------------------------------------------
def _folder_source(path: str, split: str) -> DataSource:
    """A folder, or a folder with train/ and val/ or test/ subfolders (ImageNet layout)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is neither a known data set {DATASET_NAMES} nor an existing folder")
    splits = split_subfolders(path)
    if "train" in splits:
        # Class indices come from train/ so that every split agrees on them.
        classes = scan_image_folder(splits["train"])[2]
        eval_split = "val" if "val" in splits else "test" if "test" in splits else None
        concrete = {"train": "train", "memory": "train", "query": eval_split}.get(split, split)
        if concrete is None or concrete not in splits:
            raise ValueError(f"split={split!r} is not available in {path!r}: it has the split folders {sorted(splits)}")
        ds = ImageFolder(splits[concrete], classes=classes)
    else:
        if split == "query":
            raise ValueError(
                f"{path!r} has no val/ or test/ subfolder, so there is no query split for "
                f"k-NN evaluation (use train/ and val/ subfolders)"
            )
        if split not in ("train", "memory"):
            raise ValueError(f"split={split!r} is invalid for the plain folder {path!r}: allowed 'train', 'memory'")
        concrete = "all"
        ds = ImageFolder(path)
        if split == "memory" and not ds.classes:
            raise ValueError(f"{path!r} has no class subfolders, so it cannot serve as a labeled memory bank")
    return DataSource(ds, ds.classes, path, concrete)


# --- torchvision data sets -----------------------------------------------------------------------------
def _torchvision(name: str, root: str, split: str, download: bool) -> ArrayDataset:
    """CIFAR-10/100 or STL-10 through torchvision, kept as uint8 arrays (no per-item PIL)."""
    from torchvision import datasets  # noqa: PLC0415  (import cost only for users of these sets)

    try:
        if name in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            ds = cls(root, train=split == "train", download=download)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # [N, 32, 32, 3] -> [N, 3, 32, 32] view
            return ArrayDataset(images, ds.targets, ds.classes)
        ds = datasets.STL10(root, split=split, download=download)
        # [N, 3, 96, 96] strided view of torchvision's array: no 2.7 GB copy for the unlabeled split
        labels = ds.labels if ds.labels is not None else np.full(len(ds.data), -1)
        return ArrayDataset(torch.from_numpy(ds.data), labels, tuple(getattr(ds, "classes", ())))
    except RuntimeError as e:
        if "not found" in str(e).lower() or "corrupted" in str(e).lower():
            hint = "" if download else "; pass download=True (needs a network) to fetch it"
            raise FileNotFoundError(f"{name} not found or corrupted under root={root!r}{hint}") from e
        raise


def _fashion_mnist(root: str | os.PathLike | None, split: str, download: bool) -> ArrayDataset:
    """IDX files in ``root`` itself, torchvision's ``root/FashionMNIST/raw`` layout, or (root unset)
    the Debian package's directory; otherwise torchvision (downloading when asked)."""
    from torchvision import datasets  # noqa: PLC0415

    if root is not None and find_idx_pair(root, split) is not None:
        return idx_dataset(root, split)
    if root is None and not download and find_idx_pair(DEBIAN_FASHION_MNIST_DIR, split) is not None:
        return idx_dataset(DEBIAN_FASHION_MNIST_DIR, split)
    tv_root = os.fspath(root) if root is not None else default_root()
    try:
        ds = datasets.FashionMNIST(tv_root, train=split == "train", download=download)
    except RuntimeError as e:
        hint = (
            ""
            if download
            else (
                "; pass download=True (needs a network), or install the Debian package "
                f"dataset-fashion-mnist ({DEBIAN_FASHION_MNIST_DIR})"
            )
        )
        raise FileNotFoundError(f"fashion-mnist not found under root={tv_root!r}{hint}") from e
    return ArrayDataset(ds.data, ds.targets, tuple(ds.classes))


__all__ = ["DataSource", "build_dataset", "resolve_split", "canonical_name", "default_root", "ROLES", "DATASET_NAMES"]
