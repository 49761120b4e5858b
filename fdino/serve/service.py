"""The feature service's logic, independent of HTTP: decode uploads, embed, search, attention maps.

Three kinds of threads, each bounded: uploads are decoded on a small pool (``decode_workers``
threads, each decode within ``max_decode_bytes``: see `fdino.serve.decode`), so memory for decoding
is bounded by their product whatever the number of requests; forwards (batched) and attention maps
run on one model thread, so requests never run two forwards at once; the folder is re-indexed on
its own thread in the background (at most one refresh at a time, started by a search at most every
``refresh_interval`` seconds), so a long refresh never holds up /embed or /search, which answer from
the previous index until the new one is swapped in. The asyncio side only queues work and awaits it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import EvalTransform
from .batching import BatchQueue
from .decode import UploadError, decode_image
from .index import FolderIndex, RefreshResult, default_cache_path, model_key
from .paths import display_name, image_url

log = logging.getLogger("fdino.serve")


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """Limits and batching of the feature service."""

    max_upload_bytes: int = 10 * 2**20
    """Largest accepted upload (bytes); larger requests get 413."""
    max_pixels: int = 40_000_000
    """Largest accepted image area (width x height) before decoding; guards against decompression bombs."""
    max_aspect_ratio: float = 20.0
    """Largest accepted ratio of the long side to the short side (resizing the short side of a 4,000,000 x 10
    image to 256 px would need ~73 GiB); larger get 413."""
    max_decode_bytes: int = 512 * 2**20
    """Memory budget of one upload's decoding and preprocessing, estimated from its header (pixels, mode,
    format, resize; `fdino.serve.decode.decode_cost`) before decoding; over it gets 413. The default admits
    8-bit RGB up to ~38 megapixels, 16-bit grey ~33, RGBA ~27; with ``decode_workers`` it bounds the total."""
    decode_workers: int = 2
    """Threads decoding uploads (each within ``max_decode_bytes``); other uploads wait for a free one."""
    max_queue: int = 32
    """Most upload requests (/embed, /search, /attention) in progress at once; more get 503 + Retry-After."""
    request_timeout: float = 60.0
    """Seconds an upload request may take (receiving, decoding, waiting, forward); then 408 or 504."""
    keep_alive_timeout: int = 5
    """Seconds an idle keep-alive connection stays open (uvicorn ``timeout_keep_alive``)."""
    max_connections: int = 128
    """Most concurrent connections and requests uvicorn accepts (``limit_concurrency``); more get 503."""
    max_batch: int = 32
    """Most requests one forward pass serves."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for others."""
    max_k: int = 100
    """Largest number of search results per query."""
    refresh_interval: float = 2.0
    """Seconds between checks of the images folder for changes (checked on search requests)."""

    def __post_init__(self) -> None:
        ints = ("max_upload_bytes", "max_pixels", "max_decode_bytes", "decode_workers", "max_batch", "max_k")
        for name in (*ints, "max_queue", "keep_alive_timeout", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServiceConfig.{name}={getattr(self, name)!r} is invalid: allowed an integer >= 1")
        for name in ("max_wait_ms", "refresh_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServiceConfig.{name}={getattr(self, name)!r} is invalid: allowed a number >= 0")
        if not self.request_timeout > 0:
            raise ValueError(f"ServiceConfig.request_timeout={self.request_timeout!r} is invalid: allowed a number > 0")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(
                f"ServiceConfig.max_aspect_ratio={self.max_aspect_ratio!r} is invalid: allowed a number >= 1"
            )

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``: the connection limit and keep-alive timeout."""
        return {"limit_concurrency": self.max_connections, "timeout_keep_alive": self.keep_alive_timeout}


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
        self.decoders = ThreadPoolExecutor(max_workers=self.config.decode_workers, thread_name_prefix="fdino-decode")
        self.indexer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fdino-index")
        self._refresh_lock = threading.Lock()  # one refresh at a time (startup, background, the app)
        self._refreshing: Future | None = None
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
        """Bring the index up to date (blocking; any thread; waits for a refresh already running)."""
        with self._refresh_lock:
            self._last_check = time.monotonic()
            return self.index.refresh() if self.index is not None else None

    def refresh_in_background(self) -> Future | None:
        """Start a refresh on the index thread unless one is running; the future of the running one."""
        if self.index is None:
            return None
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = self.indexer.submit(self._background_refresh)
        return self._refreshing

    def _background_refresh(self) -> RefreshResult | None:
        try:
            return self.refresh()
        except Exception:  # a failed refresh keeps the previous index; it is retried when next due
            log.exception("refreshing the index of %s failed; searches use the previous index", self.index.root)
            return None

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

    def decode(self, data: bytes):
        """Upload bytes -> upright RGB PIL image within the configured limits (or `UploadError`)."""
        c = self.config
        return decode_image(
            data,
            max_pixels=c.max_pixels,
            max_aspect_ratio=c.max_aspect_ratio,
            max_decode_bytes=c.max_decode_bytes,
            resize_size=self.transform.resize_size,
        )

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Upload bytes -> model input ``[3, S, S]`` (runs on a decode thread)."""
        return self.transform(self.decode(data))

    async def _preprocess(self, data: bytes) -> torch.Tensor:
        return await asyncio.get_running_loop().run_in_executor(self.decoders, self.preprocess, data)

    async def embed(self, data: bytes) -> torch.Tensor:
        """Upload bytes -> feature ``[D]`` (batched with concurrent requests)."""
        x = await self._preprocess(data)  # on the bounded decode pool, off the event loop
        return await self.queue.submit(x)

    async def search(self, data: bytes, k: int) -> list[dict[str, Any]]:
        """Upload bytes -> the ``k`` most similar indexed images: ``{"path", "score", "url"}``, best first."""
        if self.index is None:
            raise UploadError(409, "this service has no image folder to search (start it with --images)")
        if not 1 <= k <= self.config.max_k:
            raise UploadError(422, f"k={k} is invalid: allowed 1 to {self.config.max_k}")
        feature = await self.embed(data)
        if time.monotonic() - self._last_check >= self.config.refresh_interval:
            self._last_check = time.monotonic()  # now: concurrent requests do not start more scans
            self.refresh_in_background()  # not awaited: this search answers from the current index
        hits = await self._on_model_thread(self.index.search, feature, k)
        return [{"path": display_name(f.path), "score": round(score, 6), "url": image_url(f.path)} for f, score in hits]

    async def attention(self, data: bytes) -> bytes:
        if not self.has_attention:
            raise UploadError(
                409,
                f"attention maps need a timm ViT with a CLS token and plain attention; this model "
                f"is {type(self.backbone).__name__}",
            )
        x = await self._preprocess(data)
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
            "outside_links": len(self.index.outside) if self.index is not None else 0,
            "refreshing": self._refreshing is not None and not self._refreshing.done(),
            "max_upload_bytes": self.config.max_upload_bytes,
            "max_k": self.config.max_k,
            **self.queue.stats(),
        }

    async def aclose(self) -> None:
        await self.queue.aclose()

    def close(self) -> None:
        for pool in (self.executor, self.decoders, self.indexer):
            pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["FeatureService", "ServiceConfig", "UploadError", "decode_image"]
