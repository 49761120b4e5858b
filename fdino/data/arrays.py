"""`ArrayDataset`: a map-style data set over images held in one uint8 tensor.

Used for everything that fits in memory (the built-in shapes10, CIFAR, STL-10, Fashion-MNIST):
indexing is a view plus a label lookup, with no PIL round trip, so workers spend their time on
augmentation rather than decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """``(image, label)`` pairs from ``images`` ``[N, C, H, W]`` uint8 (C in {1, 3}) and labels ``[N]``.

    Items are ``(uint8 tensor [3, H, W], int label)``; one-channel storage is expanded to three
    channels on access (a view), so Fashion-MNIST costs 1x, not 3x, memory. Labels are -1 for
    unlabeled samples. ``classes`` names label ``k`` as ``classes[k]``.
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        classes: Sequence[str] = (),
    ) -> None:
        images = torch.as_tensor(images)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        if images.dtype != torch.uint8:
            raise TypeError(f"ArrayDataset images must be uint8, got {images.dtype}")
        if images.ndim == 3:  # [N, H, W] grayscale
            images = images[:, None]
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"ArrayDataset images must be [N, 1|3, H, W], got shape {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"ArrayDataset got {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.classes = tuple(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image, int(self.labels[index])


__all__ = ["ArrayDataset"]
