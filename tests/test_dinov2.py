"""DINOv2's additions (Oquab et al. 2023): Sinkhorn-Knopp teacher targets and the KoLeo regularizer.

Each fdino function is held to a plain float64 reference written from the equations (DINOv2's
``sinkhorn_knopp_teacher`` without any overflow guard; KoLeo's nearest-neighbour distance by a loop),
the data-parallel Sinkhorn to the single-process reference on all workers' rows, and the step's
objective to the reference losses. The compiled step is in test_dinov2_compiled.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import dist_setup
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from test_distributed import assert_states_close
from torch.func import functional_call

import fdino
from fdino import presets
from fdino.batched.hyper import batch_groups, unbatchable
from fdino.checkpoint import state_from_dict
from fdino.distributed import summing
from fdino.koleo import koleo_loss, koleo_per_crop
from fdino.sinkhorn import dino_loss_from_targets, sinkhorn_knopp_targets
from fdino.step import micro_grads, networks, teacher_logits
from fdino.sweep import study_spec

pytestmark = pytest.mark.usefixtures("one_thread")


# --- float64 references ------------------------------------------------------------------------------------
def sinkhorn_reference(shards: list[torch.Tensor], temp: float, n_iterations: int) -> list[torch.Tensor]:
    """DINOv2's sinkhorn_knopp_teacher in float64 for workers holding ``shards`` ([n_w, K] logits each),
    the all-reduces written as sums over the list. Returns each worker's [n_w, K] targets."""
    qs = [torch.exp(s.double() / temp).T for s in shards]  # [K, n_w]
    k = qs[0].shape[0]
    b = sum(q.shape[1] for q in qs)
    total = sum(q.sum() for q in qs)
    qs = [q / total for q in qs]
    for _ in range(n_iterations):
        rows = sum(q.sum(dim=1, keepdim=True) for q in qs)
        qs = [q / rows / k for q in qs]
        qs = [q / q.sum(dim=0, keepdim=True) / b for q in qs]
    return [(q * b).T for q in qs]


