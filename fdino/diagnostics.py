"""Collapse diagnostics of a DINO step (pure functions of the logits; no host sync).

DINO can collapse two ways (paper sec. 5.3): to a uniform teacher (every output equal; entropy
of q near log K) or to a one-hot teacher (one dimension dominates for every image). The metrics:
- ``teacher_entropy``: mean over teacher rows of H(q) (uniform collapse: -> log K).
- ``teacher_effective_dims``: exp(H(mean over rows of q)), the perplexity of the batch-average
  teacher distribution: how many output dimensions the batch actually uses (one-hot collapse: -> 1).
- ``kl``: mean over pairs of KL(q_i || p_j) = loss - mean H(q_i), since H(q, p) = H(q) + KL(q || p)
  and every teacher crop appears in the same number of pairs. Near 0 with a uniform collapse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def teacher_diagnostics(
    teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: torch.Tensor | float, loss: torch.Tensor
) -> dict[str, torch.Tensor]:
    """teacher_logits ``[G*B, K]`` fp32, center ``[K]`` -> 0-d fp32 tensors."""
    log_q = F.log_softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1)
    q = log_q.exp()
    return _diagnostics(q, -(q * log_q).sum(dim=-1).mean(), center, loss)


def target_diagnostics(targets: torch.Tensor, center: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """`teacher_diagnostics` of given teacher distributions (``[G*B, K]`` probabilities, e.g. Sinkhorn targets)."""
    q = targets.float()
    return _diagnostics(q, -torch.special.xlogy(q, q).sum(dim=-1).mean(), center, loss)


def _diagnostics(
    q: torch.Tensor, entropy: torch.Tensor, center: torch.Tensor, loss: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The metrics from teacher distributions ``q`` ``[G*B, K]`` and their mean per-image entropy."""
    mean_q = q.mean(dim=0)
    mean_entropy = -(mean_q * torch.log(mean_q.clamp_min(1e-30))).sum()
    return {
        "teacher_entropy": entropy,
        "teacher_effective_dims": mean_entropy.exp(),
        "kl": loss.detach().float() - entropy,
        "center_norm": torch.linalg.vector_norm(center.float()),
    }


def collapse_mode(metrics: dict[str, float], out_dim: int) -> str | None:
    """ "uniform", "one-hot" or None: which collapse the readings show (thresholds: `collapse_report`)."""
    entropy, dims, kl = (metrics.get(k) for k in ("teacher_entropy", "teacher_effective_dims", "kl"))
    if entropy is not None and out_dim > 1 and entropy > 0.98 * math.log(out_dim) and (kl is None or kl < 0.02):
        return "uniform"
    if dims is not None and dims < max(2.0, 0.002 * out_dim):
        return "one-hot"
    return None


def collapse_report(metrics: dict[str, float], out_dim: int) -> str | None:
    """A warning text when host-side metric values show collapse, else None.

    Thresholds (paper sec. 5.3, Fig. 7): a uniform teacher has per-sample entropy at log K and
    nothing left to teach (KL between teacher and student near 0), so both must hold: entropy above
    98% of log K and KL below 0.02 nats. A tiny network early in training can sit at 95% of log K
    while still learning (KL 0.05-0.3, measured on `presets.smoke`), which is why entropy alone is
    not enough. One-hot collapse: fewer than max(2, 0.2% of K) effective dimensions used by the
    batch (one dimension dominates). `fdino train` warns only when a reading repeats (see there).
    """
    mode = collapse_mode(metrics, out_dim)
    entropy, dims, kl = (metrics.get(k) for k in ("teacher_entropy", "teacher_effective_dims", "kl"))
    if mode == "uniform":
        log_k = math.log(out_dim)
        return (
            f"collapse warning: teacher entropy {entropy:.3f} is near log K = {log_k:.3f} and the "
            f"teacher-student KL is {kl if kl is not None else float('nan'):.4f} (uniform teacher). "
            "Likely fixes: lower the teacher temperature (teacher_temp, e.g. 0.04), raise center_momentum "
            "less aggressively or check centering is on, lower teacher_momentum (e.g. 0.99) on small data."
        )
    if mode == "one-hot":
        return (
            f"collapse warning: the teacher uses only {dims:.1f} of K = {out_dim} output dimensions "
            "(one dimension dominates). Likely fixes: keep centering on (center_momentum < 1), raise the "
            "teacher temperature slightly, use a smaller out_dim on small data sets, lower the learning rate."
        )
    return None
