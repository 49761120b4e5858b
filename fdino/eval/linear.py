"""Linear probe on frozen features (Caron et al. 2021, section 4.1 and appendix; reference
``eval_linear.py``).

The paper's recipe: a linear layer (weights ~ N(0, 0.01), zero bias, no batch norm) on the
concatenated CLS tokens of the last n blocks, trained with SGD (momentum 0.9, no weight decay)
for 100 epochs, lr 0.001 x batch / 256 with a cosine decay to 0, on random-resized-crop +
horizontal-flip views of the training images passed through the frozen backbone; evaluated on
the center-cropped validation images. `linear_eval_images` does exactly that.

`train_linear_probe` is the fast mode on cached features (one forward of the data set, then
thousands of cheap steps): same optimizer and schedule, no augmentation. By default it
standardizes the features with train statistics, an affine reparametrization of the same
classifier that only preconditions SGD (`standardize=False` is the paper's exact setting); the
returned weights are folded back to act on raw features.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.augment import random_resized_crop_box
from .features import batch_features, extract_features
from .knn import topk_accuracy


class LinearProbe(NamedTuple):
    """A trained linear classifier on raw features: ``logits = feats @ weight.T + bias``."""

    weight: torch.Tensor
    """``[C, D]``."""
    bias: torch.Tensor
    """``[C]``."""

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``[N, D] -> [N, C]``."""
        return F.linear(feats.to(self.weight), self.weight, self.bias)


def cosine_lr(step: int | torch.Tensor, total: int, peak: float) -> float:
    """The paper's cosine annealing from ``peak`` to 0 over ``total`` steps."""
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(int(step), total) / max(total, 1)))


def init_linear(dim: int, num_classes: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference initialization: weights ~ N(0, 0.01^2), zero bias. ``([C, D], [C])``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes, dim, generator=g) * 0.01, torch.zeros(num_classes)


def sgd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    buffers: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
) -> None:
    """In-place SGD with momentum, PyTorch semantics (v <- m v + g + wd p; p <- p - lr v)."""
    for p, g, v in zip(params, grads, buffers):
        if weight_decay:
            g = g + weight_decay * p
        v.mul_(momentum).add_(g)
        p.sub_(lr * v)


def _num_classes(*labels: torch.Tensor) -> int:
    return int(max(int(y.max()) for y in labels if len(y))) + 1


