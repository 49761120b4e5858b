"""Collapse indicators of a *representation* (backbone features), for eval-time logging.

`fdino.diagnostics` watches the head's outputs inside the step; these numbers look at the
features the evaluation uses, so they catch a backbone whose features have become (nearly) the
same for every image even while the head's statistics still look fine:
  * ``mean_cosine``: average cosine similarity of distinct images (collapse: -> 1).
  * ``normalized_std``: per-dimension standard deviation of the L2-normalized features, averaged
    and scaled by sqrt(D) (SimSiam, Chen & He 2021, section 4.1): about 1 for features spread
    over the sphere, -> 0 under collapse.
  * ``effective_rank``: exp of the entropy of the normalized singular values of the centered
    features (Roy & Vetterli 2007): how many directions the features really use (collapse: -> 1,
    or 0 when every feature is identical).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def representation_stats(features: torch.Tensor) -> dict[str, float]:
    """``features [N, D]`` (N >= 2) -> ``{"mean_cosine", "normalized_std", "effective_rank"}``."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"representation_stats needs [N >= 2, D] features, got {tuple(features.shape)}")
    n, d = features.shape
    x = features.double()
    z = F.normalize(x, dim=1)
    # sum_{i != j} z_i . z_j = |sum_i z_i|^2 - N: no N x N matrix needed.
    mean_cosine = (z.sum(dim=0).square().sum() - n) / (n * (n - 1))
    normalized_std = z.std(dim=0).mean() * math.sqrt(d)
    centered = x - x.mean(dim=0)
    # Singular values from the smaller Gram matrix: O(min(N, D)^2 * max(N, D)).
    gram = centered.T @ centered if d <= n else centered @ centered.T
    singular = torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt()
    total = singular.sum()
    if total <= 1e-12 * max(1.0, float(x.abs().max())):
        effective_rank = 0.0
    else:
        p = singular / total
        effective_rank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))
    return {
        "mean_cosine": float(mean_cosine),
        "normalized_std": float(normalized_std),
        "effective_rank": effective_rank,
    }


__all__ = ["representation_stats"]
