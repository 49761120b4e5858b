"""Few-label subsets of a training split, for fine-tuning and few-shot evaluation.

The paper's semi-supervised table (Caron et al. 2021, section 4.2, following SimCLR) fine-tunes
on 1% and 10% of the ImageNet labels. `label_subset` draws such a subset class-balanced: the same
number of items from every class present (``fraction=0.01`` of ImageNet's 1,281,167 images in 1,000
classes is 13 per class, about the 12.8 of SimCLR's fixed 1% list), or a fixed number per class
(``per_class=k``, the k-shot setting). A class with fewer items than asked contributes all it has.

It indexes the *train* split only, so a subset is disjoint from the test split by construction:
nothing here ever sees test labels, and evaluating a model fine-tuned on the subset on the test
split is a held-out evaluation.

The draw is a pure function of ``(labels, count, seed)``: it uses a local ``torch.Generator``,
never the global RNG, so a subset reproduces whatever else the program draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_int, check_real


def _as_labels(labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """The labels as a 1-D int64 CPU tensor ``[N]``; raise on anything that is not a labelled split."""
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(list(labels), dtype=torch.int64)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (one class id per item); got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids; got dtype {y.dtype}")
    if len(y) == 0:
        raise ValueError("labels is empty: pass the training split's labels (one class id per item)")
    y = y.detach().to("cpu", torch.int64)
    negative = int((y < 0).sum())
    if negative:
        raise ValueError(
            f"labels has {negative} negative entries (unlabelled items); "
            "a few-label subset needs class ids >= 0: pass the labelled training items only"
        )
    return y


def label_subset(
    labels: torch.Tensor | Sequence[int],
    *,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """A class-balanced random subset of the training split: sorted int64 indices into ``labels``.

    Args:
        labels: ``[N]`` class ids (>= 0) of the TRAIN split; the result indexes this split only, so
            it is disjoint from the test split by construction.
        per_class: take this many items of every class present (>= 1).
        fraction: in ``(0, 1]``; take ``max(1, round(fraction * N / C))`` items of every class,
            ``C`` the number of classes present. ``fraction=1`` returns every index (all labels,
            balanced or not). Give exactly one of ``per_class`` and ``fraction``.
        seed: the draw is a pure function of the labels, the count and the seed; different seeds
            give different draws of the classes larger than the count. Draws for different counts
            with the same seed are not promised to be nested.

    Either way a class smaller than the count contributes all its items.

    Returns:
        ``[M]`` int64, sorted ascending, unique, each in ``[0, N)``.
    """
    if (per_class is None) == (fraction is None):
        raise ValueError(
            f"label_subset takes exactly one of per_class= and fraction= (got per_class={per_class!r}, "
            f"fraction={fraction!r}): per_class=k for k items of every class, fraction=f for a share of the split"
        )
    y = _as_labels(labels)
    check_int("seed", seed, lo=0)
    n = len(y)
    if per_class is not None:
        count = check_int("per_class", per_class, lo=1)
    else:
        check_real("fraction", fraction, 0.0, 1.0, lo_open=True)
        if fraction == 1.0:
            return torch.arange(n, dtype=torch.int64)
        num_classes = len(torch.unique(y))
        count = max(1, round(fraction * n / num_classes))

    # A random permutation, then a stable sort by class: items grouped by class, each group in
    # random order; the first `count` of every group are the draw. Vectorized, so 1.3 M labels
    # in 1,000 classes cost one sort rather than 1,000 passes over the split.
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    order = perm[torch.sort(y[perm], stable=True).indices]  # [N]
    _, sizes = torch.unique_consecutive(y[order], return_counts=True)  # [C]
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(n) - torch.repeat_interleave(starts, sizes)  # position within the class
    return torch.sort(order[rank < count]).values


def subset_sizes(labels: torch.Tensor | Sequence[int], indices: torch.Tensor | Sequence[int]) -> dict[int, int]:
    """How many of ``indices`` fall in each class: ``{class id: count}`` for every class in ``labels``.

    Classes with no chosen item are listed with 0, so a report shows what a subset left out.
    ``labels`` is ``[N]`` as for `label_subset`; ``indices`` is ``[M]`` with entries in ``[0, N)``.
    """
    y = _as_labels(labels)
    idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(list(indices), dtype=torch.int64)
    if idx.ndim != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"indices must be a 1-D integer tensor; got shape {tuple(idx.shape)}, dtype {idx.dtype}")
    idx = idx.detach().to("cpu", torch.int64)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(y)):
        raise ValueError(
            f"indices must be positions in labels, in [0, {len(y)}); got min {int(idx.min())}, max {int(idx.max())}"
        )
    classes = torch.unique(y)
    chosen, counts = torch.unique(y[idx], return_counts=True)
    sizes = dict.fromkeys(classes.tolist(), 0)
    sizes.update(zip(chosen.tolist(), counts.tolist()))
    return sizes


__all__ = ["label_subset", "subset_sizes"]
