"""dino_loss (reference path) against the paper's definition, plus its mathematical invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fdino import dino_loss, dino_loss_reference

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def paper_loss(student, teacher, center, tau_s, tau_t, n_global=2):
    """Paper eq. 1 / Algorithm 1 as written: an explicit loop over (teacher i, student j != i) pairs,
    in float64. Returns (loss, batch_center)."""
    student, teacher, center = student.double(), teacher.double(), center.double()
    b = teacher.shape[0] // n_global
    v = student.shape[0] // b
    s_chunks = (student / tau_s).split(b)
    q_chunks = F.softmax((teacher - center) / tau_t, dim=-1).split(b)
    total, n_pairs = 0.0, 0
    for i, q in enumerate(q_chunks):
        for j in range(v):
            if j == i:
                continue
            total = total + torch.sum(-q * F.log_softmax(s_chunks[j], dim=-1), dim=-1).mean()
            n_pairs += 1
    return total / n_pairs, teacher.mean(dim=0)


@st.composite
def loss_inputs(draw):
    b = draw(st.integers(1, 4))
    v = draw(st.integers(2, 12))
    k = draw(st.sampled_from([1, 2, 3, 7, 16, 33, 64]))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(v * b, k, generator=g) * scale
    teacher = torch.randn(2 * b, k, generator=g) * scale
    center = torch.randn(k, generator=g) * 0.1
    tau_s = draw(st.floats(0.05, 1.0))
    tau_t = draw(st.floats(0.01, 0.5))
    return student, teacher, center, tau_s, tau_t


@given(loss_inputs())
def test_reference_matches_paper_loop_loss_and_grad(inputs):
    student, teacher, center, tau_s, tau_t = inputs
    s64 = student.double().requires_grad_(True)
    s32 = student.clone().requires_grad_(True)
    want, want_center = paper_loss(s64, teacher, center, tau_s, tau_t)
    got, got_center = dino_loss(s32, teacher, center, student_temp=tau_s, teacher_temp=tau_t)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_center.double(), want_center, rtol=1e-6, atol=1e-6)
    cotangent = torch.randn(())
    (want_grad,) = torch.autograd.grad(want * cotangent.double(), s64)
    (got_grad,) = torch.autograd.grad(got * cotangent, s32)
    scale = want_grad.abs().max().item() + 1e-12
    torch.testing.assert_close(got_grad.double() / scale, want_grad / scale, rtol=1e-4, atol=1e-5)


@given(loss_inputs())
def test_float64_reference_is_exact(inputs):
    student, teacher, center, tau_s, tau_t = inputs
    want, _ = paper_loss(student, teacher, center, tau_s, tau_t)
    got, _ = dino_loss_reference(
        student.double(), teacher.double(), center.double(), student_temp=tau_s, teacher_temp=tau_t
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_global,v", [(1, 3), (3, 5)])
def test_other_global_crop_counts_match_the_paper_loop(n_global, v):
    b, k = 3, 11
    student, teacher, center = torch.randn(v * b, k), torch.randn(n_global * b, k), torch.randn(k)
    want, _ = paper_loss(student, teacher, center, 0.1, 0.04, n_global=n_global)
    got, _ = dino_loss(
        student.double(),
        teacher.double(),
        center.double(),
        student_temp=0.1,
        teacher_temp=0.04,
        n_global_crops=n_global,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_loss_is_teacher_entropy_plus_kl_per_pair():
    b, v, k = 3, 4, 9
    student, teacher, center = torch.randn(v * b, k).double(), torch.randn(2 * b, k).double(), torch.randn(k).double()
    tau_s, tau_t = 0.2, 0.05
    q = F.softmax((teacher - center) / tau_t, -1).split(b)
    log_p = F.log_softmax(student / tau_s, -1).split(b)
    terms = []
    for i in range(2):
        for j in range(v):
            if i != j:
                entropy = -(q[i] * q[i].log()).sum(-1)
                kl = (q[i] * (q[i].log() - log_p[j])).sum(-1)
                terms.append((entropy + kl).mean())
    loss, _ = dino_loss(student, teacher, center, student_temp=tau_s, teacher_temp=tau_t)
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-12, atol=1e-12)


def test_invariant_to_adding_a_constant_to_a_student_row():
    b, v, k = 2, 3, 8
    student, teacher, center = torch.randn(v * b, k).double(), torch.randn(2 * b, k).double(), torch.randn(k).double()
    shifted = student + torch.randn(v * b, 1).double() * 100
    kw = dict(student_temp=0.1, teacher_temp=0.04)
    torch.testing.assert_close(
        dino_loss(shifted, teacher, center, **kw)[0], dino_loss(student, teacher, center, **kw)[0]
    )


def test_invariant_to_permuting_the_batch_consistently_across_crops():
    b, v, k = 5, 4, 6
    # A small center and a soft teacher: each image's target differs, so pairings matter.
    student, teacher, center = (
        torch.randn(v * b, k).double(),
        torch.randn(2 * b, k).double(),
        0.1 * torch.randn(k).double(),
    )
    kw = dict(student_temp=0.1, teacher_temp=0.5)
    perm = torch.randperm(b)
    s_perm = student.view(v, b, k)[:, perm].reshape(v * b, k)
    t_perm = teacher.view(2, b, k)[:, perm].reshape(2 * b, k)
    loss, batch_center = dino_loss(student, teacher, center, **kw)
    loss_p, batch_center_p = dino_loss(s_perm, t_perm, center, **kw)
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(batch_center_p, batch_center)
    # A permutation that differs between crops breaks the pairing, so the loss must change.
    s_mixed = student.view(v, b, k).clone()
    s_mixed[1] = s_mixed[1, perm.roll(1)]
    assert not torch.allclose(dino_loss(s_mixed.reshape(v * b, k), teacher, center, **kw)[0], loss)


def test_batch_center_is_the_mean_of_teacher_rows():
    teacher = torch.randn(6, 5)
    _, batch_center = dino_loss(torch.randn(9, 5), teacher, torch.zeros(5), student_temp=0.1, teacher_temp=0.04)
    torch.testing.assert_close(batch_center, teacher.mean(0))


def test_no_gradient_reaches_teacher_or_center():
    teacher = torch.randn(4, 5, requires_grad=True)
    center = torch.randn(5, requires_grad=True)
    student = torch.randn(6, 5, requires_grad=True)
    loss, _ = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    loss.backward()
    assert teacher.grad is None and center.grad is None and student.grad is not None


def test_gradcheck_float64():
    student = torch.randn(3 * 2, 7, dtype=torch.float64, requires_grad=True)
    teacher, center = torch.randn(4, 7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    fn = lambda s: dino_loss(s, teacher, center, student_temp=0.3, teacher_temp=0.07)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (student,))
    assert torch.autograd.gradgradcheck(fn, (student,))


def test_tensor_temperatures_equal_float_temperatures():
    student, teacher, center = torch.randn(8, 10), torch.randn(4, 10), torch.randn(10)
    a, _ = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    b, _ = dino_loss(student, teacher, center, student_temp=torch.tensor(0.1), teacher_temp=torch.tensor(0.04))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "student_shape,teacher_shape,center_shape,match",
    [
        ((8, 10), (4, 11), (10,), "K mismatch"),
        ((8, 10), (4, 10), (9,), "center must have shape"),
        ((8,), (4, 10), (10,), "2-D tensor"),
        ((7, 10), (4, 10), (10,), "student_logits has 7 rows"),
        ((8, 10), (3, 10), (10,), "not a positive multiple of n_global_crops"),
        ((1, 10), (2, 10), (10,), "V >= n_global_crops"),
    ],
)
def test_clear_errors_for_bad_shapes(student_shape, teacher_shape, center_shape, match):
    with pytest.raises(ValueError, match=match):
        dino_loss(
            torch.randn(student_shape),
            torch.randn(teacher_shape),
            torch.randn(center_shape),
            student_temp=0.1,
            teacher_temp=0.04,
        )


def test_clear_errors_for_bad_dtype_temperature_and_impl():
    s, t, c = torch.randn(8, 10), torch.randn(4, 10), torch.zeros(10)
    with pytest.raises(TypeError, match="floating point"):
        dino_loss(s.long(), t, c, student_temp=0.1, teacher_temp=0.04)
    with pytest.raises(ValueError, match="teacher_temp must be > 0"):
        dino_loss(s, t, c, student_temp=0.1, teacher_temp=0.0)
    with pytest.raises(ValueError, match="impl='fast' is unknown"):
        dino_loss(s, t, c, student_temp=0.1, teacher_temp=0.04, impl="fast")


@pytest.mark.parametrize("n_global_crops", [0, True, 2.0])
def test_n_global_crops_must_be_a_positive_int_not_a_bool(n_global_crops):
    s, t, c = torch.randn(8, 10), torch.randn(4, 10), torch.zeros(10)
    with pytest.raises(
        ValueError, match=rf"dino_loss: n_global_crops={n_global_crops!r} is invalid: allowed an integer >= 1"
    ):
        dino_loss(s, t, c, student_temp=0.1, teacher_temp=0.04, n_global_crops=n_global_crops)


@pytest.mark.parametrize("impl", ["reference", "triton", "auto"])
def test_loss_inputs_are_checked_once_per_call(impl, monkeypatch):
    """dino_loss owns the input checks; its kernel path must not run them a second time
    (they did run twice before fdino.loss_inputs: in dino_loss and again in dino_loss_triton)."""
    import fdino.kernels.dino_loss as kernel
    import fdino.loss as loss
    import fdino.loss_inputs

    calls = []

    def counted(*args):
        calls.append(1)
        return fdino.loss_inputs.check_loss_inputs(*args)

    monkeypatch.setattr(loss, "check_loss_inputs", counted)
    monkeypatch.setattr(kernel, "check_loss_inputs", counted)
    s, t, c = torch.randn(6, 16), torch.randn(4, 16), torch.zeros(16)  # V=3, B=2: the interpreter is slow
    got, _ = dino_loss(s, t, c, student_temp=0.1, teacher_temp=0.04, impl=impl)
    want, _ = dino_loss_reference(s, t, c, student_temp=0.1, teacher_temp=0.04)
    torch.testing.assert_close(got, want)
    assert len(calls) == 1
    calls.clear()  # the kernel's public entry is for direct callers, so it checks by itself
    kernel.dino_loss_triton(s, t, c, student_temp=0.1, teacher_temp=0.04)
    assert len(calls) == 1


def test_loss_and_kernel_share_a_leaf_module_instead_of_importing_each_other():
    """fdino.loss imports the kernel (to dispatch to it); the kernel must not import fdino.loss back
    (it did, for its input checks), and the shared leaf imports neither."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def imported_modules(path):
        mods = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                mods.update([base] if node.module else [base + alias.name for alias in node.names])
        return mods

    kernel = imported_modules(root / "kernels" / "dino_loss.py")
    assert "fdino.loss_inputs" in kernel
    assert not any(m == "fdino" or m == "fdino.loss" or m.startswith("fdino.loss.") for m in kernel), kernel
    assert imported_modules(root / "fdino" / "loss_inputs.py") == {"__future__", "torch", ".checks"}


