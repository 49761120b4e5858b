"""Magnitude pruning of a backbone's Linear and Conv2d weights for export (``fdino export --prune``).

What is pruned: the ``weight`` of every ``nn.Linear`` and ``nn.Conv2d`` of the backbone (ViT: the
patch embedding, qkv, proj, fc1, fc2; ResNet: every convolution) except the classifier
(``get_classifier()``, an Identity in fdino's backbones). Norms, biases, the CLS token and the
position table are never touched. Pruning uses `torch.nn.utils.prune` and then ``prune.remove``,
so the result is a plain module whose weights hold exact zeros: its state dict has the same keys
and shapes as before, and an export of it loads everywhere a model loads.

Unstructured (default): per-layer L1, ``prune.l1_unstructured`` with the same fraction in every
tensor, so each tensor holds ``round(fraction * numel)`` zeros. Why per layer, not
``prune.global_unstructured``: weight scales are not comparable across layers (a BatchNorm after
each ResNet convolution makes that convolution's scale arbitrary; timm initializes a ViT's Linear
layers with std 0.02 and its patch-embedding convolution with PyTorch's default), so one global
threshold can empty a whole layer and cut the network.

Structured (``structured=True``), whole units by L2 norm, the same fraction of each group:
  * attention heads (timm ``Attention``: ``qkv``, ``proj``, ``num_heads``, ``head_dim``): a head's
    q, k and v rows of ``qkv`` and its input columns of ``proj`` (so its output, bias included,
    reaches nothing);
  * MLP hidden units (timm ``Mlp``: ``fc1``, ``fc2``): a unit's row of ``fc1`` and column of ``fc2``;
  * every other layer: whole output channels (``prune.ln_structured(n=2, dim=0)``).
Structured pruning only *masks*: the tensors keep their shapes. Physically dropping heads,
units or channels would give blocks different widths, which ``timm.create_model(arch, **kwargs)``
cannot rebuild, so the export format (and `fdino.weights.load_model`) would have to change. Dense
kernels do the same work on zeros, so neither kind of pruning is expected to speed up a dense
CPU forward, and ``fdino export`` measures it rather than assuming (small32_resnet at init, 32
images, 1 thread of a busy 2-core CPU: 13-16 ms dense, unstructured and structured alike, best of
10, three rounds). What zeros do buy: a compressed file shrinks (zlib), and a sparse or
structure-aware runtime could skip them.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

PRUNED_TYPES = (nn.Linear, nn.Conv2d)


def check_fraction(fraction: float) -> float:
    """``fraction`` if ``0 < fraction < 1`` (NaN fails too), else ValueError naming the range."""
    if not (0.0 < fraction < 1.0):
        raise ValueError(f"fraction={fraction!r} is invalid: allowed 0 < fraction < 1")
    return float(fraction)


def prunable_layers(backbone: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every Linear / Conv2d outside the classifier, in module order."""
    classifier = backbone.get_classifier() if hasattr(backbone, "get_classifier") else None
    skipped = {id(m) for m in classifier.modules()} if isinstance(classifier, nn.Module) else set()
    for name, module in backbone.named_modules():
        if isinstance(module, PRUNED_TYPES) and id(module) not in skipped:
            yield name, module


@dataclass(frozen=True, kw_only=True)
class LayerSparsity:
    """Zeros in one pruned weight tensor."""

    name: str
    """Module name in the backbone (``blocks.0.attn.qkv``)."""
    kind: str
    """Module type: "Linear" or "Conv2d"."""
    zeros: int
    """Entries of the weight that are exactly zero."""
    total: int
    """Entries of the weight."""


@dataclass(frozen=True, kw_only=True)
class PruneStats:
    """What `prune_backbone` did, measured on the pruned weights."""

    fraction: float
    """The fraction asked for (of each tensor, or of each group's units when structured)."""
    structured: bool
    """Whole heads / units / channels (True) or single weights (False)."""
    layers: tuple[LayerSparsity, ...]
    """Zeros of every pruned tensor, counted after pruning."""
    groups: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Structured only: ``{"attention heads": (pruned, total), "MLP units": ..., "output channels": ...}``."""

    @property
    def sparsity(self) -> float:
        """Fraction of zero entries over all pruned tensors."""
        return sum(layer.zeros for layer in self.layers) / max(1, sum(layer.total for layer in self.layers))

    def by_kind(self) -> dict[str, float]:
        """Fraction of zero entries per module type (``{"Linear": 0.5, "Conv2d": 0.5}``)."""
        zeros: dict[str, int] = {}
        total: dict[str, int] = {}
        for layer in self.layers:
            zeros[layer.kind] = zeros.get(layer.kind, 0) + layer.zeros
            total[layer.kind] = total.get(layer.kind, 0) + layer.total
        return {kind: zeros[kind] / total[kind] for kind in total}

    def summary(self) -> str:
        scheme = "structured, L2 norm" if self.structured else "unstructured, per-layer L1"
        kinds = ", ".join(f"{kind} {100 * value:.2f}%" for kind, value in self.by_kind().items())
        total = sum(layer.total for layer in self.layers)
        text = (
            f"prune {100 * self.fraction:g}% ({scheme}): {100 * self.sparsity:.2f}% of {total:,} weights in "
            f"{len(self.layers)} tensors are zero ({kinds}); norms, biases, CLS and position embeddings untouched"
        )
        if self.groups:
            text += "; zeroed (masks, shapes kept) " + ", ".join(
                f"{name} {a}/{b}" for name, (a, b) in self.groups.items()
            )
        return text


def weight_sparsity(backbone: nn.Module) -> tuple[LayerSparsity, ...]:
    """Zeros of each `prunable_layers` weight (works on any backbone, pruned or not)."""
    return tuple(
        LayerSparsity(
            name=name,
            kind=type(module).__name__,
            zeros=int((module.weight == 0).sum()),
            total=module.weight.numel(),
        )
        for name, module in prunable_layers(backbone)
    )


def _units_to_prune(fraction: float, count: int) -> int:
    return round(fraction * count)  # torch.nn.utils.prune's rounding, so every group counts alike


def _weakest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``round(fraction * len)`` smallest scores."""
    return torch.topk(scores, _units_to_prune(fraction, len(scores)), largest=False).indices


