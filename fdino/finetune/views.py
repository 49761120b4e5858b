"""Training views for fine-tuning and the supervised baseline, keyed by ``(epoch, index)``.

Two augmentation families, both pure functions of ``(seed, epoch, index)`` (results do not depend
on workers and no global RNG is touched):
  * ``crop_flip``: RandomResizedCrop + horizontal flip, the paper's linear-evaluation views
    (`fdino.eval.linear.RandomCropFlipDataset`, so ``--freeze all`` sees exactly the probe's images);
  * ``dino``: one view drawn like DINO's global crops (crop, flip, colour jitter, grayscale, blur,
    solarization from the same `MultiCropConfig`), so a supervised baseline trained on these saw the
    same augmentation family as the self-supervised run it is compared with. Blur and solarization
    use the mean of the two global crops' probabilities (0.55 and 0.1 in the paper's recipe).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DinoConfig
from ..data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropConfig,
    render_view,
    sample_views,
    small_image_multicrop,
)
from ..eval.linear import EpochIndexSampler, RandomCropFlipDataset, collate_views

AUGMENTS = ("crop_flip", "dino")


def one_view_config(
    image_size: int, cfg: DinoConfig | None = None, *, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> MultiCropConfig:
    """DINO's global-crop augmentation for single views of side ``image_size`` (`DinoViewDataset`).

    From ``cfg`` (its crop scale and ``augment`` overrides) when the model came from an fdino run,
    else the paper's recipe (with the small-image blur for sides <= 64 px).
    """

    def mean_p(ps: Sequence[float]) -> tuple[float, float]:
        first_two = tuple(ps[:2])
        return (sum(first_two) / len(first_two),) * 2

    base = MultiCropConfig.from_dino_config(cfg) if cfg is not None else small_image_multicrop()
    if cfg is None and image_size > 64:
        base = MultiCropConfig()
    # Two global crops (MultiCropConfig insists on pairs) of which `DinoViewDataset` renders the first.
    return base.replace(
        n_global_crops=2,
        n_local_crops=0,
        global_crop_size=image_size,
        global_blur_p=mean_p(base.global_blur_p),
        global_solarize_p=mean_p(base.global_solarize_p),
        mean=tuple(mean),
        std=tuple(std),
    )


class DinoViewDataset(RandomCropFlipDataset):
    """``dataset[(epoch, i)] -> (float [3, size, size], label)``: one DINO global-crop view of item i."""

    RNG_TAG = "finetune-view"

    def __init__(self, source: Dataset, crop: MultiCropConfig, *, seed: int = 0) -> None:
        if crop.n_local_crops != 0:
            raise ValueError("DinoViewDataset renders one global crop: give it a config without local crops")
        size, scale = crop.global_crop_size, crop.global_crop_scale
        super().__init__(source, size, mean=crop.mean, std=crop.std, scale=scale, seed=seed)
        self.crop = crop

    def view(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return render_view(x, sample_views(self.crop, x.shape[-2], x.shape[-1], rng)[0], self.crop)


def view_loader(
    source: Dataset,
    *,
    augment: str,
    image_size: int,
    batch_size: int,
    seed: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    cfg: DinoConfig | None = None,
    num_workers: int = 0,
) -> tuple[DataLoader, EpochIndexSampler]:
    """A loader of augmented ``(images [B, 3, S, S], labels [B])`` and its sampler (set ``.epoch``)."""
    if augment == "crop_flip":
        views: Dataset = RandomCropFlipDataset(source, image_size, mean=mean, std=std, scale=crop_scale, seed=seed)
    elif augment == "dino":
        crop = one_view_config(image_size, cfg, mean=mean, std=std).replace(global_crop_scale=tuple(crop_scale))
        views = DinoViewDataset(source, crop, seed=seed)
    else:
        raise ValueError(f"augment={augment!r} is invalid: allowed one of {AUGMENTS}")
    sampler = EpochIndexSampler(len(views), batch_size, seed)
    loader = DataLoader(
        views,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_views,
        persistent_workers=num_workers > 0,
    )
    return loader, sampler


__all__ = ["AUGMENTS", "DinoViewDataset", "one_view_config", "view_loader"]
