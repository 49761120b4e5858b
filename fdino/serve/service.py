"""The feature service's logic, independent of HTTP: decode uploads, embed, search, attention maps.

All model work (batched forwards, attention, index refreshes) runs on one dedicated thread, so
requests never run two forwards at once and the index is only touched from that thread; the
asyncio side only queues work and awaits it.
"""

from __future__ import annotations

import asyncio
import io
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import EvalTransform, to_rgb
from .batching import BatchQueue
from .index import FolderIndex, RefreshResult, default_cache_path, model_key


class UploadError(Exception):
    """A client error: ``status`` (4xx) and a message that names the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """Limits and batching of the feature service."""

    max_upload_bytes: int = 10 * 2**20
    """Largest accepted upload (bytes); larger requests get 413."""
    max_pixels: int = 40_000_000
    """Largest accepted image area (width x height) before decoding; guards against decompression bombs."""
    max_batch: int = 32
    """Most requests one forward pass serves."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for others."""
    max_k: int = 100
    """Largest number of search results per query."""
    refresh_interval: float = 2.0
    """Seconds between checks of the images folder for changes (checked on search requests)."""

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_batch", "max_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServiceConfig.{name}={getattr(self, name)!r} is invalid: allowed an integer >= 1")
        for name in ("max_wait_ms", "refresh_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServiceConfig.{name}={getattr(self, name)!r} is invalid: allowed a number >= 0")


def decode_image(data: bytes, *, max_pixels: int):
    """Upload bytes -> RGB PIL image, or `UploadError` (400 empty, 413 too many pixels, 415 not an image)."""
    from PIL import Image  # noqa: PLC0415

    if not data:
        raise UploadError(400, "empty upload: the file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise UploadError(
                        413, f"image of {width} x {height} pixels exceeds the limit of {max_pixels} pixels"
                    )
                image.load()  # decode now: truncated or corrupt data fails here
                return to_rgb(image)
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UploadError(413, f"image too large to decode safely: {e}") from None
    except Image.UnidentifiedImageError:
        raise UploadError(
            415,
            "not an image: the upload is in no image format this service reads; upload a PNG, "
            "JPEG, WebP, BMP, GIF or TIFF file",
        ) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise UploadError(415, f"not a decodable image: {type(e).__name__}: {e} (truncated or corrupt file?)") from None


def _supports_attention(backbone: torch.nn.Module) -> bool:
    """Whether `fdino.eval.attention.cls_attention` can recompute this backbone's CLS attention."""
    from ..eval.attention import attention_module  # noqa: PLC0415

    try:
        attention_module(backbone)
    except ValueError:  # not a ViT, no CLS token, or an attention variant it does not model
        return False
    return True


