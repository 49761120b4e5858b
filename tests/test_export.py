"""Export (safetensors + ONNX checked with onnxruntime) and dynamic int8 quantization, CLI included.

One ``fdino export --int8`` run on a tiny ViT (fdino.presets.smoke) is shared by the module: the
torch.export-based ONNX exporter takes several seconds even for a small model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fdino
from fdino.checkpoint import save_checkpoint
from fdino.data import EvalTransform, build_dataset
from fdino.export import OnnxBackbone, compare_int8, compare_onnx, onnx_session, quantize_torch, time_forward
from fdino.export.cli import register
from fdino.weights import ExportInfo, export_safetensors, load_model, read_export_info

onnxruntime = pytest.importorskip("onnxruntime", reason="needs the export extras: pip install 'fdino[export]'")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (export extras)")
pytest.importorskip("onnx", reason="needs the export extras: pip install 'fdino[export]'")


pytestmark = pytest.mark.usefixtures("one_thread")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdino")
    register(p.add_subparsers(dest="command", required=True))
    return p


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = parser().parse_args(argv)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run")
    save_checkpoint(path, fdino.init_state(fdino.presets.smoke()))
    return path


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    code, stdout, stderr = run_cli(
        [
            "export",
            str(run_dir),
            "--out",
            str(out),
            "--int8",
            "--n-memory",
            "200",
            "--n-query",
            "100",
            "--bench-batch",
            "16",
        ]
    )
    return out, code, stdout, stderr


@pytest.fixture(scope="module")
def teacher(run_dir):
    return load_model(run_dir, which="teacher").backbone


# --- safetensors ------------------------------------------------------------------------------------------
def test_export_command_succeeds_and_prints_the_checks(exported):
    out, code, stdout, stderr = exported
    assert code == 0, stdout + stderr
    cosine = float(re.search(r"min cosine ([0-9.]+) \(>= 0\.9999: ok\)", stdout).group(1))
    assert cosine >= 0.9999
    assert re.search(
        r"int8 \(onnxruntime\): k-NN top-1 \(k=20\) [0-9.]+% fp32 -> [0-9.]+% int8 \(change [-+][0-9.]+ "
        r"points\).*speed-up x[0-9.]+",
        stdout,
    ), stdout
    assert {p.name for p in out.iterdir()} == {
        "backbone.safetensors",
        "backbone.json",
        "backbone.onnx",
        "backbone.int8.onnx",
    }


def test_safetensors_holds_config_and_rebuilds_the_teacher(exported, teacher):
    out = exported[0]
    info = read_export_info(out / "backbone.safetensors")
    assert info == ExportInfo.from_json(json.dumps(json.loads((out / "backbone.json").read_text())))
    assert info.arch == "vit_tiny_patch16_224" and info.which == "teacher" and info.feature_dim == 32
    assert info.dino_config["patch_size"] == 4 and info.model_kwargs["embed_dim"] == 32
    backbone = load_model(out / "backbone.safetensors").backbone
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), teacher(x), rtol=0, atol=0)
    # Without the DinoConfig, model_kwargs alone rebuild it too (for non-fdino consumers).
    plain = info.__class__(**{**info.__dict__, "dino_config": None})
    export_safetensors(backbone, out.parent / "plain" / "b.safetensors", plain)
    again = load_model(out.parent / "plain" / "b.safetensors").backbone
    with torch.no_grad():
        torch.testing.assert_close(again(x), teacher(x), rtol=0, atol=0)


def test_load_model_reads_the_export_and_the_student(exported, run_dir, teacher):
    loaded = load_model(exported[0] / "backbone.safetensors")
    assert loaded.image_size == 16 and loaded.info.which == "teacher" and loaded.kind == "fdino-export"
    assert loaded.cfg == load_model(run_dir).cfg  # the training config travels in the export
    student = load_model(run_dir, which="student")
    assert student.info.which == "student" and student.kind == "fdino-checkpoint"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(x), teacher(x), rtol=0, atol=0)


# --- ONNX -----------------------------------------------------------------------------------------------
def test_onnx_has_dynamic_batch_and_image_size(exported, teacher):
    session = onnx_session(exported[0] / "backbone.onnx")
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and outp.name == "features"
    assert not isinstance(inp.shape[0], int) and not isinstance(inp.shape[2], int)  # symbolic dims
    check = compare_onnx(teacher, OnnxBackbone(session), [(1, 3, 16, 16), (5, 3, 16, 16), (2, 3, 28, 12)], seed=3)
    assert check.ok and check.min_cosine >= 0.9999 and check.max_abs_diff < 1e-4


def test_onnx_failure_is_reported(exported, run_dir, tmp_path, monkeypatch):
    """A wrong ONNX model must fail the command (exit 1), not print 'ok'."""
    import shutil

    import fdino.export.onnx_export as ox

    real = ox.compare_onnx

    def broken(backbone, onnx_model, shapes, **kw):
        return real(backbone, lambda x: -onnx_model(x), shapes, **kw)  # every feature flipped

    def reuse(backbone, path, **kw):  # skip the slow exporter: the module's export is the same model
        return Path(shutil.copy(exported[0] / "backbone.onnx", path))

    monkeypatch.setattr(ox, "compare_onnx", broken)
    monkeypatch.setattr(ox, "export_onnx", reuse)
    code, stdout, _ = run_cli(["export", str(run_dir), "--out", str(tmp_path), "--formats", "onnx"])
    assert code == 1 and "FAILED" in stdout


# --- int8 -----------------------------------------------------------------------------------------------
def test_onnx_int8_is_close_to_fp32(exported, teacher):
    int8 = OnnxBackbone(onnx_session(exported[0] / "backbone.int8.onnx"))
    check = compare_onnx(teacher, int8, [(8, 3, 16, 16)])
    assert check.min_cosine > 0.95  # int8 weights and activations: close, not exact


def test_torch_int8_replaces_linears_and_stays_close(teacher):
    int8 = quantize_torch(teacher)
    assert not any(type(m) is nn.Linear for m in int8.modules())
    assert any(type(m) is nn.Linear for m in teacher.modules())  # the original is untouched
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(int8(x), teacher(x), dim=1)
    assert cos.min() > 0.95


def test_compare_int8_report(teacher):
    memory = build_dataset("shapes10", split="memory", n=60).dataset
    query = build_dataset("shapes10", split="query", n=30).dataset
    report = compare_int8(
        teacher, teacher, memory, query, transform=EvalTransform(16), backend="torch", k=5, bench_batch=8, repeats=1
    )
    assert report.top1_change == 0 and report.min_cosine > 0.9999 and report.batch == 8
    assert report.seconds_reference > 0 and "speed-up x" in report.summary()


def test_time_forward_takes_the_best_run():
    calls = []
    assert time_forward(lambda x: calls.append(1), torch.zeros(1), repeats=3, warmup=2) >= 0
    assert len(calls) == 5


def test_quantize_command_torch_backend(run_dir):
    code, stdout, stderr = run_cli(
        [
            "quantize",
            str(run_dir),
            "--backend",
            "torch",
            "--n-memory",
            "100",
            "--n-query",
            "50",
            "--bench-batch",
            "8",
            "--k",
            "10",
        ]
    )
    assert code == 0, stderr
    assert re.search(r"int8 \(torch\): k-NN top-1 \(k=10\) .* \(change [-+][0-9.]+ points\).*speed-up x", stdout)


# --- CLI errors -----------------------------------------------------------------------------------------
def test_export_cli_errors(run_dir, tmp_path):
    code, _, err = run_cli(["export", str(run_dir), "--formats", "tflite", "--out", str(tmp_path)])
    assert code == 2 and "--formats" in err
    code, _, err = run_cli(["export", str(run_dir), "--formats", "safetensors", "--int8", "--out", str(tmp_path)])
    assert code == 2 and "--int8" in err
    code, _, err = run_cli(["export", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert code == 2 and "does not exist" in err


def test_export_cli_help_and_defaults():
    args = parser().parse_args(["export", "run"])
    assert args.which == "teacher" and args.formats == "safetensors,onnx" and not args.int8 and args.k == 20
    assert callable(args.func)
    args = parser().parse_args(["quantize", "run"])
    assert args.backend == "both" and args.data == "shapes10"
    for command in ("export", "quantize"):
        with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
            parser().parse_args([command, "--help"])
        assert "--which" in out.getvalue()


def test_plain_export_of_safetensors_only(run_dir, tmp_path, teacher):
    code, stdout, _ = run_cli(
        ["export", str(run_dir), "--out", str(tmp_path), "--formats", "safetensors", "--which", "student"]
    )
    assert code == 0 and "onnx" not in stdout
    assert load_model(tmp_path / "backbone.safetensors").info.which == "student"
