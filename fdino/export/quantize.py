"""Dynamic int8 quantization for CPU inference, and what it costs in k-NN accuracy and buys in speed.

Two backends, both "dynamic": weights are stored in int8, activations are quantized per batch at
run time, so no calibration data is needed; only the Linear layers (ViT: qkv, proj, fc1, fc2;
over 95% of a ViT's FLOPs) are quantized, convolutions stay fp32.

  * ``"onnxruntime"``: ``onnxruntime.quantization.quantize_dynamic`` on the exported ONNX model
    (MatMul -> MatMulInteger / DynamicQuantizeMatMul). The maintained path, and the one to deploy.
  * ``"torch"``: ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear``. On torch 2.14 it still
    works but is deprecated (its warning says it moves to torchao's ``quantize_``; torchao is not a
    dependency here), so it is kept for in-PyTorch use and comparison only.

`compare_models` (k-NN top-1 and forward time of a model and its changed copy) also reports
what pruning (`fdino.export.prune`) costs and buys.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

BACKENDS = ("onnxruntime", "torch")


def quantize_torch(backbone: nn.Module) -> nn.Module:
    """A copy of ``backbone`` with every ``nn.Linear`` replaced by a dynamic int8 Linear (CPU only)."""
    quant = getattr(getattr(torch, "ao", None), "quantization", None)
    if quant is None or not hasattr(quant, "quantize_dynamic"):
        raise RuntimeError(
            "torch.ao.quantization.quantize_dynamic is not available in this PyTorch; "
            "use the 'onnxruntime' backend (fdino quantize --backend onnxruntime)"
        )
    model = copy.deepcopy(backbone).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # documented above; said once in the CLI
        warnings.simplefilter("ignore", UserWarning)
        return quant.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


@torch.no_grad()
def time_forward(
    model: Callable[[torch.Tensor], Any], images: torch.Tensor, *, repeats: int = 5, warmup: int = 1
) -> float:
    """Seconds per forward of ``images``: the best of ``repeats`` timed calls after ``warmup``.

    The minimum is the least noisy estimate on a shared machine (interference only adds time).
    """
    for _ in range(warmup):
        model(images)
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        model(images)
        best = min(best, time.perf_counter() - start)
    return best


class ModelComparison(NamedTuple):
    """A reference model and a changed copy (int8, pruned) on one data set: k-NN accuracy and forward time."""

    label: str
    """What changed and how it runs: "int8 (onnxruntime)", "prune 50% (torch)"."""
    names: tuple[str, str]
    """Short names of the two models in the summary: ("fp32", "int8"), ("dense", "pruned")."""
    k: int
    """Neighbours of the k-NN vote."""
    top1_reference: float
    """k-NN top-1 (%) with the reference model's features."""
    top1_candidate: float
    """k-NN top-1 (%) with the changed model's features."""
    min_cosine: float
    """Smallest cosine similarity between a query's reference and changed features."""
    seconds_reference: float
    """Best time of one forward of the benchmark batch, reference model."""
    seconds_candidate: float
    """Same for the changed model."""
    batch: int
    """Images in the benchmark batch."""

    @property
    def top1_change(self) -> float:
        return self.top1_candidate - self.top1_reference

    @property
    def speedup(self) -> float:
        return self.seconds_reference / self.seconds_candidate

    def summary(self) -> str:
        a, b = self.names
        return (
            f"{self.label}: k-NN top-1 (k={self.k}) {self.top1_reference:.2f}% {a} -> {self.top1_candidate:.2f}% "
            f"{b} (change {self.top1_change:+.2f} points); feature cosine >= {self.min_cosine:.4f}; forward of "
            f"{self.batch} images {1e3 * self.seconds_reference:.1f} ms {a} -> {1e3 * self.seconds_candidate:.1f} ms "
            f"{b} (speed-up x{self.speedup:.2f})"
        )


def compare_models(
    reference: nn.Module,
    candidate: nn.Module,
    memory: Any,
    query: Any,
    *,
    transform: Callable | None,
    label: str,
    names: tuple[str, str] = ("fp32", "int8"),
    k: int = 20,
    batch_size: int = 256,
    bench_batch: int = 64,
    repeats: int = 5,
) -> ModelComparison:
    """k-NN top-1 of both models (memory bank and queries from ``memory`` / ``query``) and the best
    forward time of a ``bench_batch``-image query batch.

    ``memory`` / ``query``: data sets or loaders as `fdino.eval.features.extract_features` takes;
    ``transform``: e.g. ``EvalTransform(size, mean=, std=)`` for data sets.
    """
    from ..eval.features import extract_features  # noqa: PLC0415
    from ..eval.knn import knn_classify  # noqa: PLC0415

    models = {"reference": reference, "candidate": candidate}
    top1, queries = {}, {}
    for name, model in models.items():
        bank, bank_labels = extract_features(model, memory, batch_size=batch_size, transform=transform)
        q, q_labels = extract_features(model, query, batch_size=batch_size, transform=transform)
        top1[name] = knn_classify(bank, bank_labels, q, q_labels, ks=(k,))[k]["top1"]
        queries[name] = q
    cosine = torch.nn.functional.cosine_similarity(queries["reference"], queries["candidate"], dim=1).min().item()
    images = _first_images(query, bench_batch, transform)
    seconds = {name: time_forward(model, images, repeats=repeats) for name, model in models.items()}
    return ModelComparison(
        label,
        names,
        k,
        top1["reference"],
        top1["candidate"],
        cosine,
        seconds["reference"],
        seconds["candidate"],
        len(images),
    )


def compare_int8(
    fp32: nn.Module, int8: nn.Module, memory: Any, query: Any, *, backend: str, **kwargs: Any
) -> ModelComparison:
    """`compare_models` of an fp32 model and its int8 copy made by ``backend``."""
    return compare_models(fp32, int8, memory, query, label=f"int8 ({backend})", names=("fp32", "int8"), **kwargs)


def _first_images(data: Any, n: int, transform: Callable | None) -> torch.Tensor:
    """Up to ``n`` input tensors ``[n, 3, H, W]`` from a data set or a loader (the benchmark batch)."""
    from ..eval.features import iter_batches  # noqa: PLC0415

    chunks, have = [], 0
    for images, _ in iter_batches(data, batch_size=n, transform=transform):
        chunks.append(images)
        have += len(images)
        if have >= n:
            break
    return torch.cat(chunks)[:n]


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: allowed one of {BACKENDS}")
    return backend


__all__ = [
    "BACKENDS",
    "ModelComparison",
    "check_backend",
    "compare_int8",
    "compare_models",
    "quantize_torch",
    "time_forward",
]
