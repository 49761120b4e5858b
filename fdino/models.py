"""The DINO network: a timm backbone plus the DINO projection head, driven statelessly.

Modules here are *templates*: they are built on the ``meta`` device and hold no real tensors.
Parameters and buffers live in pytrees (dicts of tensors) inside `TrainState` and are supplied
to every forward with `torch.func.functional_call`. Student and teacher use two instances of the
same definition because the paper's teacher has no stochastic depth and keeps its logits in fp32.
"""

from __future__ import annotations

import functools
import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from . import vit_conv_stem  # noqa: F401  (registers its timm name before any create_model)
from .config import DinoConfig
from .sync_batchnorm import use_synced_batchnorm_


class _LogitLayer(nn.Module):
    """A bias-free last layer of the head that can compute its logits in fp32 outside autocast.

    The teacher's logits are divided by tau_t ~ 0.04: bf16 rounding would be magnified 25x, so
    the teacher's last layer runs in fp32 (see KERNEL_NOTES).
    """

    fp32: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        if self.fp32:
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._linear(x.float())
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class WeightNormLinear(_LogitLayer):
    """Linear layer with weight normalization written out: W = g * v / ||v|| (row-wise, no bias).

    The paper's head uses `nn.utils.weight_norm`, which relies on forward pre-hooks that mutate
    module state; writing it out keeps the forward a pure function of (weight_v, weight_g).
    Names match the reference checkpoint layout (``weight_v`` and ``weight_g``).
    With ``trainable_scale=False`` (the paper's ``norm_last_layer``), g is a buffer fixed to 1,
    so the logits are cosines in [-1, 1].
    """

    def __init__(self, in_dim: int, out_dim: int, *, trainable_scale: bool, fp32: bool) -> None:
        super().__init__()
        # Default nn.Linear init for the direction, as in the reference head (its last layer is
        # created after the truncated-normal init pass).
        weight = torch.empty(out_dim, in_dim)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.weight_v = nn.Parameter(weight)
        scale = torch.ones(out_dim, 1)
        if trainable_scale:
            self.weight_g = nn.Parameter(scale)
        else:
            self.register_buffer("weight_g", scale)
        self.fp32 = fp32

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        direction = self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, direction * self.weight_g)


class PlainLinear(_LogitLayer):
    """A plain linear layer without bias, ``x @ W^T`` (``head_weight_norm=False``; parameter ``weight``).

    Initialized like `WeightNormLinear`'s direction (nn.Linear's default), so the two heads start
    from the same logits up to the row norms.
    """

    def __init__(self, in_dim: int, out_dim: int, *, fp32: bool) -> None:
        super().__init__()
        weight = torch.empty(out_dim, in_dim)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.weight = nn.Parameter(weight)
        self.fp32 = fp32

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


