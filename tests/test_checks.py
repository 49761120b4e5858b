"""fdino.checks: the shared int/real argument checks, and the places that use them rejecting bools."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fdino.checks import check_int, check_real, fail, is_int, is_number

NOT_INTS = [True, False, 2.0, "3", None, [1]]
NOT_REALS = [True, False, "0.5", None, float("nan"), float("inf"), -float("inf")]


def _message(name, value, allowed):
    return "^" + re.escape(f"{name}={value!r} is invalid: allowed {allowed}") + "$"


@given(st.integers(-50, 50), st.integers(-50, 50), st.integers(-100, 100))
def test_check_int_accepts_exactly_the_closed_range(lo, hi, value):
    if lo <= value <= hi:
        assert check_int("Cfg.n", value, lo, hi) == value
    else:
        with pytest.raises(ValueError, match=_message("Cfg.n", value, f"an integer in [{lo}, {hi}]")):
            check_int("Cfg.n", value, lo, hi)


@given(st.integers(-100, 100))
def test_check_int_one_sided_bounds(value):
    if value >= 3:
        assert check_int("n", value, lo=3) == value
    else:
        with pytest.raises(ValueError, match=_message("n", value, "an integer >= 3")):
            check_int("n", value, lo=3)
    if value <= -3:
        assert check_int("n", value, hi=-3) == value
    else:
        with pytest.raises(ValueError, match=_message("n", value, "an integer <= -3")):
            check_int("n", value, hi=-3)


@pytest.mark.parametrize("value", NOT_INTS)
def test_check_int_rejects_bools_floats_and_non_numbers_naming_the_field(value):
    # True == 1 and 2.0 == 2 lie inside [0, 5]: only the type check can reject them.
    with pytest.raises(ValueError, match=_message("TrainOptions.workers", value, "an integer in [0, 5]")):
        check_int("TrainOptions.workers", value, 0, 5)
    assert not is_int(value)


def test_check_int_without_bounds_still_checks_the_type():
    assert check_int("seed", -(2**70)) == -(2**70)
    with pytest.raises(ValueError, match=_message("seed", 1.5, "an integer")):
        check_int("seed", 1.5)


@given(st.floats(-10, 10, allow_nan=False), st.booleans(), st.booleans())
def test_check_real_honours_open_and_closed_bounds(value, lo_open, hi_open):
    inside = (value > -1 if lo_open else value >= -1) and (value < 2 if hi_open else value <= 2)
    if inside:
        assert check_real("x", value, -1, 2, lo_open=lo_open, hi_open=hi_open) == value
    else:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        with pytest.raises(ValueError, match=_message("x", value, f"values in {left}-1, 2{right}")):
            check_real("x", value, -1, 2, lo_open=lo_open, hi_open=hi_open)


@pytest.mark.parametrize("value", [-1.0, 1.0])
def test_check_real_boundaries_are_included_unless_open(value):
    assert check_real("x", value, -1.0, 1.0) == value
    with pytest.raises(ValueError, match="values in"):
        check_real("x", value, -1.0, 1.0, lo_open=value < 0, hi_open=value > 0)


@pytest.mark.parametrize("value", NOT_REALS)
def test_check_real_rejects_bools_non_numbers_and_non_finite_values(value):
    with pytest.raises(ValueError, match=_message("DinoConfig.lr", value, "a finite number in [0.0, 10.0]")):
        check_real("DinoConfig.lr", value, 0.0, 10.0)
    with pytest.raises(ValueError, match=_message("max_minutes", value, "a finite number >= 0")):
        check_real("max_minutes", value, lo=0)


def test_is_number_is_a_type_test_only():
    assert is_number(3) and is_number(0.5) and is_number(math.inf) and is_number(math.nan)
    assert not is_number(True) and not is_number("1") and not is_number(None)


def test_fail_names_argument_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=_message("rank", 2, "an integer in [0, 1]")):
        fail("rank", 2, "an integer in [0, 1]")


# --- every place that takes an integer rejects a bool, naming the field ---------------------------------
def _dino_config(v):
    from fdino import DinoConfig

    return DinoConfig(batch_size=v)


def _multicrop(v):
    from fdino.data import MultiCropConfig

    return MultiCropConfig(n_local_crops=v)


def _train_options(v):
    from fdino.train import TrainOptions

    return TrainOptions(workers=v)


def _epoch_batches(v):
    from fdino.data import epoch_batches

    return epoch_batches(100, batch_size=v, seed=0, epoch=0)


def _sampler_epoch(v):
    from fdino.data import ResumableBatchSampler

    return ResumableBatchSampler(100, batch_size=10).set_epoch(v)


def _eval_transform(v):
    from fdino.data import EvalTransform

    return EvalTransform(v)


def _knn(v):
    from fdino.eval.knn import knn_topk

    return knn_topk(torch.randn(4, 3), torch.randn(2, 3), 2, query_chunk=v)


def _loss(v):
    from fdino import dino_loss

    return dino_loss(
        torch.randn(6, 4), torch.randn(4, 4), torch.zeros(4), student_temp=0.1, teacher_temp=0.04, n_global_crops=v
    )


@pytest.mark.parametrize(
    "make, name",
    [
        (_dino_config, "DinoConfig.batch_size"),
        (_multicrop, "MultiCropConfig.n_local_crops"),
        (_train_options, "TrainOptions.workers"),
        (_epoch_batches, "batch_size"),
        (_sampler_epoch, "epoch"),
        (_eval_transform, "EvalTransform size"),
        (_knn, "query_chunk"),
        (_loss, "dino_loss: n_global_crops"),
    ],
)
def test_integer_arguments_reject_true_naming_the_field(make, name):
    with pytest.raises(ValueError, match="^" + re.escape(f"{name}=True is invalid: allowed an integer")):
        make(True)


def test_derive_seed_rejects_bool_parts():
    from fdino.data import derive_seed

    assert derive_seed(1, "a") == derive_seed(1, "a")
    with pytest.raises(TypeError, match="must be int or str, got True"):
        derive_seed(1, True)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"config": {"batch_size": true}}', r"\[config\] batch_size = True is not a int$"),
        ('{"config": {"lr": false}}', r"\[config\] lr = False is not a float$"),
        ('{"config": {"patch_size": 8.0}}', r"\[config\] patch_size = 8.0 is not a int \(or null\)$"),
    ],
)
def test_config_files_reject_bools_and_floats_where_numbers_go(tmp_path, text, match):
    from fdino.config_file import config_file

    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        config_file(path)
    path.write_text('{"config": {"batch_size": 8, "lr": 1, "patch_size": null}}')  # an int is a float here
    assert config_file(path)["config"] == {"batch_size": 8, "lr": 1, "patch_size": None}
