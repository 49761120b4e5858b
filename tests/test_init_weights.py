"""``fdino train --init-weights SOURCE`` (TrainOptions.init_weights, fdino.weights.start).

A run starts with student and teacher backbones equal to the source's backbone (an fdino run's
teacher, timm weights, an official DINO checkpoint), the head freshly initialized; a source that
does not fit is a clear error naming the tensors, both shapes and the flags to pass; the source is
recorded in run.json and read once: a resume continues from its checkpoint without it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from test_official_weights import full_checkpoint
from test_step_equivalence import RESNET

import fdino
from fdino import checkpoint as ckpt
from fdino import cli, presets
from fdino.models import create_backbone
from fdino.train import TrainOptions, resume, run
from fdino.weights import start_from_weights

pytestmark = pytest.mark.usefixtures("one_thread")

SMOKE = presets.smoke()


def source_run(folder, cfg=SMOKE, seed: int = 7) -> fdino.TrainState:
    """An fdino run folder whose checkpoint's teacher differs from its student and from a fresh state."""
    state = fdino.init_state(cfg.replace(seed=seed), device="cpu")
    g = torch.Generator().manual_seed(seed)
    teacher = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.teacher.items()}
    buffers = {
        k: v + torch.rand(v.shape, generator=g) if v.is_floating_point() else v + 3
        for k, v in state.teacher_buffers.items()
    }
    state = state.replace(teacher=teacher, teacher_buffers=buffers)
    ckpt.save_checkpoint(folder, state, {})
    return state


def backbone_of(tree: dict) -> dict:
    return {k[len("backbone.") :]: v for k, v in tree.items() if k.startswith("backbone.")}


def assert_started_from(state, fresh, weights: dict) -> None:
    """Student and teacher backbones (parameters and buffers) equal ``weights`` bitwise, in their own
    storage; the head, the optimizer state and the center are those of the ``fresh`` state."""
    for tree in ("student", "teacher", "student_buffers", "teacher_buffers"):
        ours = getattr(state, tree)
        assert ours.keys() == getattr(fresh, tree).keys()
        for k, v in backbone_of(ours).items():
            assert torch.equal(v, weights[k]) and v.dtype == getattr(fresh, tree)[f"backbone.{k}"].dtype, (tree, k)
            assert v.data_ptr() != weights[k].data_ptr()
        for k, v in ours.items():
            if not k.startswith("backbone."):
                assert torch.equal(v, getattr(fresh, tree)[k]), (tree, k)  # the head starts fresh
    assert backbone_of(state.student).keys() | backbone_of(state.student_buffers).keys() == weights.keys()
    assert all(state.student[k].data_ptr() != state.teacher[k].data_ptr() for k in state.student)
    assert fdino.tree_allclose(state.opt, fresh.opt) and torch.equal(state.center, fresh.center)


def test_an_fdino_run_starts_both_backbones_as_its_teacher(tmp_path):
    source = source_run(tmp_path / "source")
    fresh = fdino.init_state(SMOKE, device="cpu")
    state = start_from_weights(fresh, tmp_path / "source")
    teacher = {**backbone_of(source.teacher), **backbone_of(source.teacher_buffers)}
    assert_started_from(state, fresh, teacher)
    assert not torch.equal(state.student["backbone.cls_token"], fresh.student["backbone.cls_token"])


def test_timm_weights_and_an_official_checkpoint_start_the_backbone(tmp_path):
    # A BatchNorm ResNet: its running statistics (buffers) come from the source too.
    torch.manual_seed(3)
    weights = create_backbone(RESNET).state_dict()
    weights = {k: v + 0.5 if k.endswith("running_var") else v for k, v in weights.items()}
    save_file(weights, str(tmp_path / "resnet.safetensors"))
    fresh = fdino.init_state(RESNET, device="cpu")
    assert_started_from(start_from_weights(fresh, tmp_path / "resnet.safetensors"), fresh, weights)
    # The official layout: a full main_dino.py checkpoint (DDP student, teacher, head, args); the teacher is taken.
    torch.manual_seed(4)
    teacher = create_backbone(SMOKE).state_dict()
    student = {k: v + 1.0 for k, v in teacher.items()}
    torch.save(full_checkpoint(student, teacher, arch="vit_tiny", patch=4, dim=32), tmp_path / "checkpoint.pth")
    fresh = fdino.init_state(SMOKE, device="cpu")
    assert_started_from(start_from_weights(fresh, tmp_path / "checkpoint.pth"), fresh, teacher)


