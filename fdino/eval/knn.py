"""Weighted k-nearest-neighbour classification (Caron et al. 2021, section 4.1 and appendix).

The paper's k-NN protocol: L2-normalize the frozen features of the train split (the *memory
bank*) and of the query split, take the k bank images of highest cosine similarity s_j to a
query, and let each vote for its label with weight exp(s_j / T), T = 0.07. The class with the
largest summed weight is the prediction (top-5: the five largest).

Memory stays bounded whatever the bank size: the bank is streamed to the device chunk by chunk,
each chunk is compared with the queries chunk by chunk, and only a running top-k per query
(``[M, k]``) survives a bank chunk. Neither the full ``[M, N]`` similarity matrix nor the whole
bank ever sits on the device, so a 1.3M x 384 ImageNet bank works on a small GPU (or a CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..checks import check_int

PAPER_KS = (10, 20, 100, 200)
PAPER_TEMPERATURE = 0.07


@torch.no_grad()
def knn_topk(
    bank: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    *,
    query_chunk: int = 1024,
    bank_chunk: int = 32768,
    device: str | torch.device = "cpu",
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices of each query's ``k`` nearest bank rows, best first.

    Args:
        bank: ``[N, D]`` features (any device; each chunk is sent to ``device`` exactly once).
        queries: ``[M, D]`` features (sent chunk by chunk).
        k: neighbours to keep; clipped to N.
        query_chunk, bank_chunk: block sizes; besides the ``[M, k]`` running result, the device
            holds one ``[query_chunk, bank_chunk]`` similarity block and one bank chunk.
        normalize: L2-normalize rows first (cosine similarity); False takes plain dot products.
    Returns:
        ``(sims [M, k'], indices [M, k'])`` on the CPU, float32 / int64, ``k' = min(k, N)``.
    """
    check_int("query_chunk", query_chunk, lo=1)
    check_int("bank_chunk", bank_chunk, lo=1)
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"knn_topk needs bank [N, D] and queries [M, D] with the same D, got "
            f"{tuple(bank.shape)} and {tuple(queries.shape)}"
        )
    n, m = bank.shape[0], queries.shape[0]
    if n == 0:
        raise ValueError("knn_topk: the memory bank is empty")
    k = min(int(k), n)

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, torch.float32)
        return F.normalize(x, dim=1) if normalize else x

    starts = range(0, m, query_chunk)
    best = [
        (
            torch.full((min(query_chunk, m - q0), 0), float("-inf"), device=device),
            torch.zeros((min(query_chunk, m - q0), 0), dtype=torch.int64, device=device),
        )
        for q0 in starts
    ]
    # Bank chunks outside, query chunks inside: the (large) bank crosses to the device once; the
    # query chunk is re-sent and re-normalized per bank chunk, which costs 1/bank_chunk of the matmul.
    for b0 in range(0, n, bank_chunk):
        b = prep(bank[b0 : b0 + bank_chunk])  # (bc, D)
        for j, q0 in enumerate(starts):
            sims = prep(queries[q0 : q0 + query_chunk]) @ b.T  # (qc, bc)
            s, i = sims.topk(min(k, b.shape[0]), dim=1)
            # Merge with the running top-k: the top-k of the union lies within the two lists.
            s = torch.cat([best[j][0], s], dim=1)
            i = torch.cat([best[j][1], i + b0], dim=1)
            s, pos = s.topk(min(k, s.shape[1]), dim=1)
            best[j] = (s, i.gather(1, pos))
    if not best:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
    return torch.cat([s for s, _ in best]).cpu(), torch.cat([i for _, i in best]).cpu()


def knn_vote(
    sims: torch.Tensor, neighbor_labels: torch.Tensor, k: int, *, temperature: float, num_classes: int
) -> torch.Tensor:
    """Class scores of the paper's weighted vote from the ``k`` first neighbours.

    Args:
        sims: ``[M, K]`` cosine similarities, best first (K >= k).
        neighbor_labels: ``[M, K]`` int64 labels of those neighbours.
    Returns:
        ``[M, num_classes]``: sum over the k neighbours of exp(s / T) per label.
    """
    weights = (sims[:, :k].double() / temperature).exp()  # float64: exp(1/0.07) ~ 1.6e6, sums stay exact
    votes = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64, device=sims.device)
    return votes.scatter_add_(1, neighbor_labels[:, :k], weights)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Percentage of rows whose label is among the ``j`` highest scores, for each j in ``ks``.

    ``j`` is clipped to the number of classes (top-5 of a 3-class problem is top-3, always 100%).
    """
    order = scores.argsort(dim=1, descending=True)
    hits = order == labels[:, None]
    m = max(len(labels), 1)
    return {j: 100.0 * hits[:, : min(j, scores.shape[1])].any(dim=1).sum().item() / m for j in ks}


def _check_labels(name: str, labels: torch.Tensor, n: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} labels for {n} feature rows")
    if len(labels) and labels.min() < 0:
        raise ValueError(
            f"{name} holds negative (unknown) labels; k-NN needs a labeled memory bank and "
            f"labeled queries (use the 'memory' and 'query' splits)"
        )
    return labels


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int] = PAPER_KS,
    temperature: float = PAPER_TEMPERATURE,
    num_classes: int | None = None,
    query_chunk: int = 1024,
    bank_chunk: int = 32768,
    device: str | torch.device = "cpu",
) -> dict[int, dict[str, float]]:
    """The paper's weighted k-NN: top-1 / top-5 accuracy (%) of the queries for each k.

    Args:
        train_feats: ``[N, D]`` memory bank features (normalized here; any scale).
        train_labels: ``[N]`` labels in [0, C).
        test_feats: ``[M, D]`` query features; test_labels ``[M]``.
        ks: numbers of neighbours; the top max(ks) are found once and reused (as the paper does).
        temperature: T in the vote weight exp(s / T).
        num_classes: C; default 1 + the largest label seen.
        query_chunk, bank_chunk, device: see `knn_topk`.
    Returns:
        ``{k: {"top1": %, "top5": %}}``. A k larger than N uses all N bank rows.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={ks!r} is invalid: allowed a non-empty list of integers >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: allowed a number > 0")
    train_labels = _check_labels("train_labels", train_labels, len(train_feats))
    test_labels = _check_labels("test_labels", test_labels, len(test_feats))
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max() if len(test_labels) else 0)) + 1
    sims, idx = knn_topk(
        train_feats, test_feats, max(ks), query_chunk=query_chunk, bank_chunk=bank_chunk, device=device
    )
    neighbor_labels = train_labels[idx]  # (M, K)
    results = {}
    for k in ks:
        scores = knn_vote(sims, neighbor_labels, k, temperature=temperature, num_classes=num_classes)
        acc = topk_accuracy(scores, test_labels, (1, 5))
        results[k] = {"top1": acc[1], "top5": acc[5]}
    return results


def center_features(train_feats: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Subtract the bank's per-dimension mean from the bank and from every other set.

    Raw pixels are all positive, so without centering every pair of images has a large cosine
    similarity and k-NN degenerates; centering with *train* statistics only keeps queries unseen.
    """
    mean = train_feats.double().mean(dim=0).to(train_feats.dtype)
    return (train_feats - mean,) + tuple(x - mean for x in others)


__all__ = ["knn_topk", "knn_vote", "knn_classify", "topk_accuracy", "center_features", "PAPER_KS", "PAPER_TEMPERATURE"]
