"""Decoding image files into RGB, and the error raised for files that cannot be decoded.

`load_rgb` decodes eagerly (``Image.load``), so a corrupt or truncated file fails here, where the
loader can skip it, and not later inside an augmentation, and turns the image upright by its EXIF
orientation (a phone photo stored sideways with orientation 6 is shown, trained on, indexed and
served as the upright picture; `fdino.serve` decodes uploads the same way). `to_rgb` converts every PIL mode to
8-bit RGB *correctly*: PIL's own ``convert("RGB")`` saturates 16-bit images (anything above 255
becomes white) and drops alpha without compositing.
"""

from __future__ import annotations

import contextlib
import os
import struct

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white, as image viewers do


class BadImageError(Exception):
    """A file that could not be decoded as an image; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot load image {os.fspath(path)!r}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason

    def __reduce__(self):  # picklable, so it can cross from a DataLoader worker to the main process
        return (type(self), (self.path, self.reason))


def has_image_extension(name: str) -> bool:
    """True for file names ending in one of `IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Modes I;16*, I (32-bit int) and F (float) -> RGB, rescaling instead of clipping.

    Integer modes are rescaled in place in uint32 (a 40-megapixel 16-bit image peaks at ~10 bytes
    per pixel here, not the ~22 of int64 temporaries); the values are those of
    ``(clip(a, 0, 65535) * 255 + 32767) // 65535``."""
    a = np.asarray(image)
    if image.mode == "F":
        a = a.astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        # Floats in [0, 1] are intensities; anything larger is taken to be on the 8-bit scale.
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
        out = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    # I;16 is 16-bit by definition; mode I (PNG/TIFF 16-bit in some decoders) is treated as
    # 16-bit when it uses values above 255, as 8-bit otherwise.
    elif image.mode.startswith("I;16") or (a.size and a.max() > 255):
        if a.dtype.kind == "u":
            wide = a.astype(np.uint32)
        else:  # mode I: clipped to [0, 65535], then the same bits read as uint32 (no second copy)
            wide = np.clip(a, 0, 65535)
            wide = wide.view(np.uint32) if wide.dtype == np.int32 else wide.astype(np.uint32)
        wide *= 255  # at most 65535 * 255 + 32767 < 2**32
        wide += 32767
        wide //= 65535
        out = wide.astype(np.uint8)
    else:
        out = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(out).convert("RGB")  # L -> RGB repeats the grey level, without a 3-channel copy


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: alpha composited over white, 16-bit rescaled, palettes expanded."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "F") or mode.startswith("I;"):
        return _high_bit_depth_to_rgb(image)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image if mode == "RGBA" else image.convert("RGBA")  # (convert to the same mode copies)
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P (opaque), CMYK, YCbCr, LAB, HSV


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """``image``, loaded, turned upright in place by its EXIF orientation (2-8; `PIL.ImageOps.exif_transpose`).

    The rotation copies the decoded pixels once and releases the original; without a tag nothing is copied."""
    # A malformed EXIF block leaves the image as stored: orientation is a nicety, not a reason to drop a file.
    with contextlib.suppress(OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode the file at ``path`` to an upright RGB PIL image, or raise `BadImageError` saying why."""
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(path, "empty file (zero bytes)")
        with Image.open(path) as image:
            image.load()  # decode now: truncated data raises here (LOAD_TRUNCATED_IMAGES stays off)
            return to_rgb(apply_exif_orientation(image))
    except BadImageError:
        raise
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        raise BadImageError(path, f"{type(e).__name__}: {e}") from e


__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "apply_exif_orientation",
    "has_image_extension",
    "to_rgb",
    "load_rgb",
]
