"""fdino.batched: N variants trained as one vmapped step equal N single runs (eager and compiled).

Each variant differs from the others in batchable fields (seed, temperatures, lr, weight decay,
clipping, momentums, centering, teacher update), gets its own data, and runs across the schedules'
boundaries (warm-up, the last layer's unfreezing, the teacher temperature ramp, an epoch end).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from hypothesis import given
from hypothesis import strategies as st
from test_step_equivalence import RESNET, VIT, make_batches

import fdino
from fdino import schedules
from fdino.batched import (
    BATCHABLE,
    batch_groups,
    batched_train_step,
    batched_train_step_eager,
    configs_of,
    hyperparams_of,
    init_batched,
    stack_states,
    unstack,
)
from fdino.batched.hyper import batched_schedules
from fdino.batched.step import check_batched_batch

# A larger Adam eps than the paper's: some gradient entries are rounding noise (a ViT's qkv key bias,
# a bias before BatchNorm) that Adam's first steps would scale up to lr-sized differences between
# two correct implementations (see tests/test_step_equivalence.py).
VIT_B = VIT.replace(adam_eps=1e-5)
RESNET_B = RESNET
N_STEPS = 6  # steps_per_epoch is 5: the previous-epoch teacher copies the student after step 5


def variants(base):
    """Four variants of ``base`` that differ in every batchable field."""
    return [
        base.replace(seed=0),
        base.replace(seed=1, teacher_temp=0.04, warmup_teacher_temp=0.03, lr=0.02, clip_grad=0.0, weight_decay=0.0),
        base.replace(seed=2, centering="none", teacher_update="previous_epoch", min_lr=1e-3, weight_decay_end=0.2),
        base.replace(seed=3, teacher_momentum=0.9, teacher_momentum_end=0.95, student_temp=0.2, center_momentum=0.5),
    ]


def variant_batches(cfgs):
    """Each variant its own batches (as its own seed's augmentations would be)."""
    return [make_batches(cfg, N_STEPS, seed=i) for i, cfg in enumerate(cfgs)]


def stacked(per_variant, step):
    n_crops = len(per_variant[0][step])
    return [torch.stack([batches[step][v] for batches in per_variant]) for v in range(n_crops)]


def single_runs(cfgs, per_variant):
    """Every variant as its own eager train_step run: (final states, per-step metrics)."""
    states, metrics = [], []
    for cfg, batches in zip(cfgs, per_variant):
        state, history = fdino.init_state(cfg, device="cpu"), []
        for batch in batches:
            state, m = fdino.train_step_eager(state, batch)
            history.append(m)
        states.append(state)
        metrics.append(history)
    return states, metrics


def batched_run(cfgs, per_variant, step_fn):
    bstate, history = init_batched(cfgs, device="cpu"), []
    for step in range(N_STEPS):
        bstate, m = step_fn(bstate, stacked(per_variant, step))
        history.append(m)
    return bstate, history


def assert_variants_equal_single_runs(bstate, batched_metrics, states, metrics, *, atol):
    for i, single in enumerate(states):
        mine = unstack(bstate, i)
        assert mine.cfg == single.cfg
        for tree in ("student", "student_buffers", "teacher", "teacher_buffers"):
            a, b = getattr(mine, tree), getattr(single, tree)
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=f"variant {i} {tree}.{k}")
        for k in single.opt.exp_avg:
            # Gradients are sums in another order under vmap (batched convolutions): fp32 rounding relative
            # to the gradient's scale (amplified over the steps by BatchNorm), or noise where it is analytically 0.
            scale = float(single.opt.exp_avg[k].abs().max())
            torch.testing.assert_close(mine.opt.exp_avg[k], single.opt.exp_avg[k], rtol=1e-3, atol=1e-6 + 1e-3 * scale)
            torch.testing.assert_close(mine.opt.count[k], single.opt.count[k], rtol=0, atol=0)
        torch.testing.assert_close(mine.center, single.center, rtol=1e-4, atol=1e-6)
        assert torch.equal(mine.step, single.step) and torch.equal(mine.rng[0], single.rng[0])
        for step, (ours, theirs) in enumerate(zip(batched_metrics, metrics[i])):
            assert ours.keys() == theirs.keys()
            for k in theirs:
                torch.testing.assert_close(ours[k][i], theirs[k], rtol=1e-4, atol=1e-5, msg=f"step {step} {k}")


@pytest.mark.parametrize(
    "base",
    [VIT_B, RESNET_B, VIT_B.replace(arch="fdino_vit_conv_stem")],
    ids=["vit", "bn-resnet", "conv-stem-vit"],  # the last: BatchNorm in a ViT's stem
)
# One intra-op thread: with two, a batched convolution splits its sums in another order than the
# single one, and the conv-stem ViT's BatchNorm amplifies that fp32 rounding past atol over 6 steps.
@pytest.mark.usefixtures("one_thread")
def test_eager_batched_variants_equal_their_single_runs(base):
    cfgs = variants(base)
    per_variant = variant_batches(cfgs)
    states, metrics = single_runs(cfgs, per_variant)
    bstate, batched_metrics = batched_run(cfgs, per_variant, batched_train_step_eager)
    assert_variants_equal_single_runs(bstate, batched_metrics, states, metrics, atol=1e-5)
    # The ablations did what they say in the batched run too.
    assert torch.count_nonzero(unstack(bstate, 2).center) == 0  # centering="none"
    assert not torch.equal(unstack(bstate, 0).center, torch.zeros_like(unstack(bstate, 0).center))


