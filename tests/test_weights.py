"""One model loader (fdino.weights.load_model) for every source and every command.

Official DINO layouts have their own file (tests/test_official_weights.py); here: fdino runs,
checkpoints and exports, plain timm weights, errors, and the commands' shared model arguments.
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import timm
import torch
from helpers import tiny_vit
from safetensors.torch import save_file

import fdino
from fdino.checkpoint import backbone_weights, load_checkpoint, save_checkpoint
from fdino.models import create_backbone
from fdino.weights import MODEL_SOURCES_HELP, ExportInfo, export_safetensors, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A smoke-preset checkpoint whose student differs from its teacher."""
    state = fdino.init_state(fdino.presets.smoke())
    student = {
        k: v + 1.0 if k.startswith("backbone.") and v.is_floating_point() else v for k, v in state.student.items()
    }
    path = tmp_path_factory.mktemp("run")
    save_checkpoint(path, state.replace(student=student))
    return path, state


# --- fdino runs, checkpoints, exports ------------------------------------------------------------------------
def test_fdino_checkpoint_loads_teacher_or_student(run_dir):
    path, state = run_dir
    for source in (path, next(path.glob("ckpt-*.pt"))):
        model = load_model(source)
        assert model.kind == "fdino-checkpoint" and model.cfg == state.cfg
        assert model.image_size == state.cfg.global_crop_size == 16
        assert model.mean == (0.485, 0.456, 0.406) and not model.backbone.training
        assert all(not p.requires_grad for p in model.backbone.parameters())
        torch.testing.assert_close(model.backbone.state_dict()["cls_token"], state.teacher["backbone.cls_token"])
    student = load_model(path, which="student").backbone
    torch.testing.assert_close(student.state_dict()["cls_token"], state.teacher["backbone.cls_token"] + 1.0)
    assert load_model(path, img_size=32).image_size == 32
    assert load_model(path, mean=(0.5, 0.5, 0.5)).mean == (0.5, 0.5, 0.5)


def test_loaded_backbone_is_the_trainers_evaluation_backbone(run_dir):
    """The trainer evaluates `create_backbone` holding `backbone_weights(state)` (fdino.train_eval);
    every command must see the same network from the checkpoint file."""
    path, _ = run_dir
    state, _ = load_checkpoint(path)
    x = torch.randn(2, 3, 16, 16)
    for which in ("teacher", "student"):
        live = create_backbone(state.cfg, drop_path_rate=0.0).eval()
        live.load_state_dict(backbone_weights(state, which), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(live(x), load_model(path, which=which).backbone(x), rtol=0, atol=0)


def test_export_round_trip_needs_no_arch(run_dir, tmp_path):
    path, state = run_dir
    loaded = load_model(path, which="student")
    export_safetensors(loaded.backbone, tmp_path / "b.safetensors", loaded.info)
    again = load_model(tmp_path / "b.safetensors")
    assert again.kind == "fdino-export" and again.info.to_json() == loaded.info.to_json() and again.cfg == state.cfg
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again.backbone(x), loaded.backbone(x), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="arch='resnet18' ignored"):
        load_model(tmp_path / "b.safetensors", arch="resnet18")


# --- plain timm weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["pt", "safetensors", "dino-teacher", "module-prefix", "in-memory"])
def test_plain_weights_load_with_arch_and_inferred_geometry(tmp_path, layout):
    vit = tiny_vit()
    sd = vit.state_dict()
    if layout == "safetensors":
        source = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(source))
    elif layout == "in-memory":
        source = sd
    else:
        source = tmp_path / "w.pth"
        if layout == "dino-teacher":  # the official DINO checkpoint layout, head included
            sd = {
                "teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.ones(2, 32)},
                "epoch": 3,
            }
        elif layout == "module-prefix":
            sd = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
        torch.save(sd, source)
    model = load_model(source, arch="vit_tiny_patch16_224", model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2})
    assert model.cfg is None and model.kind == "timm" and model.image_size == 16  # patch 4, 16 px: off the weights
    assert model.info.model_kwargs["patch_size"] == 4 and model.info.feature_dim == 32
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.backbone(x), vit(x))
    if layout == "in-memory":  # the caller's tensors are copied, not taken
        assert model.backbone.cls_token.data_ptr() != vit.cls_token.data_ptr()


