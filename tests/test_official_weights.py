"""Official DINO checkpoints (facebookresearch/dino layout) load into timm backbones with the same features.

No download: the tests build state dicts in the official layout. The ViT side is an independent,
minimal re-implementation of the official ``vision_transformer.py`` forward (explicit softmax
attention, LayerNorm eps 1e-6, CLS token after the final norm) whose module names produce the
official key names; the ResNet-50 side is torchvision's ``resnet50``, which is what the official
code trains. Those weights are wrapped the ways the official code saves them (backbone-only
release files, teacher with ``backbone.``/``head.`` keys, the full training checkpoint with a DDP
student, optimizer state and an ``argparse.Namespace``), loaded, and compared feature for feature.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fdino.weights import guess_timm_arch, load_model, timm_to_official, torch_load_safe, unwrap_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


# --- an official-layout ViT (names as in facebookresearch/dino vision_transformer.py) ----------------
class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, C) -> (B, N, C), attention written out as in the paper's code
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), _Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class OfficialViT(nn.Module):
    """Official DINO ViT at its native resolution: forward returns the normed CLS token ``[B, D]``."""

    def __init__(self, *, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6, img: int = 224) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Identity()  # MultiCropWrapper replaces it; contributes no keys
        with torch.no_grad():  # non-trivial norms, so a swapped norm1/norm2 cannot pass unnoticed
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)

    def forward(self, x):
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def dino_head_keys(dim: int, prefix: str) -> dict[str, torch.Tensor]:
    """A (small) DINO projection head in the official layout: must be dropped on loading."""
    return {
        f"{prefix}head.mlp.0.weight": torch.randn(8, dim),
        f"{prefix}head.mlp.0.bias": torch.zeros(8),
        f"{prefix}head.last_layer.weight_g": torch.ones(16, 1),
        f"{prefix}head.last_layer.weight_v": torch.randn(16, 8),
    }


def full_checkpoint(
    student: dict, teacher: dict, *, arch: str, patch: int, dim: int, teacher_prefix: str = "backbone."
) -> dict:
    """What facebookresearch/dino's main_dino.py saves as checkpoint.pth (a small head, same layout)."""
    return {
        "student": {**timm_to_official(student, prefix="module.backbone."), **dino_head_keys(dim, "module.")},
        "teacher": {
            **timm_to_official(teacher, prefix=teacher_prefix),
            **dino_head_keys(dim, teacher_prefix.replace("backbone.", "")),
        },
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}},
            "param_groups": [{"lr": 0.1, "weight_decay": 0.04, "params": [0]}],
        },
        "epoch": 100,
        "args": argparse.Namespace(
            arch=arch,
            patch_size=patch,
            out_dim=65536,
            norm_last_layer=True,
            momentum_teacher=0.996,
            use_fp16=True,
            data_path="/path/to/imagenet/train",
            output_dir=".",
            local_crops_scale=(0.05, 0.4),
            seed=0,
        ),
        "dino_loss": {"center": torch.zeros(1, 16)},
        "fp16_scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 10,
        },
    }


@pytest.fixture(scope="module")
def vit_small():
    torch.manual_seed(1)
    model = OfficialViT().eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        return model.state_dict(), model(images), images


def features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(images)


# --- ViT-S/16 in every wrapping --------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["release", "teacher_prefixed", "module_prefixed", "full_checkpoint"])
def test_vit_small_official_layouts_give_the_official_features(vit_small, layout):
    state, want, images = vit_small
    if layout == "release":  # dino_deitsmall16_pretrain.pth: the teacher backbone, plain names
        payload = dict(state)
    elif layout == "teacher_prefixed":  # checkpoint["teacher"] saved on its own
        payload = {**timm_to_official(state, prefix="backbone."), **dino_head_keys(384, "")}
    elif layout == "module_prefixed":
        payload = {**timm_to_official(state, prefix="module.backbone."), **dino_head_keys(384, "module.")}
    else:
        student = {k: v + 0.01 for k, v in state.items()}  # a different network: must not be picked
        payload = full_checkpoint(student, state, arch="vit_small", patch=16, dim=384)
    loaded = load_model(payload, arch="vit_small_patch16_224")
    assert loaded.info.arch == "vit_small_patch16_224" and loaded.backbone.num_features == 384
    torch.testing.assert_close(features(loaded.backbone, images), want, rtol=1e-4, atol=1e-4)
    # The architecture is recognized without arch= (from the weights, or the checkpoint's args).
    recognized = load_model(payload)
    assert recognized.info.arch == "vit_small_patch16_224" and recognized.kind == "official"
    torch.testing.assert_close(features(recognized.backbone, images), want, rtol=1e-4, atol=1e-4)


def test_full_checkpoint_file_student_and_arch_from_args(vit_small, tmp_path):
    state, want, images = vit_small
    student = {k: v * 1.01 for k, v in state.items()}
    path = tmp_path / "checkpoint.pth"
    torch.save(full_checkpoint(student, state, arch="deit_small", patch=16, dim=384), path)  # old name: deit_*
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # the args Namespace is why a plain weights_only load fails
    assert guess_timm_arch({}, torch_load_safe(path)["args"]) == "vit_small_patch16_224"
    loaded = load_model(path, which="student")
    assert loaded.info.arch == "vit_small_patch16_224" and loaded.kind == "official"
    reference = OfficialViT().eval()
    reference.load_state_dict(student)
    torch.testing.assert_close(features(loaded.backbone, images), features(reference, images), rtol=1e-4, atol=1e-4)
    model = load_model(path)  # the teacher, ready for evaluation
    assert model.image_size == 224 and model.cfg is None and model.info.which == "teacher"
    assert not any(p.requires_grad for p in model.backbone.parameters()) and not model.backbone.training
    torch.testing.assert_close(features(model.backbone, images), want, rtol=1e-4, atol=1e-4)
    # With --arch given, the Namespace still marks it official, and the same teacher loads.
    named = load_model(path, arch="vit_small_patch16_224")
    assert named.kind == "official"
    torch.testing.assert_close(features(named.backbone, images), want, rtol=1e-4, atol=1e-4)