@pytest.mark.parametrize("base", [VIT_B, RESNET_B], ids=["vit", "bn-resnet"])
def test_compiled_batched_step_equals_single_runs_and_never_recompiles(base):
    # One compiled graph per backbone (minutes on 2 cores): three variants keep it small.
    cfgs = variants(base)[1:]
    per_variant = variant_batches(cfgs)
    states, metrics = single_runs(cfgs, per_variant)
    bstate = init_batched(cfgs, device="cpu")
    history = []
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    bstate, m = batched_train_step(bstate, stacked(per_variant, 0))
    history.append(m)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(1, N_STEPS):
            bstate, m = batched_train_step(bstate, stacked(per_variant, step))
            history.append(m)
    assert_variants_equal_single_runs(bstate, history, states, metrics, atol=1e-5)


def test_batched_schedules_equal_single_schedules_bitwise():
    cfgs = variants(VIT_B) + [VIT_B.replace(teacher_update=m) for m in ("student_copy", "frozen")]
    cfgs = [c.replace(warmup_epochs=0.6, warmup_teacher_temp_epochs=0.8) for c in cfgs]
    hp = hyperparams_of(cfgs, "cpu")
    base = init_batched(cfgs[:1], device="cpu").cfg
    for step in range(cfgs[0].total_steps + 2):
        ours = batched_schedules(base, hp, torch.full((len(cfgs),), step, dtype=torch.int64))
        for i, cfg in enumerate(cfgs):
            theirs = schedules.all_schedules(cfg, torch.tensor(step))
            for k in theirs:
                assert torch.equal(ours[k][i], theirs[k]), (step, i, k)


@given(
    lr=st.floats(1e-6, 1.0),
    temp=st.floats(0.01, 0.2),
    momentum=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**40),
    centering=st.sampled_from(["ema", "none"]),
    update=st.sampled_from(["ema", "student_copy", "previous_epoch", "frozen"]),
)
def test_configs_round_trip_through_hyperparameter_tensors(lr, temp, momentum, seed, centering, update):
    cfg = VIT_B.replace(
        lr=lr, teacher_temp=temp, teacher_momentum=momentum, seed=seed, centering=centering, teacher_update=update
    )
    assert configs_of(VIT_B, hyperparams_of([VIT_B, cfg], "cpu")) == (VIT_B, cfg)


def test_batch_groups_split_structural_variants():
    cfgs = [VIT_B, VIT_B.replace(teacher_temp=0.07), VIT_B.replace(out_dim=128), RESNET_B, VIT_B.replace(seed=5)]
    assert batch_groups(cfgs) == [[0, 1, 4], [2], [3]]
    assert set(BATCHABLE) >= {"teacher_temp", "teacher_momentum", "lr", "seed", "centering", "teacher_update"}


def test_stacking_structural_variants_is_refused_with_the_fields_named():
    with pytest.raises(ValueError, match=r"differ in \['out_dim'\].*one after another"):
        stack_states([fdino.init_state(VIT_B, device="cpu"), fdino.init_state(VIT_B.replace(out_dim=32), device="cpu")])


def test_bad_batches_are_refused_before_any_work():
    bstate = init_batched(variants(VIT_B)[:2], device="cpu")
    batch = make_batches(VIT_B, 1)[0]
    with pytest.raises(ValueError, match=r"\[N=2, B, C, H, W\].*expand"):
        check_batched_batch(bstate, batch)  # a single run's batch
    with pytest.raises(ValueError, match="crops but the config expects"):
        check_batched_batch(bstate, [c.expand(2, *c.shape) for c in batch[:2]])
    with pytest.raises(ValueError, match="grad_accum_steps=1"):
        check_batched_batch(init_batched([VIT_B.replace(grad_accum_steps=2)], device="cpu"), batch)
    with pytest.raises(IndexError, match="holds 2 variants"):
        unstack(bstate, 2)


def test_a_shared_batch_expanded_over_variants_trains_each_on_it():
    # Variants that share a seed share their crops: expand() repeats them without a copy.
    cfgs = [VIT_B, VIT_B.replace(teacher_temp=0.03)]
    batch = make_batches(VIT_B, 1)[0]
    bstate, _ = batched_train_step_eager(init_batched(cfgs, device="cpu"), [c.expand(2, *c.shape) for c in batch])
    single, _ = fdino.train_step_eager(fdino.init_state(cfgs[1], device="cpu"), batch)
    for k, v in single.student.items():
        torch.testing.assert_close(unstack(bstate, 1).student[k], v, rtol=1e-4, atol=1e-5)


def test_stochastic_depth_draws_differ_per_variant():
    # vmap(randomness="different"): identical variants with drop path get different masks.
    cfg = VIT_B.replace(drop_path_rate=0.5)
    batch = make_batches(cfg, 1)[0]
    bstate, m = batched_train_step_eager(init_batched([cfg, cfg], device="cpu"), [c.expand(2, *c.shape) for c in batch])
    assert not torch.equal(m["loss"][0], m["loss"][1])
