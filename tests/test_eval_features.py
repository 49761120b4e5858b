"""Feature extraction and model loading for evaluation (fdino.eval.features, fdino.eval.loading)."""

from __future__ import annotations

import timm
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

import fdino
import pytest
from fdino.checkpoint import save_checkpoint
from fdino.data import ArrayDataset, EvalTransform
from fdino.eval import (backbone_from_state, batch_features, extract_features, load_model_for_eval,
                        representation_stats)

TINY = dict(patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")



def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                             **{**TINY, **kwargs}).eval()


# --- features -------------------------------------------------------------------------------------------
def test_dataset_and_loader_give_the_backbone_cls_features_in_order():
    vit = tiny_vit()
    images, labels = torch.randn(10, 3, 16, 16), torch.arange(10) % 3
    direct = vit(images)
    a, ya = extract_features(vit, TensorDataset(images, labels), batch_size=4)
    b, yb = extract_features(vit, DataLoader(TensorDataset(images, labels), batch_size=3))
    torch.testing.assert_close(a, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, direct, rtol=1e-5, atol=1e-5)
    assert ya.tolist() == yb.tolist() == labels.tolist()
    assert a.device.type == "cpu" and a.dtype == torch.float32
    # For timm ViTs the pooled output is the CLS token after the final norm (the DINO feature).
    with torch.no_grad():
        cls = vit.forward_features(images)[:, 0]  # all tokens after the final norm; row 0 is CLS
    torch.testing.assert_close(direct, cls, rtol=1e-5, atol=1e-5)


def test_last_blocks_concatenation_and_avgpool_follow_the_linear_protocol():
    vit = tiny_vit(depth=3)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        tokens = vit._pos_embed(vit.patch_embed(x))
        outs = []
        for blk in vit.blocks:
            tokens = blk(tokens)
            outs.append(vit.norm(tokens))
        expected = torch.cat([outs[-2][:, 0], outs[-1][:, 0], outs[-1][:, 1:].mean(dim=1)], dim=1)
        got = batch_features(vit, x, n_last_blocks=2, avgpool=True)
        one = batch_features(vit, x, n_last_blocks=1, avgpool=True)
    assert got.shape == (4, 3 * 32) and one.shape == (4, 2 * 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one[:, :32], vit(x), rtol=1e-5, atol=1e-5)


def test_cnn_features_are_pooled_and_vit_options_are_refused():
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    feats, _ = extract_features(cnn, TensorDataset(torch.randn(3, 3, 32, 32), torch.zeros(3)), batch_size=2)
    assert feats.shape == (3, 512)
    with pytest.raises(ValueError, match="need a ViT"):
        batch_features(cnn, torch.randn(1, 3, 32, 32), n_last_blocks=4)


def test_transform_path_and_mode_restoration():
    vit = tiny_vit().train()
    data = ArrayDataset(torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8), [0, 1, 2, 3, 4])
    transform = EvalTransform(16)
    feats, labels = extract_features(vit, data, transform=transform, batch_size=2)
    assert feats.shape == (5, 32) and labels.tolist() == [0, 1, 2, 3, 4]
    assert vit.training, "extract_features must restore the caller's train/eval mode"
    with pytest.raises(TypeError, match="EvalTransform"):
        extract_features(vit, data)  # raw uint8 images and no transform
    vit.eval()
    torch.testing.assert_close(feats, vit(torch.stack([transform(data[i][0]) for i in range(5)])), rtol=1e-5,
                               atol=1e-5)


def test_representation_stats_flag_collapse():
    g = torch.Generator().manual_seed(0)
    healthy = representation_stats(torch.randn(2000, 16, generator=g))
    assert abs(healthy["mean_cosine"]) < 0.01
    assert 0.95 < healthy["normalized_std"] < 1.05
    assert 14.0 < healthy["effective_rank"] <= 16.0
    direction = torch.randn(16, generator=g)
    collapsed = representation_stats(direction + 1e-4 * torch.randn(500, 16, generator=g))
    assert collapsed["mean_cosine"] > 0.999 and collapsed["normalized_std"] < 0.01
    assert representation_stats(direction.repeat(10, 1))["effective_rank"] == 0.0
    low_rank = torch.randn(300, 2, generator=g) @ torch.randn(2, 16, generator=g)
    assert 1.0 < representation_stats(low_rank)["effective_rank"] < 2.0 + 1e-6
    wide = representation_stats(torch.randn(5, 64, generator=g))  # N < D: the Gram matrix side
    assert 3.0 < wide["effective_rank"] <= 4.0 + 1e-6  # centering leaves N - 1 = 4 directions


