"""What each tab of ``fdino app`` shows, computed from (model, index, image) without Gradio.

The model and the folder index are the feature service's (`fdino.serve.FeatureService`: the
backbone, its evaluation transform, and a `fdino.serve.FolderIndex` cached on disk, keyed by the
model's weights and each file's content hash), so the app and ``fdino serve`` embed, cache and
search the same way. Every function here is a plain function of its arguments (the UI runs them on
the service's model thread); errors a user can cause are `fdino.serve.UploadError` with the
service's status codes, or `ValueError` with a message for the page (attention of a CNN).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..eval.attention import PAPER_MASS, attention_cells, attention_masks, cls_attention
from ..eval.render import cell_scale, denormalize, enlarge, grid_image
from ..eval.viz import patch_pca_rgb, patch_tokens, pca, subsample
from ..serve import FeatureService, FolderIndex, ServiceConfig, UploadError, decode_image

MIN_CELL = 160  # pixels per shown image side: small inputs (32 px) are enlarged to stay readable
MAP_METHODS = ("pca", "tsne")
MAP_THUMBNAIL = 48  # pixels, longest side of the picture a map point shows on hover
# Tableau 10 less its grey (grey marks top-level files): distinct on white and for common colour
# blindness; classes beyond 9 reuse colours (the legend and the hover caption still tell them apart).
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
TOP_LEVEL_COLOUR = "#555555"  # files directly in the folder (label -1)


@dataclass(frozen=True)
class Hit:
    """A search result: an indexed file (path relative to the folder) and its cosine similarity."""

    path: str
    score: float


@dataclass(frozen=True)
class EmbeddingMap:
    """The folder's embeddings in 2-D, for the Map tab."""

    points: torch.Tensor
    """``[N, 2]`` float32 coordinates."""
    labels: torch.Tensor
    """``[N]`` int64 class index into ``class_names``; -1 for files directly in the folder."""
    class_names: list[str]
    paths: list[str]
    """Indexed paths (relative to the folder) of the points."""
    method: str
    """"pca" or "tsne"."""


# --- queries ---------------------------------------------------------------------------------------------
def read_query(path: str | Path, config: ServiceConfig):
    """An image file -> RGB PIL image under the service's upload limits (413 too large, 415 not an image)."""
    path = Path(path)
    size = path.stat().st_size
    if size > config.max_upload_bytes:
        raise UploadError(
            413,
            f"upload too large: {size} bytes; uploads are limited to {config.max_upload_bytes} bytes "
            f"({config.max_upload_bytes / 2**20:.1f} MiB)",
        )
    return decode_image(path.read_bytes(), max_pixels=config.max_pixels)


def query_tensor(service: FeatureService, image) -> torch.Tensor:
    """PIL image -> the model's normalized evaluation view ``[3, S, S]`` (what the index was built from)."""
    return service.transform(image)


# --- Search ------------------------------------------------------------------------------------------------
def search(service: FeatureService, x: torch.Tensor, k: int) -> list[Hit]:
    """The ``k`` indexed images most similar (cosine) to the query ``x [3, S, S]``, best first."""
    if service.index is None:
        raise UploadError(409, "no image folder to search: start the app with --images FOLDER")
    if not 1 <= k <= service.config.max_k:
        raise UploadError(422, f"k={k} is invalid: allowed 1 to {service.config.max_k}")
    feature = service.forward(x[None])[0]  # (D,)
    return [Hit(f.path, score) for f, score in service.index.search(feature, k)]


def folder_images(index: FolderIndex, limit: int) -> list[str]:
    """The first ``limit`` indexed paths (sorted), for the gallery to pick queries from."""
    return [f.path for f in index.files[:limit]]


# --- Attention ----------------------------------------------------------------------------------------------
def attention_grid(
    backbone: nn.Module,
    x: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    mass: float = PAPER_MASS,
):
    """PIL image of the last block's CLS attention for ``x [3, S, S]``: two rows, the image then one
    cell per head; heat maps over the image on the first row, the paper's ``mass`` masks on the second.

    Raises ValueError (with what is supported) for backbones without CLS attention, e.g. CNNs.
    """
    device = next(backbone.parameters()).device
    attention = cls_attention(backbone, x[None].to(device)).cpu()[0]  # (heads, h, w)
    masks = attention_masks(attention, mass)
    pixels = denormalize(x[None], mean, std)[0]
    big, *rest = attention_cells(pixels, attention, masks, scale=cell_scale(max(x.shape[-2:]), MIN_CELL))
    heads = len(attention)
    overlays, masked = rest[:heads], rest[heads:]
    names = [f"head {h + 1}" for h in range(heads)]
    captions = [["image", *names], ["image", *[f"{n}: {mass:.0%} mass" for n in names]]]
    return grid_image([[big, *overlays], [big, *masked]], captions=captions)


