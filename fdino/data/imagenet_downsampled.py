"""Downsampled ImageNet (ImageNet32x32, ImageNet64x64) read from its batch files.

Format (Chrabaszcz, Loshchilov & Hutter 2017, "A Downsampled Variant of ImageNet as an Alternative
to the CIFAR datasets", arXiv:1707.08819; the files on image-net.org, written by the authors'
Imagenet32_Scripts): every file is a pickled dict

    'data'    uint8 [N, 3*S*S]: per image the R plane, then G, then B, each S*S values row-major
    'labels'  N ints in 1..1000 (1-based on disk; 0-based here)
    'mean'    train batches only: the mean training image (not used)

Train: ``train_data_batch_1`` .. ``train_data_batch_10``; validation: ``val_data``. Either in the
folder given or in its ``Imagenet32_train``, ``Imagenet64_val``, ... subfolders (the zips' layout).
The ``.npz`` variant of the same files is read by numpy with pickles off.

A pickle can run any code while it loads, so these files go through `restricted_unpickle`, which
admits only the globals that pickled numpy arrays need and refuses a file that names anything else,
before anything it names is called.

Memory: a split is held as one uint8 array. ImageNet32 train is 1,281,167 x 3,072 B = 3.9 GB,
ImageNet64 train 15.7 GB. The batches are copied into one array allocated up front, so the peak
adds only the batch being read: about one batch (0.4 GB for ImageNet32, 1.6 GB for ImageNet64)
for Python 2 pickles and protocols >= 3, about four for Python 3 pickles of protocol <= 2, which
store bytes as text. Validation (50,000 images): 154 MB and 614 MB.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from typing import IO, Any

import numpy as np
import torch

from .arrays import ArrayDataset

try:  # numpy >= 2 keeps these in numpy._core; numpy 1.x in numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

SPLITS = ("train", "val")
NUM_CLASSES = 1000
DEFAULT_CLASSES = tuple(str(k) for k in range(NUM_CLASSES))
CLASS_MAP_FILE = "map_clsloc.txt"  # "n02119789 1 kit_fox" per line, as in the authors' scripts
_FILE_PATTERNS = {"train": re.compile(r"train_data_batch_(\d+)(\.npz)?"), "val": re.compile(r"val_data()(\.npz)?")}
_ZIP_MAGIC = b"PK\x03\x04"


class RefusedPickleError(pickle.UnpicklingError):
    """A pickle named a global outside the numpy-array set; nothing it names was called."""


class _Latin1Encode:
    """``_codecs.encode`` as Python 3 pickles of protocol <= 2 use it to rebuild bytes, latin-1 only.

    A fresh class with no slots, not a function: the pickle's BUILD opcode can set attributes on
    a function (``__defaults__``, ``__dict__``) and so change it for later loads; here it cannot.
    """

    __slots__ = ()

    def __call__(self, text: Any, encoding: Any = "latin1") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError(
                f"_codecs.encode is admitted only as (str, 'latin1'), got encoding {encoding!r}"
            )
        return text.encode("latin1")


class _FromBuffer:
    """numpy's ``_frombuffer`` (how protocol 5 pickles arrays), behind a class for the reason above."""

    __slots__ = ()

    def __call__(self, *args: Any) -> np.ndarray:
        return _numeric._frombuffer(*args)


