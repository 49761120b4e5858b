"""Multi-crop augmentation: config validation, the paper's recipe, determinism, fast path vs reference."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fdino.config import DinoConfig
from fdino.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCrop,
    MultiCropConfig,
    blur_kernel_size,
    sample_views,
    small_image_multicrop,
)
from fdino.data.batch_augment import resample_matrix


def _image(seed: int = 0, h: int = 40, w: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth random image (not noise): blurring and resizing should then change it only a little
    low = torch.randint(0, 256, (3, h // 8 + 1, w // 8 + 1), generator=g, dtype=torch.uint8).float()
    return torch.nn.functional.interpolate(low[None], size=(h, w), mode="bilinear")[0].round().to(torch.uint8)


# --- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("n_global_crops", 0),
        ("n_local_crops", -1),
        ("global_crop_size", 0),
        ("local_crop_scale", (0.5, 0.2)),
        ("global_crop_scale", (0.0, 1.0)),
        ("crop_ratio", (2.0, 1.0)),
        ("interpolation", "lanczos"),
        ("flip_p", 1.5),
        ("jitter_p", float("nan")),
        ("hue", 0.6),
        ("global_blur_p", ()),
        ("global_solarize_p", (0.1, 2.0)),
        ("blur_sigma", (0.0, 1.0)),
        ("blur_kernel_fraction", 0.0),
        ("std", (1.0, 0.0, 1.0)),
        ("mean", (0.5,)),
        ("solarize_threshold", 300),
        ("n_global_crops", True),
    ],
)
def test_config_rejects_bad_values_naming_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"MultiCropConfig\.{field}=.*allowed"):
        MultiCropConfig(**{field: value})


def test_config_needs_two_crops_and_is_frozen_and_keyword_only():
    with pytest.raises(ValueError, match="n_local_crops"):
        MultiCropConfig(n_global_crops=1, n_local_crops=0)
    c = MultiCropConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_local_crops = 3
    with pytest.raises(TypeError):
        MultiCropConfig(2)
    assert c.replace(n_local_crops=3).n_crops == 5


def test_from_dino_config_copies_crop_fields_and_small_images_get_small_blur():
    cfg = DinoConfig(
        n_global_crops=2,
        n_local_crops=6,
        global_crop_size=32,
        local_crop_size=16,
        global_crop_scale=(0.5, 1.0),
        local_crop_scale=(0.1, 0.5),
    )
    m = MultiCropConfig.from_dino_config(cfg)
    assert (m.n_global_crops, m.n_local_crops, m.global_crop_size, m.local_crop_size) == (2, 6, 32, 16)
    assert (m.global_crop_scale, m.local_crop_scale) == ((0.5, 1.0), (0.1, 0.5))
    assert m.blur_sigma == small_image_multicrop().blur_sigma == (0.1, 1.0)
    big = MultiCropConfig.from_dino_config(DinoConfig(), hue=0.0)
    assert (big.global_crop_size, big.n_local_crops, big.blur_sigma, big.hue) == (224, 10, (0.1, 2.0), 0.0)


def test_blur_kernel_is_odd_and_scales_with_crop():
    assert [blur_kernel_size(s, 0.1) for s in (224, 96, 32, 16)] == [23, 9, 3, 3]
    assert all(blur_kernel_size(s, f) % 2 == 1 for s in range(1, 300, 7) for f in (0.05, 0.1, 0.3))


# --- the recipe, statistically (parameters only: cheap) ---------------------------------------------------
def test_recipe_probabilities_per_crop():
    c = MultiCropConfig(n_local_crops=4)
    rng, n = random.Random(0), 4000
    draws = [sample_views(c, 100, 120, rng) for _ in range(n)]

    def rate(k, pred):
        return sum(pred(d[k]) for d in draws) / n

    def close(observed, p):  # within 5 binomial standard deviations (and exact for 0 and 1)
        return abs(observed - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12

    blurred = lambda v: v.blur_sigma is not None  # noqa: E731
    assert rate(0, blurred) == 1.0 and close(rate(1, blurred), 0.1)
    assert all(close(rate(k, blurred), 0.5) for k in range(2, 6))
    assert rate(0, lambda v: v.solarize) == 0.0 and close(rate(1, lambda v: v.solarize), 0.2)
    assert all(rate(k, lambda v: v.solarize) == 0.0 for k in range(2, 6))
    for k in range(6):
        assert close(rate(k, lambda v: v.flip), 0.5)
        assert close(rate(k, lambda v: v.jitter is not None), 0.8)
        assert close(rate(k, lambda v: v.grayscale), 0.2)
    sigmas = [d[0].blur_sigma for d in draws]
    assert 0.1 <= min(sigmas) and max(sigmas) <= 2.0
    jit = [d[2].jitter for d in draws if d[2].jitter]
    assert all(0.6 <= j[1] <= 1.4 and 0.6 <= j[2] <= 1.4 and 0.8 <= j[3] <= 1.2 and -0.1 <= j[4] <= 0.1 for j in jit)
    assert len({j[0] for j in jit}) == 24  # every order of the four jitter ops occurs


def test_crop_boxes_respect_scale_and_ratio():
    c = MultiCropConfig(n_local_crops=2)
    rng = random.Random(1)
    for _ in range(500):
        views = sample_views(c, 64, 80, rng)
        for k, v in enumerate(views):
            lo, hi = c.global_crop_scale if k < 2 else c.local_crop_scale
            area = v.height * v.width / (64 * 80)
            assert lo * 0.85 <= area <= hi * 1.15  # rounding of h and w to pixels
            assert 0 <= v.top <= 64 - v.height and 0 <= v.left <= 80 - v.width
            assert v.size == (224 if k < 2 else 96)


# --- rendering -------------------------------------------------------------------------------------------
def test_multicrop_shapes_dtype_and_value_range():
    c = small_image_multicrop()  # 2 x 32 px + 6 x 16 px
    crops = MultiCrop(c)(_image(), seed=3)
    assert [tuple(x.shape) for x in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for x in crops:
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
        pixels = x * std + mean  # undo normalization: must be a valid image in [0, 1]
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_multicrop_accepts_pil_modes_and_tensor_layouts():
    t = MultiCrop(small_image_multicrop(n_local_crops=1))
    rgb = _image()
    for image in (
        Image.fromarray(rgb.permute(1, 2, 0).numpy()),
        Image.fromarray(rgb[0].numpy()),  # RGB, L
        Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("RGBA"),
        rgb[0],
        rgb[:1],
    ):
        assert [tuple(x.shape) for x in t(image, 0)] == [(3, 32, 32)] * 2 + [(3, 16, 16)]
    with pytest.raises(TypeError, match="uint8"):
        t(rgb.float(), 0)


def test_multicrop_is_a_pure_function_of_image_and_seed():
    t = MultiCrop(small_image_multicrop())
    state = torch.get_rng_state()
    a, b, other = t(_image(), 7), t(_image(), 7), t(_image(), 8)
    assert torch.equal(torch.get_rng_state(), state), "the global torch RNG must not be touched"
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, other))


def test_batched_crops_do_not_depend_on_the_rest_of_the_batch():
    t = MultiCrop(small_image_multicrop())
    images = [_image(i, 36 + 4 * (i % 2), 44) for i in range(5)]  # two distinct image shapes
    together = t.batch(images, [10, 11, 12, 13, 14])
    for i, image in enumerate(images):
        alone = t(image, 10 + i)
        assert all(torch.allclose(together[k][i], alone[k], atol=1e-5) for k in range(len(alone)))


@pytest.mark.parametrize(
    "config, image_size",
    [
        (small_image_multicrop(), (40, 48)),
        (MultiCropConfig(global_crop_size=56, local_crop_size=24, n_local_crops=2, interpolation="bilinear"), (40, 48)),
        (MultiCropConfig(global_crop_size=64, local_crop_size=24, n_local_crops=2), (150, 170)),  # per-sample path
    ],
    ids=["small", "bilinear", "large-image"],
)
def test_fast_path_matches_torchvision_reference(config, image_size):
    """The batched renderer applies the same parameters as torchvision's v2 kernels; only rounding
    differs (the reference rounds to uint8 after resizing). Errors in [0, 1] pixel units."""
    t = MultiCrop(config)
    std = torch.tensor(config.std).view(3, 1, 1)
    errors = []
    for i in range(12):
        image = _image(i, *image_size)
        for fast, ref in zip(t(image, i), t.reference(image, i)):
            errors.append(((fast - ref) * std).abs())
    assert max(e.mean().item() for e in errors) < 0.01
    assert max(e.max().item() for e in errors) < 0.1


def test_resample_matrix_rows_are_normalized_and_confined_to_the_box():
    for interp in ("bicubic", "bilinear", "nearest"):
        m = resample_matrix(50, 7, 20, 9, interp)
        assert m.shape == (9, 50)
        assert abs(m.sum(1) - 1).max() < 1e-5
        assert (m[:, :7] == 0).all() and (m[:, 27:] == 0).all()
    identity = resample_matrix(8, 0, 8, 8)
    assert abs(identity - torch.eye(8).numpy()).max() < 1e-6


def test_eval_transform_shapes_and_center_crop():
    x = EvalTransform(32)(_image(0, 32, 32))
    assert x.shape == (3, 32, 32)
    y = EvalTransform(224)(_image(0, 300, 400))  # resize shorter side to 256, center crop 224
    assert y.shape == (3, 224, 224) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="resize_size"):
        EvalTransform(32, resize_size=16)


@given(size=st.integers(8, 40), n_local=st.integers(0, 3), seed=st.integers(0, 2**63 - 1))
def test_any_valid_config_renders_declared_shapes(size, n_local, seed):
    c = MultiCropConfig(
        global_crop_size=size,
        local_crop_size=max(4, size // 2),
        n_local_crops=n_local,
        n_global_crops=1 if n_local else 2,
    )
    crops = MultiCrop(c)(_image(1, 20, 30), seed)
    assert len(crops) == c.n_crops
    assert all(x.shape[-1] == (size if k < c.n_global_crops else max(4, size // 2)) for k, x in enumerate(crops))
    assert all(torch.isfinite(x).all() for x in crops)


def test_dino_config_augment_overrides_the_recipe_and_rejects_crop_fields():
    from fdino.cli import build_parser

    args = build_parser().parse_args(["train", "--augment", "hue=0.5,blur_sigma=(0.2,0.4)"])
    assert args.cfg_augment == (("hue", 0.5), ("blur_sigma", (0.2, 0.4)))
    cfg = DinoConfig(global_crop_size=32, local_crop_size=16, augment=[["hue", 0.5], ["blur_sigma", [0.2, 0.4]]])
    assert cfg.augment == (("hue", 0.5), ("blur_sigma", (0.2, 0.4)))  # lists frozen: configs stay hashable
    hash(cfg)
    m = MultiCropConfig.from_dino_config(cfg)
    assert (m.hue, m.blur_sigma) == (0.5, (0.2, 0.4))
    with pytest.raises(ValueError, match="not an augmentation setting"):
        MultiCropConfig.from_dino_config(DinoConfig(augment=(("n_local_crops", 3),)))
    with pytest.raises(ValueError, match="augment"):
        DinoConfig(augment=(("hue",),))