def attention_views(networks: Mapping[str, nn.Module], x: torch.Tensor, *, mean, std) -> dict[str, object]:
    """``{network name: attention_grid}`` for each network (teacher and student side by side for runs)."""
    return {name: attention_grid(backbone, x, mean=mean, std=std) for name, backbone in networks.items()}


# --- Patch PCA ----------------------------------------------------------------------------------------------
def patch_pca_view(backbone: nn.Module, x: torch.Tensor, *, mean: Sequence[float], std: Sequence[float]):
    """PIL image: ``x [3, S, S]`` and, beside it, the first three principal components of its last-block
    patch features as RGB (`fdino.eval.viz.patch_pca_rgb`, fitted on this image's patches).

    Raises ValueError for backbones without patch tokens (CNNs)."""
    device = next(backbone.parameters()).device
    rgb = patch_pca_rgb(patch_tokens(backbone, x[None].to(device)).cpu())[0]  # (3, h, w)
    pixels = denormalize(x[None], mean, std)
    scale = cell_scale(max(x.shape[-2:]), MIN_CELL)
    size = (x.shape[-2] * scale, x.shape[-1] * scale)
    cells = [enlarge(pixels, size, smooth=True)[0], enlarge(rgb[None], size)[0]]
    return grid_image([cells], captions=[["image", "patch PCA 1-3 as RGB"]])