# What pickled numpy arrays reference, found with pickletools on dicts of arrays and lists pickled
# at protocols 0-5 (numpy 2.x writes numpy._core, numpy 1.x and Python 2 numpy.core):
#   _reconstruct, ndarray, dtype - every array;  scalar - numpy integers inside a list;
#   _codecs.encode - bytes in protocol <= 2 from Python 3;  _frombuffer - arrays at protocol 5.
# Each is a constructor: the only class it can build is ndarray, so no other code is reachable.
_ADMITTED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _Latin1Encode(),
}
for _package in ("numpy.core", "numpy._core"):
    _ADMITTED[(f"{_package}.multiarray", "_reconstruct")] = _multiarray._reconstruct
    _ADMITTED[(f"{_package}.multiarray", "scalar")] = _multiarray.scalar
    _ADMITTED[(f"{_package}.numeric", "_frombuffer")] = _FromBuffer()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler whose `find_class` hands out only `_ADMITTED`: numpy arrays, dtypes, scalars."""

    def __init__(self, file: IO[bytes], name: str) -> None:
        # latin1: Python 2 pickles store an array's bytes as a str; numpy takes them back via latin-1.
        super().__init__(file, encoding="latin1")
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        admitted = _ADMITTED.get((module, name))
        if admitted is None:
            raise RefusedPickleError(
                f"{self._name}: refused to unpickle: it references the global {module}.{name}, which a "
                "downsampled-ImageNet file never holds (only numpy arrays, lists and numbers are admitted), "
                "and nothing was run. The file is corrupt or not from image-net.org: do not open it with "
                "plain pickle; download it again"
            )
        return admitted


def restricted_unpickle(file: IO[bytes], name: str = "<pickle>") -> Any:
    """Unpickle ``file`` admitting only numpy arrays, dtypes, numpy scalars and plain Python values.

    Raises `RefusedPickleError` (naming the global and ``name``) for any other global, and
    ValueError for a stream that is not a readable pickle.
    """
    try:
        return _NumpyOnlyUnpickler(file, name).load()
    except RefusedPickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{name}: not a readable pickle ({type(e).__name__}: {e})") from e


def side_from_width(width: int, name: str = "<data>") -> int:
    """The image side S of rows holding ``width == 3 * S * S`` values (3072 -> 32, 12288 -> 64)."""
    side = math.isqrt(width // 3) if width > 0 else 0
    if side == 0 or 3 * side * side != width:
        raise ValueError(
            f"{name}: 'data' rows hold {width} values, which is 3*S*S for no image side S "
            "(ImageNet32 rows hold 3072, ImageNet64 rows 12288)"
        )
    return side


def parse_batch(batch: Any, name: str = "<batch>") -> tuple[np.ndarray, np.ndarray]:
    """Check one unpickled batch dict: ``(data uint8 [N, 3*S*S], labels int64 [N] in 0..999)``."""
    if not isinstance(batch, dict):
        raise ValueError(f"{name}: expected a dict with 'data' and 'labels', got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise ValueError(f"{name}: the dict lacks {missing} (it has {sorted(map(str, batch))})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{name}: 'data' must be a uint8 array [N, 3*S*S], got {got}")
    side_from_width(data.shape[1], name)
    labels = np.asarray(batch["labels"])
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise ValueError(
            f"{name}: 'labels' must be {len(data)} integers (one per image), got {labels.dtype} {labels.shape}"
        )
    if len(labels) and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise ValueError(
            f"{name}: labels must lie in 1..{NUM_CLASSES} (1-based, as the format stores them), "
            f"got {labels.min()}..{labels.max()}"
        )
    return data, labels.astype(np.int64) - 1


def read_batch_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One batch file (pickle or ``.npz``) -> ``(data uint8 [N, 3*S*S], labels int64 [N], 0-based)``."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
        f.seek(0)
        batch = _read_npz(path) if is_zip else restricted_unpickle(f, path)
    return parse_batch(batch, path)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in ("data", "labels") if key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz of 'data' and 'labels' ({e})") from e


def _max_rows(path: str, row_bytes: int) -> int:
    """An upper bound on the images in ``path`` without reading it: a pickle holds its rows' bytes
    and more, an ``.npz`` member's uncompressed size likewise."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
    if not is_zip:
        return os.path.getsize(path) // row_bytes
    try:
        with zipfile.ZipFile(path) as z:
            return z.getinfo("data.npy").file_size // row_bytes
    except (KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz with a 'data' array ({e})") from e


def find_batch_files(root: str | os.PathLike, split: str, image_size: int | None = None) -> list[str]:
    """The split's files in ``root`` and its ``Imagenet{S}_*`` subfolders; train batches by number.

    A batch present both as a pickle and as ``.npz`` is read from the ``.npz`` (no pickle needed).
    """
    if split not in SPLITS:
        raise ValueError(f"downsampled ImageNet split={split!r} is invalid: allowed one of {SPLITS}")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"downsampled ImageNet: {root!r} is not a folder")
    prefix = f"imagenet{image_size or ''}"
    folders = [root] + sorted(
        e.path for e in os.scandir(root) if e.is_dir() and e.name.lower().startswith(prefix) and "_" in e.name
    )
    by_number: dict[int, list[str]] = {}
    for folder in folders:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            match = _FILE_PATTERNS[split].fullmatch(entry.name)
            if match and entry.is_file():
                by_number.setdefault(int(match.group(1) or 0), []).append(entry.path)
    chosen = []
    for number in sorted(by_number):
        paths = by_number[number]
        npz = [p for p in paths if p.endswith(".npz")]
        if len(paths) > 1 and len(npz) != 1:
            raise ValueError(
                f"downsampled ImageNet: the same {split} file was found {len(paths)} times: {paths}; keep one, "
                "or pass image_size (imagenet32, imagenet64) to read only the Imagenet{S}_* folders of that size"
            )
        chosen.append(npz[0] if len(paths) > 1 else paths[0])
    return chosen


