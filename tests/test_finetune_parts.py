"""fdino.finetune's pure parts: few-label subsets (`subsets`) and the parameter groups of a
fine-tune, layer-wise lr decay and block freezing (`layers`), on tiny timm ViTs and ResNets."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fdino.finetune.layers import (
    frozen_names,
    layer_id,
    num_layers,
    param_groups,
    parse_freeze,
    set_requires_grad,
)
from fdino.finetune.subsets import label_subset, subset_sizes
from fdino.models import create_backbone
from fdino.presets import small32_resnet

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------- subsets


def _imbalanced() -> torch.Tensor:
    """Class 0: 50 items, class 1: 20, class 2: 3, class 5: 7 (classes 3, 4 absent), shuffled."""
    y = torch.tensor([0] * 50 + [1] * 20 + [2] * 3 + [5] * 7)
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]


def _check_valid(idx: torch.Tensor, n: int) -> None:
    assert idx.dtype == torch.int64 and idx.ndim == 1
    assert torch.equal(idx, torch.sort(idx).values)
    assert len(torch.unique(idx)) == len(idx)
    assert len(idx) == 0 or (int(idx.min()) >= 0 and int(idx.max()) < n)


def test_per_class_is_balanced_and_capped_at_the_class_size():
    y = _imbalanced()
    idx = label_subset(y, per_class=5, seed=0)
    _check_valid(idx, len(y))
    assert subset_sizes(y, idx) == {0: 5, 1: 5, 2: 3, 5: 5}


def test_fraction_gives_the_rounded_per_class_count():
    y = _imbalanced()  # N = 80, C = 4: fraction 0.1 -> round(2.0) = 2 per class
    assert subset_sizes(y, label_subset(y, fraction=0.1)) == {0: 2, 1: 2, 2: 2, 5: 2}
    # 0.5 -> 10 per class; class 2 (3 items) and class 5 (7 items) give all they have
    assert subset_sizes(y, label_subset(y, fraction=0.5)) == {0: 10, 1: 10, 2: 3, 5: 7}
    # a tiny fraction still takes one item per class
    assert subset_sizes(y, label_subset(y, fraction=1e-6)) == {0: 1, 1: 1, 2: 1, 5: 1}


def test_fraction_one_returns_every_index():
    y = _imbalanced()
    assert torch.equal(label_subset(y, fraction=1.0), torch.arange(len(y)))


def test_deterministic_in_the_seed_and_seeds_differ():
    y = _imbalanced()
    a = label_subset(y, per_class=4, seed=3)
    torch.manual_seed(123)  # the global RNG has no say
    assert torch.equal(a, label_subset(y, per_class=4, seed=3))
    assert torch.equal(a, label_subset(y.tolist(), per_class=4, seed=3))  # a list of ints works the same
    draws = {tuple(label_subset(y, per_class=4, seed=s).tolist()) for s in range(5)}
    assert len(draws) == 5


def test_does_not_touch_the_global_rng():
    state = torch.get_rng_state()
    label_subset(_imbalanced(), fraction=0.2, seed=7)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of per_class= and fraction="),
        ({"per_class": 2, "fraction": 0.5}, "exactly one of per_class= and fraction="),
        ({"fraction": 0.0}, "fraction=0.0 is invalid"),
        ({"fraction": 1.5}, "fraction=1.5 is invalid"),
        ({"fraction": float("nan")}, "fraction=nan is invalid"),
        ({"per_class": 0}, "per_class=0 is invalid"),
        ({"per_class": 2.0}, "per_class=2.0 is invalid"),
        ({"per_class": True}, "per_class=True is invalid"),
        ({"per_class": 2, "seed": -1}, "seed=-1 is invalid"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        label_subset(_imbalanced(), **kwargs)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([], "labels is empty"),
        (torch.zeros(0, dtype=torch.int64), "labels is empty"),
        ([0, 1, -1, 2], "1 negative entries (unlabelled items)"),
        (torch.zeros(2, 3, dtype=torch.int64), "labels must be 1-D"),
        (torch.tensor([0.0, 1.0]), "labels must be integer class ids"),
    ],
)
def test_bad_labels_are_rejected(labels, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        label_subset(labels, per_class=1)


def test_subset_sizes_lists_empty_classes_and_rejects_bad_indices():
    y = torch.tensor([0, 0, 1, 3])
    assert subset_sizes(y, torch.tensor([0, 1])) == {0: 2, 1: 0, 3: 0}
    assert subset_sizes(y, []) == {0: 0, 1: 0, 3: 0}
    with pytest.raises(ValueError, match=re.escape("indices must be positions in labels, in [0, 4)")):
        subset_sizes(y, [0, 4])


@given(
    labels=st.lists(st.integers(0, 6), min_size=1, max_size=80),
    per_class=st.integers(1, 15),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32),
)
def test_subsets_are_valid_balanced_and_reproducible(labels, per_class, fraction, seed):
    y = torch.tensor(labels)
    n, sizes = len(labels), {c: labels.count(c) for c in sorted(set(labels))}
    idx = label_subset(y, per_class=per_class, seed=seed)
    _check_valid(idx, n)
    assert subset_sizes(y, idx) == {c: min(per_class, size) for c, size in sizes.items()}
    assert torch.equal(idx, label_subset(labels, per_class=per_class, seed=seed))

    idx = label_subset(y, fraction=fraction, seed=seed)
    _check_valid(idx, n)
    count = n if fraction == 1.0 else max(1, round(fraction * n / len(sizes)))
    assert subset_sizes(y, idx) == {c: min(count, size) for c, size in sizes.items()}


# ----------------------------------------------------------------------------------------- layers


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2
    )


@pytest.fixture(scope="module")
def vit_reg() -> nn.Module:
    """Register tokens and a pooling norm: the other parameter names of timm's ViT."""
    return timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=0,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        reg_tokens=2,
        global_pool="avg",
        fc_norm=True,
    )


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return create_backbone(small32_resnet())