def train_linear_probe(
    feats: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    batch_size: int | None = 1024,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    standardize: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LinearProbe:
    """Fit a linear classifier to cached features ``[N, D]`` with labels ``[N]`` in [0, C).

    ``batch_size=None`` trains full-batch (one step per epoch). ``lr`` defaults to 0.1 with
    standardization and to the paper's 0.001 x batch / 256 without. Returns the probe on CPU.
    """
    labels = torch.as_tensor(labels).long()
    if len(feats) != len(labels) or len(feats) == 0:
        raise ValueError(
            f"train_linear_probe needs equally many features and labels, got {len(feats)} and {len(labels)}"
        )
    if labels.min() < 0:
        raise ValueError("train_linear_probe needs labeled features (found negative labels)")
    num_classes = num_classes or _num_classes(labels)
    n, d = feats.shape
    bs = n if batch_size is None else min(int(batch_size), n)
    if lr is None:
        lr = 0.1 if standardize else 0.001 * bs / 256
    x = feats.float().to(device)
    y = labels.to(device)
    mean = x.mean(dim=0) if standardize else torch.zeros(d, device=device)
    std = x.std(dim=0).clamp_min(1e-6) if standardize else torch.ones(d, device=device)
    w, b = (t.to(device) for t in init_linear(d, num_classes, seed=seed))
    buffers = [torch.zeros_like(w), torch.zeros_like(b)]
    steps_per_epoch = math.ceil(n / bs)
    total = epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(device) if bs < n else torch.arange(n, device=device)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            xb = (x[idx] - mean) / std
            # Closed-form gradient of the mean cross-entropy: (softmax - onehot) / B.
            err = torch.softmax(xb @ w.T + b, dim=1)
            err[torch.arange(len(idx), device=device), y[idx]] -= 1.0
            err /= len(idx)
            sgd_step(
                [w, b],
                [err.T @ xb, err.sum(dim=0)],
                buffers,
                lr=cosine_lr(step, total, lr),
                momentum=momentum,
                weight_decay=weight_decay,
            )
            step += 1
    # Fold the standardization in: w (x - m) / s + b = (w / s) x + (b - (w / s) m).
    w_raw = w / std
    return LinearProbe(w_raw.cpu(), (b - w_raw @ mean).cpu())


def probe_accuracy(probe: LinearProbe, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{"top1": %, "top5": %}`` of ``probe`` on features ``[N, D]``."""
    acc = topk_accuracy(probe.logits(feats.float()), torch.as_tensor(labels).long(), (1, 5))
    return {"top1": acc[1], "top5": acc[5]}


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    **kwargs: Any,
) -> dict[str, Any]:
    """Fast mode end to end: `train_linear_probe` on train, accuracy on test.

    Returns ``{"top1", "top5", "train_top1", "probe"}``; kwargs go to `train_linear_probe`.
    """
    kwargs.setdefault("num_classes", _num_classes(torch.as_tensor(train_labels), torch.as_tensor(test_labels)))
    probe = train_linear_probe(train_feats, train_labels, **kwargs)
    result: dict[str, Any] = dict(probe_accuracy(probe, test_feats, test_labels))
    result["train_top1"] = probe_accuracy(probe, train_feats, train_labels)["top1"]
    result["probe"] = probe
    return result


# --- the paper's recipe on images ----------------------------------------------------------------------
class EpochIndexSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches of ``(epoch, index)`` keys; the permutation is a function of (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for s in range(0, self.n, self.batch_size):
            yield [(self.epoch, i) for i in order[s : s + self.batch_size]]


class RandomCropFlipDataset(Dataset):
    """Training views for the probe: RandomResizedCrop(size, scale, bicubic) + flip + normalize.

    ``dataset[(epoch, i)] -> (float [3, size, size], label)``; the randomness is a pure function
    of (seed, epoch, i), so results do not depend on workers and no global RNG is touched.
    """

    def __init__(
        self,
        source: Dataset,
        size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.08, 1.0),
        seed: int = 0,
    ) -> None:
        self.source, self.size, self.scale, self.seed = source, size, scale, seed
        self.mean, self.std = list(mean), list(std)

    def __len__(self) -> int:
        return len(self.source)

    # Names this class's random stream; a subclass drawing other views uses its own.
    RNG_TAG = "linear-probe"

    def __getitem__(self, key: tuple[int, int]):
        from ..data.augment import as_uint8_chw  # noqa: PLC0415
        from ..data.loader import load_with_fallback  # noqa: PLC0415
        from ..data.seeds import derive_seed  # noqa: PLC0415

        epoch, index = key
        image, label, _ = load_with_fallback(self.source, index)
        rng = random.Random(derive_seed(self.seed, self.RNG_TAG, epoch, index))
        return self.view(as_uint8_chw(image), rng), label

    def view(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """uint8 ``[3, H, W]`` -> one normalized training view ``[3, size, size]``."""
        from torchvision.transforms import InterpolationMode  # noqa: PLC0415
        from torchvision.transforms.v2 import functional as TF  # noqa: PLC0415

        top, left, h, w = random_resized_crop_box(x.shape[-2], x.shape[-1], self.scale, rng)
        x = TF.resized_crop(
            x, top, left, h, w, [self.size, self.size], interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        if rng.random() < 0.5:
            x = TF.horizontal_flip(x)
        return TF.normalize(x.float().div_(255.0), self.mean, self.std)


def collate_views(samples):
    """``[(view [3, S, S], label)] -> (images [B, 3, S, S], labels [B])``: a batch of training views."""
    return torch.stack([s[0] for s in samples]), torch.tensor([int(s[1]) for s in samples])


def linear_eval_images(
    backbone: nn.Module,
    train_data: Dataset,
    test_data: Dataset | Iterable,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    epochs: int = 100,
    batch_size: int = 1024,
    lr: float | None = None,
    momentum: float = 0.9,
    n_last_blocks: int = 1,
    avgpool: bool = False,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    seed: int = 0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    on_epoch=None,
) -> dict[str, Any]:
    """The paper's linear evaluation: train on augmented views through the frozen backbone.

    ``train_data``: map-style ``(image, label)`` data set (uint8 tensors or PIL images);
    ``test_data``: the same, or a loader of normalized batches. ``lr`` defaults to
    0.001 x batch / 256. ``on_epoch(epoch, mean_loss)`` is called after each epoch (progress).
    Returns ``{"top1", "top5", "probe"}`` measured on center crops of ``test_data``.
    """
    from ..data import EvalTransform  # noqa: PLC0415
    from .features import is_map_dataset  # noqa: PLC0415

    lr = 0.001 * batch_size / 256 if lr is None else lr
    views = RandomCropFlipDataset(train_data, image_size, mean=mean, std=std, scale=crop_scale, seed=seed)
    sampler = EpochIndexSampler(len(views), batch_size, seed)
    loader = DataLoader(views, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_views)
    backbone.eval()
    w = b = buffers = None
    total, step = epochs * len(sampler), 0
    for epoch in range(epochs):
        sampler.epoch = epoch
        losses = []
        for images, labels in loader:
            with torch.no_grad():
                feats = batch_features(
                    backbone, images.to(device), n_last_blocks=n_last_blocks, avgpool=avgpool
                ).float()
            labels = labels.to(device)
            if w is None:  # the feature width is known after the first batch
                classes = (
                    num_classes
                    or len(getattr(train_data, "classes", ()))
                    or _num_classes(torch.as_tensor(getattr(train_data, "labels", labels)))
                )
                w, b = (t.to(device) for t in init_linear(feats.shape[1], classes, seed=seed))
                buffers = [torch.zeros_like(w), torch.zeros_like(b)]
            logits = feats @ w.T + b
            losses.append(F.cross_entropy(logits, labels).item())
            err = torch.softmax(logits, dim=1)
            err[torch.arange(len(labels), device=device), labels] -= 1.0
            err /= len(labels)
            sgd_step([w, b], [err.T @ feats, err.sum(dim=0)], buffers, lr=cosine_lr(step, total, lr), momentum=momentum)
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, sum(losses) / max(len(losses), 1))
    transform = EvalTransform(image_size, mean=tuple(mean), std=tuple(std)) if is_map_dataset(test_data) else None
    test_feats, test_labels = extract_features(
        backbone,
        test_data,
        batch_size=batch_size,
        device=device,
        n_last_blocks=n_last_blocks,
        avgpool=avgpool,
        num_workers=num_workers,
        transform=transform,
    )
    probe = LinearProbe(w.cpu(), b.cpu())
    return {**probe_accuracy(probe, test_feats, test_labels), "probe": probe}


__all__ = [
    "LinearProbe",
    "train_linear_probe",
    "probe_accuracy",
    "linear_probe",
    "linear_eval_images",
    "RandomCropFlipDataset",
    "EpochIndexSampler",
    "collate_views",
    "cosine_lr",
    "init_linear",
    "sgd_step",
]
