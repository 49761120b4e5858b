"""A ViT whose patch embedding is a small convolutional stem (Xiao et al. 2021, "Early Convolutions
Help Transformers See Better"), registered in timm as ``fdino_vit_conv_stem``.

Why: a plain ViT on 32 px images learns slowly from scratch (its patch embedding is one linear
map per 4 x 4 patch and it has no locality prior); a stem of stride-2 3x3 convolutions (BatchNorm,
ReLU) followed by one 1x1 convolution to the embedding width makes the same token grid as patch
size ``p`` and leaves the transformer blocks, CLS token and attention maps as they are. The paper
finds such a stem makes ViTs converge faster and less sensitive to the optimizer; on 2 CPU cores
that is what a time budget needs (bench/results/recipes-cpu.md).

Because it is a registered timm name, every place that builds a backbone from ``arch`` and the
timm keyword arguments (training, `fdino.weights.load_model`, export, serving) builds this one the
same way: ``DinoConfig(arch="fdino_vit_conv_stem", patch_size=4, backbone_kwargs=(("embed_dim",
96), ...))``. ``patch_size`` is the stem's total stride (a power of two >= 2); the stem's widths double from
``embed_dim / 2**n`` up to ``embed_dim / 2`` over its ``n = log2(patch_size)`` convolutions.
"""

from __future__ import annotations

import math

from timm.layers import ConvNormAct
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import _create_vision_transformer_hybrid
from torch import nn

ARCH = "fdino_vit_conv_stem"


def conv_stem(in_chans: int, embed_dim: int, stride: int) -> nn.Sequential:
    """``log2(stride)`` 3x3 convolutions of stride 2, each with BatchNorm and ReLU."""
    n = int(math.log2(stride)) if stride >= 2 else 0
    if n == 0 or 2**n != stride:
        raise ValueError(
            f"{ARCH}: patch_size={stride} must be a power of two >= 2 (the stem halves the image per convolution)"
        )
    widths = [max(8, embed_dim // 2 ** (n - i)) for i in range(n)]
    ins = [in_chans, *widths[:-1]]
    layers = [ConvNormAct(i, o, kernel_size=3, stride=2, padding=1, bias=False) for i, o in zip(ins, widths)]
    return nn.Sequential(*layers)


@register_model
def fdino_vit_conv_stem(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT (default: width 192, depth 12, 3 heads) with a convolutional stem of total stride ``patch_size``."""
    if pretrained:
        raise ValueError(f"{ARCH} has no pretrained weights")
    stride = kwargs.pop("patch_size", 16)
    kwargs = {"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs}
    stem = conv_stem(kwargs.get("in_chans", 3), kwargs["embed_dim"], stride)
    # The 1x1 projection of HybridEmbed (patch_size 1 on the stem's output) is the stem's last layer.
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {"architecture": ARCH}  # none to download
    return _create_vision_transformer_hybrid(ARCH, backbone=stem, pretrained=False, **kwargs)
