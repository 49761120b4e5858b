"""Decode a folder of small images once, into a memory-mapped uint8 file that every epoch and worker reads.

Why: `ImageFolder` decodes each file on every access, so a JPEG folder is decoded again every
epoch, on the same CPU cores that run the training step (a photo folder trained at 470 images/s
against 763 for the compiled step alone on 2 cores; ``bench/results/input-cpu.md`` measures this
module's effect). Small decoded images are cheap to keep: a 32 px RGB image is 3 KB, so 100,000
of them take 300 MB.

What is stored: exactly what `load_rgb` returns (upright RGB at the file's own size, not resized),
as uint8 ``[3, H, W]`` blocks laid end to end in one file. So an item is bitwise the pixels of the
per-access path and the augmentation's output does not change; a file that fails to decode is
recorded with its reason and raises the same `BadImageError` on access, as before.

Where: ``<directory>/<key>/pixels.u8`` and ``index.npz``. The key hashes the format version, the
Pillow and codec versions, and every file's path, size and modification time, so a changed, added
or removed file gives a new key and a stale cache is never read. A cache is written in a
``.partial-<key>-*`` folder and renamed into place when complete, so a killed decode leaves only a
partial folder, which readers ignore and the next builder removes. A lock file per key serializes
builders (the ranks of a distributed run: one decodes, the others wait, then read).

Sharing: `DecodedImageFolder` maps the file copy-on-write and never writes it, so the pixels sit in
the page cache once however many DataLoader workers read them; pickling it (spawned workers)
sends the file's path, not the pixels.

Policy (`DecodeCacheOptions.from_env`):
    FDINO_DECODE_CACHE         auto (default) | on | off
    FDINO_DECODE_CACHE_DIR     where caches go (default ~/.cache/fdino/decoded)
    FDINO_DECODE_CACHE_MAX_GB  the largest cache to build (default 4 GB)
"auto" caches folders used at an image size of at most 64 px when the decoded images fit under the
cap and on the disk and the cache folder can be written (otherwise it warns and decodes on every
access, as before); "on" caches at any image size and raises (`DecodeCacheTooLargeError`, OSError)
where "auto" warns; "off" never caches. Caches are never deleted by fdino: removing the folder
is always safe (the next run decodes again).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, features
from torch.utils.data import Dataset

from .folder import ImageFolder
from .images import BadImageError, load_rgb

DECODE_VERSION = 1  # bump when load_rgb's output changes: old caches then miss instead of being read
SMALL_IMAGE_MAX = 64  # "auto" caches folders used at image sizes up to this (px)
GB = 10**9
MODES = ("auto", "on", "off")
_MODE_WORDS = {"auto": "auto", "on": "on", "1": "on", "true": "on", "off": "off", "0": "off", "false": "off"}
_CHUNK = 1024  # images decoded per batch of threads: bounds the decoded pixels held in memory


class DecodeCacheTooLargeError(RuntimeError):
    """The decoded images do not fit under the cache's cap or on its disk; the message says the fix."""


