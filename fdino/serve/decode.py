"""Decoding uploads safely: accepted formats, a memory budget checked from the header, EXIF orientation.

An upload's cost is decided by its header, not its size: a 100 KB PNG can claim 4,000,000 x 10
pixels (resizing its short side to 256 px asks for ~73 GiB), a 16-bit or RGBA 40-megapixel PNG
costs about 1 GB on its way to a model input. So, before any pixel is decoded, `decode_image`
opens the header with only the documented formats' plugins (`ACCEPTED_FORMATS`) and refuses with
`UploadError`:
  * 415 for another format (TIFF, PSD, EPS, ...: their decoders are never run) or pixel mode;
  * 413 for more than ``max_pixels`` pixels, an aspect ratio beyond ``max_aspect_ratio``, or an
    estimated working set (`decode_cost`) beyond ``max_decode_bytes``.
Then it decodes, applies the EXIF orientation (`PIL.ImageOps.exif_transpose`, as `load_rgb` does
for training and the index) and converts to RGB (`fdino.data.images.to_rgb`).
"""

from __future__ import annotations

import io
import math

from ..data.images import apply_exif_orientation, to_rgb

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
"""PIL format names an upload may have (GIF: the first frame)."""
ACCEPTED_TEXT = "JPEG, PNG, WebP, BMP or GIF (first frame)"