def _expected_layer(name: str, blocks: int, *, vit: bool) -> int:
    """Layer ids written out from the rule, independently of fdino.finetune.layers."""
    top = name.split(".")[0]
    if vit:
        if top in ("cls_token", "pos_embed", "reg_token", "patch_embed"):
            return 0
        return int(name.split(".")[1]) + 1 if top == "blocks" else blocks + 1
    if top in ("conv1", "bn1"):
        return 0
    return int(top[len("layer") :]) if re.fullmatch(r"layer[1-4]", top) else blocks + 1


def _by_param(groups: list[dict]) -> dict[int, dict]:
    """``id(param) -> its group``; asserts that no parameter is in two groups."""
    out: dict[int, dict] = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in out, f"a parameter is in groups {out[id(p)]['name']} and {group['name']}"
            out[id(p)] = group
    return out


MODELS = [("vit", 3, True), ("vit_reg", 2, True), ("resnet", 4, False)]


@pytest.mark.parametrize(("fixture", "blocks", "is_vit"), MODELS)
def test_layer_ids_follow_the_rule(request, fixture, blocks, is_vit):
    backbone = request.getfixturevalue(fixture)
    assert num_layers(backbone) == blocks + 1
    for name, _ in backbone.named_parameters():
        assert layer_id(name, backbone) == _expected_layer(name, blocks, vit=is_vit), name
    ids = {layer_id(name, backbone) for name, _ in backbone.named_parameters()}
    assert set(range(blocks + 1)) <= ids  # the embedding or stem and every block or stage


@pytest.mark.parametrize("decay", [0.5, 0.75, 1.0])
@pytest.mark.parametrize("freeze", ["none", "blocks:0", "blocks:1", 2, "all"])
@pytest.mark.parametrize(("fixture", "blocks", "is_vit"), MODELS)
def test_each_parameter_lr_matches_the_formula(request, fixture, blocks, is_vit, decay, freeze):
    backbone, head = request.getfixturevalue(fixture), nn.Linear(8, 3)
    groups = param_groups(backbone, head, lr=0.1, weight_decay=0.05, layer_decay=decay, freeze=freeze)
    placed = _by_param(groups)
    k = {"none": -1, "all": blocks + 1}.get(freeze, parse_freeze(freeze) if isinstance(freeze, str) else freeze)
    tokens = ("cls_token", "pos_embed", "reg_token")
    for name, p in backbone.named_parameters():
        layer = _expected_layer(name, blocks, vit=is_vit)
        if layer <= k:
            assert id(p) not in placed, f"frozen {name} is in group {placed[id(p)]['name']}"
            continue
        group = placed[id(p)]
        assert group["lr"] == pytest.approx(0.1 * decay ** (blocks + 1 - layer)), name
        assert group["lr"] == pytest.approx(0.1 * group["lr_scale"])
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in tokens
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
        prefix = f"layer{layer}" if decay != 1.0 else "all"
        assert group["name"] == f"{prefix}/{'no_decay' if no_decay else 'decay'}"
    for name, p in head.named_parameters():
        assert placed[id(p)]["lr"] == pytest.approx(0.1), name  # the head is the top layer: full lr
        assert placed[id(p)]["weight_decay"] == (0.0 if name == "bias" else 0.05)
    trainable = [p for n, p in backbone.named_parameters() if _expected_layer(n, blocks, vit=is_vit) > k]
    assert len(placed) == len(trainable) + 2
    assert all(group["params"] for group in groups)
    torch.optim.AdamW(groups)  # torch accepts the groups as they are


