"""How step templates run their backbones, held to the plain modules' math: ViT attention per device
and precision (the explicit q @ k^T softmax @ v of CPU bf16 steps, fdino.models.fused_attention_pays,
against the fused SDPA kernel) and NHWC crops for convolutional backbones (against NCHW)."""

from __future__ import annotations

import copy

import torch

from fdino.models import create_network, fused_attention_pays
from fdino.presets import preset
from fdino.step import networks


def _fused_flags(module: torch.nn.Module) -> set[bool]:
    return {sub.fused_attn for sub in module.modules() if hasattr(sub, "fused_attn")}


def test_only_cpu_bf16_steps_form_the_attention_matrix():
    assert not fused_attention_pays(torch.device("cpu"), "bf16")
    assert fused_attention_pays(torch.device("cpu"), "fp32")
    assert fused_attention_pays(torch.device("cuda"), "bf16")
    cpu = torch.device("cpu")
    bf16 = networks(preset("smoke", precision="bf16"), cpu)
    fp32 = networks(preset("smoke", precision="fp32"), cpu)
    assert _fused_flags(bf16.student) == _fused_flags(bf16.teacher) == {False}
    assert _fused_flags(fp32.student) == _fused_flags(fp32.teacher) == {True}


def test_explicit_attention_equals_the_fused_kernel_forward_and_backward():
    cfg = preset("smoke", precision="fp32")
    torch.manual_seed(0)
    fused = create_network(cfg).train()
    explicit = copy.deepcopy(fused)
    for sub in explicit.modules():
        if hasattr(sub, "fused_attn"):
            sub.fused_attn = False
    crops = [torch.randn(4, 3, s, s) for s in (cfg.global_crop_size, cfg.local_crop_size)]
    out_f, out_e = fused(crops), explicit(crops)
    torch.testing.assert_close(out_e, out_f, rtol=1e-5, atol=1e-5)
    out_f.square().mean().backward()
    out_e.square().mean().backward()
    for (name, p_f), p_e in zip(fused.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(p_e.grad, p_f.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_convolutional_step_templates_run_nhwc_except_under_vmap():
    cpu = torch.device("cpu")
    resnet = preset("small32_resnet", batch_size=8)
    assert networks(resnet, cpu).student.channels_last and networks(resnet, cpu).teacher.channels_last
    assert not networks(resnet, cpu, vmapped=True).student.channels_last  # vmap cannot query memory formats
    assert not networks(preset("smoke"), cpu).student.channels_last  # ViTs: no convolutions to speak of


def test_nhwc_crops_give_the_nchw_outputs_and_gradients():
    cfg = preset("small32_resnet", batch_size=8)
    torch.manual_seed(0)
    nchw = create_network(cfg).train()
    nhwc = copy.deepcopy(nchw)
    nhwc.channels_last = True
    crops = [torch.randn(8, 3, cfg.global_crop_size, cfg.global_crop_size) for _ in range(2)]
    out_a, out_b = nchw(crops), nhwc(crops)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    for (name, p_a), p_b in zip(nchw.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(p_b.grad, p_a.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b_a), b_b in zip(nchw.named_buffers(), nhwc.buffers()):  # BatchNorm running statistics
        torch.testing.assert_close(b_b, b_a, msg=name)