def _mask(module: nn.Module, mask: torch.Tensor) -> None:
    prune.custom_from_mask(module, "weight", mask.to(module.weight.dtype))
    prune.remove(module, "weight")


def _is_attention(m: nn.Module) -> bool:
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and hasattr(m, "num_heads")):
        return False
    width = int(m.num_heads) * int(getattr(m, "head_dim", 0))
    return qkv.out_features == 3 * width and proj.in_features == width


def _is_mlp(m: nn.Module) -> bool:
    fc1, fc2 = getattr(m, "fc1", None), getattr(m, "fc2", None)
    return isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and fc1.out_features == fc2.in_features


def _prune_heads(attn: nn.Module, fraction: float) -> tuple[int, int]:
    heads, dim = int(attn.num_heads), int(attn.head_dim)
    qkv = attn.qkv.weight.reshape(3, heads, dim, -1)  # rows of qkv: (q|k|v, head, head_dim)
    proj = attn.proj.weight.reshape(-1, heads, dim)  # columns of proj: (head, head_dim)
    scores = (qkv.square().sum((0, 2, 3)) + proj.square().sum((0, 2))).sqrt()  # [heads]
    weakest = _weakest(scores, fraction)
    qkv_mask, proj_mask = torch.ones_like(qkv), torch.ones_like(proj)
    qkv_mask[:, weakest], proj_mask[:, weakest] = 0, 0
    _mask(attn.qkv, qkv_mask.reshape(attn.qkv.weight.shape))
    _mask(attn.proj, proj_mask.reshape(attn.proj.weight.shape))
    return len(weakest), heads


def _prune_units(mlp: nn.Module, fraction: float) -> tuple[int, int]:
    fc1, fc2 = mlp.fc1.weight, mlp.fc2.weight  # [hidden, in], [out, hidden]
    scores = (fc1.square().sum(1) + fc2.square().sum(0)).sqrt()  # [hidden]
    weakest = _weakest(scores, fraction)
    fc1_mask, fc2_mask = torch.ones_like(fc1), torch.ones_like(fc2)
    fc1_mask[weakest], fc2_mask[:, weakest] = 0, 0
    _mask(mlp.fc1, fc1_mask)
    _mask(mlp.fc2, fc2_mask)
    return len(weakest), len(scores)


@torch.no_grad()
def prune_backbone(backbone: nn.Module, fraction: float, *, structured: bool = False) -> tuple[nn.Module, PruneStats]:
    """A pruned copy of ``backbone`` and what was pruned (see the module docstring); the input is untouched.

    Args:
        fraction: ``0 < fraction < 1``: of each tensor's weights (unstructured), or of each group's
            heads / hidden units / output channels (structured), rounded as `torch.nn.utils.prune`
            rounds (``round(fraction * n)``).
        structured: whole heads, MLP units and output channels by L2 norm instead of single weights by L1.
    """
    fraction = check_fraction(fraction)
    pruned = copy.deepcopy(backbone)
    layers = {id(module) for _, module in prunable_layers(pruned)}  # not yet pruned
    groups = {"attention heads": [0, 0], "MLP units": [0, 0], "output channels": [0, 0]}
    for module in pruned.modules() if structured else ():
        for is_group, prune_group, name, parts in (
            (_is_attention, _prune_heads, "attention heads", ("qkv", "proj")),
            (_is_mlp, _prune_units, "MLP units", ("fc1", "fc2")),
        ):
            ids = {id(getattr(module, part, None)) for part in parts}
            if is_group(module) and ids <= layers:  # both layers targeted (not the classifier) and still whole
                removed, total = prune_group(module, fraction)
                groups[name][0] += removed
                groups[name][1] += total
                layers -= ids
    for _, module in prunable_layers(pruned):
        if id(module) not in layers:  # pruned with its head or MLP unit above
            continue
        if structured:
            channels = module.weight.shape[0]
            prune.ln_structured(module, "weight", amount=fraction, n=2, dim=0)
            groups["output channels"][0] += _units_to_prune(fraction, channels)
            groups["output channels"][1] += channels
        else:
            prune.l1_unstructured(module, "weight", amount=fraction)
        prune.remove(module, "weight")
    counts = {name: (a, b) for name, (a, b) in groups.items() if b} if structured else {}
    stats = PruneStats(fraction=fraction, structured=structured, layers=weight_sparsity(pruned), groups=counts)
    return pruned, stats


def compressed_size(data: bytes, *, level: int = 6) -> int:
    """Bytes of ``data`` after zlib at ``level`` (6: gzip's default): what zeros save on disk."""
    return len(zlib.compress(data, level))


__all__ = [
    "PRUNED_TYPES",
    "LayerSparsity",
    "PruneStats",
    "check_fraction",
    "compressed_size",
    "prunable_layers",
    "prune_backbone",
    "weight_sparsity",
]