def test_frozen_names_and_set_requires_grad(vit, resnet):
    vit_embed = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert frozen_names(vit, "none") == set()
    assert frozen_names(vit, "all") == {n for n, _ in vit.named_parameters()}
    assert frozen_names(vit, 0) == frozen_names(vit, "blocks:0") == vit_embed
    assert frozen_names(vit, "blocks:2") == vit_embed | {
        n for n, _ in vit.named_parameters() if n.startswith(("blocks.0.", "blocks.1."))
    }
    assert frozen_names(resnet, "blocks:0") == {
        n for n, _ in resnet.named_parameters() if n.startswith(("conv1", "bn1"))
    }
    assert {n for n, _ in resnet.named_parameters()} - frozen_names(resnet, "blocks:4") == set()  # no fc: all of it

    model = timm.create_model(  # a fresh one: set_requires_grad changes the module in place
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2
    )
    set_requires_grad(model, "blocks:1")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == frozen_names(model, 1) and "blocks.1.attn.qkv.weight" not in frozen
    set_requires_grad(model, "none")
    assert all(p.requires_grad for p in model.parameters())


def test_parse_freeze():
    assert parse_freeze("none") == "none" and parse_freeze("all") == "all"
    assert parse_freeze("blocks:0") == 0 and parse_freeze("blocks:12") == 12


@pytest.mark.parametrize("spec", ["", "None", "blocks", "blocks:", "blocks:-1", "blocks:1.5", "layers:2", " all", 3])
def test_parse_freeze_rejects_other_forms(spec):
    with pytest.raises(ValueError, match=re.escape("allowed 'none', 'all' or 'blocks:K'")):
        parse_freeze(spec)


def test_bad_freeze_and_hyperparameters_are_rejected(vit):
    head = nn.Linear(32, 2)
    with pytest.raises(ValueError, match=re.escape("K must be in [0, 3]")):
        frozen_names(vit, "blocks:4")
    with pytest.raises(ValueError, match=re.escape("freeze=-1 is invalid")):
        param_groups(vit, head, lr=0.1, weight_decay=0.0, freeze=-1)
    with pytest.raises(ValueError, match=re.escape("freeze=True is invalid")):
        param_groups(vit, head, lr=0.1, weight_decay=0.0, freeze=True)
    for kwargs, message in [
        ({"layer_decay": 0.0}, "layer_decay=0.0 is invalid"),
        ({"layer_decay": 1.5}, "layer_decay=1.5 is invalid"),
        ({"lr": -1.0}, "lr=-1.0 is invalid"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1 is invalid"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            param_groups(vit, head, **{"lr": 0.1, "weight_decay": 0.0, **kwargs})
    with pytest.raises(ValueError, match="nothing to train"):
        param_groups(vit, nn.Identity(), lr=0.1, weight_decay=0.0, freeze="all")


def test_any_module_works_without_layer_decay_and_other_archs_say_what_is_supported():
    backbone, head = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)), nn.Linear(8, 2)
    groups = param_groups(backbone, head, lr=0.1, weight_decay=0.04, freeze="none")
    assert [(g["name"], len(g["params"]), g["weight_decay"]) for g in groups] == [
        ("all/decay", 2, 0.04),
        ("all/no_decay", 4, 0.0),
    ]
    groups = param_groups(backbone, head, lr=0.1, weight_decay=0.04, freeze="all")
    assert len(_by_param(groups)) == 2 and all(g["lr_scale"] == 1.0 for g in groups)

    message = r"layer decay and 'blocks:K' freezing support timm ViTs and ResNets only, not Sequential"
    with pytest.raises(ValueError, match=message):
        param_groups(backbone, head, lr=0.1, weight_decay=0.0, layer_decay=0.5)
    with pytest.raises(ValueError, match=message):
        param_groups(backbone, head, lr=0.1, weight_decay=0.0, freeze="blocks:1")
    with pytest.raises(ValueError, match=message):
        layer_id("0.weight", backbone)


def test_a_parameter_shared_with_the_head_is_listed_once(vit):
    head = nn.Module()
    head.norm = vit.norm  # the head reuses the backbone's final norm
    head.proj = nn.Linear(32, 2)
    groups = param_groups(vit, head, lr=0.1, weight_decay=0.0, layer_decay=0.5)
    assert len(_by_param(groups)) == len(list(vit.parameters())) + 2
