"""What each tab of ``fdino app`` shows, computed from (model, index, image) without Gradio.

The model and the folder index are the feature service's (`fdino.serve.FeatureService`: the
backbone, its evaluation transform, and a `fdino.serve.FolderIndex` cached on disk, keyed by the
model's weights and each file's content hash), so the app and ``fdino serve`` embed, cache and
search the same way. Every function here is a plain function of its arguments (the UI runs them on
the service's model thread); errors a user can cause are `fdino.serve.UploadError` with the
service's status codes, or `ValueError` with a message for the page (attention of a CNN).
"""

from __future__ import annotations

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


__all__ = [
    "EmbeddingMap",
    "Hit",
    "MAP_METHODS",
    "attention_grid",
    "attention_views",
    "class_labels",
    "embedding_map",
    "folder_images",
    "patch_pca_view",
    "query_tensor",
    "read_query",
    "search",
]
