"""Fast path: render the sampled views of a whole batch at once.

`fdino.data.augment.render_view` applies one view with torchvision's v2 kernels (the reference);
per-call overhead makes that about 0.5 ms per 16 px crop, i.e. most of a training step's budget
on 2 cores. `render_batch` applies the *same parameters* with the same formulas, batched:

  * crop + resize + flip is one separable linear map per sample, ``Wy[b] @ img[b] @ Wx[b]^T``,
    with antialiased bicubic weights (Keys a = -0.5, support stretched when shrinking, as in
    torchvision's ``antialias=True``) restricted to the crop box; a flip reverses Wx's rows.
  * jitter in each sample's own random order, grayscale, blur (per-sample Gaussian kernels, one
    grouped convolution, reflect padding) and solarization act on the sample subsets that drew them.

Every op is per sample, so a sample's crops do not depend on the rest of its batch. The torch
calls run with one intra-op thread: reductions (contrast mean) and matmuls then give the same
bits in the main process and in (single-threaded) DataLoader workers, and OpenMP barriers cannot
stall on a busy 2-core machine. Differences from the reference are float rounding only (the
reference rounds to uint8 after resizing); `tests/test_data_augment.py` bounds them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@contextlib.contextmanager
def single_thread():
    """Run torch ops with one intra-op thread, restoring the caller's setting afterwards."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def blur_kernel_size(crop_size: int, fraction: float) -> int:
    """Odd kernel side of about ``fraction * crop_size``, at least 3 (e.g. 224 -> 23, 96 -> 9, 32 -> 3)."""
    k = int(fraction * crop_size)
    return max(3, k if k % 2 else k + 1)


def _filter(d: np.ndarray, interpolation: str) -> np.ndarray:
    a = np.abs(d)
    if interpolation == "bilinear":
        return np.clip(1.0 - a, 0.0, None)
    k = -0.5  # Keys' cubic with a = -0.5, as in PIL and torchvision's antialiased bicubic
    near = ((k + 2) * a - (k + 3)) * a * a + 1
    far = ((k * a - 5 * k) * a + 8 * k) * a - 4 * k
    return np.where(a < 1, near, np.where(a < 2, far, 0.0))


def resample_matrix(in_len: int, start: int, length: int, out_len: int, interpolation: str = "bicubic") -> np.ndarray:
    """``[out_len, in_len]`` float32 weights resampling pixels ``[start, start + length)`` to ``out_len``.

    Pixel centers sit at half-integers (align_corners=False). Pixels outside the box get weight 0,
    so the box edge behaves like an image edge, as in torchvision's resized_crop.
    """
    if in_len * out_len <= _CACHE_MAX_ELEMENTS:  # small images: few distinct boxes, worth caching
        return _cached_matrix(in_len, start, length, out_len, interpolation)
    return _matrix(in_len, start, length, out_len, interpolation)


_CACHE_MAX_ELEMENTS = 128 * 128  # at most 64 KiB per cached matrix; 4096 of them at most 256 MiB


def _matrix(in_len: int, start: int, length: int, out_len: int, interpolation: str) -> np.ndarray:
    scale = length / out_len
    src = np.arange(start, start + length, dtype=np.float64) + 0.5
    centers = start + scale * (np.arange(out_len, dtype=np.float64) + 0.5)
    m = np.zeros((out_len, in_len), dtype=np.float64)
    if interpolation == "nearest":
        m[np.arange(out_len), start + np.minimum((scale * np.arange(out_len)).astype(np.int64), length - 1)] = 1
        return m.astype(np.float32)
    stretch = max(scale, 1.0)  # antialias: widen the filter by the shrink factor
    w = _filter((src[None, :] - centers[:, None]) / stretch, interpolation)
    m[:, start : start + length] = w / w.sum(axis=1, keepdims=True)
    m = m.astype(np.float32)
    m.flags.writeable = False  # shared through the cache
    return m


_cached_matrix = functools.lru_cache(maxsize=4096)(_matrix)


# --- colour ops on [N, 3, S, S] in [0, 1] with per-sample factors [N] ------------------------------
def _gray(x: torch.Tensor) -> torch.Tensor:  # [N, 1, S, S]
    return (_GRAY[0] * x[:, 0] + _GRAY[1] * x[:, 1] + _GRAY[2] * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _brightness(x, f):
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def _contrast(x, f):
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def _saturation(x, f):
    return _blend(x, _gray(x), f)


def _hue(x, h):
    """Rotate hue by ``h`` (fraction of a turn) via HSV, like torchvision's adjust_hue."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    sat = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    dc = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    hue = torch.remainder(hue + h.view(-1, 1, 1), 1.0) * 6.0
    i = torch.floor(hue).clamp_(0, 5)
    f = hue - i
    v = maxc
    p, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    i = i.long().unsqueeze(1)  # [N, 1, S, S] sector 0..5
    sectors = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))  # (r, g, b) per sector
    table = torch.stack([torch.stack(rgb, 1) for rgb in sectors], 1)  # [N, 6, 3, S, S]
    return table.gather(1, i.unsqueeze(1).expand(-1, 1, 3, -1, -1)).squeeze(1)  # [N, 3, S, S]


_JITTER = (_brightness, _contrast, _saturation, _hue)


def _blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with per-sample sigma [N]; reflect padding like torchvision."""
    n, c, hgt, wid = x.shape
    half = (kernel - 1) / 2
    t = torch.linspace(-half, half, kernel)
    k1 = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    k1 = (k1 / k1.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*3, k]
    pad = kernel // 2
    y = x.reshape(1, n * c, hgt, wid)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), k1[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k1[:, None, :, None], groups=n * c)
    return y.reshape(n, c, hgt, wid)


