"""The README's promise "nothing inside the step syncs with the host", held two ways.

On CUDA: the whole compiled `train_step` runs under ``torch.cuda.set_sync_debug_mode("error")``,
which raises on any device-to-host copy or synchronization. On the CPU (its twin): the step's
graph is captured the way `train_step` compiles it (dynamo, ``fullgraph=True``) and lowered to
ATen ops with AOTAutograd; the graph must contain no op that reads a value on the host
(``.item()`` / ``float(t)`` lower to ``_local_scalar_dense``) or whose output shape depends on
data (``nonzero`` and friends sync on CUDA to size their output). ``capture_scalar_outputs`` is
on, so a scalar read shows up as a node instead of a graph break that fullgraph would hide
behind a different error.
"""

from __future__ import annotations

import torch
import torch._dynamo
from helpers import requires_cuda
from torch._dynamo.backends.common import aot_autograd

import fdino
from fdino import presets
from fdino.step import _full_step, graph_config, networks, step_schedules

# ATen ops that read device values on the host, or size their output from device data.
HOST_READS = {
    "aten._local_scalar_dense",
    "aten.item",
    "aten.equal",
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.masked_select",
    "aten.unique",
    "aten._unique2",
    "aten.repeat_interleave",
}


def crops_for(cfg, device="cpu"):
    g = torch.Generator().manual_seed(0)
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    return [torch.randn(cfg.batch_size, 3, s, s, generator=g).to(device) for s in sizes]


def _aten_ops(gm: torch.fx.GraphModule) -> set[str]:
    ops = set()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = str(getattr(node.target, "_overloadpacket", node.target))
            ops.add(name)
    return ops


def captured_ops(fn, *args) -> tuple[set[str], object]:
    """The ATen ops of ``fn``'s graph(s), captured as `train_step` compiles (fullgraph), and its output."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert graphs, "nothing was captured"
    return set().union(*(_aten_ops(gm) for gm in graphs)), out


def test_the_check_sees_a_host_read():
    # Guards the guard: a shape read from a device value and a data-sized output are both found.
    # (A value read only to scale a tensor, `x * float(x.sum())`, is folded back into a device
    # op by dynamo and never reaches the host: the compiled graph has no read to find there.)
    ops, _ = captured_ops(lambda x: x.new_zeros(int(x.sum().item())), torch.ones(3))
    assert ops & HOST_READS == {"aten._local_scalar_dense"}
    ops, _ = captured_ops(lambda x: torch.nonzero(x > 0).sum(), torch.ones(3))
    assert "aten.nonzero" in ops & HOST_READS


def test_compiled_step_graph_reads_nothing_on_the_host():
    cfg = presets.smoke(batch_size=2)
    state = fdino.init_state(cfg, device="cpu")
    graph_cfg = graph_config(cfg)
    nets = networks(graph_cfg, state.device)

    def step_and_schedules(state, crops):  # the schedules run outside the compiled step, but must not read either
        sched = step_schedules(cfg, state.step)
        return {**sched, **_full_step(graph_cfg, nets, state, crops, sched)}

    ops, metrics = captured_ops(step_and_schedules, state, crops_for(cfg))
    assert "aten.mm" in ops or "aten.addmm" in ops, f"the captured graph is not the step: {sorted(ops)[:20]}"
    assert not ops & HOST_READS, f"the step reads device values on the host: {sorted(ops & HOST_READS)}"
    assert set(metrics) >= {"loss", "lr", "teacher_entropy", "kl", "center_norm"}
    assert all(v.ndim == 0 for v in metrics.values())
    assert torch.isfinite(metrics["loss"])


@requires_cuda
def test_compiled_step_never_syncs_on_cuda():
    cfg = presets.smoke(batch_size=8)
    state = fdino.init_state(cfg, device="cuda")
    crops = crops_for(cfg, "cuda")
    state, metrics = fdino.train_step(state, crops)  # compiles; the first call may sync (autotuning, copies)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            state, metrics = fdino.train_step(state, crops)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(metrics["loss"]).item()
