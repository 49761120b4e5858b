"""Embeddings of an image folder on disk, and nearest-neighbour image search over them.

File formats, chosen by the output suffix:
  * ``.safetensors``: tensors ``features`` ``[N, D]`` float32 and ``labels`` ``[N]`` int64; the
    image paths and how the features were made are JSON strings in the file's metadata
    (``paths``, ``info``).
  * ``.npy``: the ``[N, D]`` float32 array; a JSON sidecar ``<name>.json`` next to it holds
    ``paths``, ``labels`` and ``info``.
Features are stored as extracted (not normalized); search uses cosine similarity.
Unreadable files are skipped and reported, never silently replaced by another image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .features import batch_features
from .knn import knn_topk

SUFFIXES = (".safetensors", ".npy")


class Embeddings(NamedTuple):
    """Features of a set of images: ``features [N, D]``, ``paths`` (N), ``labels [N]`` (-1: none)."""

    features: torch.Tensor
    paths: list[str]
    labels: torch.Tensor
    info: dict[str, Any]


class _PathImages(Dataset):
    """``(normalized image, index, ok)`` per path; a file that fails to decode gives ok=False."""

    def __init__(self, paths: Sequence[str], transform) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from ..data.images import BadImageError, load_rgb  # noqa: PLC0415

        try:
            return self.transform(load_rgb(self.paths[i])), i, ""
        except BadImageError as e:
            return None, i, e.reason


def _collate(samples):
    good = [s for s in samples if s[0] is not None]
    images = torch.stack([s[0] for s in good]) if good else None
    return images, [s[1] for s in good], [(s[1], s[2]) for s in samples if s[0] is None]


@torch.no_grad()
def embed_paths(
    backbone: nn.Module,
    paths: Sequence[str],
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    n_last_blocks: int = 1,
    avgpool: bool = False,
    num_workers: int = 0,
) -> tuple[torch.Tensor, list[int], dict[str, str]]:
    """Features of the images at ``paths`` (evaluation view: resize + center crop).

    Returns ``(features [M, D] float32 CPU, kept indices into paths (M), {path: reason} skipped)``.
    """
    from ..data import EvalTransform  # noqa: PLC0415

    transform = EvalTransform(image_size, mean=tuple(mean), std=tuple(std))
    loader = DataLoader(
        _PathImages(paths, transform), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    backbone.eval()
    feats, kept, skipped = [], [], {}
    for images, index, bad in loader:
        skipped.update({paths[i]: reason for i, reason in bad})
        if images is None:
            continue
        f = batch_features(backbone, images.to(device), n_last_blocks=n_last_blocks, avgpool=avgpool)
        feats.append(f.float().cpu())
        kept.extend(index)
    if not feats:
        raise ValueError(f"none of the {len(paths)} images could be read")
    return torch.cat(feats), kept, skipped


def embed_folder(backbone: nn.Module, folder: str | os.PathLike, **kwargs: Any) -> tuple[Embeddings, dict[str, str]]:
    """`embed_paths` over every image under ``folder`` (class subfolders give labels).

    Returns ``(Embeddings, skipped {path: reason})``; kwargs as for `embed_paths`.
    """
    from ..data import scan_image_folder  # noqa: PLC0415

    paths, labels, classes = scan_image_folder(folder)
    feats, kept, skipped = embed_paths(backbone, paths, **kwargs)
    info = {
        "folder": os.path.abspath(os.fspath(folder)),
        "classes": list(classes),
        **{k: v for k, v in kwargs.items() if k in ("image_size", "n_last_blocks", "avgpool")},
        "mean": list(kwargs.get("mean", ())),
        "std": list(kwargs.get("std", ())),
    }
    return Embeddings(
        feats, [paths[i] for i in kept], torch.tensor([labels[i] for i in kept], dtype=torch.int64), info
    ), skipped


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_embeddings(path: str | os.PathLike, emb: Embeddings) -> Path:
    """Write ``emb`` to ``.safetensors`` (paths in metadata) or ``.npy`` (+ ``.json`` sidecar)."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"embedding file {str(path)!r}: the suffix must be one of {SUFFIXES}")
    if len(emb.paths) != len(emb.features):
        raise ValueError(f"{len(emb.paths)} paths for {len(emb.features)} feature rows")
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = emb.features.float().contiguous()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file  # noqa: PLC0415

        save_file(
            {"features": feats, "labels": emb.labels.long().contiguous()},
            str(path),
            metadata={"paths": json.dumps(emb.paths), "info": json.dumps(emb.info)},
        )
    else:
        np.save(path, feats.numpy())
        _sidecar(path).write_text(json.dumps({"paths": emb.paths, "labels": emb.labels.tolist(), "info": emb.info}))
    return path


def load_embeddings(path: str | os.PathLike) -> Embeddings:
    """Inverse of `save_embeddings`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            feats, labels = f.get_tensor("features"), f.get_tensor("labels")
        paths, info = json.loads(meta.get("paths", "[]")), json.loads(meta.get("info", "{}"))
    elif path.suffix == ".npy":
        feats = torch.from_numpy(np.load(path))
        side = _sidecar(path)
        if not side.exists():
            raise FileNotFoundError(f"{side} (the image list of {path}) is missing")
        meta = json.loads(side.read_text())
        paths, info = meta["paths"], meta.get("info", {})
        labels = torch.tensor(meta.get("labels", [-1] * len(paths)), dtype=torch.int64)
    else:
        raise ValueError(f"embedding file {str(path)!r}: the suffix must be one of {SUFFIXES}")
    if len(paths) != len(feats):
        raise ValueError(f"{path}: {len(paths)} paths for {len(feats)} feature rows")
    return Embeddings(feats.float(), list(paths), labels, info)


def search(queries: torch.Tensor, bank: torch.Tensor, k: int = 8, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine matches of each query ``[Q, D]`` in ``bank [N, D]``: ``(scores, indices)`` ``[Q, k]``."""
    return knn_topk(bank, queries, k, **kwargs)


def save_search_grid(
    query: torch.Tensor,
    results: Sequence[torch.Tensor],
    scores: Sequence[float],
    path: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    min_cell: int = 96,
) -> Path:
    """One-row PNG: the query image, then the matches with their cosine score under each.

    Images: float ``[3, H, W]`` in [0, 1] (any sizes; each is fitted into a square cell).
    """
    from .render import enlarge, save_grid  # noqa: PLC0415

    # Cells: at least min_cell (small images enlarged), at most 224 px (large ones shrunk).
    side = max(min_cell, min(224, max(max(x.shape[-2:]) for x in [query, *results])))

    def fit(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = side / max(h, w)
        return enlarge(x[None], (max(1, round(h * s)), max(1, round(w * s))), smooth=True)[0]

    captions = ["query"] + [f"{float(s):.3f}" + (f" {names[i]}" if names else "") for i, s in enumerate(scores)]
    return save_grid([[fit(query), *(fit(r) for r in results)]], path, captions=[captions])


__all__ = [
    "Embeddings",
    "embed_paths",
    "embed_folder",
    "save_embeddings",
    "load_embeddings",
    "search",
    "save_search_grid",
    "SUFFIXES",
]
