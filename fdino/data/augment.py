"""Multi-crop augmentation (Caron et al. 2021, section 3.1 and appendix) as sampled parameters.

A view is made in two pure steps: `sample_views` draws every random choice of every crop from a
`random.Random` (crop box, flip, jitter factors and order, grayscale, blur sigma, solarize), and
`render_view` applies them with `torchvision.transforms.v2.functional` kernels. Splitting the two
makes the augmentation a pure function of (image, seed), keeps the global RNGs of torch, numpy
and `random` untouched, and lets tests check the recipe's probabilities without touching pixels.

The paper's recipe (reference code `DataAugmentationDINO`), all of it configurable:
  global crop k: RandomResizedCrop(scale (0.4, 1), bicubic) -> flip p=0.5 -> colour jitter
      (0.4, 0.4, 0.2, 0.1) p=0.8 -> grayscale p=0.2 -> Gaussian blur (p=1.0 for the first,
      0.1 for the second; sigma in [0.1, 2]) -> solarize (p=0 first, 0.2 second) -> normalize.
  local crops: scale (0.05, 0.4) -> 96 px, same flip/jitter/grayscale, blur p=0.5, no solarize.
Deviation: the reference blurs with PIL's GaussianBlur(radius=sigma) on the whole support; here
the kernel is an odd size of about `blur_kernel_fraction` of the crop side (SimCLR's rule), so a
blur costs the same relative effort at every resolution.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..checks import check_int, fail, is_number
from ..config import MAX_GLOBAL_CROPS, MAX_LOCAL_CROPS
from .batch_augment import blur_kernel_size, render_batch
from .images import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
_SMALL_IMAGE_MAX = 64  # global crops at most this big get the small-image blur (see small_image_multicrop)


@dataclass(frozen=True, kw_only=True)
class MultiCropConfig:
    """All settings of the multi-crop augmentation. Crop k of V: globals first, then locals."""

    n_global_crops: int = 2
    """Global crops per image (the teacher's inputs)."""
    n_local_crops: int = 8
    """Local crops per image (student only); the reference code's default is 8."""
    global_crop_size: int = 224
    """Side of a global crop in pixels."""
    local_crop_size: int = 96
    """Side of a local crop in pixels."""
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    """RandomResizedCrop area fraction range of global crops."""
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    """RandomResizedCrop area fraction range of local crops."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range (sampled log-uniformly)."""
    interpolation: str = "bicubic"
    """Resize filter: 'bicubic' (paper), 'bilinear' or 'nearest'; antialiased when shrinking."""
    flip_p: float = 0.5
    """Probability of a horizontal flip."""
    jitter_p: float = 0.8
    """Probability of applying colour jitter."""
    brightness: float = 0.4
    """Brightness factor range [1 - b, 1 + b]."""
    contrast: float = 0.4
    """Contrast factor range [1 - c, 1 + c]."""
    saturation: float = 0.2
    """Saturation factor range [1 - s, 1 + s]."""
    hue: float = 0.1
    """Hue shift range [-h, h] (fraction of the colour wheel)."""
    grayscale_p: float = 0.2
    """Probability of converting to grayscale (kept as 3 channels)."""
    global_blur_p: tuple[float, ...] = (1.0, 0.1)
    """Blur probability of global crop k (the last entry serves further globals)."""
    local_blur_p: float = 0.5
    """Blur probability of each local crop."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range in pixels (uniform)."""
    blur_kernel_fraction: float = 0.1
    """Blur kernel side as a fraction of the crop side, rounded to an odd size >= 3."""
    global_solarize_p: tuple[float, ...] = (0.0, 0.2)
    """Solarization probability of global crop k (the last entry serves further globals)."""
    local_solarize_p: float = 0.0
    """Solarization probability of each local crop."""
    solarize_threshold: int = 128
    """Pixels >= this (uint8 scale) are inverted by solarization, as in PIL's ImageOps.solarize."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted at the end (ImageNet's)."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation divided at the end (ImageNet's)."""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def n_crops(self) -> int:
        """V: all crops per image, global first."""
        return self.n_global_crops + self.n_local_crops

    def replace(self, **changes: Any) -> MultiCropConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dino_config(cls, cfg: Any, **overrides: Any) -> MultiCropConfig:
        """Crop counts, sizes and scales from a `DinoConfig`, then its ``augment`` overrides; the
        rest is the paper's recipe.

        Global crops of at most 64 px get `small_image_multicrop`'s blur (see there).
        """
        fields = dict(
            n_global_crops=cfg.n_global_crops,
            n_local_crops=cfg.n_local_crops,
            global_crop_size=cfg.global_crop_size,
            local_crop_size=cfg.local_crop_size,
            global_crop_scale=tuple(cfg.global_crop_scale),
            local_crop_scale=tuple(cfg.local_crop_scale),
        )
        if cfg.global_crop_size <= _SMALL_IMAGE_MAX:
            fields.update(_SMALL_IMAGE_BLUR)
        known = {f.name for f in dataclasses.fields(cls)}
        for name, value in getattr(cfg, "augment", ()):
            if name not in known or name in _FROM_CROP_FIELDS:
                raise ValueError(
                    f"DinoConfig.augment has {name!r}, which is not an augmentation setting; allowed: "
                    f"{sorted(known - _FROM_CROP_FIELDS)}"
                )
            fields[name] = tuple(value) if isinstance(value, list) else value
        fields.update(overrides)
        return cls(**fields)


# Set from DinoConfig's own crop fields, so not overridable through DinoConfig.augment.
_FROM_CROP_FIELDS = frozenset(
    {"n_global_crops", "n_local_crops", "global_crop_size", "local_crop_size", "global_crop_scale", "local_crop_scale"}
)

# Sigma 2 px is ~1% of a 224 px crop but 6% of a 32 px one (it erases a CIFAR object); halve the
# range for small images. The kernel rule already gives 3x3 kernels at 16-32 px.
_SMALL_IMAGE_BLUR = {"blur_sigma": (0.1, 1.0)}


def small_image_multicrop(**overrides: Any) -> MultiCropConfig:
    """Preset for CIFAR-sized data: 2 x 32 px global, 6 x 16 px local, smaller blur."""
    fields = dict(global_crop_size=32, local_crop_size=16, n_local_crops=6, **_SMALL_IMAGE_BLUR)
    fields.update(overrides)
    return MultiCropConfig(**fields)


def _fail(name: str, value: Any, allowed: str) -> None:
    fail(f"MultiCropConfig.{name}", value, allowed)


def _is_number(v: Any) -> bool:
    return is_number(v) and math.isfinite(v)


def _validate(c: MultiCropConfig) -> None:
    for name, lo, hi in (
        ("n_global_crops", 1, MAX_GLOBAL_CROPS),
        ("n_local_crops", 0, MAX_LOCAL_CROPS),
        ("global_crop_size", 1, 4096),
        ("local_crop_size", 1, 4096),
        ("solarize_threshold", 0, 256),
    ):
        check_int(f"MultiCropConfig.{name}", getattr(c, name), lo, hi)
    if c.n_crops < 2:
        _fail("n_local_crops", c.n_local_crops, "at least 1 when n_global_crops is 1 (DINO needs pairs)")
    for name in ("global_crop_scale", "local_crop_scale"):
        v = getattr(c, name)
        if not (isinstance(v, tuple) and len(v) == 2 and all(map(_is_number, v)) and 0 < v[0] <= v[1] <= 1):
            _fail(name, v, "a pair (lo, hi) with 0 < lo <= hi <= 1")
    r = c.crop_ratio
    if not (isinstance(r, tuple) and len(r) == 2 and all(map(_is_number, r)) and 0 < r[0] <= r[1]):
        _fail("crop_ratio", r, "a pair (lo, hi) with 0 < lo <= hi")
    if c.interpolation not in _INTERPOLATIONS:
        _fail("interpolation", c.interpolation, f"one of {tuple(_INTERPOLATIONS)}")
    for name in ("flip_p", "jitter_p", "grayscale_p", "local_blur_p", "local_solarize_p"):
        v = getattr(c, name)
        if not (_is_number(v) and 0 <= v <= 1):
            _fail(name, v, "a probability in [0, 1]")
    for name in ("global_blur_p", "global_solarize_p"):
        v = getattr(c, name)
        if not (isinstance(v, tuple) and len(v) >= 1 and all(_is_number(p) and 0 <= p <= 1 for p in v)):
            _fail(name, v, "a non-empty tuple of probabilities in [0, 1]")
    for name, hi in (("brightness", 1.0), ("contrast", 1.0), ("saturation", 1.0), ("hue", 0.5)):
        v = getattr(c, name)
        if not (_is_number(v) and 0 <= v <= hi):
            _fail(name, v, f"values in [0, {hi}]")
    s = c.blur_sigma
    if not (isinstance(s, tuple) and len(s) == 2 and all(map(_is_number, s)) and 0 < s[0] <= s[1]):
        _fail("blur_sigma", s, "a pair (lo, hi) with 0 < lo <= hi")
    if not (_is_number(c.blur_kernel_fraction) and 0 < c.blur_kernel_fraction <= 1):
        _fail("blur_kernel_fraction", c.blur_kernel_fraction, "values in (0, 1]")
    for name in ("mean", "std"):
        v = getattr(c, name)
        if not (isinstance(v, tuple) and len(v) == 3 and all(map(_is_number, v))):
            _fail(name, v, "a tuple of 3 numbers")
    if not all(x > 0 for x in c.std):
        _fail("std", c.std, "positive numbers")


# --- parameter sampling (pure Python, explicit RNG) -----------------------------------------------
class ViewParams(NamedTuple):
    """Every random choice of one crop. ``jitter`` is None or ((order of b,c,s,h), b, c, s, h)."""

    top: int
    left: int
    height: int
    width: int
    size: int
    flip: bool
    jitter: tuple | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], rng: random.Random, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with an explicit RNG: ``(top, left, h, w)``.

    The one copy of the box draw: the multi-crop views and the linear probe's training views use it.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.random() * (height - h + 1)), int(rng.random() * (width - w + 1)), h, w
    # Fallback (extreme aspect ratios or tiny images): the largest centered crop within `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _sample_view(
    rng: random.Random,
    c: MultiCropConfig,
    height: int,
    width: int,
    *,
    size: int,
    scale,
    blur_p: float,
    solarize_p: float,
) -> ViewParams:
    top, left, h, w = random_resized_crop_box(height, width, scale, rng, c.crop_ratio)
    flip = rng.random() < c.flip_p
    jitter = None
    if rng.random() < c.jitter_p:
        order = [0, 1, 2, 3]
        rng.shuffle(order)
        jitter = (
            tuple(order),
            rng.uniform(max(0.0, 1 - c.brightness), 1 + c.brightness),
            rng.uniform(max(0.0, 1 - c.contrast), 1 + c.contrast),
            rng.uniform(max(0.0, 1 - c.saturation), 1 + c.saturation),
            rng.uniform(-c.hue, c.hue),
        )
    grayscale = rng.random() < c.grayscale_p
    sigma = rng.uniform(*c.blur_sigma) if rng.random() < blur_p else None
    solarize = rng.random() < solarize_p
    return ViewParams(top, left, h, w, size, flip, jitter, grayscale, sigma, solarize)


