"""The compiled train_step with DINOv2's additions (centering="sinkhorn", koleo_weight > 0) and a head variant
(LayerNorm, ReLU, plain last layer: fdino.models.DinoHead) equals the eager step over 2 steps and compiles to
one graph. One compiled graph for the file (smoke preset)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import fdino
from fdino import presets

# adam_eps and the learning rate as in test_step_compiled.py (why: see there); warm-up 0 so both steps move.
CFG = presets.smoke(
    centering="sinkhorn",
    koleo_weight=0.1,
    head_norm="layernorm",
    head_activation="relu",
    head_weight_norm=False,
    norm_last_layer=False,
    lr=0.05,
    warmup_epochs=0.0,
    adam_eps=1e-5,
)
N_STEPS = 2


def batches(n):
    g = torch.Generator().manual_seed(4)
    sizes = [CFG.global_crop_size] * 2 + [CFG.local_crop_size] * CFG.n_local_crops
    return [[torch.randn(CFG.batch_size, 3, s, s, generator=g) for s in sizes] for _ in range(n)]


@pytest.fixture(scope="module")
def runs():
    data = batches(N_STEPS)
    compiled = fdino.init_state(CFG, device="cpu")
    eager = fdino.clone_state(compiled)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled_metrics, eager_metrics = [], []
    # The first step may recompile the shared step function when another file compiled it for its own config
    # in this process (as in test_step_compiled.py); later steps must not.
    compiled, m = fdino.train_step(compiled, data[0])
    compiled_metrics.append(m)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in data[1:]:
            compiled, m = fdino.train_step(compiled, batch)
            compiled_metrics.append(m)
    for batch in data:
        eager, m = fdino.train_step_eager(eager, batch)
        eager_metrics.append(m)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    return dict(compiled=compiled, eager=eager, cm=compiled_metrics, em=eager_metrics, graphs=graphs)


def test_compiled_sinkhorn_koleo_step_equals_the_eager_step(runs):
    assert runs["graphs"] == 1
    compiled, eager = runs["compiled"], runs["eager"]
    for tree in ("student", "teacher"):
        for name, value in getattr(compiled, tree).items():
            torch.testing.assert_close(value, getattr(eager, tree)[name], rtol=1e-4, atol=1e-5, msg=f"{tree}.{name}")
    torch.testing.assert_close(compiled.center, eager.center, rtol=1e-5, atol=1e-6)
    for mc, me in zip(runs["cm"], runs["em"]):
        assert "koleo" in me and set(mc) == set(me)
        for name in me:
            torch.testing.assert_close(mc[name], me[name], rtol=1e-4, atol=1e-5, msg=name)
    # Not a step that did nothing: the parameters moved and KoLeo is a real (positive, finite) number.
    fresh = fdino.init_state(CFG, device="cpu")
    assert not torch.allclose(
        compiled.student["backbone.blocks.0.attn.qkv.weight"], fresh.student["backbone.blocks.0.attn.qkv.weight"]
    )
    assert all(0 < float(m["koleo"]) < 100 for m in runs["cm"])
