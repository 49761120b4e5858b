"""The KoLeo regularizer (DINOv2, Oquab et al. 2023, sec. 4; Sablayrolles et al. 2019, "Spreading
vectors for similarity search"): the Kozachenko-Leonenko differential-entropy estimate of a batch of
features, which pushes each feature away from its nearest neighbour so that features spread uniformly:

    L_koleo = -1/n sum_i log(d_i + eps),   d_i = min_{j != i} || x_i - x_j ||,   x = L2-normalized features

As in DINOv2's KoLeoLoss: the nearest neighbour is the largest inner product (the same for unit vectors),
found without gradient, and the distance is `F.pairwise_distance` (its eps keeps the gradient finite
for coinciding features); DINOv2 applies it to the student's backbone (CLS) features of each global
crop separately, over the batch, and sums over the global crops (`koleo_per_crop`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KOLEO_EPS = 1e-8


def koleo_loss(features: torch.Tensor, eps: float = KOLEO_EPS) -> torch.Tensor:
    """0-d fp32 KoLeo loss of ``features`` ``[n, D]`` (n >= 2 rows; normalized here, in fp32 outside autocast)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"koleo_loss: features must be [n, D] with n >= 2 (a nearest neighbour needs another row), got "
            f"{tuple(features.shape)}; with koleo_weight > 0 every worker's micro-batch needs at least 2 images"
        )
    with torch.autocast(device_type=features.device.type, enabled=False):
        work = torch.promote_types(features.dtype, torch.float32)
        x = F.normalize(features.to(work), p=2, dim=-1, eps=eps)  # [n, D]
        with torch.no_grad():
            dots = x @ x.T  # [n, n]; the largest inner product is the nearest neighbour of a unit vector
            self_pair = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
            nearest = dots.masked_fill(self_pair, -torch.inf).argmax(dim=1)  # [n]
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)  # [n]
        return -torch.log(distances + eps).mean()


def koleo_per_crop(features: torch.Tensor, n_global_crops: int) -> torch.Tensor:
    """Sum over the G global crops of `koleo_loss` of each crop's ``[B, D]`` rows (``features``: ``[G*B, D]``,
    crop-major): the nearest neighbour of an image is searched among other images of the same crop, never
    among the other views of itself (DINOv2)."""
    return sum(koleo_loss(crop) for crop in features.chunk(n_global_crops))


__all__ = ["KOLEO_EPS", "koleo_loss", "koleo_per_crop"]
