"""ONNX export of a backbone, checked against PyTorch with ONNX Runtime on the CPU.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the torch.export-based exporter (the default
since PyTorch 2.9; needs ``onnxscript``). Why not the legacy TorchScript exporter
(``dynamo=False``): on torch 2.14 it is deprecated ("will be removed") and it *traces*, so the
position-embedding interpolation of a ``dynamic_img_size`` ViT is frozen at the example size
(TracerWarnings "Converting a tensor to a Python number"): a dynamic-resolution ONNX model would
be silently wrong at other sizes. torch.export captures the shape arithmetic symbolically, so
one file serves every batch size and (for ViTs built with ``dynamic_img_size``, and CNNs) every
image size that is a multiple of the patch size.

The graph takes ``images`` float32 ``[B, 3, H, W]`` (normalized like the training inputs) and
returns ``features`` float32 ``[B, D]``, the backbone's pooled output (ViT: final-norm CLS token).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models import is_vit

MIN_COSINE = 0.9999
INPUT_NAME, OUTPUT_NAME = "images", "features"


def supports_dynamic_size(backbone: nn.Module) -> bool:
    """CNNs take any size; timm ViTs only when built with ``dynamic_img_size`` (interpolated table)."""
    return bool(getattr(backbone, "dynamic_img_size", False)) if is_vit(backbone) else True


def size_step(backbone: nn.Module) -> int:
    """Input sides must be multiples of this: the ViT patch size, 32 (a ResNet's stride) otherwise."""
    return int(backbone.patch_embed.patch_size[0]) if is_vit(backbone) else 32


def export_onnx(
    backbone: nn.Module, path: str | Path, *, image_size: int, dynamic_size: bool = True, opset: int | None = None
) -> Path:
    """Write ``backbone`` as a single-file ONNX model with a dynamic batch axis.

    Args:
        image_size: side of the example input (and the fixed size when not dynamic).
        dynamic_size: also make H and W dynamic (ignored, i.e. fixed, for ViTs without
            ``dynamic_img_size``).
        opset: ONNX opset; None lets the exporter choose (18+ for the dynamo exporter).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_size = dynamic_size and supports_dynamic_size(backbone)
    was_training = backbone.training
    backbone.eval()
    example = torch.randn(2, 3, image_size, image_size, device=next(backbone.parameters()).device)
    dim = torch.export.Dim.DYNAMIC
    axes = {0: dim, 2: dim, 3: dim} if dynamic_size else {0: dim}
    kwargs: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
    try:
        # The exporter prints progress and warns about its own internals: keep the core quiet.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                backbone,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamo=True,
                dynamic_shapes=(axes,),
                external_data=False,
                verbose=False,
                **kwargs,
            )
    finally:
        backbone.train(was_training)
    return path


def onnx_session(path: str | Path, *, threads: int | None = None):
    """An ONNX Runtime CPU session (``threads``: intra-op threads, None = ORT's default)."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxBackbone(nn.Module):
    """An ONNX Runtime session behind the backbone interface: ``[B, 3, H, W] -> [B, D]`` (CPU).

    Lets `fdino.eval.features.extract_features` and the k-NN code run the ONNX (or int8) model.
    """

    def __init__(self, session, num_features: int | None = None) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.num_features = num_features if num_features is not None else session.get_outputs()[0].shape[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])


class OnnxCheck(NamedTuple):
    """PyTorch vs ONNX Runtime features over a few inputs."""

    min_cosine: float
    """Smallest per-row cosine similarity between the two features."""
    max_abs_diff: float
    """Largest absolute difference of any feature value."""
    shapes: tuple[tuple[int, ...], ...]
    """Input shapes that were compared."""

    @property
    def ok(self) -> bool:
        return self.min_cosine >= MIN_COSINE


def check_shapes(backbone: nn.Module, image_size: int, dynamic_size: bool) -> list[tuple[int, int, int, int]]:
    """Inputs a check should cover: batch 1 and 3 at the export size; another size if dynamic."""
    shapes = [(1, 3, image_size, image_size), (3, 3, image_size, image_size)]
    if dynamic_size and supports_dynamic_size(backbone):
        step = size_step(backbone)
        shapes.append((2, 3, image_size + step, image_size + 2 * step))
    return shapes


@torch.no_grad()
def compare_onnx(
    backbone: nn.Module, onnx_model: nn.Module, shapes: Sequence[Sequence[int]], *, seed: int = 0
) -> OnnxCheck:
    """Features of ``backbone`` (PyTorch) and ``onnx_model`` (e.g. `OnnxBackbone`) on random inputs."""
    gen = torch.Generator().manual_seed(seed)
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    cos, diff = [], []
    try:
        for shape in shapes:
            x = torch.randn(*shape, generator=gen)
            ref = backbone(x.to(device)).float().cpu()
            out = onnx_model(x).float()
            if out.shape != ref.shape:
                raise ValueError(
                    f"ONNX output {tuple(out.shape)} != PyTorch output {tuple(ref.shape)} for input {shape}"
                )
            cos.append(F.cosine_similarity(ref, out, dim=1).min().item())
            diff.append((ref - out).abs().max().item())
    finally:
        backbone.train(was_training)
    return OnnxCheck(min(cos), max(diff), tuple(tuple(int(d) for d in s) for s in shapes))


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantization with ONNX Runtime: int8 weights of MatMul/Gemm, activations
    quantized per batch at run time (no calibration data needed)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # ORT logs "consider pre-processing" on the root logger; its shape-inference pre-pass made no
    # difference to accuracy or speed for timm ViTs (measured), so the advice is silenced here.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        logging.disable(previous)
    return dst


__all__ = [
    "MIN_COSINE",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "export_onnx",
    "onnx_session",
    "OnnxBackbone",
    "OnnxCheck",
    "check_shapes",
    "compare_onnx",
    "quantize_onnx",
    "supports_dynamic_size",
    "size_step",
]