def test_official_teacher_file_loads_with_and_without_arch(vit_small, tmp_path):
    state, want, images = vit_small
    torch.save({**timm_to_official(state, prefix="backbone."), **dino_head_keys(384, "")}, tmp_path / "teacher.pth")
    model = load_model(tmp_path / "teacher.pth", arch="vit_small_patch16_224")
    torch.testing.assert_close(features(model.backbone, images), want, rtol=1e-4, atol=1e-4)
    loaded = load_model(tmp_path / "teacher.pth")  # the architecture is recognized, no --arch needed
    assert loaded.info.arch == "vit_small_patch16_224" and loaded.info.model_kwargs["patch_size"] == 16
    torch.testing.assert_close(features(loaded.backbone, images), want, rtol=1e-4, atol=1e-4)


# --- ViT-B/16 and ResNet-50 ---------------------------------------------------------------------------------
def test_vit_base_release_file():
    torch.manual_seed(2)
    model = OfficialViT(dim=768, heads=12).eval()
    images = torch.randn(1, 3, 224, 224)
    loaded = load_model(model.state_dict())  # dino_vitbase16_pretrain.pth's layout
    assert loaded.info.arch == "vit_base_patch16_224"
    torch.testing.assert_close(features(loaded.backbone, images), features(model, images), rtol=1e-4, atol=1e-4)


def _official_resnet50():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    model = torchvision.models.resnet50()
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    model.fc = nn.Identity()  # as the official MultiCropWrapper does: the pooled 2048-d feature
    return model.eval()


@pytest.mark.parametrize("layout", ["release", "full_checkpoint_syncbn"])
def test_resnet50_official_layouts(layout):
    model = _official_resnet50()
    state = model.state_dict()
    assert not any(k.startswith("fc.") for k in state) and "layer1.0.conv1.weight" in state
    images = torch.randn(2, 3, 96, 96)
    if layout == "release":  # dino_resnet50_pretrain.pth
        payload = dict(state)
    else:  # ResNets train with SyncBN, so the official teacher is DDP-wrapped too: module.backbone.*
        payload = full_checkpoint(state, state, arch="resnet50", patch=16, dim=2048, teacher_prefix="module.backbone.")
    loaded = load_model(payload)
    assert loaded.info.arch == "resnet50" and loaded.backbone.num_features == 2048 and loaded.image_size == 224
    torch.testing.assert_close(features(loaded.backbone, images), features(model, images), rtol=1e-4, atol=1e-4)


# --- key mapping and errors ---------------------------------------------------------------------------------
def test_unwrapping_strips_every_wrapper_and_keeps_the_tensors(vit_small):
    state = vit_small[0]
    official = {**timm_to_official(state, prefix="module.backbone."), **dino_head_keys(384, "module.")}
    back = unwrap_state_dict(official)
    assert set(back) == set(state) | {k.removeprefix("module.") for k in dino_head_keys(384, "module.")}
    assert all(back[k] is state[k] for k in state)
    # The head keys are left for the builder, which drops them silently: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_model(official)
    assert set(loaded.backbone.state_dict()) == set(state)


def test_wrong_arch_names_the_mismatch(vit_small):
    state = vit_small[0]
    with pytest.raises(ValueError, match=r"vit_base_patch16_224.*shape mismatch.*vit_small_patch16_224"):
        load_model(dict(state), arch="vit_base_patch16_224")
    broken = {k: v for k, v in state.items() if k != "blocks.3.attn.qkv.weight"}
    with pytest.raises(ValueError, match=r"missing \['blocks.3.attn.qkv.weight'\]"):
        load_model(broken, arch="vit_small_patch16_224")
    with pytest.raises(ValueError, match="no state dict of tensors"):
        load_model({"epoch": 3, "args": argparse.Namespace()}, arch="vit_small_patch16_224")
    with pytest.raises(ValueError, match="which="):
        load_model(dict(state), which="ema")


@pytest.mark.parametrize(
    "width, patch, arch",
    [(192, 16, "vit_tiny_patch16_224"), (384, 8, "vit_small_patch8_224"), (768, 8, "vit_base_patch8_224")],
)
def test_guess_arch_from_weights(width, patch, arch):
    n = (224 // patch) ** 2
    state = {
        "cls_token": torch.zeros(1, 1, width),
        "pos_embed": torch.zeros(1, 1 + n, width),
        "patch_embed.proj.weight": torch.zeros(width, 3, patch, patch),
    }
    assert guess_timm_arch(state) == arch
    assert math.isqrt(n) * patch == 224


def test_files_that_are_not_official_say_so(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "plain.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"not an fdino checkpoint or export.*arch="):
        load_model(tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="not a readable weights file"):
        load_model(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(Path(tmp_path))  # a folder without ckpt-*.pt
