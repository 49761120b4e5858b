"""Named configurations as plain functions returning a `DinoConfig` (override with ``.replace``).

- `smoke`: a tiny ViT that runs a step in well under a second on a CPU (tests, quick checks).
- `small32`: the built-in data set / CIFAR-sized preset (32 px global, 16 px local crops) with
  hyperparameters measured to learn within minutes on 2 CPU cores (see README, `make demo`).
- `vit_small16`: the paper's ViT-S/16 recipe (ImageNet, 224/96 px, 2 + 10 crops, K = 65536).
- `vit_base16`: the paper's ViT-B/16 recipe.
- `resnet50`: the reference code's ResNet-50 command (SGD, lr 0.03, weight decay 1e-4), exactly.
- `resnet50_adamw`: fdino's earlier ResNet-50 variant (AdamW, BN in the head, no last-layer norm).
"""

from __future__ import annotations

from .config import DinoConfig


def smoke(**overrides) -> DinoConfig:
    """Tiny everything: 2-block ViT of width 32 on 16/8 px crops, K = 64, batch 4."""
    cfg = DinoConfig(
        arch="vit_tiny_patch16_224",
        patch_size=4,
        backbone_kwargs=(("embed_dim", 32), ("depth", 2), ("num_heads", 2)),
        drop_path_rate=0.0,
        out_dim=64,
        head_hidden_dim=32,
        head_bottleneck_dim=16,
        n_local_crops=2,
        global_crop_size=16,
        local_crop_size=8,
        epochs=2,
        steps_per_epoch=5,
        batch_size=4,
        warmup_epochs=1.0,
        freeze_last_layer=0.2,
    )
    return cfg.replace(**overrides)


def small32(**overrides) -> DinoConfig:
    """32 px images (built-in data set, CIFAR): small ViT, patch 4, 2 x 32 px + 6 x 16 px crops."""
    cfg = DinoConfig(
        arch="vit_tiny_patch16_224",
        patch_size=4,
        backbone_kwargs=(("embed_dim", 96), ("depth", 4), ("num_heads", 3)),
        drop_path_rate=0.0,
        out_dim=1024,
        head_hidden_dim=512,
        head_bottleneck_dim=128,
        n_local_crops=6,
        global_crop_size=32,
        local_crop_size=16,
        global_crop_scale=(0.35, 1.0),
        local_crop_scale=(0.1, 0.35),
        teacher_temp=0.04,
        warmup_teacher_temp=0.04,
        teacher_momentum=0.99,
        epochs=10,
        steps_per_epoch=100,
        batch_size=64,
        lr=2e-3,
        warmup_epochs=1.0,
        weight_decay=0.04,
        weight_decay_end=0.1,
        freeze_last_layer=0.0,
    )
    return cfg.replace(**overrides)


def small32_resnet(**overrides) -> DinoConfig:
    """32 px images with a narrow ResNet (the demo's preset): what learns fastest on 2 CPU cores.

    A 4-stage ResNet with one basic block per stage (16-128 channels, output stride 8, 0.32 M
    backbone parameters), BN in the head, K = 256, two 32 px global crops and no local crops, stronger
    colour jitter (the built-in data set's colours are nuisance), peak lr 0.008 (0.032 x 64/256),
    13 epochs of shapes10 (2,028 steps of batch 64): the compiled run fits the demo's 5 minutes
    on 2 CPU cores including compilation. Why these choices (bench/results/demo-recipes-cpu.md):
    DINO's k-NN on shapes10 sits near 27% for ~1,000 steps and then rises steeply, so the demo
    needs many cheap steps rather than a wider network (the 32-256-channel network with 2 local
    crops stayed at 24.7-28.1% after 312 steps); local crops of a 32 px image make the step ~1.4x
    slower and did not help after 312 steps; twice the paper-scaled lr brought the rise forward
    (14 epochs at seed 0: 45.4% against 37.5%). Measured on shapes10 (1,000
    held-out images, raw pixels 34.3%): see the README's "What `make demo` shows".
    """
    cfg = small32(
        arch="resnet18",
        patch_size=None,
        backbone_kwargs=(
            ("layers", (1, 1, 1, 1)),
            ("channels", (16, 32, 64, 128)),
            ("stem_width", 16),
            ("output_stride", 8),
        ),
        out_dim=256,
        head_hidden_dim=256,
        head_bottleneck_dim=64,
        head_norm="batchnorm",
        norm_last_layer=False,
        n_local_crops=0,
        epochs=13,
        warmup_epochs=0.2,
        lr=0.032,
        augment=(("hue", 0.5), ("saturation", 0.8), ("grayscale_p", 0.5)),
    )
    return cfg.replace(**overrides)