def read_class_names(root: str | os.PathLike) -> tuple[str, ...]:
    """WordNet ids from ``root/map_clsloc.txt`` (``wnid index name`` a line, index 1-based), else
    `DEFAULT_CLASSES` ("0".."999")."""
    path = os.path.join(os.fspath(root), CLASS_MAP_FILE)
    if not os.path.isfile(path):
        return DEFAULT_CLASSES
    names: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or not fields[1].isdigit():
                raise ValueError(f"{path}:{number}: expected 'wnid index [name]', got {line.strip()!r}")
            names[int(fields[1])] = fields[0]
    if sorted(names) != list(range(1, len(names) + 1)):
        raise ValueError(f"{path}: class indices must be 1..{len(names)}, each once")
    return tuple(names[k] for k in range(1, len(names) + 1))


def read_batches(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Batch files -> one ``(data [N, 3*S*S], labels [N])``, copied into arrays allocated once."""
    data, labels = read_batch_file(paths[0])
    if len(paths) == 1:
        return data, labels
    row = data.shape[1]
    capacity = len(data) + sum(_max_rows(p, row) for p in paths[1:])
    all_data = np.empty((capacity, row), np.uint8)  # the one big allocation
    all_labels = np.empty(capacity, np.int64)
    count = 0
    for i, path in enumerate(paths):
        if i > 0:
            data = labels = None  # let the previous batch go before the next one is read
            data, labels = read_batch_file(path)
        if data.shape[1] != row:
            raise ValueError(
                f"{path}: rows hold {data.shape[1]} values but {paths[0]} rows hold {row}: "
                "the folder mixes image sizes; keep one size per folder"
            )
        if count + len(data) > capacity:  # the bound holds for every uncompressed file
            raise ValueError(f"{path}: holds more images than its size allows; the file is not in the expected format")
        all_data[count : count + len(data)] = data
        all_labels[count : count + len(data)] = labels
        count += len(data)
    # The bound overshoots by up to half for Python 3 pickles of protocol <= 2 (bytes stored as UTF-8
    # text); give the tail back. No view of all_data exists here, so skipping the reference check is safe.
    all_data.resize((count, row), refcheck=False)
    return all_data, all_labels[:count]


def imagenet_downsampled(root: str | os.PathLike, split: str = "train", image_size: int | None = None) -> ArrayDataset:
    """Downsampled ImageNet's ``split`` ("train": every batch present, in order; "val") from ``root``.

    Args:
        root: the folder with the files, or with ``Imagenet{S}_train`` / ``Imagenet{S}_val`` in it.
        split: "train" or "val".
        image_size: 32, 64, ...: read only ``Imagenet{S}_*`` subfolders and check the files hold
            that size; None takes the size the files hold.

    Returns an `ArrayDataset` of uint8 ``[N, 3, S, S]`` images (a view of the file order), labels
    0..999, and class names from ``map_clsloc.txt`` in ``root`` when present, else "0".."999".
    """
    paths = find_batch_files(root, split, image_size)
    if not paths:
        size = image_size or 32
        wanted = "train_data_batch_1 .. train_data_batch_10" if split == "train" else "val_data"
        raise FileNotFoundError(
            f"downsampled ImageNet: no {wanted} (or .npz) in {os.fspath(root)!r} or its Imagenet{size}_* "
            f"subfolders; download Imagenet{size}_{split}.zip from image-net.org and unpack it there"
        )
    data, labels = read_batches(paths)
    side = side_from_width(data.shape[1], paths[0])
    if image_size is not None and side != image_size:
        raise ValueError(
            f"{paths[0]}: holds {side}x{side} images, not {image_size}x{image_size}: use imagenet{side} "
            f"or point root at the Imagenet{image_size} files"
        )
    classes = read_class_names(root)
    if len(labels) and labels.max() >= len(classes):
        raise ValueError(f"label {labels.max()} has no name in the {len(classes)} classes of {CLASS_MAP_FILE}")
    images = torch.from_numpy(data.reshape(len(data), 3, side, side))  # R, G, B planes, rows of S
    return ArrayDataset(images, labels, classes)


__all__ = [
    "SPLITS",
    "DEFAULT_CLASSES",
    "RefusedPickleError",
    "restricted_unpickle",
    "side_from_width",
    "parse_batch",
    "read_batch_file",
    "read_batches",
    "find_batch_files",
    "read_class_names",
    "imagenet_downsampled",
]