_HEAD_NORMS = {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}
_HEAD_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class DinoHead(nn.Module):
    """MLP -> L2 normalization -> weight-normalized linear layer to K dimensions (paper, sec. 3.1).

    ``mlp`` holds ``head_n_layers`` linear layers; each but the last is followed by the configured
    norm (``head_norm``: none, BatchNorm or LayerNorm over the features) and activation. The last
    layer (``last_layer``) is weight-normalized (`WeightNormLinear`) or plain (`PlainLinear`).
    """

    def __init__(self, in_dim: int, cfg: DinoConfig, *, fp32_logits: bool) -> None:
        super().__init__()
        dims = [in_dim] + [cfg.head_hidden_dim] * (cfg.head_n_layers - 1) + [cfg.head_bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:  # hidden layers: [norm], activation; the bottleneck output has neither
                if cfg.head_norm != "none":
                    layers.append(_HEAD_NORMS[cfg.head_norm](b))
                layers.append(_HEAD_ACTIVATIONS[cfg.head_activation]())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        if cfg.head_weight_norm:
            self.last_layer: _LogitLayer = WeightNormLinear(
                cfg.head_bottleneck_dim, cfg.out_dim, trainable_scale=not cfg.norm_last_layer, fp32=fp32_logits
            )
        else:
            self.last_layer = PlainLinear(cfg.head_bottleneck_dim, cfg.out_dim, fp32=fp32_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, K)
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class DinoNetwork(nn.Module):
    """Backbone + head over a list of crops (the reference code's multi-crop wrapper).

    Consecutive crops of equal resolution go through the backbone in one call; the head runs once
    on all features. Output rows are crop-major: rows j*B .. j*B+B-1 belong to crop j.
    """

    def __init__(self, backbone: nn.Module, head: DinoHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.channels_last = False  # set on step templates of convolutional backbones; see network_template

    def forward(
        self, crops: list[torch.Tensor] | tuple[torch.Tensor, ...], with_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``[V*B, K]`` logits; with ``with_features`` also the ``[V*B, D]`` backbone features (KoLeo reads them)."""
        per_group = []
        for group in resolution_groups(crops):
            x = torch.cat(group)  # (n*B, C, H, W)
            if self.channels_last:  # the convolutions then run (and return) NHWC; weights stay as they are
                x = x.contiguous(memory_format=torch.channels_last)
            per_group.append(self.backbone(x))
        features = torch.cat(per_group)
        logits = self.head(features)
        return (logits, features) if with_features else logits


def resolution_groups(crops) -> list[list[torch.Tensor]]:
    """Split a crop list into runs of consecutive crops with the same (C, H, W)."""
    groups: list[list[torch.Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[1:] == crop.shape[1:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return groups


def is_vit(module: nn.Module) -> bool:
    """True for timm vision transformers (they have a patch embedding and a CLS token option)."""
    return hasattr(module, "patch_embed") and hasattr(module, "blocks")


def timm_kwargs(cfg: DinoConfig, *, drop_path_rate: float, vit: bool) -> dict:
    """The keyword arguments `create_backbone` passes to `timm.create_model` for this config."""
    kwargs = dict(cfg.backbone_kwargs)
    kwargs["num_classes"] = 0
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    if vit:
        kwargs.setdefault("img_size", cfg.img_size or cfg.global_crop_size)
        if cfg.patch_size is not None:
            kwargs.setdefault("patch_size", cfg.patch_size)
        # Local crops have another resolution: interpolate position embeddings per forward.
        kwargs.setdefault("dynamic_img_size", True)
    return kwargs


def create_backbone(cfg: DinoConfig, *, drop_path_rate: float | None = None) -> nn.Module:
    """A freshly initialized timm backbone without classifier (real tensors, current device)."""
    rate = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
    try:
        with torch.device("meta"):
            probe = timm.create_model(cfg.arch, pretrained=False, num_classes=0)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        raise ValueError(
            f"DinoConfig.arch={cfg.arch!r} is not a timm model; list names with timm.list_models()"
        ) from err
    vit = is_vit(probe)
    if not vit and (cfg.patch_size is not None):
        raise ValueError(f"DinoConfig.patch_size is set but arch={cfg.arch!r} is not a ViT; unset it")
    backbone = timm.create_model(cfg.arch, pretrained=False, **timm_kwargs(cfg, drop_path_rate=rate, vit=vit))
    if cfg.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled feature the backbone returns."""
    return int(backbone.num_features)


def create_network(cfg: DinoConfig, *, teacher: bool = False) -> DinoNetwork:
    """Backbone + head with real, freshly initialized tensors (the student's initialization)."""
    backbone = create_backbone(cfg, drop_path_rate=0.0 if teacher else None)
    head = DinoHead(feature_dim(backbone), cfg, fp32_logits=teacher)
    return DinoNetwork(backbone, head)


@functools.lru_cache(maxsize=16)
def network_template(
    cfg: DinoConfig, *, teacher: bool, fused_attention: bool = True, channels_last: bool = False
) -> DinoNetwork:
    """The stateless module (on ``meta``) that `functional_call` drives, cached per config.

    The student template has the configured stochastic depth; the teacher template has none and
    computes its logits in fp32, as in the paper's reference code. ``fused_attention=False`` makes
    ViT blocks form the attention matrix explicitly (see `fused_attention_pays`); same math.
    ``channels_last`` feeds a convolutional backbone NHWC crops: oneDNN's bf16 convolutions are
    about 1.4x faster that way on the CPU (bench/results/cpu-speed.md). Not under vmap (the batched
    step), which cannot query memory formats. The state's tensors keep their layout either way.
    With ``cfg.sync_batchnorm`` its BatchNorm layers are `fdino.sync_batchnorm` classes (plain BatchNorm
    outside a data-parallel step).
    """
    with torch.device("meta"):
        module = create_network(cfg, teacher=teacher)
    module.channels_last = channels_last and not is_vit(module.backbone)
    # Same parameters and buffers; the statistics span workers only inside a data-parallel step.
    module.unsynced_batchnorm = tuple(use_synced_batchnorm_(module)) if cfg.sync_batchnorm else ()
    if not fused_attention:
        for sub in module.modules():
            if hasattr(sub, "fused_attn"):  # timm's Attention: q @ k^T, softmax, @ v instead of SDPA
                sub.fused_attn = False
    return module.train()


def fused_attention_pays(device: torch.device, precision: str) -> bool:
    """Whether ViT attention should call the fused `scaled_dot_product_attention` kernel.

    Everywhere but bf16 on the CPU. There (torch 2.14, AVX512-BF16), the CPU flash-attention
    kernel's bf16 backward is 2.5-4x slower than its fp32 one, while the explicit q @ k^T, softmax,
    @ v runs its matrix products as bf16 GEMMs: 2x faster than fp32 flash attention at the
    ViT-tiny crop shapes (measured: bench/results/cpu-speed.md). With few tokens per crop the
    T x T matrix is small, so the memory the fused kernel saves does not matter.
    """
    return not (device.type == "cpu" and precision == "bf16")


def split_params_and_buffers(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Detached copies of a module's trainable parameters and its buffers, as two pytrees."""
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    return params, buffers


def is_last_layer(name: str) -> bool:
    """Parameters frozen during the first `freeze_last_layer` epochs."""
    return name.startswith("head.last_layer.")


def is_regularized(name: str, tensor: torch.Tensor) -> bool:
    """Weight decay applies to weights only: not to biases and norm parameters (ndim 1)."""
    return not (name.endswith(".bias") or tensor.ndim <= 1)
