"""Contracts of train_step (eager path): donation, structure, metrics, RNG, input validation."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import fdino
from fdino import presets

CFG = presets.smoke()


def batch_for(cfg, seed=0, b=None):
    g = torch.Generator().manual_seed(seed)
    b = cfg.batch_size if b is None else b
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    return [torch.randn(b, 3, s, s, generator=g) for s in sizes]


def test_teacher_starts_as_an_exact_copy_of_the_student():
    state = fdino.init_state(CFG, device="cpu")
    assert state.teacher.keys() == state.student.keys()
    assert all(torch.equal(state.teacher[k], state.student[k]) for k in state.student)
    assert all(state.teacher[k].data_ptr() != state.student[k].data_ptr() for k in state.student)
    again = fdino.init_state(CFG, device="cpu")
    assert fdino.tree_allclose(state, again)  # deterministic from the seed
    assert not torch.equal(
        fdino.init_state(CFG, seed=1).student["head.mlp.0.weight"], state.student["head.mlp.0.weight"]
    )


def test_state_is_donated_and_structure_is_kept():
    state = fdino.init_state(CFG, device="cpu")
    leaves_before, spec_before = pytree.tree_flatten(state)
    ptrs = [t.data_ptr() for t in leaves_before]
    copy = fdino.clone_state(state)
    new_state, _ = fdino.train_step_eager(state, batch_for(CFG))
    leaves_after, spec_after = pytree.tree_flatten(new_state)
    assert spec_after == spec_before
    assert [t.data_ptr() for t in leaves_after] == ptrs  # same buffers: updated in place
    assert [(t.shape, t.dtype) for t in leaves_after] == [(t.shape, t.dtype) for t in leaves_before]
    assert not fdino.tree_allclose(copy, new_state)  # the clone kept the old values
    assert int(copy.step) == 0 and int(new_state.step) == 1


def test_metrics_are_0d_tensors_with_the_documented_names():
    state = fdino.init_state(CFG, device="cpu")
    _, metrics = fdino.train_step_eager(state, batch_for(CFG))
    expected = {
        "loss",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "grad_norm",
        "teacher_entropy",
        "teacher_effective_dims",
        "kl",
        "center_norm",
    }
    assert set(metrics) == expected
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and torch.isfinite(value), name


def test_step_randomness_comes_from_the_state_and_leaves_the_callers_rng_alone():
    cfg = CFG.replace(drop_path_rate=0.5, warmup_epochs=0.0, lr=0.05)
    batch = batch_for(cfg)
    a = fdino.init_state(cfg, device="cpu")
    b = fdino.clone_state(a)
    torch.manual_seed(123)
    caller = torch.get_rng_state()
    a, _ = fdino.train_step_eager(a, batch)
    assert torch.equal(torch.get_rng_state(), caller)  # the caller's generator is untouched
    torch.manual_seed(999)  # a different global RNG must not change the step
    b, _ = fdino.train_step_eager(b, batch)
    assert fdino.tree_allclose(a, b)
    assert a.rng.tolist() == [cfg.seed, 1]
    # Drop path really draws from that stream: another seed gives another result.
    c = fdino.init_state(cfg, device="cpu").replace(rng=torch.tensor([cfg.seed + 1, 0]))
    c, _ = fdino.train_step_eager(c, batch)
    assert not fdino.tree_allclose(a.student, c.student)


def test_bf16_autocast_keeps_teacher_logits_center_and_loss_fp32():
    cfg = CFG.replace(precision="bf16")
    state = fdino.init_state(cfg, device="cpu")
    ref = fdino.init_state(CFG, device="cpu")
    batch = batch_for(cfg)
    state, m16 = fdino.train_step_eager(state, batch)
    ref, m32 = fdino.train_step_eager(ref, batch)
    assert m16["loss"].dtype == torch.float32 and state.center.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in state.student.values())  # fp32 master weights
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=0.05)
    from fdino.step import networks, teacher_logits

    logits = teacher_logits(cfg, networks(cfg, state.device).teacher, state.teacher, state.teacher_buffers, batch[:2])
    assert logits.dtype == torch.float32


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda b: b[:-1], ValueError, "batch has 3 crops but the config expects"),
        (lambda b: [b[0], b[2], b[1], b[3]], ValueError, "crop 1 \\(global\\) is \\(8, 8\\) pixels"),
        (lambda b: b[:3] + [b[3][:2]], ValueError, "crop 3 has 2 images but crop 0 has 4"),
        (lambda b: [c[:2] for c in b], ValueError, "set batch_size=2"),
        (lambda b: [c.to(torch.uint8) for c in b], TypeError, "convert images to float"),
        (lambda b: [c[0] for c in b], ValueError, "must be a \\[B, C, H, W\\] tensor"),
        (lambda b: tuple(b[:2]) + ("x",) * 2, ValueError, "must be a \\[B, C, H, W\\] tensor"),
    ],
)
def test_bad_batches_get_clear_errors(mutate, error, match):
    state = fdino.init_state(CFG, device="cpu")
    with pytest.raises(error, match=match):
        fdino.train_step_eager(state, mutate(batch_for(CFG)))
    assert int(state.step) == 0  # nothing was changed


def test_config_validation_names_field_value_and_range():
    with pytest.raises(ValueError, match=r"DinoConfig.teacher_temp=-0.1 is invalid: allowed values in \(0.0, 100.0\]"):
        fdino.DinoConfig(teacher_temp=-0.1)
    with pytest.raises(
        ValueError, match=r"DinoConfig.grad_accum_steps=3 is invalid: allowed a divisor of batch_size=64"
    ):
        fdino.DinoConfig(batch_size=64, grad_accum_steps=3)
    with pytest.raises(ValueError, match="unknown DinoConfig field"):
        fdino.DinoConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="is not a timm model"):
        fdino.init_state(CFG.replace(arch="no_such_net"))
    cfg = presets.small32()
    assert fdino.DinoConfig.from_dict(cfg.to_dict()) == cfg


def test_presets_build_valid_configs():
    for name, fn in presets.PRESETS.items():
        cfg = fn()
        assert isinstance(cfg, fdino.DinoConfig), name
    assert presets.vit_small16().arch == "vit_small_patch16_224" and presets.vit_small16().out_dim == 65536
    # The reference code's ResNet-50 command (README of facebookresearch/dino) over main_dino.py's defaults.
    rn50 = presets.resnet50()
    assert (rn50.arch, rn50.optimizer, rn50.lr, rn50.weight_decay, rn50.weight_decay_end) == (
        "resnet50",
        "sgd",
        0.03,
        1e-4,
        1e-4,
    )
    assert (rn50.global_crop_scale, rn50.local_crop_scale, rn50.n_local_crops) == ((0.14, 1.0), (0.05, 0.14), 8)
    assert (rn50.out_dim, rn50.head_norm, rn50.norm_last_layer, rn50.batch_size) == (65536, "none", True, 512)
    assert (rn50.lr_warmup, rn50.teacher_temp_warmup) == ("official", "per_epoch")
    assert presets.resnet50_adamw().optimizer == "adamw" and presets.resnet50_adamw().head_norm == "batchnorm"