def sample_views(c: MultiCropConfig, height: int, width: int, rng: random.Random) -> list[ViewParams]:
    """The parameters of all V crops of one ``height x width`` image, globals first."""
    views = []
    for k in range(c.n_global_crops):
        views.append(
            _sample_view(
                rng,
                c,
                height,
                width,
                size=c.global_crop_size,
                scale=c.global_crop_scale,
                blur_p=c.global_blur_p[min(k, len(c.global_blur_p) - 1)],
                solarize_p=c.global_solarize_p[min(k, len(c.global_solarize_p) - 1)],
            )
        )
    for _ in range(c.n_local_crops):
        views.append(
            _sample_view(
                rng,
                c,
                height,
                width,
                size=c.local_crop_size,
                scale=c.local_crop_scale,
                blur_p=c.local_blur_p,
                solarize_p=c.local_solarize_p,
            )
        )
    return views


# --- rendering (torchvision v2 kernels) -------------------------------------------------------------
def as_uint8_chw(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image (any mode) or uint8 tensor ``[C, H, W]`` / ``[H, W]`` -> uint8 ``[3, H, W]``."""
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(to_rgb(image))
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
        raise TypeError(
            f"expected a PIL image or a uint8 tensor, got {type(image).__name__} {getattr(image, 'dtype', '')}"
        )
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [1|3, H, W], got shape {tuple(image.shape)}")
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


_JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def render_view(image: torch.Tensor, v: ViewParams, c: MultiCropConfig) -> torch.Tensor:
    """Apply one view's parameters: uint8 ``[3, H, W]`` -> normalized float32 ``[3, size, size]``."""
    crop = TF.resized_crop(
        image,
        v.top,
        v.left,
        v.height,
        v.width,
        [v.size, v.size],
        interpolation=_INTERPOLATIONS[c.interpolation],
        antialias=True,
    )
    if v.flip:
        crop = TF.horizontal_flip(crop)
    x = crop.float().div_(255.0)  # float from here on: one rounding instead of one per op
    if v.jitter is not None:
        order, *factors = v.jitter
        for i in order:
            x = _JITTER_OPS[i](x, factors[i])
    if v.grayscale:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if v.blur_sigma is not None:
        k = blur_kernel_size(v.size, c.blur_kernel_fraction)
        x = TF.gaussian_blur(x, [k, k], [v.blur_sigma, v.blur_sigma])
    if v.solarize:
        x = torch.where(x >= c.solarize_threshold / 255.0, 1.0 - x, x)
    return TF.normalize(x, list(c.mean), list(c.std))


class MultiCrop:
    """The multi-crop augmentation: image(s) -> V crops each, globals first.

    ``MultiCrop(cfg)(image, seed)`` maps one image (PIL or uint8 tensor) to a list of V float
    tensors ``[3, S_k, S_k]``; it is a pure function of (image, seed). Without a seed, fresh OS
    entropy is used (not reproducible). `batch` does the same for many images at once (the loaders'
    fast path, `fdino.data.batch_augment`); `reference` renders the same parameters with torchvision's
    v2 kernels one crop at a time (slow; the yardstick the fast path is tested against).
    """

    def __init__(self, cfg: MultiCropConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else MultiCropConfig()

    def views(self, image: torch.Tensor, seed: int | None) -> list[ViewParams]:
        """The sampled parameters of the V crops of a uint8 ``[3, H, W]`` image."""
        rng = random.Random(seed) if seed is not None else random.Random()
        return sample_views(self.cfg, image.shape[-2], image.shape[-1], rng)

    def batch(self, images: Sequence[Image.Image | torch.Tensor], seeds: Sequence[int]) -> list[torch.Tensor]:
        """B images (sizes may differ) with one seed each -> V tensors ``[B, 3, S_k, S_k]``."""
        arrays = [as_uint8_chw(im) for im in images]
        return render_batch(arrays, [self.views(a, s) for a, s in zip(arrays, seeds, strict=True)], self.cfg)

    def __call__(self, image: Image.Image | torch.Tensor, seed: int | None = None) -> list[torch.Tensor]:
        return [c[0] for c in self.batch([image], [seed])]

    def reference(self, image: Image.Image | torch.Tensor, seed: int | None = None) -> list[torch.Tensor]:
        """Same parameters as ``self(image, seed)``, rendered with torchvision v2 kernels."""
        image = as_uint8_chw(image)
        return [render_view(image, v, self.cfg) for v in self.views(image, seed)]

    def __repr__(self) -> str:
        return f"MultiCrop({self.cfg!r})"


class EvalTransform:
    """Callable: one image -> normalized float ``[3, size, size]`` (resize shorter side, center crop).

    ``resize_size`` defaults to ``size`` for small images (<= 64 px: no crop, the whole object)
    and to ``size * 256 / 224`` otherwise (the usual ImageNet evaluation view).
    """

    def __init__(
        self,
        size: int,
        *,
        resize_size: int | None = None,
        interpolation: str = "bicubic",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        check_int("EvalTransform size", size, lo=1)
        if resize_size is None:
            resize_size = size if size <= _SMALL_IMAGE_MAX else int(round(size * 256 / 224))
        if resize_size < size:
            raise ValueError(f"EvalTransform resize_size={resize_size} is invalid: allowed >= size={size}")
        self.size, self.resize_size = size, resize_size
        self.interpolation = _INTERPOLATIONS[interpolation]
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        x = as_uint8_chw(image)
        x = TF.resize(x, [self.resize_size], interpolation=self.interpolation, antialias=True)
        x = TF.center_crop(x, [self.size, self.size])
        return TF.normalize(x.float().div_(255.0), self.mean, self.std)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropConfig",
    "small_image_multicrop",
    "ViewParams",
    "blur_kernel_size",
    "sample_views",
    "render_view",
    "as_uint8_chw",
    "MultiCrop",
    "EvalTransform",
]
