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


def batches(n):
    g = torch.Generator().manual_seed(7)
    sizes = [CFG.global_crop_size] * 2 + [CFG.local_crop_size] * CFG.n_local_crops
    return [[torch.randn(CFG.batch_size, 3, s, s, generator=g) for s in sizes] for _ in range(n)]
