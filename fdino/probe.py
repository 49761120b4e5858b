"""An online linear probe: a linear classifier on the teacher's detached backbone features, trained beside DINO.

solo-learn and lightly watch self-supervised runs this way: a softmax-regression layer learns, on the
labels of the training batches, to classify the frozen teacher's pooled features (the ones the k-NN
uses); its running training accuracy and its accuracy on held-out images say, for the price of one
no-grad forward of the first global crop per update, whether the features are getting linearly useful.

The probe never touches DINO: its own state (`LinearProbe`: weight, bias, AdamW moments), its own
optimizer, and a teacher forward in eval mode through a separate stateless template (no BatchNorm
statistics update, no random draws). So the DINO state after N steps is bitwise the same with the
probe on or off (tests/test_probe.py).

    probe = init_probe(dim, num_classes, device)
    feats = teacher_features(state, images)                 # [B, D], no gradient
    out = probe_update_(probe, feats, labels, lr=1e-3)       # in place; loss, correct, seen
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value

from .checkpoint import backbone_weights
from .config import DinoConfig
from .models import create_backbone
from .optim import AdamWState, adamw_, init_adamw
from .state import TrainState


class LinearProbe(NamedTuple):
    """The probe's whole state: ``params`` {weight ``[C, D]``, bias ``[C]``} and their AdamW moments."""

    params: dict[str, torch.Tensor]
    opt: AdamWState


def init_probe(dim: int, num_classes: int, device: torch.device | str = "cpu") -> LinearProbe:
    """Zero weights and biases (softmax regression is convex: no random init needed, and none drawn, so
    the global RNG the DINO step uses is untouched)."""
    params = {
        "weight": torch.zeros(num_classes, dim, dtype=torch.float32, device=device),
        "bias": torch.zeros(num_classes, dtype=torch.float32, device=device),
    }
    return LinearProbe(params, init_adamw(params))


def probe_logits(params: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` class scores of features ``[N, D]``."""
    return F.linear(features.float(), params["weight"], params["bias"])


def _loss(params: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor):
    logits = probe_logits(params, features)
    return F.cross_entropy(logits, labels), logits


def probe_update_(
    probe: LinearProbe,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """One AdamW step on the mean cross-entropy of ``features`` ``[B, D]`` (detached) and ``labels`` ``[B]``.

    Updates ``probe`` in place (decoupled weight decay on the weight only, as torch.optim.AdamW with a
    bias group without decay). Returns device tensors: ``loss`` (before the step), ``correct`` (top-1 hits
    of the pre-step logits, i.e. training accuracy on data not yet fitted) and ``seen``.
    """
    names = ("weight", "bias")
    device = probe.params["weight"].device
    grads, (loss, logits) = grad_and_value(_loss, has_aux=True)(probe.params, features.detach(), labels)
    adamw_(
        [probe.params[k] for k in names],
        [grads[k] for k in names],
        [probe.opt.exp_avg[k] for k in names],
        [probe.opt.exp_avg_sq[k] for k in names],
        [probe.opt.count[k] for k in names],
        lr=torch.tensor(lr, device=device),
        wd=torch.tensor(weight_decay, device=device),
        regularized=[True, False],
        betas=betas,
        eps=eps,
    )
    correct = (logits.argmax(1) == labels).sum()
    return {"loss": loss.detach(), "correct": correct, "seen": torch.tensor(labels.numel(), device=labels.device)}


def probe_top1(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of the probe on ``features`` ``[N, D]`` with ``labels`` ``[N]`` (a host read)."""
    with torch.no_grad():
        logits = probe_logits(probe.params, features.to(probe.params["weight"].device))
    return 100.0 * float((logits.argmax(1).cpu() == labels.cpu()).float().mean())


@functools.lru_cache(maxsize=4)
def _eval_backbone(cfg: DinoConfig) -> torch.nn.Module:
    """A stateless backbone (on ``meta``) in eval mode: BatchNorm uses running statistics and leaves them be."""
    with torch.device("meta"):
        return create_backbone(cfg.replace(grad_checkpointing=False), drop_path_rate=0.0).eval()


def teacher_features(state: TrainState, images: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` fp32 pooled features of the teacher backbone on ``images`` ``[B, C, H, W]``, in eval mode and
    without gradient: the features `fdino.train_eval`'s k-NN classifies, read from the state in place."""
    with torch.no_grad():
        return functional_call(_eval_backbone(state.cfg), backbone_weights(state, "teacher"), (images,)).float()


def probe_to_dict(probe: LinearProbe) -> dict[str, torch.Tensor]:
    """Flat tensors for a checkpoint (``probe_from_dict`` reads them back)."""
    out = {f"params.{k}": v for k, v in probe.params.items()}
    for part in ("exp_avg", "exp_avg_sq", "count"):
        out.update({f"{part}.{k}": v for k, v in getattr(probe.opt, part).items()})
    return out


def probe_from_dict(data: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> LinearProbe:
    names = ("weight", "bias")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k: data[f"{prefix}.{k}"].to(device) for k in names}

    return LinearProbe(part("params"), AdamWState(part("exp_avg"), part("exp_avg_sq"), part("count")))