# --- loading --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A smoke-preset checkpoint whose student differs from its teacher."""
    state = fdino.init_state(fdino.presets.smoke())
    student = {k: v + 1.0 if k.startswith("backbone.") and v.is_floating_point() else v
               for k, v in state.student.items()}
    path = tmp_path_factory.mktemp("run")
    save_checkpoint(path, state.replace(student=student))
    return path, state


def test_fdino_checkpoint_loads_teacher_or_student(run_dir):
    path, state = run_dir
    for source in (path, next(path.glob("ckpt-*.pt"))):
        model = load_model_for_eval(source)
        backbone, cfg, mean, std, size = model
        assert cfg == state.cfg and size == cfg.global_crop_size == 16
        assert mean == (0.485, 0.456, 0.406) and not backbone.training
        assert all(not p.requires_grad for p in backbone.parameters())
        torch.testing.assert_close(backbone.state_dict()["cls_token"], state.teacher["backbone.cls_token"])
    student = load_model_for_eval(path, which="student").backbone
    torch.testing.assert_close(student.state_dict()["cls_token"], state.teacher["backbone.cls_token"] + 1.0)
    assert load_model_for_eval(path, img_size=32).image_size == 32


def test_backbone_from_state_matches_the_saved_checkpoint_without_copying(run_dir):
    path, _ = run_dir
    from fdino.checkpoint import load_checkpoint

    state, _ = load_checkpoint(path)
    x = torch.randn(2, 3, 16, 16)
    for which in ("teacher", "student"):
        live = backbone_from_state(state, which=which)
        assert not live.training
        with torch.no_grad():
            torch.testing.assert_close(live(x), load_model_for_eval(path, which=which).backbone(x))
    live = backbone_from_state(state)
    assert live.cls_token.data_ptr() == state.teacher["backbone.cls_token"].data_ptr()


@pytest.mark.parametrize("layout", ["pt", "safetensors", "dino-teacher", "module-prefix"])
def test_plain_weights_load_with_arch_and_inferred_geometry(tmp_path, layout):
    vit = tiny_vit()
    sd = vit.state_dict()
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        if layout == "dino-teacher":  # the official DINO checkpoint layout, head included
            sd = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.ones(2, 32)},
                  "epoch": 3}
        elif layout == "module-prefix":
            sd = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
        torch.save(sd, path)
    model = load_model_for_eval(path, arch="vit_tiny_patch16_224",
                                model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2})
    assert model.cfg is None and model.image_size == 16  # patch 4 and 16 px read off the weights
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.backbone(x), vit(x))


def test_plain_cnn_weights(tmp_path):
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    torch.save(cnn.state_dict(), tmp_path / "r.pt")
    model = load_model_for_eval(tmp_path / "r.pt", arch="resnet18")
    assert model.image_size == 224
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.backbone(x), cnn(x))


def test_loading_errors_say_what_to_do(tmp_path, run_dir):
    torch.save(tiny_vit().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="arch="):
        load_model_for_eval(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="embed_dim"):
        load_model_for_eval(tmp_path / "w.pt", arch="vit_tiny_patch16_224")  # width 192 != 32
    with pytest.raises(ValueError, match="not a timm model"):
        load_model_for_eval(tmp_path / "w.pt", arch="no_such_model")
    with pytest.raises(FileNotFoundError):
        load_model_for_eval(tmp_path / "missing.pt", arch="resnet18")
    with pytest.raises(ValueError, match="which="):
        load_model_for_eval(run_dir[0], which="ema")
    torch.save(tiny_vit(), tmp_path / "module.pt")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="state_dict"):
        load_model_for_eval(tmp_path / "module.pt", arch="vit_tiny_patch16_224")