@dataclass(frozen=True, kw_only=True)
class DecodeCacheOptions:
    """When and where `decoded_folder` keeps a folder's decoded pixels."""

    mode: str = "auto"
    """'auto' (cache when the image size is at most 64 px and the cache fits), 'on' (always; too big
    is an error), 'off' (decode every image on every access)."""
    directory: str | None = None
    """Where caches are written; None: ~/.cache/fdino/decoded."""
    max_bytes: int = 4 * GB
    """The largest cache built (decoded bytes: 3 x H x W per image)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DecodeCacheOptions.mode={self.mode!r} is invalid: allowed one of {MODES}")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise ValueError(f"DecodeCacheOptions.max_bytes={self.max_bytes!r} is invalid: allowed an int >= 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> DecodeCacheOptions:
        """Options from FDINO_DECODE_CACHE, FDINO_DECODE_CACHE_DIR and FDINO_DECODE_CACHE_MAX_GB."""
        word = environ.get("FDINO_DECODE_CACHE", "auto").strip().lower()
        if word not in _MODE_WORDS:
            raise ValueError(f"FDINO_DECODE_CACHE={word!r} is invalid: allowed auto, on (1), off (0)")
        max_gb = environ.get("FDINO_DECODE_CACHE_MAX_GB", "4")
        try:
            gb = float(max_gb)
        except ValueError:
            gb = math.nan
        if not (math.isfinite(gb) and gb >= 0):
            raise ValueError(f"FDINO_DECODE_CACHE_MAX_GB={max_gb!r} is invalid: allowed a number of GB >= 0")
        directory = environ.get("FDINO_DECODE_CACHE_DIR") or None
        return cls(mode=_MODE_WORDS[word], directory=directory, max_bytes=round(gb * GB))

    def resolved_directory(self) -> Path:
        """``directory``, or ~/.cache/fdino/decoded when it is None."""
        return Path(self.directory) if self.directory is not None else Path.home() / ".cache" / "fdino" / "decoded"

    def wanted(self, image_size: int) -> bool:
        """Whether a folder used at ``image_size`` px should be cached at all."""
        return self.mode == "on" or (self.mode == "auto" and image_size <= SMALL_IMAGE_MAX)


# --- pure parts: key, layout, messages ---------------------------------------------------------------
def _codec_versions() -> str:
    """Pillow's and its codecs' versions: another libjpeg may decode the same file to other pixels."""
    return f"Pillow {PIL.__version__}; jpeg {features.version('jpg')}; webp {features.version('webp')}"


def cache_key(paths: list[str], stats: list[tuple[int, int]], codecs: str) -> str:
    """Hex SHA-256 naming the cache of ``paths`` with their ``(size, mtime_ns)`` decoded by ``codecs``."""
    h = hashlib.sha256(f"fdino decoded v{DECODE_VERSION}\0{codecs}\0{len(paths)}\0".encode())
    for path, (size, mtime_ns) in zip(paths, stats, strict=True):
        h.update(os.fsencode(path) + f"\0{size}\0{mtime_ns}\0".encode())
    return h.hexdigest()


def _human(n_bytes: float) -> str:
    if n_bytes >= 10**8:
        return f"{n_bytes / GB:.2f} GB"
    return f"{n_bytes / 10**6:.1f} MB" if n_bytes >= 10**5 else f"{n_bytes / 1000:.1f} kB"


def too_large_message(
    root: str, n_images: int, need: int, counted: int, cap: int, image_size: int, free: int | None = None
) -> str:
    """What does not fit and the three fixes. ``need`` bytes were counted over the first ``counted``
    images' headers (all of them, or fewer when the count stopped early at the cap); ``free`` is
    the disk's free space when that is what is short."""
    estimate = need if counted >= n_images else math.ceil(need / max(counted, 1) * n_images)
    about = "" if counted >= n_images else f"about {_human(estimate)} (from the first {counted} files' headers), "
    need_text = about or f"{_human(estimate)}, "
    if free is not None:
        short = f"but the cache folder's disk has {_human(free)} free"
        raise_it = "point FDINO_DECODE_CACHE_DIR at a disk with room"
    else:
        short = f"more than the decode cache's cap of {_human(cap)}"
        raise_it = f"raise the cap (FDINO_DECODE_CACHE_MAX_GB={math.ceil(estimate * 1.1 / GB * 10) / 10:g})"
    return (
        f"decoding the {n_images} images of {root!r} once needs {need_text}{short} (uint8 RGB at each file's "
        f"own size). Either {raise_it}, shrink the files on disk to about the training size ({image_size} px), "
        f"or turn the cache off (FDINO_DECODE_CACHE=off: every image is then decoded on every access, slower)."
    )


# --- I/O: stats, headers, decoding, files ------------------------------------------------------------
def _file_stats(paths: list[str]) -> list[tuple[int, int]]:
    stats = []
    for path in paths:
        try:
            st = os.stat(path)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:  # gone since the listing: the decode records it as a bad file
            stats.append((-1, -1))
    return stats


def _header_bytes(paths: list[str], limit: int) -> tuple[int, int]:
    """``(decoded bytes, files counted)`` from image headers, stopping once past ``limit``."""
    total = 0
    for counted, path in enumerate(paths, 1):
        with contextlib.suppress(Exception):  # a bad file: its decode records why, at no cost here
            with Image.open(path) as image:
                total += 3 * image.width * image.height  # EXIF rotation swaps H and W, not their product
        if total > limit:
            return total, counted
    return total, len(paths)


def _decode(path: str) -> np.ndarray | BadImageError:
    """The pixels `ImageFolder` would give for ``path``, as uint8 ``[3, H, W]``, or the error it would raise."""
    try:
        image = load_rgb(path)
    except BadImageError as e:
        return e
    return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))


def _read_index(folder: Path, key: str, n: int) -> dict[str, np.ndarray] | None:
    """A complete cache's index, or None when absent or not whole (then it is rebuilt)."""
    try:
        with np.load(folder / "index.npz", allow_pickle=False) as z:
            index = {name: z[name] for name in z.files}
        ok = str(index["key"]) == key and len(index["offsets"]) == n + 1
        return index if ok and os.path.getsize(folder / "pixels.u8") == int(index["offsets"][-1]) else None
    except (OSError, KeyError, ValueError):
        return None


