"""Data parallelism and DINO-aware gradient accumulation equal one big batch (fp32, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_setup import CFG, N_STEPS, batches

import fdino
from fdino.distributed import _buckets

TESTS = Path(__file__).resolve().parent


def single_process_run(cfg, n_steps=N_STEPS):
    state = fdino.init_state(cfg, device="cpu")
    for batch in batches(n_steps):
        state, metrics = fdino.train_step_eager(state, batch)
    return state, metrics


def assert_states_close(a, b, atol=1e-5):
    for tree in ("student", "teacher"):
        for name in getattr(a, tree):
            torch.testing.assert_close(
                getattr(a, tree)[name], getattr(b, tree)[name], rtol=0, atol=atol, msg=f"{tree}.{name}"
            )
    torch.testing.assert_close(a.center, b.center, rtol=0, atol=atol)
    assert int(a.step) == int(b.step)


def test_two_gloo_processes_equal_one_process_with_the_whole_batch(tmp_path):
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
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from fdino.checkpoint import state_from_dict

    saved = torch.load(out, weights_only=True)
    distributed = state_from_dict(saved["state"])
    single, metrics = single_process_run(CFG)
    assert_states_close(distributed, single)
    torch.testing.assert_close(saved["loss"], metrics["loss"], rtol=1e-5, atol=1e-6)


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
