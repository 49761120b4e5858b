"""Data parallelism and DINO-aware gradient accumulation equal one big batch (fp32, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_setup import CFG, N_STEPS, RESNET_CFG, batches

import fdino
from fdino.distributed import _buckets
from fdino.models import create_network

TESTS = Path(__file__).resolve().parent


def single_process_run(cfg, n_steps=N_STEPS):
    state = fdino.init_state(cfg, device="cpu")
    for batch in batches(n_steps, cfg):
        state, metrics = fdino.train_step_eager(state, batch)
    return state, metrics


def assert_states_close(a, b, atol=1e-5, trees=("student", "teacher")):
    for tree in trees:
        for name in getattr(a, tree):
            torch.testing.assert_close(
                getattr(a, tree)[name], getattr(b, tree)[name], rtol=0, atol=atol, msg=f"{tree}.{name}"
            )
    torch.testing.assert_close(a.center, b.center, rtol=0, atol=atol)
    assert int(a.step) == int(b.step)


def run_two_gloo_workers(tmp_path, which: str) -> dict:
    """Rank 0's saved results of `dist_worker.py` under torchrun with 2 CPU (gloo) processes."""
    out = tmp_path / "rank0.pt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(TESTS / "dist_worker.py"),
        str(out),
        which,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_two_gloo_processes_equal_one_process_with_the_whole_batch(tmp_path):
    from fdino.checkpoint import state_from_dict

    saved = run_two_gloo_workers(tmp_path, "vit")
    distributed = state_from_dict(saved["state"])
    single, metrics = single_process_run(CFG)
    assert_states_close(distributed, single)
    torch.testing.assert_close(saved["loss"], metrics["loss"], rtol=1e-5, atol=1e-6)


def test_synced_batchnorm_makes_two_gloo_processes_equal_one_process_and_unsynced_does_not(tmp_path):
    """BatchNorm ResNet (backbone and head BN, two backbone calls per step): with sync_batchnorm the
    statistics, hence loss, gradients, parameters and running statistics, are those of the whole batch;
    with it off each worker normalizes its 8 images alone, and the states part (the test can fail)."""
    from fdino.checkpoint import state_from_dict

    saved = run_two_gloo_workers(tmp_path, "resnet")
    single, metrics = single_process_run(RESNET_CFG)
    synced = state_from_dict(saved["sync=True"]["state"])
    # A bias feeding a BatchNorm has an analytically zero gradient (the BatchNorm removes any shift): its
    # gradient is rounding noise (~1e-5 here) that depends on the summation order, and Adam turns it into
    # steps of up to ~lr * 1e-2. Those entries get a looser bound, still 100x below the unsynced gap.
    net = create_network(RESNET_CFG)
    layers = list(net.head.mlp)
    noise_only = {
        f"head.mlp.{i}.bias" for i, (a, b) in enumerate(zip(layers, layers[1:])) if isinstance(b, torch.nn.BatchNorm1d)
    }
    assert noise_only == {"head.mlp.0.bias", "head.mlp.3.bias"}
    for tree in ("student", "teacher", "student_buffers", "teacher_buffers"):
        for name, value in getattr(single, tree).items():
            atol = 2e-4 if name in noise_only else 1e-5
            torch.testing.assert_close(getattr(synced, tree)[name], value, rtol=0, atol=atol, msg=f"{tree}.{name}")
    torch.testing.assert_close(synced.center, single.center, rtol=0, atol=1e-5)
    torch.testing.assert_close(saved["sync=True"]["loss"], metrics["loss"], rtol=1e-5, atol=1e-6)
    unsynced = state_from_dict(saved["sync=False"]["state"])
    gap = max((unsynced.student[k] - single.student[k]).abs().max().item() for k in single.student)
    assert gap > 1e-3, f"per-worker BatchNorm should change the training, largest parameter gap {gap}"
    stem = "backbone.bn1.running_mean"
    assert (unsynced.student_buffers[stem] - single.student_buffers[stem]).abs().max() > 1e-4


def test_four_micro_batches_of_four_equal_one_batch_of_sixteen():
    accumulated, m_acc = single_process_run(CFG.replace(grad_accum_steps=4))
    whole, m_whole = single_process_run(CFG)
    assert_states_close(accumulated, whole)
    torch.testing.assert_close(m_acc["loss"], m_whole["loss"], rtol=1e-5, atol=1e-6)


def test_accumulation_updates_center_and_teacher_once_per_step():
    state = fdino.init_state(CFG.replace(grad_accum_steps=4), device="cpu")
    teacher_before = {k: v.clone() for k, v in state.teacher.items()}
    state, _ = fdino.train_step_eager(state, batches(1)[0])
    assert int(state.step) == 1
    # One EMA step with momentum m moves the teacher by (1 - m) of the gap; four would move more.
    m = float(fdino.schedules.teacher_momentum(state.cfg, 0))
    name = "backbone.blocks.0.mlp.fc1.weight"
    expected = teacher_before[name] * m + state.student[name] * (1 - m)
    torch.testing.assert_close(state.teacher[name], expected, rtol=1e-6, atol=1e-7)


def test_buckets_respect_size_dtype_and_order():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(3, dtype=torch.float64), torch.zeros(100)]
    buckets = _buckets(ts, bucket_bytes=80)
    assert [[t.numel() for t in b] for b in buckets] == [[10, 10], [3], [100]]
    assert [t for b in buckets for t in b] == ts


def test_activation_checkpointing_leaves_gradients_unchanged():
    from fdino import schedules
    from fdino.step import micro_grads, networks

    results = []
    for ckpt in (False, True):
        cfg = CFG.replace(grad_checkpointing=ckpt)
        state = fdino.init_state(cfg, device="cpu")
        t = schedules.teacher_temperature(cfg, state.step)
        grads, out = micro_grads(cfg, networks(cfg, state.device), state, batches(1)[0], state.center, t)
        results.append((grads, out["loss"]))
    (g0, l0), (g1, l1) = results
    assert torch.equal(l0, l1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize("bad", [5, 3])
def test_world_size_must_divide_into_the_config_batch(bad):
    state = fdino.init_state(CFG, device="cpu")
    shard = [c[:bad] for c in batches(1)[0]]
    with pytest.raises(ValueError, match="DinoConfig.batch_size=16"):
        fdino.train_step_eager(state, shard, world_size=2)
