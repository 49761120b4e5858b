"""Loaders: deterministic, resumable, shardable multi-crop batches, and a plain evaluation loader.

Determinism contract: the crops of sample ``i`` in epoch ``e`` are a pure function of
``(seed, e, i)`` (`derive_seed(seed, "crops", e, i)` seeds the augmentation), and the batches of
epoch ``e`` are slices of a permutation that is a pure function of ``(seed, e)``. Nothing depends
on ``num_workers``, on worker scheduling, or on where a run resumed (bit for bit: those leave
every batch's composition unchanged; a sample rendered in a *different* batch, e.g. with another
batch size, agrees to float rounding, about 1e-6). The caller's global RNGs are never read or
advanced (the DataLoader gets its own generator for its per-epoch base seed).

Sharding: epoch ``e``'s permutation is cut into global batches of ``world_size * batch_size``
(incomplete tail dropped); rank ``r`` takes the ``r``-th ``batch_size`` slice of each. So shards
are disjoint, equal in size, and a global batch holds the same images for any ``world_size``.

Bad files: a sample that fails to load (`BadImageError`) is replaced by the next loadable index
(deterministically), so batches stay full and shapes fixed (drop_last). The failure travels with
the batch to the main process, which warns once per file and counts it in ``loader.skipped``:
that works the same with or without worker processes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..checks import check_int
from .augment import EvalTransform, MultiCrop
from .images import BadImageError
from .seeds import derive_seed, torch_generator

_MAX_CONSECUTIVE_BAD = 64  # a run of this many unloadable files is a broken data set, not noise


# --- index plans (pure) ---------------------------------------------------------------------------
def batches_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches each rank gets per epoch: ``n // (batch_size * world_size)``."""
    return n // (batch_size * world_size)


