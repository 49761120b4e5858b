"""Fine-tuning, the supervised baseline and the few-label evaluation (fdino.finetune).

Correctness: ``freeze="all"`` with `linear_protocol` is the paper's linear evaluation
(`linear_eval_images`) step for step; lr 0 leaves the backbone as it was; frozen blocks stay
frozen; the schedule is the probe's cosine. End to end (the commands a user runs, in-process):
`fdino finetune`, `fdino supervised` and `fdino eval fewshot` on shapes10, and on Fashion-MNIST
when Debian's files are installed: the outputs exist and load, accuracy is above chance, and the
saved classifier gives the predictions of the model that was trained.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import fdino
from fdino.checkpoint import save_checkpoint
from fdino.cli import main as fdino_main
from fdino.data import EvalTransform, build_dataset
from fdino.eval.linear import cosine_lr, linear_eval_images
from fdino.finetune import (
    FewshotConfig,
    dataset_labels,
    fewshot,
    finetune,
    label_subset,
    linear_protocol,
    load_classifier,
    lr_at,
    matched_supervised_steps,
    save_classifier,
    train_supervised,
    vit_recipe,
)
from fdino.finetune.fewshot import format_markdown
from fdino.finetune.train import with_drop_path
from fdino.weights import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.is_dir(),
    reason=f"{FASHION_MNIST} is absent: install Debian's dataset-fashion-mnist (make test-system-deps)",
)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """An fdino run folder holding the smoke preset's state at initialization (16 px ViT)."""
    path = tmp_path_factory.mktemp("smoke_run")
    save_checkpoint(path, fdino.init_state(fdino.presets.smoke()))
    return path


@pytest.fixture(scope="module")
def shapes16():
    """(train, test) shapes10 at 16 px: 80 and 40 images."""
    train = build_dataset("shapes10", split="memory", image_size=16, n=80).dataset
    test = build_dataset("shapes10", split="query", image_size=16, n=40).dataset
    return train, test


def _fit(model, train, test, cfg, backbone=None):
    return finetune(
        model.backbone if backbone is None else backbone,
        train,
        test,
        cfg,
        image_size=model.image_size,
        mean=model.mean,
        std=model.std,
        num_classes=10,
    )


