"""Frozen features of a backbone over a data set, and raw-pixel features for the baseline.

What "the feature" is follows the paper's evaluation code:
  * k-NN (n_last_blocks=1, avgpool=False): the backbone's own pooled output, i.e. the CLS token
    after the final LayerNorm for timm ViTs (global_pool='token'), the global-average-pooled
    map for CNNs; this is exactly what the DINO head was trained on.
  * linear protocol: the CLS tokens of the last n blocks, each passed through the final norm,
    concatenated (ViT-S: n=4), optionally followed by the average of the last block's patch
    tokens (ViT-B: n=1, avgpool=True).

Features leave the device after every batch, so an ImageNet-sized bank never sits on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..models import is_vit


def batch_features(
    backbone: nn.Module, images: torch.Tensor, *, n_last_blocks: int = 1, avgpool: bool = False
) -> torch.Tensor:
    """Features of one batch: ``[B, 3, H, W] -> [B, D']`` (call under no_grad / inference_mode).

    ``D' = D`` for the defaults; ``n_last_blocks * D (+ D with avgpool)`` for the linear-protocol
    variants, which need a timm ViT with a CLS token.
    """
    if n_last_blocks < 1:
        raise ValueError(f"n_last_blocks={n_last_blocks!r} is invalid: allowed an integer >= 1")
    if n_last_blocks == 1 and not avgpool:
        return backbone(images)
    if not is_vit(backbone):
        raise ValueError(
            f"n_last_blocks={n_last_blocks} / avgpool={avgpool} need a ViT; "
            f"{type(backbone).__name__} only has its pooled feature (use the defaults)"
        )
    if getattr(backbone, "cls_token", None) is None:
        raise ValueError("n_last_blocks / avgpool need a ViT with a CLS token (class_token=True)")
    # [(patch tokens [B, L, D], prefix tokens [B, P, D])] for the last n blocks, each normed.
    outs = backbone.get_intermediate_layers(images, n=n_last_blocks, return_prefix_tokens=True, norm=True)
    parts = [prefix[:, 0] for _, prefix in outs]
    if avgpool:
        parts.append(outs[-1][0].mean(dim=1))
    return torch.cat(parts, dim=-1)


def _stack_items(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.as_tensor(s[0]) for s in samples])
    labels = torch.tensor([int(s[1]) for s in samples], dtype=torch.int64)
    return images, labels


def is_map_dataset(data: Any) -> bool:
    """Map-style data set (indexable, sized) rather than an iterable of batches."""
    if isinstance(data, Dataset):
        return True
    return hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple))


def iter_batches(
    data: Dataset | Iterable,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    transform: Callable | None = None,
    pin_memory: bool = False,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``(images [B, ...], labels [B])`` batches from a loader (used as is) or a map-style data set.

    A data set's items are ``(image, label)``; ``transform`` maps an image to a tensor (e.g.
    `fdino.data.EvalTransform`); without it the images must already be equal-shape tensors.
    Data set order is kept (no shuffling), so row i of any result belongs to item i.
    """
    if not is_map_dataset(data):
        if transform is not None:
            raise ValueError("transform= applies to a data set; a loader already yields transformed batches")
        return data
    if transform is not None:
        # EvalLoader skips (and reports) undecodable files of image folders instead of crashing.
        from ..data import EvalLoader  # noqa: PLC0415

        return EvalLoader(data, transform, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_stack_items,
        pin_memory=pin_memory,
    )


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset_or_loader: Dataset | Iterable,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    n_last_blocks: int = 1,
    avgpool: bool = False,
    num_workers: int = 0,
    transform: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every image: ``(features float32 [N, D'] on CPU, labels int64 [N])``.

    Args:
        backbone: a timm backbone (``num_classes=0``); put in eval mode for the call, then restored.
        dataset_or_loader: an iterable of ``(images [B, 3, H, W] float, labels [B])`` (e.g.
            `fdino.data.EvalLoader`), or a map-style data set of ``(image, label)``.
        transform: per-image transform for a data set (e.g. ``EvalTransform(size, mean=, std=)``).
        n_last_blocks, avgpool: see `batch_features`.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        pin = torch.device(device).type == "cuda"  # pinned host memory makes the copy asynchronous
        for images, y in iter_batches(
            dataset_or_loader, batch_size=batch_size, num_workers=num_workers, transform=transform, pin_memory=pin
        ):
            if not torch.is_floating_point(images):
                raise TypeError(
                    f"extract_features got {images.dtype} images: pass transform=EvalTransform(size, "
                    f"mean=..., std=...) for a data set of raw images, or a loader of normalized batches"
                )
            f = batch_features(
                backbone, images.to(device, non_blocking=True), n_last_blocks=n_last_blocks, avgpool=avgpool
            )
            feats.append(f.float().cpu())  # per batch: the bank accumulates in host memory
            labels.append(torch.as_tensor(y).reshape(-1).long().cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features: the data set is empty")
    return torch.cat(feats), torch.cat(labels)


def _as_pixels(image: Any) -> torch.Tensor:
    """An item's image as a tensor ``[C, H, W]`` (uint8 kept as uint8, PIL decoded to uint8 RGB)."""
    if isinstance(image, torch.Tensor):
        return image if image.ndim == 3 else image[None]
    from ..data.augment import as_uint8_chw  # noqa: PLC0415

    return as_uint8_chw(image)


def raw_pixel_features(
    dataset_or_loader: Dataset | Iterable,
    *,
    batch_size: int = 1024,
    transform: Callable | None = None,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened pixels as features: ``(float32 [N, C*H*W], labels int64 [N])``.

    uint8 images are scaled to [0, 1]. Grayscale images stored as three equal channels (as
    `fdino.data.ArrayDataset` hands out Fashion-MNIST) keep one channel: the cosine similarity
    is identical and the k-NN matmul three times cheaper. Center with `center_features` (bank
    mean) before `knn_classify`.
    """
    from ..data.arrays import ArrayDataset  # noqa: PLC0415

    chunks, labels = [], []
    if transform is None and isinstance(dataset_or_loader, ArrayDataset):
        # In-memory uint8 array: slice it directly instead of 60k __getitem__ calls.
        images = dataset_or_loader.images
        chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        labels = [dataset_or_loader.labels]
    else:
        if transform is None and is_map_dataset(dataset_or_loader):
            transform = _as_pixels
        for images, y in iter_batches(
            dataset_or_loader, batch_size=batch_size, num_workers=num_workers, transform=transform
        ):
            chunks.append(images)  # kept in the stored dtype (uint8: 4x less memory until the end)
            labels.append(torch.as_tensor(y).reshape(-1).long())
    if not chunks:
        raise ValueError("raw_pixel_features: the data set is empty")
    gray = all(
        x.ndim == 4 and x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
        for x in chunks
    )
    rows = []
    for x in chunks:
        x = x[:, :1] if gray else x
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        rows.append(x.reshape(len(x), -1))
    return torch.cat(rows), torch.cat(labels)


def raw_pixel_knn(
    memory: Dataset | Iterable,
    query: Dataset | Iterable,
    *,
    ks=(20,),
    temperature: float = 0.07,
    transform: Callable | None = None,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
) -> dict[int, dict[str, float]]:
    """The raw-pixel baseline: `knn_classify` on bank-centered flattened pixels.

    ``memory`` / ``query``: data sets or loaders as for `extract_features`; images must share one
    size (pass a resizing ``transform`` for folders of mixed sizes). Returns ``{k: {"top1", "top5"}}``.
    """
    from .knn import center_features, knn_classify  # noqa: PLC0415

    bank, bank_labels = raw_pixel_features(memory, batch_size=batch_size, transform=transform)
    queries, query_labels = raw_pixel_features(query, batch_size=batch_size, transform=transform)
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"memory and query images differ in size ({bank.shape[1]} vs {queries.shape[1]} values); "
            f"pass a resizing transform"
        )
    bank, queries = center_features(bank, queries)
    return knn_classify(
        bank, bank_labels, queries, query_labels, ks=ks, temperature=temperature, num_classes=num_classes, device=device
    )


__all__ = [
    "batch_features",
    "extract_features",
    "iter_batches",
    "is_map_dataset",
    "raw_pixel_features",
    "raw_pixel_knn",
]