def epoch_batches(
    n: int, *, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """Sample indices of every batch of one epoch for one rank: int64 ``[batches_per_epoch, batch_size]``."""
    _check_plan(n, batch_size, rank, world_size)
    steps = batches_per_epoch(n, batch_size, world_size)
    perm = torch.randperm(n, generator=torch_generator(seed, "perm", epoch))
    return perm[: steps * world_size * batch_size].view(steps, world_size, batch_size)[:, rank]


def _check_plan(n: int, batch_size: int, rank: int, world_size: int) -> None:
    check_int("batch_size", batch_size, lo=1)
    check_int("world_size", world_size, lo=1)
    check_int("rank", rank, 0, world_size - 1)
    if n < batch_size * world_size:
        raise ValueError(
            f"the data set has {n} samples, fewer than one global batch of "
            f"batch_size={batch_size} x world_size={world_size}"
        )


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches of ``(epoch, index)`` keys for epoch ``e`` from batch ``start_batch`` on.

    Set the position with `set_epoch` before iterating. Keys carry the epoch so that persistent
    workers (which hold stale copies of everything else) still derive the right seeds.
    """

    def __init__(self, n: int, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        _check_plan(n, batch_size, rank, world_size)
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        steps = batches_per_epoch(self.n, self.batch_size, self.world_size)
        check_int("epoch", epoch, lo=0)
        check_int("start_batch", start_batch, 0, steps)
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.batch_size, self.world_size) - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # Built eagerly: the position is captured when iteration starts, not on the first next().
        plan = epoch_batches(
            self.n,
            batch_size=self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
        )[self.start_batch :]
        return iter([[(self.epoch, i) for i in row] for row in plan.tolist()])


# --- data sets producing augmented samples --------------------------------------------------------
def load_with_fallback(source: Dataset, index: int) -> tuple[object, int, list[tuple[str, str]]]:
    """``source[index]``, or the next loadable index after it (wrapping): (image, label, skipped).

    ``skipped`` lists ``(path, reason)`` of each file that failed on the way.
    """
    skipped: list[tuple[str, str]] = []
    n = len(source)
    for step in range(min(n, _MAX_CONSECUTIVE_BAD)):
        try:
            image, label = source[(index + step) % n]
            return image, label, skipped
        except BadImageError as e:
            skipped.append((e.path, e.reason))
    raise RuntimeError(
        f"{len(skipped)} consecutive files failed to load, starting at index {index} "
        f"({skipped[0][0]!r}: {skipped[0][1]}); the data set looks broken"
    )


class MultiCropDataset(Dataset):
    """Augmented samples keyed by ``(epoch, index)``.

    ``dataset[(e, i)] -> (crops: V x [3, S, S], label, skipped)``; ``dataset.__getitems__(keys)``
    (what DataLoader calls with a batch sampler) returns the whole batch already collated,
    ``(crops: V x [B, 3, S, S], labels [B], skipped)``, rendered by the batched fast path.
    """

    def __init__(self, source: Dataset, transform: MultiCrop, seed: int = 0) -> None:
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, keys: Sequence[tuple[int, int]]):
        images, labels, skipped, seeds = [], [], [], []
        for epoch, index in keys:
            image, label, bad = load_with_fallback(self.source, index)
            images.append(image)
            labels.append(label)
            skipped.extend(bad)
            # Seeded by the *requested* index: a replacement image still gets sample i's own crops.
            seeds.append(derive_seed(self.seed, "crops", epoch, index))
        return self.transform.batch(images, seeds), torch.tensor(labels, dtype=torch.int64), skipped

    def __getitem__(self, key: tuple[int, int]):
        crops, labels, skipped = self.__getitems__([key])
        return [c[0] for c in crops], int(labels[0]), skipped


def _collated(batch):
    """collate_fn for data sets whose ``__getitems__`` already returns a collated batch."""
    return batch


class _EvalDataset(Dataset):
    def __init__(self, source: Dataset, transform: EvalTransform) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label, skipped = load_with_fallback(self.source, index)
        return self.transform(image), label, skipped


def _collate_eval(samples: Sequence) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return images, labels, [item for s in samples for item in s[2]]


# --- loaders (I/O edge: processes, warnings) --------------------------------------------------------
class _SkipLog:
    """Files skipped so far (path -> reason); warns once per file, in the main process."""

    def __init__(self) -> None:
        self._skipped: dict[str, str] = {}

    def _record(self, skipped: list[tuple[str, str]]) -> None:
        for path, reason in skipped:
            if path not in self._skipped:
                self._skipped[path] = reason
                warnings.warn(f"skipping unreadable image {path!r}: {reason}", stacklevel=3)

    @property
    def skipped(self) -> dict[str, str]:
        """Every file skipped so far, with the reason (a copy)."""
        return dict(self._skipped)

    @property
    def num_skipped(self) -> int:
        """How many distinct files were skipped so far (for the run summary)."""
        return len(self._skipped)


def _dataloader_kwargs(
    num_workers: int, pin_memory: bool | None, persistent_workers: bool, prefetch_factor: int | None, seed: int
) -> dict:
    check_int("num_workers", num_workers, lo=0)
    kwargs = dict(
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        # The DataLoader draws a base seed per epoch; its own generator keeps the caller's global
        # RNG untouched (our augmentations never use the worker seeds anyway).
        generator=torch_generator(seed, "dataloader"),
    )
    if num_workers > 0:
        kwargs.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor or 2)
    return kwargs


class MultiCropLoader(_SkipLog):
    """Multi-crop batches by epoch, ``for crops, labels in loader.epoch(e, start_batch=k)``, or by
    global step across epochs, ``for step, epoch, crops, labels in loader.steps(s)``.

    Each batch is ``(crops, labels)``: ``crops`` a list of V float tensors ``[B, 3, S_k, S_k]``
    (globals first, normalized), ``labels`` int64 ``[B]`` (-1 when unknown). ``batch_size`` is
    per rank (global batch = batch_size * world_size). Every epoch has exactly ``len(loader)``
    full batches; ``epoch(e, start_batch=k)`` yields batches k.. of epoch e exactly as an
    uninterrupted iteration would (mid-epoch resume). Worker processes persist across epochs.
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: MultiCrop,
        *,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        multiprocessing_context=None,
    ) -> None:
        super().__init__()
        self.sampler = ResumableBatchSampler(
            len(dataset), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size
        )
        self.dataloader = DataLoader(
            MultiCropDataset(dataset, transform, seed),
            batch_sampler=self.sampler,
            collate_fn=_collated,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
            **_dataloader_kwargs(num_workers, pin_memory, persistent_workers, prefetch_factor, seed),
        )
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size

    def __len__(self) -> int:
        """Batches per epoch (per rank)."""
        return batches_per_epoch(self.sampler.n, self.batch_size, self.world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """The batches of ``epoch`` from ``start_batch`` to the end (start_batch = steps done in it)."""
        self.sampler.set_epoch(epoch, start_batch)
        for crops, labels, skipped in self.dataloader:
            self._record(skipped)
            yield crops, labels

    def steps(self, start_step: int = 0) -> Iterator[tuple[int, int, list[torch.Tensor], torch.Tensor]]:
        """``(step, epoch, crops, labels)`` for global steps ``start_step, start_step + 1, ...``, endlessly.

        Crosses epochs; the batches are those `epoch` gives (step s is batch ``s % len(self)`` of
        epoch ``s // len(self)``), so a run resumed at step s sees what an uninterrupted one does.
        The caller decides when to stop (e.g. ``itertools.islice``): nothing is loaded past that.
        """
        check_int("start_step", start_step, lo=0)
        epoch, start_batch = divmod(start_step, len(self))
        step = start_step
        while True:
            for crops, labels in self.epoch(epoch, start_batch):
                yield step, epoch, crops, labels
                step += 1
            epoch, start_batch = epoch + 1, 0


class EvalLoader(_SkipLog):
    """Single-view batches in data set order: ``for images, labels in loader`` (last batch may be short).

    ``images`` float ``[B, 3, S, S]`` from `EvalTransform`; ``labels`` int64 ``[B]``. For feature
    extraction (k-NN memory bank and queries, linear probes).
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: EvalTransform,
        *,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, lo=1)
        self.dataloader = DataLoader(
            _EvalDataset(dataset, transform),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=_collate_eval,
            **_dataloader_kwargs(num_workers, pin_memory, persistent_workers, None, 0),
        )

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, skipped in self.dataloader:
            self._record(skipped)
            yield images, labels


__all__ = [
    "batches_per_epoch",
    "epoch_batches",
    "ResumableBatchSampler",
    "load_with_fallback",
    "MultiCropDataset",
    "MultiCropLoader",
    "EvalLoader",
]