@given(st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_update_center_is_the_ema_in_place(momentum, seed):
    from fdino import update_center_

    g = torch.Generator().manual_seed(seed)
    center, batch_center = torch.randn(33, generator=g), torch.randn(33, generator=g)
    want = momentum * center.double() + (1 - momentum) * batch_center.double()
    storage = center.data_ptr()
    out = update_center_(center, batch_center, momentum)
    assert out is center and center.data_ptr() == storage
    torch.testing.assert_close(center.double(), want, rtol=0, atol=1e-6)
    # A 0-d tensor momentum (a schedule's value) gives the same bits as the float.
    again = torch.randn(33, generator=torch.Generator().manual_seed(seed))
    update_center_(again, batch_center, torch.tensor(momentum, dtype=torch.float64))
    assert torch.equal(again, center)


def test_the_training_step_updates_the_center_with_update_center(monkeypatch):
    """The documented function is the one the step runs (it once was exported but never called)."""
    import fdino
    import fdino.step
    from fdino import presets

    cfg = presets.smoke(center_momentum=0.7)
    state = fdino.init_state(cfg, device="cpu")
    seen = []

    def recorded(center, batch_center, momentum):
        seen.append((center.clone(), batch_center.clone(), momentum))
        return fdino.update_center_(center, batch_center, momentum)

    monkeypatch.setattr(fdino.step, "update_center_", recorded)
    g = torch.Generator().manual_seed(0)
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    state, _ = fdino.train_step_eager(state, [torch.randn(cfg.batch_size, 3, s, s, generator=g) for s in sizes])
    assert len(seen) == 1 and seen[0][2] == 0.7
    before, batch_center, _ = seen[0]
    assert not torch.equal(state.center, before)
    assert torch.equal(state.center, torch.lerp(before, batch_center, 1.0 - 0.7))
