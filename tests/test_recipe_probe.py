"""bench/recipe_probe.py: its contrastive control loss against the NT-Xent equation, the loss swap
restoring the DINO loss, and a 2-step probe of each objective through the real training job."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import load_bench_module

import fdino.objective
from fdino import presets
from fdino.loss import dino_loss

probe_module = load_bench_module("recipe_probe")


def nt_xent_by_equation(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR's loss written out: for each of the 2B views, -log of its positive's share of the
    exponentiated cosine similarities to every other view, averaged over the 2B views."""
    views = [row / row.norm() for row in torch.cat([z1, z2]).double()]
    b = len(z1)
    total = 0.0
    for i, zi in enumerate(views):
        positive = (i + b) % (2 * b)
        terms = {j: math.exp(float(zi @ zj) / tau) for j, zj in enumerate(views) if j != i}
        total += -math.log(terms[positive] / sum(terms.values()))
    return total / (2 * b)


@pytest.mark.parametrize("b,k,n_crops", [(3, 8, 2), (5, 16, 4)])
def test_contrastive_control_loss_is_nt_xent_on_the_two_global_crops(b, k, n_crops):
    gen = torch.Generator().manual_seed(b * k)
    student = torch.randn(n_crops * b, k, generator=gen)
    teacher = torch.randn(2 * b, k, generator=gen)
    loss, batch_center = probe_module.nt_xent_loss(
        student, teacher, torch.zeros(k), student_temp=0.1, teacher_temp=0.04, n_global_crops=2
    )
    want = nt_xent_by_equation(student[:b], student[b : 2 * b], probe_module.CONTRASTIVE_TEMPERATURE)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(batch_center, teacher.mean(dim=0))


def test_objective_swap_is_undone_even_on_error():
    with pytest.raises(RuntimeError, match="inside"):
        with probe_module.objective("contrastive"):
            assert fdino.objective.dino_loss is probe_module.nt_xent_loss
            raise RuntimeError("inside")
    assert fdino.objective.dino_loss is dino_loss


@pytest.mark.parametrize("objective", ["dino", "contrastive"])
def test_probe_runs_the_training_job_and_reads_all_four_numbers(objective, tmp_path):
    result = probe_module.probe(
        {"seed": 1}, steps=2, name=objective, eval_every=1, eval_samples=200, run_dir=str(tmp_path / objective)
    )
    assert result["steps"] == 2 and result["objective"] == objective
    assert [h["step"] for h in result["history"]] == [0, 1, 2]
    for key in ("init", "teacher", "student", "raw_pixels"):
        assert 0.0 <= result[key] <= 100.0, key
    # The last logged step's collapse diagnostics (read back from metrics.jsonl).
    assert set(result["final"]) == set(probe_module.DIAGNOSTICS)
    out_dim = presets.small32_resnet().out_dim
    assert 0.0 < result["final"]["teacher_entropy"] <= math.log(out_dim) + 1e-3
    assert 1.0 <= result["final"]["teacher_effective_dims"] <= out_dim + 1e-3
    assert fdino.objective.dino_loss is dino_loss
