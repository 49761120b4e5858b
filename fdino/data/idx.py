"""IDX files (the MNIST / Fashion-MNIST format), parsed without torchvision.

Format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the number of
dimensions n, then n big-endian uint32 sizes, then the data in big-endian order. Files may be
gzip-compressed (``.gz``), as the Debian package ``dataset-fashion-mnist`` ships them in
``/usr/share/datasets/fashion-mnist/``.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from .arrays import ArrayDataset

_IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_PREFIX = {"train": "train", "test": "t10k"}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of one (uncompressed) IDX file into an array in native byte order."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{name}: not an IDX file (the first two bytes must be zero)")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        raise ValueError(
            f"{name}: unknown IDX type code 0x{code:02x} (known: {', '.join(f'0x{c:02x}' for c in _IDX_TYPES)})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{name}: IDX size mismatch: shape {shape} of {dtype} needs {expected} bytes, file has {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gunzipping it when it starts with the gzip magic bytes."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
    return parse_idx(data, path)


def find_idx_pair(directory: str | os.PathLike, split: str) -> tuple[str, str] | None:
    """Paths of ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in ``directory``, or None."""
    if split not in _PREFIX:
        raise ValueError(f"IDX split={split!r} is invalid: allowed one of {tuple(_PREFIX)}")
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        stem = os.path.join(os.fspath(directory), f"{_PREFIX[split]}-{kind}-ubyte")
        hit = next((stem + ext for ext in ("", ".gz") if os.path.isfile(stem + ext)), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def idx_dataset(
    directory: str | os.PathLike, split: str = "train", classes: tuple[str, ...] = FASHION_MNIST_CLASSES
) -> ArrayDataset:
    """An MNIST-style split from IDX files in ``directory``: 1-channel uint8 images read as RGB."""
    pair = find_idx_pair(directory, split)
    if pair is None:
        raise FileNotFoundError(
            f"no {_PREFIX[split]}-images-idx3-ubyte[.gz] and "
            f"{_PREFIX[split]}-labels-idx1-ubyte[.gz] in {os.fspath(directory)!r}"
        )
    images, labels = read_idx(pair[0]), read_idx(pair[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{pair[0]}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{pair[1]}: expected {len(images)} labels, got shape {labels.shape}")
    return ArrayDataset(images.copy(), labels.astype(np.int64), classes)


__all__ = ["parse_idx", "read_idx", "find_idx_pair", "idx_dataset", "FASHION_MNIST_CLASSES", "DEBIAN_FASHION_MNIST_DIR"]
