"""Config and data shared by the data-parallel test and its torchrun worker."""

import json
import os

import torch

from fdino import presets

# A ViT (no BatchNorm): data parallelism is then exactly one big batch. adam_eps: the key part of
# the qkv bias has an analytically zero gradient, i.e. rounding noise that differs with summation
# order; Adam would turn it into lr-sized steps, so a larger eps keeps those entries still.
CFG = presets.smoke(batch_size=16, lr=0.05, warmup_epochs=0.0, freeze_last_layer=0.2, adam_eps=1e-5)
# A test may run the workers on a variant of CFG (DinoConfig fields as JSON), e.g. centering="sinkhorn".
CFG = CFG.replace(**json.loads(os.environ.get("FDINO_DIST_TEST_CONFIG", "{}")))
N_STEPS = 3

# A tiny BatchNorm ResNet (BN in the backbone and the head, the demo preset's layout) with a local crop,
# so the backbone runs twice per step (one call per crop resolution): 2 workers x 8 images equal 1 x 16
# only when the BatchNorm statistics span both workers (sync_batchnorm). adam_eps: the biases of the head's
# linear layers feed a BatchNorm, which removes any shift, so their gradient is analytically zero (rounding
# noise that depends on the summation order); a larger eps keeps Adam from making lr-sized steps of it.
RESNET_CFG = presets.small32_resnet(
    backbone_kwargs=(("layers", (1, 1, 1, 1)), ("channels", (4, 8, 8, 8)), ("stem_width", 4), ("output_stride", 8)),
    out_dim=32,
    head_hidden_dim=16,
    head_bottleneck_dim=8,
    global_crop_size=16,
    local_crop_size=8,
    n_local_crops=1,
    batch_size=16,
    epochs=2,
    steps_per_epoch=5,
    lr=0.05,
    warmup_epochs=0.0,
    adam_eps=1e-3,
)


def batches(n, cfg=CFG):
    g = torch.Generator().manual_seed(7)
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    return [[torch.randn(cfg.batch_size, 3, s, s, generator=g) for s in sizes] for _ in range(n)]