# --- Map -------------------------------------------------------------------------------------------------------
def class_labels(paths: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """Class of each path = its first folder (``cats/1.png`` -> ``cats``); -1 for top-level files.
    Returns ``(labels [N] int64, sorted class names)``."""
    folders = [p.split("/")[0] if "/" in p else None for p in paths]
    names = sorted({f for f in folders if f is not None})
    lookup = {name: i for i, name in enumerate(names)}
    labels = torch.tensor([lookup[f] if f is not None else -1 for f in folders], dtype=torch.int64)
    return labels, names


def embedding_map(
    index: FolderIndex, *, method: str = "pca", max_points: int = 2000, seed: int = 0, tsne_iters: int = 750
) -> EmbeddingMap:
    """2-D PCA (`fdino.eval.viz.pca`) or exact t-SNE (`fdino.eval.tsne`, ``tsne_iters`` iterations) of
    the indexed features, L2-normalized first (the geometry search uses); at most ``max_points`` rows,
    drawn with ``seed``."""
    if method not in MAP_METHODS:
        raise ValueError(f"method={method!r} is invalid: allowed {MAP_METHODS}")
    if len(index) < 3:
        raise ValueError(f"a map needs at least 3 indexed images; the folder has {len(index)}")
    rows = subsample(len(index), max_points, seed)
    features = torch.nn.functional.normalize(index.features[rows].float(), dim=-1)
    if method == "pca":
        points = pca(features, 2)
    else:
        from ..eval.tsne import tsne  # noqa: PLC0415  (only this method needs it)

        points = tsne(features, iters=tsne_iters)
    paths = [index.files[i].path for i in rows.tolist()]
    labels, names = class_labels(paths)
    return EmbeddingMap(points.float(), labels, names, paths, method)


def thumbnail_uri(path: str | Path, size: int = MAP_THUMBNAIL) -> str:
    """An image file as a ``data:image/png;base64`` URI, scaled (up or down) so its longest side is ``size``:
    the page then needs no file access and no network to show it."""
    from PIL import Image, ImageOps  # noqa: PLC0415

    with Image.open(path) as image:
        small = ImageOps.contain(image.convert("RGB"), (size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def map_thumbnails(
    index: FolderIndex, paths: Sequence[str], cache: dict, size: int = MAP_THUMBNAIL
) -> list[str | None]:
    """`thumbnail_uri` of each indexed path (None where the file can no longer be read).

    ``cache`` maps ``(SHA-256, size)`` to URIs and is updated in place to hold just these paths, so
    switching projection or reloading the page re-encodes only files whose content changed."""
    digests = dict(zip((f.path for f in index.files), index.digests))
    keys = [(digests[p], size) for p in paths]
    fresh = {}
    for key, path in zip(keys, paths):
        if key not in fresh:
            try:
                fresh[key] = cache.get(key) or thumbnail_uri(index.root / path, size)
            except OSError:  # vanished or unreadable since indexing: the point keeps its caption only
                fresh[key] = None
    cache.clear()
    cache.update({k: v for k, v in fresh.items() if v is not None})
    return [fresh[k] for k in keys]


def class_colour(label: int) -> str:
    return TOP_LEVEL_COLOUR if label < 0 else PALETTE[label % len(PALETTE)]


# All rules are under .fdino-map so they cannot restyle the rest of the page. Hover is CSS only: the
# page runs no script of ours. The hovered point is raised (z-index) so its picture covers later points.
MAP_CSS = """
.fdino-map .legend { display: flex; flex-wrap: wrap; gap: 4px 14px; margin-bottom: 6px; font-size: 14px; }
.fdino-map .legend i { display: inline-block; width: 11px; height: 11px; border-radius: 50%; margin-right: 5px; }
.fdino-map .plot { position: relative; height: {height}px; border: 1px solid #ccc; border-radius: 4px; }
.fdino-map .pt { position: absolute; width: 10px; height: 10px; margin: -5px 0 0 -5px; border-radius: 50%;
  border: 1px solid rgba(0, 0, 0, 0.35); box-sizing: border-box; cursor: default; }
.fdino-map .pt .tip { display: none; position: absolute; left: 12px; top: 12px; padding: 4px; background: #fff;
  border: 1px solid #888; border-radius: 4px; font-size: 12px; color: #111; white-space: nowrap; }
.fdino-map .pt.right .tip { left: auto; right: 12px; }
.fdino-map .pt.low .tip { top: auto; bottom: 12px; }
.fdino-map .pt .tip img { display: block; max-width: none; margin: 0 0 2px 0; image-rendering: pixelated; }
.fdino-map .pt:hover { z-index: 10; outline: 2px solid #111; }
.fdino-map .pt:hover .tip { display: block; }
"""


def map_html(
    points: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    thumbnails: Sequence[str | None],
    paths: Sequence[str],
    *,
    height: int = 520,
) -> str:
    """Self-contained HTML scatter plot of ``points [N, 2]`` coloured by ``labels [N]`` (-1: top level),
    with a legend; hovering point ``i`` shows ``thumbnails[i]`` (a data URI) above ``paths[i]``.

    No script and no external resource: a ``<style>`` block and absolutely positioned ``<div>``s, one
    per point (``class="pt"``, ``data-path``), so any HTML view (Gradio's ``gr.HTML``, a saved file) shows it."""
    lo, hi = points.min(0).values, points.max(0).values
    unit = (points - lo) / (hi - lo).clamp_min(1e-12)  # (N, 2) in [0, 1]; axes scaled independently
    left, top = (3 + 94 * unit[:, 0]).tolist(), (97 - 94 * unit[:, 1]).tolist()  # % of the plot, y up
    label_list = labels.tolist()
    legend = [(class_colour(c), name) for c, name in enumerate(class_names)]
    if -1 in label_list:
        legend.append((TOP_LEVEL_COLOUR, "(top level)"))
    out = [f'<div class="fdino-map"><style>{MAP_CSS.replace("{height}", str(int(height)))}</style>']
    out.append('<div class="legend">')
    out += [f'<span><i style="background:{c}"></i>{html.escape(name)}</span>' for c, name in legend]
    out.append('</div><div class="plot">')
    for x, y, label, uri, path in zip(left, top, label_list, thumbnails, paths, strict=True):
        name = class_names[label] if label >= 0 else "(top level)"
        side = " right" * (x > 65) + " low" * (y > 65)  # keep the picture inside the plot near its edges
        img = f'<img src="{uri}" alt="">' if uri else ""
        out.append(
            f'<div class="pt{side}" data-path="{html.escape(path)}" style="left:{x:.2f}%;top:{y:.2f}%;'
            f'background:{class_colour(label)}"><span class="tip">{img}{html.escape(path)} ({html.escape(name)})'
            "</span></div>"
        )
    out.append("</div></div>")
    return "".join(out)


__all__ = [
    "EmbeddingMap",
    "Hit",
    "MAP_METHODS",
    "attention_grid",
    "attention_views",
    "class_labels",
    "embedding_map",
    "folder_images",
    "map_html",
    "map_thumbnails",
    "patch_pca_view",
    "query_tensor",
    "read_query",
    "search",
    "thumbnail_uri",
]