def vit_small16(**overrides) -> DinoConfig:
    """The paper's ViT-S/16: 2 x 224 + 10 x 96 crops, K = 65536, lr 5e-4 x batch/256, batch 1024."""
    cfg = DinoConfig(
        arch="vit_small_patch16_224",
        drop_path_rate=0.1,
        out_dim=65536,
        n_local_crops=10,
        teacher_temp=0.04,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=0.0,
        epochs=100,
        batch_size=1024,
        lr=5e-4,
        warmup_epochs=10.0,
        freeze_last_layer=1.0,
        precision="bf16",
    )
    return cfg.replace(**overrides)


def vit_base16(**overrides) -> DinoConfig:
    """The paper's ViT-B/16 (teacher temperature warmed up 0.04 -> 0.07 over 30 epochs, 3 frozen epochs)."""
    cfg = vit_small16(
        arch="vit_base_patch16_224",
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=30.0,
        lr=7.5e-4,
        freeze_last_layer=3.0,
        norm_last_layer=True,
    )
    return cfg.replace(**overrides)


def resnet50(**overrides) -> DinoConfig:
    """The reference code's ResNet-50 command, exactly: SGD, lr 0.03 x batch/256, weight decay 1e-4, crops 0.14/0.05.

    facebookresearch/dino README ("ResNet-50 and other convnets trainings", 8 GPUs, 100 epochs):
    ``main_dino.py --arch resnet50 --optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4
    --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14``; every other setting is main_dino.py's
    default (read in its argument parser): batch_size_per_gpu 64 on 8 GPUs = batch 512 (peak lr
    0.03 x 512/256 = 0.06), out_dim 65536, use_bn_in_head False, norm_last_layer True, momentum_teacher
    0.996, teacher temperature 0.04 with warmup_teacher_temp 0.04 over 0 epochs, clip_grad 3.0,
    freeze_last_layer 1, warmup_epochs 10, min_lr 1e-6, 8 local crops, SGD momentum 0.9 (hard-coded
    there), learning-rate warm-up ``np.linspace(0, peak, W)`` (``lr_warmup="official"``) and the teacher
    temperature table per epoch. So this command has no BN in the head and keeps 65536 outputs (fdino's
    earlier preset, now `resnet50_adamw`, had a BN head, K = 60000 and no last-layer norm: none of them
    is in this command). The torchvision ResNet-50 there has no stochastic depth (rate 0 here).
    Mixed precision: the reference's fp16 autocast is bf16 here (no loss scaling needed). With fewer
    devices, keep ``batch_size`` (micro-batches: ``grad_accum_steps``) or let the lr scale with it.
    """
    cfg = DinoConfig(
        arch="resnet50",
        drop_path_rate=0.0,
        out_dim=65536,
        head_use_bn=False,
        norm_last_layer=True,
        n_local_crops=8,
        global_crop_scale=(0.14, 1.0),
        local_crop_scale=(0.05, 0.14),
        teacher_temp=0.04,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=0.0,
        teacher_temp_warmup="per_epoch",
        teacher_momentum=0.996,
        epochs=100,
        batch_size=512,
        optimizer="sgd",
        optimizer_momentum=0.9,
        lr=0.03,
        min_lr=1e-6,
        warmup_epochs=10.0,
        lr_warmup="official",
        weight_decay=1e-4,
        weight_decay_end=1e-4,
        clip_grad=3.0,
        freeze_last_layer=1.0,
        precision="bf16",
    )
    return cfg.replace(**overrides)


def resnet50_adamw(**overrides) -> DinoConfig:
    """fdino's AdamW ResNet-50 variant: BN in the head, trainable last-layer norm, no weight-decay ramp.

    Not the reference code's ResNet-50 command (SGD; see `resnet50`): AdamW at lr 5e-4 x batch/256
    (main_dino.py's AdamW default), a BN head with K = 60000, 6 local crops, teacher temperature warm-up
    0.04 -> 0.07 over 50 epochs, weight decay 1e-6 and no clipping. Kept under this name unchanged.
    """
    cfg = DinoConfig(
        arch="resnet50",
        drop_path_rate=0.0,
        out_dim=60000,
        head_norm="batchnorm",
        norm_last_layer=False,
        n_local_crops=6,
        global_crop_scale=(0.14, 1.0),
        local_crop_scale=(0.05, 0.14),
        teacher_temp=0.07,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=50.0,
        epochs=100,
        batch_size=1024,
        weight_decay=1e-6,
        weight_decay_end=1e-6,
        clip_grad=0.0,
        freeze_last_layer=1.0,
        precision="bf16",
    )
    return cfg.replace(**overrides)


PRESETS = {
    "smoke": smoke,
    "small32": small32,
    "small32_resnet": small32_resnet,
    "vit_small16": vit_small16,
    "vit_base16": vit_base16,
    "resnet50": resnet50,
    "resnet50_adamw": resnet50_adamw,
}


def preset(name: str, **overrides) -> DinoConfig:
    """A preset by name; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