# --- one view for a batch --------------------------------------------------------------------------
_BATCH_MAX_PIXELS = 128 * 128  # larger images: per-sample matmuls on the crop box only (see below)


def _resize_crops(images: Sequence[torch.Tensor], views, size: int, interpolation: str) -> torch.Tensor:
    """Crop, resize and flip: ``[B, 3, size, size]`` float in [0, 1].

    Small images share one batched matmul pair per image shape, with full-image matrices that are
    zero outside each crop box. For large images those zeros would dominate the cost, so each is
    cropped first and resized with crop-local matrices. The path depends on the image only, never
    on the rest of the batch.
    """
    out = torch.empty(len(images), 3, size, size)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for b, im in enumerate(images):
        hgt, wid = im.shape[-2:]
        v = views[b]
        if hgt * wid <= _BATCH_MAX_PIXELS:
            by_shape.setdefault((hgt, wid), []).append(b)
            continue
        wy = torch.from_numpy(resample_matrix(v.height, 0, v.height, size, interpolation) / 255.0)
        wx = torch.from_numpy(resample_matrix(v.width, 0, v.width, size, interpolation).copy())
        crop = im[:, v.top : v.top + v.height, v.left : v.left + v.width].float()
        res = torch.matmul(torch.matmul(wy, crop), wx.T)
        out[b] = (res.flip(-1) if v.flip else res).clamp_(0, 1)
    for (hgt, wid), idx in by_shape.items():
        wy = np.stack([resample_matrix(hgt, views[b].top, views[b].height, size, interpolation) for b in idx])
        # a horizontal flip is the same map with the output columns reversed
        wx = np.stack(
            [
                resample_matrix(wid, views[b].left, views[b].width, size, interpolation)[:: -1 if views[b].flip else 1]
                for b in idx
            ]
        )
        src = torch.stack([images[b] for b in idx]).float()  # [n, 3, H, W], 0..255
        wy_t, wx_t = torch.from_numpy(wy) / 255.0, torch.from_numpy(wx)
        res = torch.matmul(torch.matmul(wy_t[:, None], src), wx_t.transpose(1, 2)[:, None])
        out[idx] = res.clamp_(0, 1)
    return out


def render_batch_view(images: Sequence[torch.Tensor], views, cfg) -> torch.Tensor:
    """One view (same crop size for all) of every image: normalized float ``[B, 3, S, S]``.

    ``images``: uint8 ``[3, H_b, W_b]`` (shapes may differ); ``views``: one `ViewParams` per image.
    """
    size = views[0].size
    x = _resize_crops(images, views, size, cfg.interpolation)
    jit = [v.jitter is not None for v in views]
    if any(jit):
        sel = torch.tensor(jit)
        order = torch.tensor([v.jitter[0] if v.jitter else (0, 1, 2, 3) for v in views])  # [B, 4]
        factors = torch.tensor([v.jitter[1:] if v.jitter else (1.0, 1.0, 1.0, 0.0) for v in views])  # [B, 4]
        for pos in range(4):
            for op in range(4):
                m = sel & (order[:, pos] == op)
                if m.any():
                    x[m] = _JITTER[op](x[m], factors[m, op])
    gray = torch.tensor([v.grayscale for v in views])
    if gray.any():
        x[gray] = _gray(x[gray]).expand(-1, 3, -1, -1)
    blur = torch.tensor([v.blur_sigma is not None for v in views])
    if blur.any():
        sigma = torch.tensor([v.blur_sigma for v in views if v.blur_sigma is not None])
        x[blur] = _blur(x[blur], sigma, blur_kernel_size(size, cfg.blur_kernel_fraction))
    sol = torch.tensor([v.solarize for v in views])
    if sol.any():
        xs = x[sol]
        x[sol] = torch.where(xs >= cfg.solarize_threshold / 255.0, 1.0 - xs, xs)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


def render_batch(images: Sequence[torch.Tensor], views: Sequence[Sequence], cfg) -> list[torch.Tensor]:
    """All V views of a batch: ``views[b][k]`` for image b -> list of V tensors ``[B, 3, S_k, S_k]``."""
    with single_thread():
        return [render_batch_view(images, [v[k] for v in views], cfg) for k in range(len(views[0]))]


__all__ = ["blur_kernel_size", "render_batch", "render_batch_view", "resample_matrix", "single_thread"]
