"""Ablation switches of the paper (Caron et al. 2021, sec. 5.2 Table 6, sec. 5.3): `DinoConfig.centering`
and `DinoConfig.teacher_update`. Each does what its docstring says over eager steps on the smoke preset
that cross an epoch boundary; the momentum schedule behind the teacher modes; validation and round trips.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch._dynamo
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

import fdino
from fdino import DinoConfig, cli, presets, schedules
from fdino.config import CENTERINGS, TEACHER_UPDATES
from fdino.step import networks, teacher_logits

pytestmark = pytest.mark.usefixtures("one_thread")

# steps_per_epoch = 5: the 5th step (index 4) ends epoch 0; 7 steps reach into epoch 1.
CFG = presets.smoke(lr=0.05, warmup_epochs=0.4)
N_STEPS = 7


def batches(cfg: DinoConfig, n: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    return [[torch.randn(cfg.batch_size, 3, s, s, generator=g) for s in sizes] for _ in range(n)]


def clone(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tree.items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(cfg: DinoConfig, n: int = N_STEPS, **step_kwargs):
    """Eager steps from a fresh state: the initial teacher, then (student, teacher, metrics) after each step."""
    state = fdino.init_state(cfg, device="cpu")
    initial = clone(state.teacher)
    after = []
    for batch in batches(cfg, n):
        state, metrics = fdino.train_step_eager(state, batch, **step_kwargs)
        after.append((clone(state.student), clone(state.teacher), metrics))
    return initial, after, state


# --- teacher_update -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs():
    return {mode: run(CFG.replace(teacher_update=mode)) for mode in TEACHER_UPDATES}


def test_frozen_teacher_stays_at_its_initialization(runs):
    initial, after, _ = runs["frozen"]
    for i, (_student, teacher, metrics) in enumerate(after):
        assert equal(teacher, initial), f"step {i}"
        assert float(metrics["momentum"]) == 1.0
    assert not equal(after[-1][0], initial)  # the student did train


def test_student_copy_teacher_is_the_student_after_every_step(runs):
    initial, after, _ = runs["student_copy"]
    for i, (student, teacher, metrics) in enumerate(after):
        assert equal(teacher, student), f"step {i}"
        assert float(metrics["momentum"]) == 0.0
    assert not equal(after[-1][1], initial)  # (step 0 has lr 0: the warm-up starts at 0)


def test_previous_epoch_teacher_is_the_student_of_the_last_epoch_end(runs):
    initial, after, _ = runs["previous_epoch"]
    spe = CFG.steps_per_epoch
    assert N_STEPS > spe  # crosses the boundary
    for i, (student, teacher, metrics) in enumerate(after):
        if i < spe - 1:  # epoch 0: still the initialization
            assert equal(teacher, initial), f"step {i}"
            assert float(metrics["momentum"]) == 1.0
        elif i == spe - 1:  # the last step of epoch 0: copied
            assert equal(teacher, student), f"step {i}"
            assert not equal(teacher, initial)
            assert float(metrics["momentum"]) == 0.0
        else:  # epoch 1: frozen at the end-of-epoch-0 student, while the student moves on
            assert equal(teacher, after[spe - 1][0]), f"step {i}"
            assert not equal(student, after[spe - 1][0])
            assert float(metrics["momentum"]) == 1.0


def test_ema_teacher_is_the_cosine_momentum_ema(runs):
    initial, after, _ = runs["ema"]
    teacher = clone(initial)
    for i, (student, stepped, metrics) in enumerate(after):
        m = CFG.teacher_momentum_end - (CFG.teacher_momentum_end - CFG.teacher_momentum) * 0.5 * (
            1 + math.cos(math.pi * i / CFG.total_steps)
        )
        assert float(metrics["momentum"]) == pytest.approx(m, rel=1e-7)
        fdino.ema_update_(list(teacher.values()), [student[k] for k in teacher], metrics["momentum"])
        assert equal(stepped, teacher), f"step {i}"
    last_student, last_teacher = after[-1][0], after[-1][1]
    assert not equal(last_teacher, last_student) and not equal(last_teacher, initial)


def test_defaults_are_the_papers_method():
    # With these defaults the step is bit-identical to the step before the switches existed
    # (checked over every state tensor and metric when they were added; the ema test above holds the math).
    assert DinoConfig().teacher_update == "ema" and DinoConfig().centering == "ema"
    assert CFG.replace(teacher_update="ema", centering="ema") == CFG


def test_previous_epoch_on_the_accumulated_and_reduced_path():
    # grad accumulation and the data-parallel step share _accumulated_step -> apply_update and its schedule;
    # an identity reducer takes the data-parallel path in one process.
    cfg = CFG.replace(teacher_update="previous_epoch", grad_accum_steps=2, steps_per_epoch=2)
    initial, after, _ = run(cfg, n=3, reducer=lambda tensors: None)
    assert equal(after[0][1], initial)
    assert equal(after[1][1], after[1][0])
    assert equal(after[2][1], after[1][0]) and not equal(after[2][0], after[1][0])


# --- the momentum schedule ---------------------------------------------------------------------------
@given(
    mode=st.sampled_from(TEACHER_UPDATES),
    step=st.integers(0, 100_000),
    steps_per_epoch=st.integers(1, 5_000),
    as_tensor=st.booleans(),
)
def test_teacher_momentum_per_mode(mode, step, steps_per_epoch, as_tensor):
    cfg = DinoConfig(teacher_update=mode, steps_per_epoch=steps_per_epoch)
    m = schedules.teacher_momentum(cfg, torch.tensor(step, dtype=torch.int64) if as_tensor else step)
    assert isinstance(m, torch.Tensor) and m.ndim == 0 and m.dtype == torch.float32
    expected = {
        "ema": float(schedules.teacher_momentum(cfg.replace(teacher_update="ema"), step)),
        "student_copy": 0.0,
        "previous_epoch": 0.0 if (step + 1) % steps_per_epoch == 0 else 1.0,
        "frozen": 1.0,
    }[mode]
    assert float(m) == expected
    assert torch.equal(schedules.all_schedules(cfg, step)["momentum"], m)


def test_previous_epoch_momentum_is_zero_exactly_at_the_epoch_ends():
    cfg = presets.smoke(teacher_update="previous_epoch", epochs=3, steps_per_epoch=4)
    values = [float(schedules.teacher_momentum(cfg, torch.tensor(s))) for s in range(cfg.total_steps)]
    assert values == [1.0, 1.0, 1.0, 0.0] * 3
    one_step_epochs = cfg.replace(steps_per_epoch=1)
    assert all(float(schedules.teacher_momentum(one_step_epochs, s)) == 0.0 for s in range(5))


# --- centering ---------------------------------------------------------------------------------------
def reference_loss(cfg: DinoConfig, state, batch, center: torch.Tensor) -> torch.Tensor:
    """The paper's loss on the logits the step will see, with the given center (drop_path is 0 in smoke)."""
    nets = networks(cfg, state.device)
    with torch.no_grad():
        t = teacher_logits(cfg, nets.teacher, state.teacher, state.teacher_buffers, batch[: cfg.n_global_crops])
        s = functional_call(nets.student, (state.student, state.student_buffers), (list(batch),))
    tau_t = schedules.teacher_temperature(cfg, state.step)
    loss, _ = fdino.dino_loss_reference(
        s, t, center, student_temp=cfg.student_temp, teacher_temp=tau_t, n_global_crops=cfg.n_global_crops
    )
    return loss