def _write_cache(paths: list[str], final: Path, key: str) -> None:
    """Decode every file into ``final`` (a partial folder renamed into place when complete)."""
    partial = final.parent / f".partial-{key}-{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    try:
        offsets = np.zeros(len(paths) + 1, np.int64)
        shapes = np.zeros((len(paths), 2), np.int64)
        bad: dict[int, str] = {}
        # Pillow releases the GIL while it decodes, so threads decode in parallel.
        with open(partial / "pixels.u8", "wb") as f, ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(paths), _CHUNK):
                for i, pixels in enumerate(pool.map(_decode, paths[start : start + _CHUNK]), start):
                    if isinstance(pixels, BadImageError):
                        bad[i], offsets[i + 1] = pixels.reason, offsets[i]
                        continue
                    f.write(pixels.data)
                    shapes[i], offsets[i + 1] = pixels.shape[1:], offsets[i] + pixels.size
            f.flush()
            os.fsync(f.fileno())
        with open(partial / "index.npz", "wb") as f:
            np.savez(
                f,
                key=np.array(key),
                offsets=offsets,
                shapes=shapes,
                bad_index=np.array(sorted(bad), np.int64),
                bad_reason=np.array([bad[i] for i in sorted(bad)], np.str_),
            )
            f.flush()
            os.fsync(f.fileno())
        os.rename(partial, final)  # atomic: readers see no cache or a whole one
    finally:
        shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        yield


# --- the data set ------------------------------------------------------------------------------------
class DecodedImageFolder(Dataset):
    """`ImageFolder`'s items from its decode cache: ``(uint8 tensor [3, H, W], label)``.

    Same ``root``, ``paths``, ``labels``, ``classes`` and order as the `ImageFolder` it was made
    from; items are read-only views of the mapped file (copy-on-write: writing to one changes
    this process's copy, never the file).
    """

    def __init__(self, folder: ImageFolder, cache: str | os.PathLike, index: dict[str, np.ndarray]) -> None:
        self.root, self.paths, self.labels, self.classes = folder.root, folder.paths, folder.labels, folder.classes
        self.cache = os.fspath(cache)
        self._offsets = index["offsets"].tolist()
        self._shapes = index["shapes"].tolist()
        self._bad = dict(zip(index["bad_index"].tolist(), index["bad_reason"].tolist(), strict=True))
        self._pixels: torch.Tensor | None = None  # mapped on first access, in each process

    def _storage(self) -> torch.Tensor:
        if self._pixels is None:
            size = self._offsets[-1]
            path = os.path.join(self.cache, "pixels.u8")
            self._pixels = (
                torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
                if size
                else torch.empty(0, dtype=torch.uint8)
            )
        return self._pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = range(len(self.paths))[index]  # negative indices as lists take them; IndexError past the end
        if index in self._bad:
            raise BadImageError(self.paths[index], self._bad[index])
        height, width = self._shapes[index]
        pixels = self._storage()[self._offsets[index] : self._offsets[index + 1]]
        return pixels.view(3, height, width), self.labels[index]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}  # workers map the file themselves: no pixels in the pickle

    def __repr__(self) -> str:
        return (
            f"DecodedImageFolder({self.root!r}, {len(self)} images, {len(self.classes)} classes, cache {self.cache!r})"
        )


def decoded_folder(
    folder: ImageFolder, *, image_size: int, options: DecodeCacheOptions | None = None
) -> ImageFolder | DecodedImageFolder:
    """``folder`` served from its decode cache (built on first use), or ``folder`` itself when the
    options say not to cache it; see the module docstring for the policy."""
    options = options if options is not None else DecodeCacheOptions.from_env()
    if not options.wanted(image_size):
        return folder
    directory = options.resolved_directory()
    key = cache_key(folder.paths, _file_stats(folder.paths), _codec_versions())
    try:
        index = _read_index(directory / key, key, len(folder))
        if index is None:
            index = _build(folder, directory, key, options.max_bytes, image_size)
    except (OSError, DecodeCacheTooLargeError) as e:  # too big, a read-only folder, a full disk
        if options.mode == "on":
            raise
        warnings.warn(f"{e} (FDINO_DECODE_CACHE=auto: decoding every image on every access)", stacklevel=2)
        return folder
    return DecodedImageFolder(folder, directory / key, index)


def _build(folder: ImageFolder, directory: Path, key: str, cap: int, image_size: int) -> dict[str, np.ndarray]:
    final = directory / key
    with _locked(directory / f"{key}.lock"):
        index = _read_index(final, key, len(folder))  # another process may have built it while we waited
        if index is not None:
            return index
        problem = _does_not_fit(folder, directory, cap, image_size)
        if problem is not None:
            raise DecodeCacheTooLargeError(problem)
        for stale in [final, *directory.glob(f".partial-{key}-*")]:  # ours to clear: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        _write_cache(folder.paths, final, key)
    index = _read_index(final, key, len(folder))
    if index is None:
        raise OSError(f"the decode cache {final} was written but does not read back whole")
    return index


def _does_not_fit(folder: ImageFolder, directory: Path, cap: int, image_size: int) -> str | None:
    need, counted = _header_bytes(folder.paths, cap)
    if need > cap:
        return too_large_message(folder.root, len(folder), need, counted, cap, image_size)
    free = shutil.disk_usage(directory).free
    if need > free:
        return too_large_message(folder.root, len(folder), need, counted, cap, image_size, free=free)
    return None


__all__ = [
    "DecodeCacheOptions",
    "DecodeCacheTooLargeError",
    "DecodedImageFolder",
    "decoded_folder",
    "cache_key",
    "too_large_message",
    "DECODE_VERSION",
]