def koleo_reference(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-1/n sum_i log(min_{j != i} ||x_i - x_j|| + eps) of the L2-normalized rows, by loops (float64)."""
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True)
    n = x.shape[0]
    terms = []
    for i in range(n):
        nearest = torch.stack([torch.linalg.vector_norm(x[i] - x[j]) for j in range(n) if j != i]).min()
        terms.append(torch.log(nearest + eps))
    return -torch.stack(terms).mean()


def cross_entropy_reference(student: torch.Tensor, targets: torch.Tensor, student_temp: float, g: int) -> torch.Tensor:
    """Mean over pairs i != j (i < G) and images of -sum_k q_i log p_j, by a loop over pairs (float64)."""
    b = targets.shape[0] // g
    v = student.shape[0] // b
    log_p = F.log_softmax(student.double() / student_temp, dim=-1)
    terms = [
        -(targets[i * b : (i + 1) * b].double() * log_p[j * b : (j + 1) * b]).sum(-1).mean()
        for i in range(g)
        for j in range(v)
        if i != j
    ]
    return torch.stack(terms).mean()


# --- Sinkhorn-Knopp ----------------------------------------------------------------------------------------
@given(
    n=st.integers(1, 12),
    k=st.integers(1, 40),
    temp=st.sampled_from([0.02, 0.04, 0.1, 1.0]),
    n_iterations=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_sinkhorn_equals_the_float64_reference(n, k, temp, n_iterations, seed):
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.5
    got = sinkhorn_knopp_targets(logits, temp, n_iterations=n_iterations)
    (want,) = sinkhorn_reference([logits], temp, n_iterations)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # The last normalization is per sample: every row is a distribution.
    torch.testing.assert_close(got.sum(-1), torch.ones(n), rtol=0, atol=1e-5)


def test_sinkhorn_tensor_temperature_and_float64_input():
    logits = torch.randn(6, 9, dtype=torch.float64)
    (want,) = sinkhorn_reference([logits], 0.07, 3)
    got = sinkhorn_knopp_targets(logits, torch.tensor(0.07, dtype=torch.float64))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_sinkhorn_does_not_overflow_where_the_plain_formula_does():
    # logits / tau up to 300: exp overflows fp32 (> 88.7) but not float64; the per-prototype shift is exact.
    logits = torch.rand(8, 16, generator=torch.Generator().manual_seed(3)) * 3.0
    temp = 0.01
    assert torch.isinf(torch.exp(logits / temp)).any()  # DINOv2's formula in fp32 would give NaN targets
    got = sinkhorn_knopp_targets(logits, temp)
    (want,) = sinkhorn_reference([logits], temp, 3)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_sinkhorn_balances_the_prototypes_more_than_a_softmax():
    # Every sample prefers prototype 0: a softmax sends them all there; the transport plan spreads them.
    logits = torch.randn(32, 8) * 0.1
    logits[:, 0] += 1.0
    softmax_share = F.softmax(logits / 0.1, dim=-1).mean(0)
    sinkhorn_share = sinkhorn_knopp_targets(logits, 0.1, n_iterations=20).mean(0)
    assert softmax_share[0] > 0.9
    torch.testing.assert_close(sinkhorn_share, torch.full((8,), 1 / 8), rtol=0, atol=1e-3)


def test_sinkhorn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp_targets(torch.randn(4, 5), 0.1, n_iterations=0)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        sinkhorn_knopp_targets(torch.randn(0, 5), 0.1)


class ThreadWorkers:
    """In-process stand-in for W data-parallel workers (one thread each): a sum all-reduce and the step's
    averaging reducer, both rendezvousing at a barrier and combining in rank order (the same on every rank)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world

    def all_reduce_sum(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total = total + other
            self.barrier.wait()  # every rank has read the slots before any rank writes the next ones
            return total

        return reduce

    def mean_reducer(self, rank: int):
        reduce = self.all_reduce_sum(rank)

        def reducer(tensors: list[torch.Tensor]) -> None:
            for t in tensors:
                t.copy_(reduce(t) / self.world)

        return reducer

    def run(self, fn) -> list:
        """``fn(rank)`` on every worker concurrently; their results in rank order."""
        results: list = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException as err:  # noqa: BLE001  (re-raised below, in the test's thread)
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("sizes", [(5, 5), (3, 6, 4)])
@pytest.mark.parametrize("through_step_reducer", [False, True])
def test_data_parallel_sinkhorn_equals_one_process_on_all_rows(sizes, through_step_reducer):
    logits = torch.randn(sum(sizes), 12, generator=torch.Generator().manual_seed(5)) * 2.0
    shards = list(logits.split(sizes))
    workers = ThreadWorkers(len(sizes))

    def worker(rank: int) -> torch.Tensor:
        if through_step_reducer:  # what train_step does with its averaging reducer (fdino.distributed.summing)
            reduce = summing(workers.mean_reducer(rank), len(sizes))
        else:
            reduce = workers.all_reduce_sum(rank)
        return sinkhorn_knopp_targets(shards[rank], 0.05, n_iterations=3, all_reduce_sum=reduce)

    got = workers.run(worker)
    want = sinkhorn_reference(shards, 0.05, 3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)
    # The same as one process holding every row; not what each worker would compute alone.
    torch.testing.assert_close(torch.cat(got), sinkhorn_knopp_targets(logits, 0.05), rtol=1e-4, atol=1e-6)
    alone = sinkhorn_knopp_targets(shards[0], 0.05)
    assert (alone - got[0]).abs().max() > 1e-3


# --- the loss with given targets ---------------------------------------------------------------------------
@pytest.mark.parametrize("g,v", [(2, 4), (1, 3), (3, 3)])
def test_loss_from_targets_equals_the_pair_loop_and_the_dino_reference(g, v):
    b, k = 5, 11
    student = torch.randn(v * b, k, dtype=torch.float64, requires_grad=True)
    teacher, center = torch.randn(g * b, k, dtype=torch.float64), torch.randn(k, dtype=torch.float64) * 0.1
    q = F.softmax((teacher - center) / 0.04, dim=-1)
    got = dino_loss_from_targets(student, q, student_temp=0.1, n_global_crops=g)
    torch.testing.assert_close(got, cross_entropy_reference(student, q, 0.1, g))
    # The centered softmax given as targets is DINO's loss (values and student gradients).
    want, _ = fdino.dino_loss_reference(student, teacher, center, student_temp=0.1, teacher_temp=0.04, n_global_crops=g)
    (g_got,) = torch.autograd.grad(got, student)
    (g_want,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def test_loss_from_targets_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        dino_loss_from_targets(torch.randn(12, 5), torch.rand(6, 4), student_temp=0.1, n_global_crops=2)


# --- KoLeo -------------------------------------------------------------------------------------------------
@given(n=st.integers(2, 10), d=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_koleo_equals_the_loop_reference(n, d, seed):
    # d >= 2: unit vectors in 1-D are +-1, so neighbours coincide and the distance is pairwise_distance's eps.
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3.0
    torch.testing.assert_close(koleo_loss(x).double(), koleo_reference(x), rtol=1e-4, atol=1e-5)


def test_koleo_gradient_equals_the_reference_gradient():
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(koleo_loss(x), x)
    (want,) = torch.autograd.grad(koleo_reference(x), x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_koleo_is_finite_for_coinciding_features_and_rejects_one_row():
    x = torch.ones(4, 3, requires_grad=True)
    loss = koleo_loss(x)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="at least 2 images"):
        koleo_loss(torch.randn(1, 3))


def test_koleo_per_crop_never_pairs_an_image_with_its_other_view():
    crop = torch.randn(6, 4)
    both = torch.cat([crop, crop])  # the two global crops' features of each image coincide
    got = koleo_per_crop(both, 2)
    torch.testing.assert_close(got.double(), 2 * koleo_reference(crop), rtol=1e-4, atol=1e-5)
    assert koleo_loss(both) > 10  # over both crops at once, each image's neighbour is itself: -log(eps)


def test_koleo_runs_in_fp32_under_autocast():
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = koleo_loss(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), koleo_reference(x.float()), rtol=1e-5, atol=1e-6)


# --- the objective inside the step -------------------------------------------------------------------------
CFG = presets.smoke(batch_size=6, out_dim=32)


def _setup(cfg, teacher_noise=0.0):
    state = fdino.init_state(cfg, device="cpu")
    if teacher_noise:  # a teacher that differs from the student (at init they are equal)
        g = torch.Generator().manual_seed(11)
        for t in state.teacher.values():
            t.add_(torch.randn(t.shape, generator=g) * teacher_noise)
    g = torch.Generator().manual_seed(2)
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    crops = [torch.randn(cfg.batch_size, 3, s, s, generator=g) for s in sizes]
    return state, crops


def test_sinkhorn_step_loss_equals_the_reference_on_the_teacher_and_student_outputs():
    cfg = CFG.replace(centering="sinkhorn", sinkhorn_iterations=4)
    state, crops = _setup(cfg, teacher_noise=0.02)
    nets = networks(cfg, state.device)
    temp = torch.tensor(0.04)
    _, out = micro_grads(cfg, nets, state, crops, state.center, temp)
    t_logits = teacher_logits(cfg, nets.teacher, state.teacher, state.teacher_buffers, crops[:2])
    s_logits = functional_call(nets.student, (state.student, state.student_buffers), (crops,))
    (targets,) = sinkhorn_reference([t_logits], 0.04, 4)
    want = cross_entropy_reference(s_logits.detach(), targets, cfg.student_temp, 2)
    torch.testing.assert_close(out["loss"].double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["batch_center"], t_logits.mean(0))  # the center EMA keeps running
    entropy = -(targets * targets.clamp_min(1e-300).log()).sum(-1).mean()
    torch.testing.assert_close(out["teacher_entropy"].double(), entropy, rtol=1e-4, atol=1e-5)
    assert "koleo" not in out


def test_koleo_term_reads_the_students_global_crop_features_and_adds_its_weighted_gradient():
    w = 0.3
    cfg0 = CFG.replace(teacher_temp=0.05)
    state, crops = _setup(cfg0, teacher_noise=0.05)
    nets = networks(cfg0, state.device)
    temp = torch.tensor(0.05)
    grads0, out0 = micro_grads(cfg0, nets, state, crops, state.center, temp)
    cfg = cfg0.replace(koleo_weight=w)
    grads, out = micro_grads(cfg, nets, state, crops, state.center, temp)
    n_rows = cfg.n_global_crops * cfg.batch_size

    def koleo_of(net, params, buffers):
        _, feats = functional_call(net, (params, buffers), (crops, True))
        return koleo_per_crop(feats[:n_rows], cfg.n_global_crops)

    student_koleo = koleo_of(nets.student, state.student, state.student_buffers)
    teacher_koleo = koleo_of(nets.student, state.teacher, state.teacher_buffers)
    torch.testing.assert_close(out["koleo"], student_koleo.detach())
    assert (out["koleo"] - teacher_koleo).abs() > 1e-4  # the student's features, not the teacher's
    torch.testing.assert_close(out["loss"], out0["loss"])  # the metric stays the DINO loss
    koleo_grads = torch.func.grad(lambda p: koleo_of(nets.student, p, state.student_buffers))(state.student)
    moved = 0
    for name in grads:
        torch.testing.assert_close(grads[name], grads0[name] + w * koleo_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        if name.startswith("head."):  # KoLeo reads the backbone's output: the head's gradient is DINO's alone
            torch.testing.assert_close(grads[name], grads0[name], rtol=0, atol=1e-7, msg=name)
        moved += bool((koleo_grads[name] != 0).any())
    assert moved > 10


def test_activation_checkpointing_path_gives_the_same_sinkhorn_koleo_gradients():
    cfg = CFG.replace(centering="sinkhorn", koleo_weight=0.2)
    state, crops = _setup(cfg, teacher_noise=0.02)
    temp = torch.tensor(0.04)
    grads, out = micro_grads(cfg, networks(cfg, state.device), state, crops, state.center, temp)
    ckpt = cfg.replace(grad_checkpointing=True)
    grads_ckpt, out_ckpt = micro_grads(ckpt, networks(ckpt, state.device), state, crops, state.center, temp)
    assert set(out) == set(out_ckpt)
    for name in out:
        torch.testing.assert_close(out_ckpt[name], out[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_default_objective_has_the_old_metric_keys():
    state, crops = _setup(CFG)
    _, out = micro_grads(CFG, networks(CFG, state.device), state, crops, state.center, torch.tensor(0.04))
    assert set(out) == {"loss", "batch_center", "teacher_entropy", "teacher_effective_dims", "kl", "center_norm"}


def test_eager_step_with_sinkhorn_and_koleo_reports_koleo_and_keeps_the_center_ema():
    cfg = CFG.replace(centering="sinkhorn", koleo_weight=0.1)
    state, crops = _setup(cfg)
    state, metrics = fdino.train_step_eager(state, crops)
    assert torch.isfinite(metrics["koleo"]) and torch.isfinite(metrics["loss"])
    assert float(metrics["center_norm"]) == 0.0 and float(state.center.norm()) > 0  # EMA ran after the loss


# --- config, batched step, sweep -------------------------------------------------------------------------
def test_defaults_leave_dinov2_off():
    cfg = fdino.DinoConfig()
    assert cfg.centering == "ema" and cfg.koleo_weight == 0.0 and cfg.sinkhorn_iterations == 3


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(sinkhorn_iterations=0), "sinkhorn_iterations"),
        (dict(sinkhorn_iterations=2.0), "sinkhorn_iterations"),
        (dict(koleo_weight=-0.1), "koleo_weight"),
        (dict(koleo_weight=math.nan), "koleo_weight"),
        (dict(koleo_weight=math.inf), "koleo_weight"),
        (dict(centering="sinkhorn", grad_accum_steps=2), "grad_accum_steps=2 .*whole batch"),
        (dict(centering="sinkhorn", loss_impl="triton"), "loss_impl='triton' .*fused kernel"),
        (dict(centering="sinkhorn_knopp"), "centering"),
    ],
)
def test_config_rejects_bad_dinov2_settings(changes, match):
    with pytest.raises(ValueError, match=match):
        CFG.replace(**changes)


def test_cli_lists_the_new_flags():
    from fdino.config import field_doc

    assert "KoLeo" in field_doc("koleo_weight") and "sinkhorn" in field_doc("sinkhorn_iterations")
    assert "sinkhorn" in field_doc("centering")


def test_batched_step_refuses_dinov2_options_and_names_the_fix():
    cfgs = [CFG.replace(centering="sinkhorn", seed=s) for s in (0, 1)]
    bstate = fdino.init_batched(cfgs, device="cpu")
    crops = [c.unsqueeze(0).expand(2, *c.shape) for c in _setup(CFG)[1]]
    with pytest.raises(ValueError, match="run these variants unbatched"):
        fdino.batched_train_step_eager(bstate, crops)
    assert unbatchable(CFG.replace(koleo_weight=0.1)) and unbatchable(CFG) is None
    # ema and none share a batched run; sinkhorn is another computation and never joins them.
    assert batch_groups([CFG, CFG.replace(centering="none"), CFG.replace(centering="sinkhorn")]) == [[0, 1], [2]]


def test_dinov2_study_is_a_two_by_two_grid_that_validates():
    spec = study_spec("centering-sinkhorn-koleo", preset="smoke", seeds=(0, 1))
    cfgs = {v.name: cfg for v, seed, cfg, _ in spec.runs() if seed == 0}
    assert [(c.centering, c.koleo_weight) for c in cfgs.values()] == [
        ("ema", 0.0),
        ("ema", 0.1),
        ("sinkhorn", 0.0),
        ("sinkhorn", 0.1),
    ]
    assert dict(spec.grid) == {"centering": ("ema", "sinkhorn"), "koleo_weight": (0.0, 0.1)}
    assert [unbatchable(c) is None for c in cfgs.values()] == [True, False, False, False]


def test_two_gloo_processes_with_sinkhorn_equal_one_process_with_the_whole_batch(tmp_path):
    # The Sinkhorn targets normalize over both workers' rows, so 2 workers are one big batch (KoLeo is per
    # worker, as in DINOv2, so it stays off here). Each worker runs tests/dist_worker.py (train_step_eager).
    tests = Path(__file__).resolve().parent
    changes = {"centering": "sinkhorn"}
    out = tmp_path / "rank0.pt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "FDINO_DIST_TEST_CONFIG": json.dumps(changes),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*cmd, str(tests / "dist_worker.py"), str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    distributed = state_from_dict(saved["state"])
    assert distributed.cfg.centering == "sinkhorn"
    single = fdino.init_state(dist_setup.CFG.replace(**changes), device="cpu")
    for batch in dist_setup.batches(dist_setup.N_STEPS):
        single, metrics = fdino.train_step_eager(single, batch)
    assert_states_close(distributed, single)
    torch.testing.assert_close(saved["loss"], metrics["loss"], rtol=1e-5, atol=1e-6)