def test_plain_cnn_weights(tmp_path):
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    torch.save(cnn.state_dict(), tmp_path / "r.pt")
    model = load_model(tmp_path / "r.pt", arch="resnet18")
    assert model.image_size == 224
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.backbone(x), cnn(x))


def test_unknown_extra_keys_warn_but_head_keys_do_not(tmp_path):
    sd = tiny_vit().state_dict()
    kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    with pytest.warns(UserWarning, match=r"ignoring 1 weights.*'projector.weight'"):
        load_model({**sd, "projector.weight": torch.ones(2)}, arch="vit_tiny_patch16_224", model_kwargs=kwargs)


def test_loading_errors_say_what_to_do(tmp_path, run_dir):
    torch.save(tiny_vit().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="arch="):
        load_model(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="embed_dim"):
        load_model(tmp_path / "w.pt", arch="vit_tiny_patch16_224")  # width 192 != 32
    with pytest.raises(ValueError, match="not a timm model"):
        load_model(tmp_path / "w.pt", arch="no_such_model")
    with pytest.raises(ValueError, match="not a ViT"):
        load_model(tmp_path / "w.pt", arch="resnet18", patch_size=4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.pt", arch="resnet18")
    with pytest.raises(ValueError, match="which="):
        load_model(run_dir[0], which="ema")
    torch.save(tiny_vit(), tmp_path / "module.pt")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="state_dict"):
        load_model(tmp_path / "module.pt", arch="vit_tiny_patch16_224")


# --- every command: the same sources, the same flags ------------------------------------------------------------
MODEL_COMMANDS = (
    ["eval", "knn"],
    ["eval", "linear"],
    ["attention"],
    ["embed"],
    ["viz"],
    ["search"],
    ["export"],
    ["quantize"],
    ["serve"],
)


def _help(argv: list[str]) -> str:
    from fdino.cli import build_parser

    out = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(out):
        build_parser().parse_args([*argv, "--help"])
    return " ".join(out.getvalue().split())  # argparse wraps lines differently per command


@pytest.mark.parametrize("argv", MODEL_COMMANDS, ids=" ".join)
def test_every_command_lists_the_same_model_sources_and_flags(argv):
    text = _help(argv)
    assert " ".join(MODEL_SOURCES_HELP.split()) in text
    for flag in ("--arch", "--which", "--patch-size", "--img-size", "--model-kwargs"):
        assert re.search(rf"{flag}\b", text), f"{' '.join(argv)} --help lacks {flag}"


def test_eval_reads_an_fdino_export_without_arch(run_dir, tmp_path, capsys):
    """`fdino eval` once refused an fdino .safetensors export without --arch while export and serve took it."""
    from PIL import Image

    from fdino.cli import main

    for split in ("train", "val"):
        for c, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), tuple(v + 10 * i for v in colour)).save(
                    tmp_path / "data" / split / c / f"{i}.png"
                )
    loaded = load_model(run_dir[0])
    export_safetensors(loaded.backbone, tmp_path / "b.safetensors", loaded.info)
    code = main(
        [
            "eval",
            "knn",
            str(tmp_path / "b.safetensors"),
            "--data",
            str(tmp_path / "data"),
            "--k",
            "1",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "knn.json"),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert (tmp_path / "knn.json").is_file()


def test_export_info_json_round_trip():
    info = ExportInfo(arch="resnet18", model_kwargs={"a": 1}, image_size=32, feature_dim=512)
    assert ExportInfo.from_json(info.to_json()) == info
    with pytest.raises(ValueError, match="not an fdino backbone export"):
        ExportInfo.from_json('{"format": "other"}')
