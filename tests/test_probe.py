"""The online linear probe (fdino.probe, fdino.train_probe; issue 22, "watching quality during training").

Its update equals torch.nn.Linear + torch.optim.AdamW; it learns an easy labelled problem; its teacher
features are the k-NN's features and touch nothing; and the guard that matters most: a run with the
probe ends with DINO's state bitwise equal to a run without it (a BatchNorm ResNet, deterministic mode),
and a resumed run continues the probe exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dist_setup import RESNET_CFG

import fdino
from fdino.checkpoint import backbone_weights, load_checkpoint, read_payload, resolve_checkpoint
from fdino.models import create_backbone
from fdino.probe import init_probe, probe_logits, probe_top1, probe_update_, teacher_features
from fdino.train import TrainOptions, resume, run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_update_equals_torch_linear_with_adamw_and_no_decay_on_the_bias():
    g = torch.Generator().manual_seed(1)
    features, labels = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    probe = init_probe(5, 3)
    linear = torch.nn.Linear(5, 3)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.AdamW(
        [{"params": [linear.weight], "weight_decay": 0.1}, {"params": [linear.bias], "weight_decay": 0.0}],
        lr=0.05,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    for i in range(5):
        rows = slice(2 * i, 2 * i + 4)
        out = probe_update_(probe, features[rows], labels[rows], lr=0.05, weight_decay=0.1)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(features[rows]), labels[rows])
        loss.backward()
        opt.step()
        torch.testing.assert_close(out["loss"], loss.detach())
    torch.testing.assert_close(probe.params["weight"], linear.weight.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probe.params["bias"], linear.bias.detach(), rtol=1e-6, atol=1e-7)
    assert int(out["seen"]) == 4 and 0 <= int(out["correct"]) <= 4


def test_probe_learns_an_easy_problem_on_fixed_features():
    """Four Gaussian clusters in 16 dimensions: chance is 25%, a few hundred updates reach > 90% held out."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 2

    def draw(n):
        labels = torch.randint(0, 4, (n,), generator=g)
        return centers[labels] + torch.randn(n, 16, generator=g), labels

    probe = init_probe(16, 4)
    test_x, test_y = draw(400)
    assert probe_top1(probe, test_x, test_y) < 40  # zero weights: one class for everything
    for _ in range(300):
        probe_update_(probe, *draw(32), lr=1e-2)
    assert probe_top1(probe, test_x, test_y) > 90


def test_teacher_features_are_the_eval_backbones_and_change_neither_state_nor_rng():
    state = fdino.init_state(RESNET_CFG, device="cpu")
    state.teacher_buffers["backbone.bn1.running_mean"].add_(0.5)  # eval mode must use these statistics
    before = fdino.clone_state(state)
    backbone = create_backbone(RESNET_CFG, drop_path_rate=0.0).eval()
    backbone.load_state_dict(backbone_weights(state, "teacher"))
    images = torch.randn(6, 3, 16, 16)
    rng = torch.get_rng_state()
    features = teacher_features(state, images)
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        torch.testing.assert_close(features, backbone(images), rtol=1e-6, atol=1e-6)
    assert features.shape == (6, backbone.num_features) and not features.requires_grad
    assert fdino.tree_allclose(state, before)  # bitwise: no BatchNorm statistics moved


# A BatchNorm ResNet (a probe forward in train mode would move its statistics) on shapes10, eager, deterministic.
OPTIONS = dict(
    data="shapes10",
    compile=False,
    workers=0,
    progress=False,
    eval_samples=40,
    attention_images=0,
    embedding_snapshots=False,
    trackers="none",
    max_steps=4,
    log_every=2,
    eval_every=2,
    ckpt_every=2,
    deterministic=True,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4-step run with the probe on and off."""
    root = tmp_path_factory.mktemp("probe")
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)
    summaries = {}
    try:
        for name, extra in (("on", dict(linear_probe=True, probe_lr=1e-2)), ("off", {})):
            torch.manual_seed(0)
            summaries[name] = run(RESNET_CFG, TrainOptions(**OPTIONS, **extra, run_dir=str(root / name)))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
    return root, summaries


def test_dino_state_is_bitwise_the_same_with_the_probe_on_and_off(runs):
    root, summaries = runs
    on, _ = load_checkpoint(root / "on")
    off, _ = load_checkpoint(root / "off")
    assert int(on.step) == int(off.step) == 4 and fdino.tree_allclose(on, off)  # rtol = atol = 0
    assert [h["knn_top1"] for h in summaries["on"]["knn_history"]] == [
        h["knn_top1"] for h in summaries["off"]["knn_history"]
    ]
    assert read_payload(resolve_checkpoint(root / "off")).get("probe") is None


def test_probe_readings_reach_metrics_summary_and_curves(runs):
    root, summaries = runs
    records = [json.loads(line) for line in (root / "on" / "metrics.jsonl").read_text().splitlines()]
    train_top1 = [r["probe_train_top1"] for r in records if "step" in r]
    assert len(train_top1) == 2 and all(0 <= v <= 100 for v in train_top1)
    history = summaries["on"]["knn_history"]
    assert [h["step"] for h in history] == [0, 2, 4] and all(0 <= h["probe_top1"] <= 100 for h in history)
    assert summaries["on"]["probe_top1"] == history[-1]["probe_top1"]
    assert "probe_top1" not in summaries["off"] and all("probe_top1" not in h for h in summaries["off"]["knn_history"])
    off_records = [json.loads(line) for line in (root / "off" / "metrics.jsonl").read_text().splitlines()]
    assert not any("probe_train_top1" in r for r in off_records)
    assert (root / "on" / "curves.png").stat().st_size > 0


def test_a_resumed_run_continues_the_probe_exactly(runs, tmp_path):
    root, _ = runs
    run_dir = tmp_path / "resumed"
    shutil.copytree(root / "on", run_dir)
    (run_dir / "ckpt-00000004.pt").unlink()  # as if killed after step 2's checkpoint
    (run_dir / "run.json").write_text((run_dir / "run.json").read_text().replace(str(root / "on"), str(run_dir)))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        summary = resume(run_dir, max_steps=4)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    straight, resumed = (read_payload(resolve_checkpoint(d)) for d in (root / "on", run_dir))
    assert straight["probe"].keys() == resumed["probe"].keys()
    assert all(torch.equal(straight["probe"][k], resumed["probe"][k]) for k in straight["probe"])
    assert fdino.tree_allclose(load_checkpoint(root / "on")[0], load_checkpoint(run_dir)[0])
    assert summary["probe_top1"] == json.loads((root / "on" / "summary.json").read_text())["probe_top1"]


def test_probe_logits_are_a_linear_map():
    probe = init_probe(3, 2)
    probe.params["weight"].copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    probe.params["bias"].copy_(torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(probe_logits(probe.params, torch.tensor([[1.0, 1.0, 1.0]])), torch.tensor([[1.5, 1.5]]))