def test_no_centering_keeps_the_center_at_zero_and_the_loss_center_free():
    cfg = CFG.replace(centering="none")
    assert cfg.drop_path_rate == 0.0  # the reference forward below must see the step's exact logits
    state = fdino.init_state(cfg, device="cpu")
    zero = torch.zeros(cfg.out_dim)
    for batch in batches(cfg, 3):
        expected = reference_loss(cfg, state, batch, zero)
        state, metrics = fdino.train_step_eager(state, batch)
        torch.testing.assert_close(metrics["loss"], expected, rtol=1e-6, atol=0)
        assert torch.equal(state.center, zero)
        assert float(metrics["center_norm"]) == 0.0


def test_no_centering_ignores_a_resumed_center_and_never_updates_it():
    # A state from a centered run (nonzero center) continued with centering="none": the teacher subtracts 0.
    state = fdino.init_state(CFG, device="cpu")
    data = batches(CFG, 3)
    for batch in data[:2]:
        state, _ = fdino.train_step_eager(state, batch)
    center = state.center.clone()
    assert float(center.norm()) > 0
    state = state.replace(cfg=CFG.replace(centering="none"))
    free = reference_loss(state.cfg, state, data[2], torch.zeros(CFG.out_dim))
    centered = reference_loss(state.cfg, state, data[2], center)
    assert not torch.allclose(free, centered, rtol=1e-4, atol=0)
    state, metrics = fdino.train_step_eager(state, data[2])
    torch.testing.assert_close(metrics["loss"], free, rtol=1e-6, atol=0)
    assert torch.equal(state.center, center)


