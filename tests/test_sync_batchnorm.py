"""Synced BatchNorm (fdino.sync_batchnorm): its math equals torch's batch norm, its layers are torch's
BatchNorm outside a data-parallel step, and a step refuses to sync what it cannot. The cross-worker
equivalence (2 gloo workers x 8 images == 1 x 16) is in tests/test_distributed.py."""

from __future__ import annotations

import copy

import pytest
import torch
from dist_setup import RESNET_CFG, batches
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdino
from fdino.models import network_template
from fdino.sync_batchnorm import (
    SyncedBatchNorm2d,
    batch_norm_reference,
    batchnorm_statistics_across,
    synced_batch_norm,
    use_synced_batchnorm_,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@given(
    n=st.integers(2, 7),
    c=st.integers(1, 5),
    spatial=st.sampled_from([(), (1, 1), (3, 5)]),
    momentum=st.sampled_from([0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_synced_math_on_one_worker_equals_torch_batch_norm_forward_backward_and_running_stats(
    n, c, spatial, momentum, seed
):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, *spatial, generator=g, dtype=torch.float64) * 3 + 5).requires_grad_(True)
    weight = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_(True)
    bias = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_(True)
    cotangent = torch.randn(n, c, *spatial, generator=g, dtype=torch.float64)
    results = []
    running = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64)
    for fn in (batch_norm_reference, lambda *a, **k: synced_batch_norm(*a, **k, sum_across_workers=_identity)):
        rm, rv = (t.clone() for t in running)
        y = fn(x, rm, rv, weight, bias, momentum=momentum, eps=1e-5)
        grads = torch.autograd.grad(y, (x, weight, bias), cotangent)
        results.append((y, grads, rm, rv))
    (y0, g0, rm0, rv0), (y1, g1, rm1, rv1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rm1, rm0, rtol=1e-12, atol=1e-12)  # unbiased running variance, as torch
    torch.testing.assert_close(rv1, rv0, rtol=1e-12, atol=1e-12)


def test_statistics_come_from_the_sum_across_workers():
    """A fake second worker holding a copy of the batch: the global mean and variance are the local ones
    (and the unbiased running variance uses the doubled count), so the output is unchanged."""
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64) + 2
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    y = synced_batch_norm(x, rm, rv, None, None, momentum=1.0, eps=1e-5, sum_across_workers=lambda t: 2 * t)
    torch.testing.assert_close(y, batch_norm_reference(x, None, None, None, None, momentum=1.0, eps=1e-5))
    doubled = torch.cat([x, x])
    torch.testing.assert_close(rm, doubled.mean((0, 2, 3)))
    torch.testing.assert_close(rv, doubled.transpose(0, 1).reshape(3, -1).var(1, unbiased=True))


def test_synced_layers_are_torch_batchnorm_outside_a_data_parallel_step():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4))
    synced = copy.deepcopy(plain)
    assert use_synced_batchnorm_(synced) == []
    assert isinstance(synced[1], SyncedBatchNorm2d)
    assert list(synced.state_dict()) == list(plain.state_dict())
    x = torch.randn(5, 3, 6, 6)
    assert torch.equal(synced(x), plain(x))
    assert all(torch.equal(a, b) for a, b in zip(synced.state_dict().values(), plain.state_dict().values()))
    with batchnorm_statistics_across(_identity):  # inside: the synced math, equal up to rounding
        torch.testing.assert_close(synced(x), plain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(synced[1].running_var, plain[1].running_var, rtol=1e-6, atol=1e-6)
    assert int(synced[1].num_batches_tracked) == int(plain[1].num_batches_tracked) == 2
    synced.eval()
    with batchnorm_statistics_across(lambda t: pytest.fail("eval mode must not sync")):
        synced(x)


def test_templates_of_batchnorm_networks_sync_only_when_configured():
    on = network_template(RESNET_CFG, teacher=False)
    off = network_template(RESNET_CFG.replace(sync_batchnorm=False), teacher=False)
    assert isinstance(on.backbone.bn1, SyncedBatchNorm2d) and type(off.backbone.bn1) is nn.BatchNorm2d
    assert on.unsynced_batchnorm == ()


def test_a_reducer_without_a_differentiable_sum_is_refused_for_batchnorm_networks():
    state = fdino.init_state(RESNET_CFG, device="cpu")
    shard = [c[:8] for c in batches(1, RESNET_CFG)[0]]
    with pytest.raises(ValueError, match="sum_across_workers"):
        fdino.train_step_eager(state, shard, reducer=lambda tensors: None, world_size=2)


def test_sync_batchnorm_must_be_a_bool():
    with pytest.raises(ValueError, match="sync_batchnorm"):
        RESNET_CFG.replace(sync_batchnorm="yes")
