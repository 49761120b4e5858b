"""The projection head's variants (DinoConfig.head_norm, head_activation, head_weight_norm).

Each variant's forward is held equal to the head written out from its equations in float64
(MLP -> L2 normalization -> last layer); the optimizer's parameter groups (last layer frozen,
weight decay) classify every variant's parameters by what they are; the old ``head_use_bn``
spelling keeps working; the batched (vmapped) step trains a LayerNorm head as single runs do.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from test_batched import VIT_B, assert_variants_equal_single_runs, stacked, variant_batches, variants
from torch import nn

import fdino
from fdino import cli, presets
from fdino.batched import batched_train_step_eager, init_batched
from fdino.config import HEAD_ACTIVATIONS, HEAD_NORMS, DinoConfig
from fdino.models import DinoHead, PlainLinear, WeightNormLinear, is_last_layer, is_regularized

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(out_dim=13, head_hidden_dim=10, head_bottleneck_dim=6)
# (head_norm, head_activation, head_weight_norm, norm_last_layer, head_n_layers): every norm and
# activation, both last layers (weight-normalized with the scale fixed or trained), 1 to 5 layers.
VARIANTS = [
    (norm, act, wn, nll, n)
    for (norm, act), (wn, nll), n in zip(
        itertools.product(HEAD_NORMS, HEAD_ACTIVATIONS),
        itertools.cycle([(True, True), (True, False), (False, False)]),
        itertools.cycle([3, 1, 5, 2]),
    )
] + [
    ("layernorm", "gelu", True, True, 5),
    ("layernorm", "relu", False, False, 4),
    ("batchnorm", "gelu", True, False, 3),
]


def head_cfg(norm, act, wn, nll, n, **extra) -> DinoConfig:
    return DinoConfig(
        head_norm=norm, head_activation=act, head_weight_norm=wn, norm_last_layer=nll, head_n_layers=n, **SMALL, **extra
    )


# --- the reference: the head from its equations ---------------------------------------------------------
def reference_head(p: dict[str, torch.Tensor], x: torch.Tensor, cfg: DinoConfig, *, train: bool) -> torch.Tensor:
    """h_{i+1} = act(norm(W_i h_i + b_i)) for the hidden layers, then W h + b; z = h / ||h||_2;
    logits = (g * v / ||v||_row) z (weight norm) or W z (plain). float64; ``p`` are the head's
    parameters and buffers by name; BatchNorm normalizes with the batch statistics in training
    (biased variance) and the running ones in evaluation, LayerNorm each row over its features."""
    p = {k: v.double() for k, v in p.items()}
    h, eps = x.double(), 1e-5
    layer = 0  # index in the nn.Sequential: Linear [, norm], activation per hidden layer
    for i in range(cfg.head_n_layers):
        h = h @ p[f"mlp.{layer}.weight"].T + p[f"mlp.{layer}.bias"]
        layer += 1
        if i == cfg.head_n_layers - 1:
            break
        if cfg.head_norm == "batchnorm":
            if train:
                mean, var = h.mean(0), h.var(0, unbiased=False)
            else:
                mean, var = p[f"mlp.{layer}.running_mean"], p[f"mlp.{layer}.running_var"]
            h = (h - mean) / torch.sqrt(var + eps) * p[f"mlp.{layer}.weight"] + p[f"mlp.{layer}.bias"]
            layer += 1
        elif cfg.head_norm == "layernorm":
            mean, var = h.mean(1, keepdim=True), h.var(1, unbiased=False, keepdim=True)
            h = (h - mean) / torch.sqrt(var + eps) * p[f"mlp.{layer}.weight"] + p[f"mlp.{layer}.bias"]
            layer += 1
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2))) if cfg.head_activation == "gelu" else h.clamp_min(0)
        layer += 1
    z = h / h.norm(dim=1, keepdim=True)
    if cfg.head_weight_norm:
        v = p["last_layer.weight_v"]
        w = p["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)
    else:
        w = p["last_layer.weight"]
    return z @ w.T


def perturbed(head: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The head's parameters and buffers moved off their initial values (norm scales 1, shifts 0,
    running statistics 0 and 1, the weight-norm scale 1 would hide swapped or missing terms)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in [*head.named_parameters(), *head.named_buffers()]:
        if not t.is_floating_point():
            out[name] = t.clone()
        elif name.endswith("running_var") or name.endswith("weight_g"):
            out[name] = 0.5 + torch.rand(t.shape, generator=g)
        else:
            out[name] = t + 0.3 * torch.randn(t.shape, generator=g)
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_each_head_variant_computes_its_equations(variant, train):
    cfg = head_cfg(*variant)
    head = DinoHead(7, cfg, fp32_logits=False).train(train)
    tensors = perturbed(head, seed=VARIANTS.index(variant))
    x = torch.randn(9, 7)
    ours = torch.func.functional_call(head, tensors, (x,))
    expected = reference_head(tensors, x, cfg, train=train)
    assert ours.shape == (9, cfg.out_dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_teachers_logits_stay_fp32_under_bf16_autocast_for_both_last_layers():
    for wn in (True, False):
        head = DinoHead(7, head_cfg("layernorm", "gelu", wn, False, 3), fp32_logits=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert head(torch.randn(4, 7)).dtype == torch.float32


# --- structure ------------------------------------------------------------------------------------------
def test_a_five_layer_layernorm_head_with_1000_outputs_is_expressible():
    """A published recipe: five linear layers, LayerNorm between them, 1000 prototypes."""
    cfg = DinoConfig(
        head_n_layers=5, head_norm="layernorm", out_dim=1000, head_hidden_dim=2048, head_bottleneck_dim=256
    )
    with torch.device("meta"):
        head = DinoHead(384, cfg, fp32_logits=False)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.GELU] * 4 + [nn.Linear]
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 2048)] + [(2048, 2048)] * 3 + [(2048, 256)]
    assert all(m.normalized_shape == (2048,) and m.elementwise_affine for m in head.mlp if isinstance(m, nn.LayerNorm))
    assert isinstance(head.last_layer, WeightNormLinear) and head.last_layer.weight_v.shape == (1000, 256)
    assert "last_layer.weight_g" not in dict(head.named_parameters())  # norm_last_layer: g fixed to 1


def test_the_plain_last_layer_has_one_weight_and_no_bias():
    head = DinoHead(7, head_cfg("none", "relu", False, False, 2), fp32_logits=False)
    assert isinstance(head.last_layer, PlainLinear)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert {k for k, _ in head.last_layer.named_parameters()} == {"weight"} and not list(head.last_layer.buffers())


# --- parameter classes: the last-layer freeze and weight decay --------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_last_layer_and_weight_decay_classify_every_variants_parameters(variant):
    head = DinoHead(7, head_cfg(*variant), fp32_logits=False)
    modules = dict(head.named_modules())
    for name, tensor in head.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = modules[owner_name]
        full = f"head.{name}"  # as in TrainState.student
        assert is_last_layer(full) == (owner is head.last_layer), name
        # Decayed: the linear layers' matrices and the last layer's weights (the reference code decays the
        # weight-norm scale g too: its shape is [K, 1]); not: biases, BatchNorm / LayerNorm scales and shifts.
        decayed = isinstance(owner, (nn.Linear, PlainLinear, WeightNormLinear)) and leaf != "bias"
        assert is_regularized(full, tensor) == decayed, name


def test_the_plain_last_layer_is_frozen_for_the_configured_steps_only():
    cfg = presets.smoke(
        head_weight_norm=False, norm_last_layer=False, head_norm="layernorm", freeze_last_layer=0.2, warmup_epochs=0.0
    )
    state = fdino.init_state(cfg, device="cpu")
    before = {k: v.clone() for k, v in state.student.items()}
    g = torch.Generator().manual_seed(0)
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    state, _ = fdino.train_step_eager(state, [torch.randn(cfg.batch_size, 3, s, s, generator=g) for s in sizes])
    assert torch.equal(state.student["head.last_layer.weight"], before["head.last_layer.weight"])
    assert not torch.equal(state.student["head.mlp.1.weight"], before["head.mlp.1.weight"])  # LayerNorm scale learns
    assert float(state.opt.count["head.last_layer.weight"]) == 0.0


# --- the config: validation and the old spelling -----------------------------------------------------------
def test_head_use_bn_is_read_as_head_norm_batchnorm():
    old, new = DinoConfig(head_use_bn=True), DinoConfig(head_norm="batchnorm")
    assert old == new and hash(old) == hash(new) and old.head_norm == "batchnorm" and not old.head_use_bn
    assert DinoConfig(head_use_bn=True, head_norm="batchnorm") == new
    run_json = json.loads(json.dumps(DinoConfig().to_dict()))
    for key in ("head_norm", "head_activation", "head_weight_norm"):
        del run_json[key]  # a run.json written before these fields existed
    assert DinoConfig.from_dict({**run_json, "head_use_bn": True}) == new
    assert DinoConfig.from_dict(run_json) == DinoConfig()
    assert new.replace(head_norm="layernorm").head_norm == "layernorm"  # the old flag does not hold it back
    assert new.replace(head_norm="none") == DinoConfig() == new.replace(head_use_bn=False)
    assert DinoConfig(head_norm="layernorm").replace(head_use_bn=False).head_norm == "layernorm"
    torch.testing.assert_close(
        fdino.init_state(presets.smoke(head_use_bn=True), device="cpu").student,
        fdino.init_state(presets.smoke(head_norm="batchnorm"), device="cpu").student,
        rtol=0,
        atol=0,
    )


def test_the_cli_sets_the_head_over_a_preset():
    cfg, _ = cli.train_settings(["--preset", "resnet50", "--head-norm", "layernorm", "--head-activation", "relu"])
    assert (cfg.head_norm, cfg.head_activation) == ("layernorm", "relu")
    cfg, _ = cli.train_settings(["--preset", "smoke", "--head-use-bn", "true"])
    assert cfg.head_norm == "batchnorm"
    cfg, _ = cli.train_settings(["--preset", "smoke", "--head-weight-norm", "false", "--norm-last-layer", "false"])
    assert not cfg.head_weight_norm


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(head_norm="groupnorm"), r"head_norm='groupnorm'.*'none', 'batchnorm', 'layernorm'"),
        (dict(head_activation="silu"), r"head_activation='silu'.*'gelu', 'relu'"),
        (dict(head_weight_norm=False), r"norm_last_layer=True.*head_weight_norm=False.*--norm-last-layer false"),
        (dict(head_use_bn=True, head_norm="layernorm"), r"head_use_bn=True.*head_norm='layernorm'"),
        (dict(head_use_bn="yes"), r"head_use_bn='yes'.*bool"),
        (dict(head_weight_norm=1, norm_last_layer=False), r"head_weight_norm=1.*True or False"),
    ],
)
def test_bad_head_settings_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        DinoConfig(**changes)


# --- the batched (vmapped) sweep step ------------------------------------------------------------------------
def test_batched_variants_with_a_layernorm_plain_head_equal_their_single_runs():
    base = VIT_B.replace(head_norm="layernorm", head_activation="relu", head_weight_norm=False, norm_last_layer=False)
    cfgs = variants(base)[:2]
    per_variant = [batches[:3] for batches in variant_batches(cfgs)]
    states, metrics = [], []
    for cfg, batches in zip(cfgs, per_variant):
        state, history = fdino.init_state(cfg, device="cpu"), []
        for batch in batches:
            state, m = fdino.train_step_eager(state, batch)
            history.append(m)
        states.append(state)
        metrics.append(history)
    bstate, batched_metrics = init_batched(cfgs, device="cpu"), []
    for step in range(3):
        bstate, m = batched_train_step_eager(bstate, stacked(per_variant, step))
        batched_metrics.append(m)
    assert_variants_equal_single_runs(bstate, batched_metrics, states, metrics, atol=1e-5)
