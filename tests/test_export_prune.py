"""Magnitude pruning for export (`fdino.export.prune`, ``fdino export --prune``): the asked sparsity in
exactly the targeted tensors, whole heads / units / channels when structured, and exports that
load with `load_model` and compute what the in-memory pruned backbone computes.

Models: the ``smoke`` preset's ViT and the ``small32_resnet`` preset's ResNet at initialization.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

import fdino
from fdino.checkpoint import save_checkpoint
from fdino.data import EvalTransform, build_dataset
from fdino.eval.features import extract_features
from fdino.eval.knn import knn_classify
from fdino.export import OnnxBackbone, compare_onnx, onnx_session, prune_backbone, weight_sparsity
from fdino.export.cli import register
from fdino.export.prune import compressed_size, prunable_layers
from fdino.models import create_backbone
from fdino.weights import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    p = argparse.ArgumentParser(prog="fdino")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


def features(backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(x)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_backbone(fdino.presets.smoke()).eval()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return create_backbone(fdino.presets.small32_resnet()).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run")
    save_checkpoint(path, fdino.init_state(fdino.presets.smoke()))
    return path


@pytest.fixture(scope="module")
def teacher(run_dir):
    return load_model(run_dir).backbone


# --- the pruning itself ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["vit", "resnet"])
@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_unstructured_prunes_the_asked_fraction_of_each_weight_and_nothing_else(request, arch, fraction):
    backbone = request.getfixturevalue(arch)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    pruned, stats = prune_backbone(backbone, fraction)
    targets = {f"{name}.weight" for name, _ in prunable_layers(backbone)}
    assert targets and pruned.state_dict().keys() == before.keys()
    for key, value in pruned.state_dict().items():
        if key not in targets:  # norms, biases, BN statistics, CLS token, position table: bitwise the same
            assert torch.equal(value, before[key]), key
            continue
        zeroed = value == 0
        assert int(zeroed.sum()) == round(fraction * value.numel()), key  # per layer, torch's rounding
        assert torch.equal(value[~zeroed], before[key][~zeroed])  # survivors keep their values
        assert before[key][zeroed].abs().max() <= before[key][~zeroed].abs().min()  # L1: the smallest go
    untouched = {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"} if arch == "vit" else {"bn1.weight"}
    assert untouched <= before.keys() - targets  # what must not be pruned is there, and was checked above
    for key, value in backbone.state_dict().items():  # the input is untouched
        assert torch.equal(value, before[key])
    want = sum(round(fraction * layer.total) for layer in stats.layers) / sum(layer.total for layer in stats.layers)
    assert stats.sparsity == pytest.approx(want) and abs(stats.sparsity - fraction) < 0.01
    assert set(stats.by_kind()) == ({"Linear", "Conv2d"} if arch == "vit" else {"Conv2d"})


def test_structured_vit_zeroes_whole_heads_and_mlp_units(vit):
    pruned, stats = prune_backbone(vit, 0.5, structured=True)
    assert stats.groups == {"attention heads": (2, 4), "MLP units": (128, 256), "output channels": (16, 32)}
    x = torch.randn(2, 3, 16, 16)
    reference = features(pruned, x)
    for block in pruned.blocks:
        attn, mlp = block.attn, block.mlp
        heads, dim = attn.num_heads, attn.head_dim
        qkv = attn.qkv.weight.reshape(3, heads, dim, -1)
        gone = [h for h in range(heads) if torch.all(qkv[:, h] == 0)]
        assert len(gone) == 1 and torch.all(qkv[:, [h for h in range(heads) if h not in gone]] != 0)
        assert torch.all(attn.proj.weight.reshape(-1, heads, dim)[:, gone] == 0)
        units = torch.all(mlp.fc1.weight == 0, dim=1)
        assert int(units.sum()) == 64 and torch.all(mlp.fc2.weight[:, units] == 0)
        with torch.no_grad():  # a pruned head's bias (kept) reaches nothing: the head is really gone
            attn.qkv.bias.reshape(3, heads, dim)[:, gone] += 5.0
    torch.testing.assert_close(features(pruned, x), reference, rtol=0, atol=1e-6)
    channels = torch.all(pruned.patch_embed.proj.weight.flatten(1) == 0, dim=1)
    assert int(channels.sum()) == 16


def test_structured_resnet_zeroes_whole_output_channels(resnet):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    pruned, stats = prune_backbone(resnet, 0.5, structured=True)
    assert set(stats.groups) == {"output channels"}
    for name, conv in prunable_layers(pruned):
        dead = torch.all(conv.weight.flatten(1) == 0, dim=1)
        assert int(dead.sum()) == round(0.5 * conv.out_channels), name
        assert not torch.any(torch.all(conv.weight[~dead].flatten(1) == 0, dim=1))
    targets = {f"{name}.weight" for name, _ in prunable_layers(resnet)}
    for key, value in pruned.state_dict().items():
        if key not in targets:
            assert torch.equal(value, before[key]), key
    assert stats.sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_prune_backbone_rejects_fractions_outside_0_1(vit, fraction):
    with pytest.raises(ValueError, match="0 < fraction < 1"):
        prune_backbone(vit, fraction)


# --- fdino export --prune -------------------------------------------------------------------------------
KNN = ["--n-memory", "200", "--n-query", "100", "--bench-batch", "16"]


@pytest.fixture(scope="module")
def pruned_export(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned")
    code, stdout, stderr = run_cli(
        ["export", str(run_dir), "--out", str(out), "--formats", "safetensors", "--prune", "0.5", *KNN]
    )
    assert code == 0, stdout + stderr
    return out, stdout


def test_pruned_export_loads_and_equals_the_in_memory_pruned_backbone(pruned_export, teacher):
    out, stdout = pruned_export
    loaded = load_model(out / "backbone.safetensors")
    assert loaded.kind == "fdino-export" and loaded.info.which == "teacher"
    pruned, stats = prune_backbone(teacher, 0.5)
    assert weight_sparsity(loaded.backbone) == stats.layers
    assert "prune 50% (unstructured, per-layer L1): 50.00% of" in stdout
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(features(loaded.backbone, x), features(pruned, x), rtol=0, atol=1e-5)
    assert (features(loaded.backbone, x) - features(teacher, x)).abs().max() > 1e-3  # pruning changed them


def test_reported_knn_change_and_sizes_are_what_they_measure(pruned_export, teacher):
    out, stdout = pruned_export
    line = re.search(
        r"prune 50% \(unstructured, torch\): k-NN top-1 \(k=20\) ([0-9.]+)% dense -> ([0-9.]+)% pruned "
        r"\(change ([-+][0-9.]+) points\); feature cosine >= ([0-9.]+);.*speed-up x[0-9.]+",
        stdout,
    )
    assert line, stdout
    loaded = load_model(out / "backbone.safetensors")
    memory = build_dataset("shapes10", split="memory", n=200).dataset
    query = build_dataset("shapes10", split="query", n=100).dataset
    transform = EvalTransform(loaded.image_size, mean=loaded.mean, std=loaded.std)
    top1, queries = [], []
    for backbone in (teacher, loaded.backbone):
        bank, bank_labels = extract_features(backbone, memory, transform=transform)
        q, q_labels = extract_features(backbone, query, transform=transform)
        top1.append(knn_classify(bank, bank_labels, q, q_labels, ks=(20,))[20]["top1"])
        queries.append(q)
    cosine = torch.nn.functional.cosine_similarity(*queries, dim=1).min().item()
    assert line.groups() == (f"{top1[0]:.2f}", f"{top1[1]:.2f}", f"{top1[1] - top1[0]:+.2f}", f"{cosine:.4f}")
    pruned_zlib = re.search(r"backbone\.safetensors \([0-9.]+ MB, zlib ([0-9.]+) MB\)", stdout).group(1)
    dense_zlib = float(
        re.search(r"unpruned safetensors for comparison: [0-9.]+ MB, zlib ([0-9.]+) MB", stdout).group(1)
    )
    assert pruned_zlib == f"{compressed_size((out / 'backbone.safetensors').read_bytes()) / 1e6:.2f}"
    assert float(pruned_zlib) < dense_zlib  # zeros pay on disk once compressed


def test_structured_export_masks_whole_heads_and_loads(run_dir, teacher, tmp_path):
    code, stdout, stderr = run_cli(
        [
            "export",
            str(run_dir),
            "--out",
            str(tmp_path),
            "--formats",
            "safetensors",
            "--prune",
            "0.5",
            "--prune-structured",
            *KNN,
        ]
    )
    assert code == 0, stdout + stderr
    assert "attention heads 2/4" in stdout and "prune 50% (structured, torch): k-NN top-1" in stdout
    loaded = load_model(tmp_path / "backbone.safetensors").backbone
    pruned, _ = prune_backbone(teacher, 0.5, structured=True)
    want = pruned.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_prune_then_int8_onnx(run_dir, teacher, tmp_path):
    for extra in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(extra, reason="needs the export extras: pip install 'fdino[export]'")
    code, stdout, stderr = run_cli(
        [
            "export",
            str(run_dir),
            "--out",
            str(tmp_path),
            "--prune",
            "0.5",
            "--int8",
            "--n-memory",
            "100",
            "--n-query",
            "50",
            "--bench-batch",
            "8",
        ]
    )
    assert code == 0, stdout + stderr
    assert "(>= 0.9999: ok)" in stdout and re.search(
        r"int8 \(onnxruntime\): k-NN top-1 .*of the pruned model\]", stdout
    )
    assert {p.name for p in tmp_path.iterdir()} == {
        "backbone.safetensors",
        "backbone.json",
        "backbone.onnx",
        "backbone.int8.onnx",
    }
    pruned = load_model(tmp_path / "backbone.safetensors").backbone
    assert weight_sparsity(pruned) == prune_backbone(teacher, 0.5)[1].layers
    fp32 = OnnxBackbone(onnx_session(tmp_path / "backbone.onnx"))
    assert compare_onnx(pruned, fp32, [(3, 3, 16, 16)]).ok  # the ONNX model is the pruned one
    int8 = OnnxBackbone(onnx_session(tmp_path / "backbone.int8.onnx"))
    assert compare_onnx(pruned, int8, [(8, 3, 16, 16)]).min_cosine > 0.9


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prune", "1.5"], "--prune 1.5: allowed 0 < FRACTION < 1"),
        (["--prune", "0"], "--prune 0: allowed 0 < FRACTION < 1"),
        (["--prune", "-0.2"], "--prune -0.2: allowed 0 < FRACTION < 1"),
        (["--prune", "nan"], "--prune nan: allowed 0 < FRACTION < 1"),
        (["--prune-structured"], "--prune-structured needs --prune FRACTION"),
    ],
)
def test_invalid_prune_flags_exit_2_with_a_clear_message(run_dir, tmp_path, flags, message):
    code, stdout, err = run_cli(["export", str(run_dir), "--out", str(tmp_path), "--formats", "safetensors", *flags])
    assert code == 2 and message in err and "Traceback" not in err and not list(tmp_path.iterdir())


def test_prune_flags_default_off():
    p = argparse.ArgumentParser(prog="fdino")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["export", "run"])
    assert args.prune is None and not args.prune_structured
