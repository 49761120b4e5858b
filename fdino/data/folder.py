"""Any folder of images as a data set.

Layouts:
  * labeled: ``root/<class>/**/<image>``: each top-level subfolder is a class (sorted by name);
    images directly in ``root`` are kept with label -1.
  * unlabeled: images anywhere under ``root`` with no class subfolder holding images: label -1.

Only files with a known image extension are listed (hidden files and folders are ignored).
Listing never opens a file: bad files are found when loaded and skipped by the loaders, so a
million-image folder is indexed in seconds rather than verified for minutes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, has_image_extension, load_rgb


def _images_under(directory: str) -> list[str]:
    """Image files under ``directory``, recursively, in a stable (sorted) order."""
    found = []
    for here, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(here, f) for f in sorted(files) if not f.startswith(".") and has_image_extension(f))
    return found


def scan_image_folder(
    root: str | os.PathLike, classes: Sequence[str] | None = None
) -> tuple[list[str], list[int], tuple[str, ...]]:
    """``(paths, labels, class_names)`` of the images under ``root``.

    ``classes`` fixes the class list (e.g. a validation split must use the train split's
    mapping); subfolders not in it are an error. Raises FileNotFoundError for a missing folder
    or one without images, NotADirectoryError for a file.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.exists(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"image folder {root!r} is not a directory")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    loose = [os.path.join(root, e) for e in entries if e not in subdirs and has_image_extension(e)]
    per_dir = {d: _images_under(os.path.join(root, d)) for d in subdirs}

    paths, labels = list(loose), [-1] * len(loose)
    labeled = classes is not None or any(per_dir.values())
    if not labeled:
        names: tuple[str, ...] = ()
    else:
        names = tuple(classes) if classes is not None else tuple(subdirs)
        unknown = sorted(d for d in subdirs if per_dir[d] and d not in names)
        if unknown:
            raise ValueError(
                f"image folder {root!r} has class folders {unknown} that are not in the "
                f"class list {list(names)} (of the training split)"
            )
        empty = [d for d in names if not per_dir.get(d)]
        if empty and classes is None:
            warnings.warn(f"image folder {root!r}: class folders without images: {empty}", stacklevel=2)
        for k, name in enumerate(names):
            paths.extend(per_dir.get(name, ()))
            labels.extend([k] * len(per_dir.get(name, ())))
    if not paths:
        raise FileNotFoundError(
            f"image folder {root!r} contains no images (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths, labels, names


class ImageFolder(Dataset):
    """Map-style data set of ``(RGB PIL image, label)`` over `scan_image_folder`'s listing.

    ``__getitem__`` raises `fdino.data.images.BadImageError` for a file that cannot be decoded;
    the loaders catch it, skip the file and count it. Every access decodes the file again;
    `fdino.data.decoded_cache.DecodedImageFolder` gives the same items from pixels decoded once.
    """

    def __init__(self, root: str | os.PathLike, classes: Sequence[str] | None = None) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.paths, self.labels, self.classes = scan_image_folder(self.root, classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_rgb(self.paths[index]), self.labels[index]

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self)} images, {len(self.classes)} classes)"


SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}


def split_subfolders(root: str | os.PathLike) -> dict[str, Path]:
    """The split subfolders of ``root`` (``train``, ``val``/``validation``, ``test``) that exist."""
    root = Path(root)
    found = {}
    for split, names in SPLIT_DIRS.items():
        for name in names:
            if (root / name).is_dir():
                found[split] = root / name
                break
    return found


__all__ = ["ImageFolder", "scan_image_folder", "split_subfolders", "SPLIT_DIRS"]
