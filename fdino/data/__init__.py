"""fdino.data: multi-crop augmentation, data sources and deterministic, resumable loaders.

Typical use by a training loop::

    from fdino.data import build_dataset, MultiCrop, MultiCropConfig, multicrop_loader

    train = build_dataset("shapes10", split="train")          # or "cifar10", a folder path, ...
    loader = multicrop_loader(cfg, train.dataset, num_workers=2)   # cfg: DinoConfig
    for epoch in range(start_epoch, cfg.epochs):
        for crops, labels in loader.epoch(epoch, start_batch=steps_done_in_epoch):
            state, metrics = train_step(state, crops)            # crops: V x [B, 3, S, S]
    print("skipped files:", loader.num_skipped)

    memory, query = build_dataset("shapes10", split="memory"), build_dataset("shapes10", split="query")
    for images, labels in EvalLoader(memory.dataset, EvalTransform(32), batch_size=256): ...
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from .arrays import ArrayDataset
from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCrop,
    MultiCropConfig,
    ViewParams,
    blur_kernel_size,
    render_view,
    sample_views,
    small_image_multicrop,
)
from .decoded_cache import DecodeCacheOptions, DecodeCacheTooLargeError, DecodedImageFolder
from .folder import ImageFolder, scan_image_folder
from .idx import DEBIAN_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, idx_dataset, parse_idx, read_idx
from .images import IMAGE_EXTENSIONS, BadImageError, load_rgb, to_rgb
from .loader import (
    EvalLoader,
    MultiCropDataset,
    MultiCropLoader,
    ResumableBatchSampler,
    batches_per_epoch,
    epoch_batches,
)
from .seeds import derive_seed
from .shapes import CLASSES as SHAPES10_CLASSES
from .shapes import make_shapes10, shapes10
from .sources import DATASET_NAMES, ROLES, DataSource, build_dataset, default_root, resolve_split


def multicrop_loader(
    cfg: Any, dataset: Dataset, *, num_workers: int = 0, rank: int = 0, world_size: int = 1, **kwargs: Any
) -> MultiCropLoader:
    """A `MultiCropLoader` set up from a `DinoConfig`: its crops, its seed, and its batch size.

    Each batch holds ``cfg.batch_size // world_size`` images: one optimizer step's worth per rank
    (split it into ``cfg.grad_accum_steps`` micro-batches in the loop), so ``start_batch`` for a
    resume is the number of optimizer steps already taken in the epoch.
    """
    if cfg.batch_size % world_size:
        raise ValueError(f"DinoConfig.batch_size={cfg.batch_size} is not divisible by world_size={world_size}")
    transform = MultiCrop(MultiCropConfig.from_dino_config(cfg))
    return MultiCropLoader(
        dataset,
        transform,
        batch_size=cfg.batch_size // world_size,
        seed=cfg.seed,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        **kwargs,
    )


__all__ = [
    # augmentation
    "MultiCropConfig",
    "small_image_multicrop",
    "MultiCrop",
    "EvalTransform",
    "ViewParams",
    "sample_views",
    "render_view",
    "blur_kernel_size",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    # sources
    "build_dataset",
    "DataSource",
    "DATASET_NAMES",
    "ROLES",
    "resolve_split",
    "default_root",
    "DecodeCacheOptions",
    "DecodeCacheTooLargeError",
    "DecodedImageFolder",
    "ArrayDataset",
    "ImageFolder",
    "scan_image_folder",
    "shapes10",
    "make_shapes10",
    "SHAPES10_CLASSES",
    "parse_idx",
    "read_idx",
    "idx_dataset",
    "FASHION_MNIST_CLASSES",
    "DEBIAN_FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "load_rgb",
    "to_rgb",
    # loading
    "MultiCropLoader",
    "multicrop_loader",
    "EvalLoader",
    "ResumableBatchSampler",
    "MultiCropDataset",
    "epoch_batches",
    "batches_per_epoch",
    "derive_seed",
]