# Peak bytes per source pixel of decode + EXIF rotation + `to_rgb` + `EvalTransform` (resize, crop), by
# PIL mode: the most measured with Pillow 12 / torch 2.11 on 3-4 megapixel images (VmHWM growth of a
# fresh process), rounded up by 10-20%: RGB 12.5 -> 14, L/P 12.8 -> 14, CMYK 16.3 -> 18, RGBA
# (composited over white) 18.7 -> 20, LA 19.8 -> 22, 16-bit grey (rescaled in uint32) 13.6 -> 16;
# 32-bit I (not measured: no accepted format decodes to it) 20. WebP's decoder holds an extra
# buffer: measured +8.2, counted +12. Images with a transparent colour are counted as LA.
BYTES_PER_PIXEL = {
    "1": 14,
    "L": 14,
    "P": 14,
    "RGB": 14,
    "YCbCr": 14,
    "CMYK": 18,
    "LA": 22,
    "La": 22,
    "PA": 22,
    "RGBA": 20,
    "RGBa": 20,
    "I;16": 16,
    "I;16B": 16,
    "I;16L": 16,
    "I": 20,
}
FORMAT_EXTRA_BYTES_PER_PIXEL = {"WEBP": 12}
RESIZED_BYTES_PER_PIXEL = 8  # per pixel of the resized (not yet cropped) image: measured 3.2-4.2
_MAGIC = (  # formats people upload that the service does not open, for a message that names them
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"8BPS", "PSD"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


class UploadError(Exception):
    """A client error: ``status`` (4xx) and a message that names the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _sniff(data: bytes) -> str | None:
    head = data[:32]
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF" if head[8:12] in (b"heic", b"heix", b"mif1", b"avif", b"avis") else "MP4/QuickTime"
    if head.lstrip().startswith((b"<svg", b"<?xml")):
        return "SVG/XML"
    return None


def _not_accepted(data: bytes) -> UploadError:
    name = _sniff(data)
    what = f"a {name} file" if name else "not an image in any format this service reads"
    return UploadError(415, f"{what}: upload a {ACCEPTED_TEXT} file (convert it first, e.g. to PNG)")


def resized_pixels(width: int, height: int, resize_size: int) -> int:
    """Pixels of the image after `EvalTransform`'s resize of its shorter side to ``resize_size``."""
    if resize_size <= 0:
        return 0
    short, long = min(width, height), max(width, height)
    return resize_size * math.ceil(resize_size * long / max(short, 1))


def decode_cost(width: int, height: int, mode: str, image_format: str, *, resize_size: int = 0) -> int:
    """Estimated peak bytes of decoding a ``width x height`` image of PIL ``mode`` and converting it to a
    model input (resize of the short side to ``resize_size``); KeyError for modes not in `BYTES_PER_PIXEL`."""
    per_pixel = BYTES_PER_PIXEL[mode] + FORMAT_EXTRA_BYTES_PER_PIXEL.get(image_format, 0)
    return width * height * per_pixel + resized_pixels(width, height, resize_size) * RESIZED_BYTES_PER_PIXEL


def check_header(
    image,
    *,
    max_pixels: int,
    max_aspect_ratio: float,
    max_decode_bytes: int,
    resize_size: int = 0,
) -> int:
    """Refuse an opened, not yet decoded PIL image from its header; returns its `decode_cost`."""
    width, height, mode = *image.size, image.mode
    if width < 1 or height < 1:
        raise UploadError(415, f"not a decodable image: the header claims {width} x {height} pixels")
    if width * height > max_pixels:
        raise UploadError(
            413,
            f"image of {width} x {height} pixels exceeds the limit of {max_pixels} pixels "
            f"(ServiceConfig.max_pixels): downscale it before uploading",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise UploadError(
            413,
            f"image of {width} x {height} pixels is too large to preprocess: its aspect ratio {ratio:.0f}:1 "
            f"exceeds the limit of {max_aspect_ratio:g}:1 (ServiceConfig.max_aspect_ratio); crop it to a "
            f"less elongated region",
        )
    if "transparency" in image.info and mode in ("1", "L", "P", "RGB"):
        mode = "LA"  # converted to RGBA and composited over white like an alpha channel (see to_rgb)
    try:
        cost = decode_cost(width, height, mode, image.format or "", resize_size=resize_size)
    except KeyError:
        raise UploadError(
            415,
            f"unsupported pixel mode {image.mode!r} ({image.format}): upload an 8-bit RGB, RGBA or "
            f"grayscale image, or 16-bit grayscale",
        ) from None
    if cost > max_decode_bytes:
        fit = int(max_decode_bytes / cost * width * height / 1e6 * 10) / 10
        cheap = BYTES_PER_PIXEL[mode] <= BYTES_PER_PIXEL["RGB"]
        raise UploadError(
            413,
            f"image too large to decode within the memory limit: {width} x {height} pixels of mode "
            f"{image.mode} ({image.format}) need about {cost / 2**20:.0f} MiB; the limit per request is "
            f"{max_decode_bytes / 2**20:.0f} MiB (ServiceConfig.max_decode_bytes, fdino serve --max-decode-mb). "
            f"Downscale it to at most {fit} megapixels" + ("" if cheap else ", or convert it to 8-bit RGB"),
        )
    return cost


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    max_aspect_ratio: float = 20.0,
    max_decode_bytes: int = 512 * 2**20,
    resize_size: int = 0,
):
    """Upload bytes -> upright RGB PIL image, or `UploadError`: 400 empty; 413 over a limit checked on the
    header (pixels, aspect ratio, estimated memory, see `check_header`); 415 not an accepted image."""
    from PIL import Image  # noqa: PLC0415

    if not data:
        raise UploadError(400, "empty upload: the file has zero bytes")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            check_header(
                image,
                max_pixels=max_pixels,
                max_aspect_ratio=max_aspect_ratio,
                max_decode_bytes=max_decode_bytes,
                resize_size=resize_size,
            )
            image.load()  # decode now: truncated or corrupt data fails here
            return to_rgb(apply_exif_orientation(image))
    except UploadError:
        raise
    except Image.DecompressionBombError as e:  # the header claims over 2x PIL's MAX_IMAGE_PIXELS
        raise UploadError(413, f"image too large to decode safely: {e}") from None
    except Image.UnidentifiedImageError:
        raise _not_accepted(data) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise UploadError(415, f"not a decodable image: {type(e).__name__}: {e} (truncated or corrupt file?)") from None


__all__ = [
    "ACCEPTED_FORMATS",
    "BYTES_PER_PIXEL",
    "UploadError",
    "check_header",
    "decode_cost",
    "decode_image",
    "resized_pixels",
]