# --- validation, round trips, command line -------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("centering", "mean", CENTERINGS),
        ("centering", None, CENTERINGS),
        ("teacher_update", "copy", TEACHER_UPDATES),
        ("teacher_update", 1, TEACHER_UPDATES),
    ],
)
def test_invalid_ablation_values_name_the_field_and_the_choices(field, value, allowed):
    message = f"DinoConfig.{field}={value!r} is invalid: allowed one of {allowed}"
    with pytest.raises(ValueError, match=rf"^{re.escape(message)}$"):
        DinoConfig(**{field: value})


def test_ablation_fields_round_trip_and_old_configs_load_with_defaults():
    cfg = presets.smoke(centering="none", teacher_update="previous_epoch")
    assert DinoConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("centering", "teacher_update")}
    loaded = DinoConfig.from_dict(old)  # a checkpoint written before these fields existed
    assert loaded.centering == "ema" and loaded.teacher_update == "ema"
    assert loaded == cfg.replace(centering="ema", teacher_update="ema")


def test_train_flags_exist_with_help_and_parse(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--centering" in help_text and "no sharpening is teacher_temp == student_temp" in help_text
    assert "--teacher-update" in help_text and "'previous_epoch'" in help_text
    cfg, _ = cli.train_settings(["--preset", "smoke", "--centering", "none", "--teacher-update", "frozen"])
    assert cfg.centering == "none" and cfg.teacher_update == "frozen"
    with pytest.raises(ValueError, match="DinoConfig.teacher_update='never' is invalid"):
        cli.train_settings(["--preset", "smoke", "--teacher-update", "never"])


# --- compiled ----------------------------------------------------------------------------------------
def test_compiled_previous_epoch_matches_eager_and_never_recompiles():
    # The momentum goes 1, 0, 1, 0 (steps_per_epoch 2): keep and copy in one graph, no recompilation.
    cfg = CFG.replace(teacher_update="previous_epoch", steps_per_epoch=2, adam_eps=1e-5)
    data = batches(cfg, 4)
    compiled = fdino.init_state(cfg, device="cpu")
    eager = fdino.clone_state(compiled)
    initial = clone(compiled.teacher)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled, _ = fdino.train_step(compiled, data[0])
    assert equal(compiled.teacher, initial)
    graphs_after_first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, batch in enumerate(data[1:], start=1):
            before = clone(compiled.teacher)
            compiled, metrics = fdino.train_step(compiled, batch)
            if i % 2:
                assert equal(compiled.teacher, compiled.student) and float(metrics["momentum"]) == 0.0
            else:
                assert equal(compiled.teacher, before) and float(metrics["momentum"]) == 1.0
    assert graphs_after_first - graphs_before == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_after_first
    for batch in data:
        eager, _ = fdino.train_step_eager(eager, batch)
    for name in eager.teacher:  # tolerance: see tests/test_step_compiled.py (compiled AdamW rounds differently)
        torch.testing.assert_close(compiled.teacher[name], eager.teacher[name], rtol=1e-4, atol=1e-5, msg=name)