class FeatureService:
    """A frozen backbone serving embeddings, nearest-image search over a folder, and attention maps.

    Args:
        model: `fdino.weights.LoadedModel` (backbone, image_size, mean, std, ...).
        images: folder to index (None: /search is unavailable).
        arch: display name of the model.
        cache_dir: where the index cache goes (default `fdino.serve.index.default_cache_path`).
        model_info: how to reload the model (`fdino.weights.cli_args.model_args_record`), stored in the
            cache (`fdino search` reloads the model from it).
    """

    def __init__(
        self,
        model: Any,
        images: str | Path | None = None,
        *,
        arch: str = "",
        config: ServiceConfig | None = None,
        cache_dir: str | Path | None = None,
        model_info: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.arch = model, arch
        self.config = config or ServiceConfig()
        self.backbone = model.backbone.eval()
        self.transform = EvalTransform(int(model.image_size), mean=tuple(model.mean), std=tuple(model.std))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fdino-model")
        self.queue = BatchQueue(
            self.forward, executor=self.executor, max_batch=self.config.max_batch, max_wait_ms=self.config.max_wait_ms
        )
        self.has_attention = _supports_attention(self.backbone)
        self.index: FolderIndex | None = None
        self._last_check = 0.0
        if images is not None:
            size, mean, std = int(model.image_size), tuple(model.mean), tuple(model.std)
            key = model_key(self.backbone, size, mean, std)
            self.index = FolderIndex(
                Path(images),
                self.backbone,
                size,
                mean,
                std,
                key,
                cache_path=default_cache_path(images, key, cache_dir),
                model_info=dict(model_info or {"arch": arch}),
            )

    # --- model thread ------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> features ``[B, D]`` float32 on the CPU."""
        device = next(self.backbone.parameters()).device
        return self.backbone(batch.to(device)).float().cpu()

    def refresh(self) -> RefreshResult | None:
        """Bring the index up to date (blocking; call before serving or from the model thread)."""
        self._last_check = time.monotonic()
        return self.index.refresh() if self.index is not None else None

    def attention_png(self, x: torch.Tensor) -> bytes:
        """PNG: the preprocessed query (left) and the CLS attention of the last block, averaged over
        heads, over it (right); patch blocks are enlarged so small inputs stay readable."""
        from PIL import Image  # noqa: PLC0415

        from ..eval.attention import cls_attention  # noqa: PLC0415
        from ..eval.render import cell_scale, colormap, denormalize, enlarge, normalize_max  # noqa: PLC0415

        device = next(self.backbone.parameters()).device
        attention = cls_attention(self.backbone, x[None].to(device)).cpu()[0]  # (heads, h, w)
        heat = normalize_max(attention.mean(dim=0, keepdim=True))  # (1, h, w)
        pixels = denormalize(x[None], self.model.mean, self.model.std)  # (1, 3, H, W)
        scale = cell_scale(max(x.shape[-2:]), 224)
        size = (x.shape[-2] * scale, x.shape[-1] * scale)
        big = enlarge(pixels, size, smooth=True)[0]
        overlay = 0.4 * big + 0.6 * enlarge(colormap(heat), size)[0]
        canvas = torch.cat([big, torch.ones(3, size[0], 4), overlay], dim=-1)
        array = (canvas.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    # --- asyncio side --------------------------------------------------------------------------------
    async def _on_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def preprocess(self, data: bytes) -> torch.Tensor:
        return self.transform(decode_image(data, max_pixels=self.config.max_pixels))

    async def embed(self, data: bytes) -> torch.Tensor:
        """Upload bytes -> feature ``[D]`` (batched with concurrent requests)."""
        x = await asyncio.to_thread(self.preprocess, data)  # decoding off the event loop
        return await self.queue.submit(x)

    async def search(self, data: bytes, k: int) -> list[dict[str, Any]]:
        """Upload bytes -> the ``k`` most similar indexed images: ``{"path", "score", "url"}``, best first."""
        if self.index is None:
            raise UploadError(409, "this service has no image folder to search (start it with --images)")
        if not 1 <= k <= self.config.max_k:
            raise UploadError(422, f"k={k} is invalid: allowed 1 to {self.config.max_k}")
        feature = await self.embed(data)
        now = time.monotonic()
        if now - self._last_check >= self.config.refresh_interval:
            self._last_check = now  # before awaiting: concurrent requests do not queue more scans
            await self._on_model_thread(self.index.refresh)
        hits = await self._on_model_thread(self.index.search, feature, k)
        from urllib.parse import quote  # noqa: PLC0415

        return [{"path": f.path, "score": round(score, 6), "url": "/images/" + quote(f.path)} for f, score in hits]

    async def attention(self, data: bytes) -> bytes:
        if not self.has_attention:
            raise UploadError(
                409,
                f"attention maps need a timm ViT with a CLS token and plain attention; this model "
                f"is {type(self.backbone).__name__}",
            )
        x = await asyncio.to_thread(self.preprocess, data)
        return await self._on_model_thread(self.attention_png, x)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.arch,
            "feature_dim": int(self.backbone.num_features),
            "image_size": int(self.model.image_size),
            "attention": self.has_attention,
            "images": len(self.index) if self.index is not None else 0,
            "skipped_images": len(self.index.skipped) if self.index is not None else 0,
            "max_upload_bytes": self.config.max_upload_bytes,
            "max_k": self.config.max_k,
            **self.queue.stats(),
        }

    async def aclose(self) -> None:
        await self.queue.aclose()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["FeatureService", "ServiceConfig", "UploadError", "decode_image"]