def test_a_source_that_does_not_fit_names_the_tensors_the_shapes_and_the_fix(tmp_path):
    source_run(tmp_path / "p8", SMOKE.replace(patch_size=8))
    fresh = fdino.init_state(SMOKE, device="cpu")
    with pytest.raises(ValueError) as err:
        start_from_weights(fresh, tmp_path / "p8")
    message = str(err.value)
    assert "patch_embed.proj.weight: source (32, 3, 8, 8), run (32, 3, 4, 4)" in message
    assert "pos_embed: source (1, 5, 32), run (1, 17, 32)" in message
    assert "--arch vit_tiny_patch16_224 --patch-size 8 --img-size 16" in message
    assert "--backbone-kwargs embed_dim=32,depth=2,num_heads=2" in message
    # Plain weights of a deeper network: the blocks the run has no place for are an error, not dropped.
    deeper = create_backbone(SMOKE.replace(backbone_kwargs=(("embed_dim", 32), ("depth", 3), ("num_heads", 2))))
    torch.save(deeper.state_dict(), tmp_path / "deeper.pt")
    with pytest.raises(ValueError, match=r"--init-weights .*deeper.pt: .*weights have no place in.*blocks\.2\."):
        start_from_weights(fresh, tmp_path / "deeper.pt")
    # ... of a wider one: the loader's own message, said for --init-weights.
    wider = create_backbone(SMOKE.replace(backbone_kwargs=(("embed_dim", 48), ("depth", 2), ("num_heads", 2))))
    torch.save(wider.state_dict(), tmp_path / "wider.pt")
    with pytest.raises(ValueError, match=r"--init-weights .*wider.pt: the weights do not fit") as err:
        start_from_weights(fresh, tmp_path / "wider.pt")
    assert "blocks.0.attn.proj.weight: (48, 48) vs timm (32, 32)" in str(err.value)
    assert "--backbone-kwargs" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        start_from_weights(fresh, tmp_path / "missing")


def test_the_cli_flag_and_the_option_check():
    _, opts = cli.train_settings(["--preset", "smoke", "--init-weights", "runs/pretrained"])
    assert opts.init_weights == "runs/pretrained" and TrainOptions().init_weights == ""
    with pytest.raises(ValueError, match="TrainOptions.init_weights=3 is invalid"):
        TrainOptions(init_weights=3)


def test_a_run_starts_from_the_source_records_it_and_resumes_without_it(tmp_path):
    source = source_run(tmp_path / "source")
    # A frozen teacher keeps its start through the step, so the checkpoint shows what the run started from.
    cfg = SMOKE.replace(teacher_update="frozen")
    options = dict(
        data="shapes10", compile=False, workers=0, progress=False, eval_samples=20, attention_images=0,
        embedding_snapshots=False, tensorboard=False, trackers="none", max_steps=1, ckpt_every=1,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    run(cfg, TrainOptions(**options, run_dir=str(run_dir), init_weights=str(tmp_path / "source")))
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["options"]["init_weights"] == str(tmp_path / "source")
    state, _ = ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, 1))
    fresh = fdino.init_state(cfg, device="cpu")
    for k, v in backbone_of(state.teacher).items():
        assert torch.equal(v, source.teacher[f"backbone.{k}"]), k
    for k, v in state.teacher.items():
        if k.startswith("head."):
            assert torch.equal(v, fresh.teacher[k]), k  # a fresh head, not the source's
    shutil.rmtree(tmp_path / "source")  # a resume must not read it again
    resume(run_dir, max_steps=2)
    state, _ = ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, 2))
    assert int(state.step) == 2
    assert torch.equal(state.teacher["backbone.cls_token"], source.teacher["backbone.cls_token"])