def test_lr_at_is_the_probe_cosine_without_warmup_and_ramps_linearly_with_it():
    for step in (0, 1, 7, 19, 20, 25):
        assert lr_at(step, 20, 0, 0.3, 0.0) == pytest.approx(cosine_lr(step, 20, 0.3), abs=1e-15)
    assert [lr_at(s, 20, 4, 1.0, 0.0) for s in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert lr_at(4, 20, 4, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(20, 20, 4, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(12, 20, 4, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_freeze_all_with_the_linear_protocol_is_the_papers_linear_evaluation(smoke_run, shapes16):
    """Same views, data order, head init, optimizer and schedule: the same head up to rounding."""
    model = load_model(smoke_run)
    train, test = shapes16
    ours = _fit(model, train, test, linear_protocol(epochs=2, batch_size=16, seed=3))
    ref = linear_eval_images(
        model.backbone,
        train,
        test,
        image_size=model.image_size,
        mean=model.mean,
        std=model.std,
        epochs=2,
        batch_size=16,
        seed=3,
        num_classes=10,
    )
    torch.testing.assert_close(ours.head.weight, ref["probe"].weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.head.bias, ref["probe"].bias, rtol=0, atol=1e-6)
    assert ours.top1 == ref["top1"] and ours.top5 == ref["top5"]
    assert ours.steps == 2 * math.ceil(80 / 16) and not ours.head.weight.equal(torch.zeros_like(ours.head.weight))


@pytest.mark.parametrize("preset", ["smoke", "small32_resnet"])
def test_lr_zero_leaves_the_backbone_unchanged(preset, shapes16):
    """AdamW with lr 0 (decoupled weight decay included) moves no parameter. A ViT's backbone is then
    bitwise the same; a ResNet in train mode still re-estimates its BatchNorm statistics."""
    cfg = getattr(fdino.presets, preset)()
    before = fdino.models.create_backbone(cfg, drop_path_rate=0.0)
    train, test = shapes16
    result = finetune(
        before,
        train,
        test,
        vit_recipe(lr=0.0, min_lr=0.0, epochs=1, batch_size=16, drop_path=0.0),
        image_size=16,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        num_classes=10,
    )
    after = dict(result.backbone.named_parameters())
    for name, p in before.named_parameters():
        assert torch.equal(p, after[name]), name
    if preset == "smoke":
        for (name, b), b2 in zip(before.named_buffers(), result.backbone.buffers()):
            assert torch.equal(b, b2), name
    assert result.steps == 5


def test_blocks_k_trains_only_the_blocks_after_k(smoke_run, shapes16):
    model = load_model(smoke_run)
    train, test = shapes16
    result = _fit(
        model,
        train,
        test,
        vit_recipe(epochs=1, batch_size=16, lr=0.05, freeze="blocks:1", drop_path=0.1),
        backbone=with_drop_path(model, 0.1),
    )
    before = dict(model.backbone.named_parameters())
    for name, p in result.backbone.named_parameters():
        frozen = name.startswith(("patch_embed", "cls_token", "pos_embed", "blocks.0."))
        assert torch.equal(p, before[name]) == frozen, name


def test_saved_classifier_reloads_and_predicts_what_was_trained(smoke_run, shapes16, tmp_path):
    model = load_model(smoke_run)
    train, test = shapes16
    result = _fit(model, train, test, vit_recipe(epochs=2, batch_size=16, lr=0.01))
    info = model.info
    paths = save_classifier(
        tmp_path,
        result.backbone,
        result.head,
        info,
        classes=[str(c) for c in range(10)],
        report={"title": "t"},
        curve=result.curve,
    )
    assert {p.name for p in paths.values()} >= {"model.safetensors", "classifier.safetensors", "finetune.json"}
    loaded = load_classifier(tmp_path)
    assert loaded.model.kind == "fdino-export" and loaded.classes[3] == "3"
    view = EvalTransform(model.image_size, mean=model.mean, std=model.std)
    images = torch.stack([view(test[i][0]) for i in range(16)])
    torch.testing.assert_close(loaded.logits(images), result.logits(images), rtol=1e-5, atol=1e-5)
    assert torch.equal(loaded.predict(images), result.logits(images).argmax(dim=1))
    # The folder is a model source for every other command too.
    assert load_model(tmp_path).info.feature_dim == result.head.weight.shape[1]


def test_supervised_baseline_trains_the_presets_backbone_from_a_seeded_start(shapes16):
    cfg = fdino.presets.smoke()
    train, test = shapes16
    ft = vit_recipe(epochs=1, batch_size=16, augment="dino", layer_decay=1.0)
    a, info = train_supervised(cfg, train, test, ft, num_classes=10)
    b, _ = train_supervised(cfg, train, test, ft, num_classes=10)
    assert info.which == "supervised" and info.arch == cfg.arch and a.steps == 5
    for p, q in zip(a.backbone.parameters(), b.backbone.parameters()):
        assert torch.equal(p, q)  # same seed, same views: the same baseline
    with pytest.raises(ValueError, match="trains every layer"):
        train_supervised(cfg, train, test, ft.replace(freeze="all"), num_classes=10)


def test_fewshot_measures_every_method_on_the_same_subsets(smoke_run, shapes16):
    model = load_model(smoke_run)
    train, test = shapes16
    cfg = FewshotConfig(
        fractions=(0.1, 1.0),
        draws=2,
        steps=3,
        linear_epochs=3,
        finetune=vit_recipe(batch_size=16),
        supervised=vit_recipe(batch_size=16, layer_decay=1.0),
    )
    result = fewshot(model, train, test, cfg)
    rows = result["rows"]
    # k-NN and raw pixels with every label are measured once (nothing left to draw).
    assert len(rows) == 2 * 5 + 5 + 3
    assert {r["labels"] for r in rows if r["fraction"] == 0.1} == {10} and all(0 <= r["top1"] <= 100 for r in rows)
    summary = {(s["method"], s["fraction"]): s for s in result["summary"]}
    assert summary[("knn", 1.0)]["draws"] == 1 and summary[("finetune", 0.1)]["draws"] == 2
    assert all(r["seconds"] > 0 for r in rows)
    assert {r["steps"] for r in rows if r["method"] in ("finetune", "supervised")} == {3}
    assert "Budgets" in format_markdown(result, "t") and "3 steps" in format_markdown(result, "t")
    with pytest.raises(ValueError, match="methods"):
        FewshotConfig(methods=("knn", "magic"))
    with pytest.raises(ValueError, match="first_draw"):
        FewshotConfig(first_draw=-1)


def test_fewshot_pairs_pretraining_seeds_with_draws_and_gives_the_baseline_its_own_budget(smoke_run, shapes16):
    """``first_draw`` shifts the label draws (pretraining seed i on draw i); ``supervised_steps`` is the
    baseline's budget, and `matched_supervised_steps` adds the pretraining's seconds as measured steps."""
    model = load_model(smoke_run)
    train, test = shapes16
    recipe = vit_recipe(batch_size=16, layer_decay=1.0)
    cfg = FewshotConfig(
        fractions=(0.1, 1.0), draws=1, first_draw=2, steps=2, supervised_steps=5, linear_epochs=2,
        methods=("knn", "finetune", "supervised"), finetune=recipe, supervised=recipe,
    )  # fmt: skip
    rows = fewshot(model, train, test, cfg)["rows"]
    assert {r["draw"] for r in rows} == {2}
    assert {(r["method"], r["fraction"]) for r in rows} == {
        (m, f) for m in ("knn", "finetune", "supervised") for f in (0.1, 1.0)
    }  # the first draw of a fraction of 1 still measures the k-NN
    assert {r["steps"] for r in rows if r["method"] == "supervised"} == {5}
    assert {r["steps"] for r in rows if r["method"] == "finetune"} == {2}
    # The subset of draw 2 is the one label_subset draws with seed 2.
    idx = label_subset(dataset_labels(train), fraction=0.1, seed=2)
    assert next(r for r in rows if r["fraction"] == 0.1)["labels"] == len(idx)
    assert matched_supervised_steps(model.cfg, train, cfg, 0.0, probe_steps=2) == cfg.steps
    many = matched_supervised_steps(model.cfg, train, cfg, 30.0, probe_steps=2)
    assert many > cfg.steps + 10  # a 16 px ViT step takes well under 3 s
    with pytest.raises(ValueError, match="pretrain_seconds"):
        matched_supervised_steps(model.cfg, train, cfg, -1.0)


# --- end to end, the commands a user runs ---------------------------------------------------------------
def _cli_end_to_end(tmp_path, source, data, *, steps, above):
    """The three commands as a user types them; ``above``: a top-1 (%) clearly above chance."""
    out_ft, out_sup, out_fs = tmp_path / "ft", tmp_path / "sup", tmp_path / "fs"
    common = f"--data {data} --num-workers 0 --batch-size 64".split()
    budget = f"--label-fraction 0.1 --max-steps {steps} --lr 0.8".split()
    assert fdino_main(["finetune", str(source), *common, *budget, "--out", str(out_ft)]) == 0
    assert fdino_main(["supervised", "--like", str(source), *common, *budget, "--out", str(out_sup)]) == 0
    # --pretrain-minutes: the baseline also gets 2 s worth of its own (measured) steps.
    fewshot_args = "--fractions 0.01 --draws 1 --steps 5 --linear-epochs 20 --pretrain-minutes 0.033".split()
    assert fdino_main(["eval", "fewshot", str(source), *common, *fewshot_args, "--out", str(out_fs)]) == 0
    for out in (out_ft, out_sup):
        report = json.loads((out / "finetune.json").read_text())
        assert report["top1"] > above, (out.name, report["top1"])
        assert (out / "curve.png").stat().st_size > 0
        assert load_classifier(out).model.backbone is not None
    fs = json.loads((out_fs / "fewshot.json").read_text())
    assert {r["method"] for r in fs["rows"]} == {"knn", "linear", "finetune", "supervised", "raw_pixels"}
    assert next(r for r in fs["rows"] if r["method"] == "supervised")["steps"] > 5
    assert (out_fs / "fewshot.md").read_text().count("|") > 10 and (out_fs / "fewshot.png").stat().st_size > 0
    # The fine-tuned folder is a model source: k-NN on it runs like on any run folder.
    assert fdino_main(["eval", "knn", str(out_ft), "--data", data, "--k", "5"]) == 0


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """The demo preset's state at initialization: a 32 px BatchNorm ResNet."""
    path = tmp_path_factory.mktemp("resnet_run")
    save_checkpoint(path, fdino.init_state(fdino.presets.small32_resnet()))
    return path


def test_commands_end_to_end_on_shapes10(resnet_run, tmp_path):
    # 2,000 test images: chance is 10 +- 0.7%, so 13% is more than 4 standard deviations above it.
    _cli_end_to_end(tmp_path, resnet_run, "shapes10", steps=60, above=13.0)


@needs_fashion_mnist
def test_commands_end_to_end_on_fashion_mnist(resnet_run, tmp_path):
    _cli_end_to_end(tmp_path, resnet_run, "fashion-mnist", steps=60, above=30.0)
