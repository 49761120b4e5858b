"""Fused DINO loss kernel (fdino.kernels.dino_loss) against a float64 pair-by-pair reference.

On this CPU CI the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small. Covered: forward loss, batch center and student gradient (random cotangent)
over shapes, dtypes, temperatures and logit scales up to 1e4; the multi-tile and multi-chunk paths
(small forced tiles); torch.compile and torch.func.grad; bitwise determinism; grad_output read on
the device; stop-gradient; input errors; and a CPU smoke run of the benchmark's providers.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from helpers import TOLERANCES, load_bench_module, requires_cuda
from hypothesis import example, given
from hypothesis import strategies as st

from fdino.kernels.dino_loss import MAX_CROPS, LaunchConfig, dino_loss_triton, launch_config, launch_count
from fdino.loss import dino_loss, dino_loss_reference

# The kernels run on the GPU when there is one, else on CPU tensors in the Triton interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32_EPS = torch.finfo(torch.float32).eps
# Forced small tiles: several K tiles per chunk, several chunks per image, more chunks than tiles.
SMALL_CONFIGS = (LaunchConfig(16, 1), LaunchConfig(16, 3), LaunchConfig(32, 128))


def reference_float64(student, teacher, center, tau_s, tau_t, cotangent):
    """Eq. 1 pair by pair in float64 on the CPU: (loss, batch center, d(cotangent * loss)/d student).

    The teacher enters as u = t - c rounded to fp32, as in every fp32 implementation (the kernel
    and ``dino_loss_reference`` alike): near-ties in q amplify that rounding by |s| / tau_s (at
    logits of 1e4 it moves the loss in its 5th digit), which is the input's conditioning, not
    the kernel's error. From u on, everything here is float64.
    """
    s = student.detach().cpu().double().requires_grad_()
    t = teacher.cpu().double()
    u = (teacher.float() - center.float()).cpu().double()
    batch = t.shape[0] // 2
    n_crops = s.shape[0] // batch
    q = torch.softmax(u / tau_t, dim=-1).view(2, batch, -1)
    log_p = torch.log_softmax(s / tau_s, dim=-1).view(n_crops, batch, -1)
    pairs = [(i, j) for i in range(2) for j in range(n_crops) if i != j]
    loss = sum(-(q[i] * log_p[j]).sum(-1).mean() for i, j in pairs) / len(pairs)
    (grad,) = torch.autograd.grad(loss, s, cotangent.cpu().double())
    return loss.detach(), t.mean(dim=0), grad


def make_inputs(n_crops, batch, k, dtype, scale=1.0, seed=0, agree=False, tau_ratio=1.0):
    """Logits uniform in [-scale, scale]; ``agree`` makes each student crop a copy of a teacher
    crop sharpened to the student temperature, where n_j p_j - Qbar_j cancels most."""
    gen = torch.Generator().manual_seed(seed)
    center = (torch.rand(k, generator=gen) * 2 - 1) * (0.3 * scale)
    if agree:  # (t - c) / tau_t == s / tau_s up to noise, with |s| <= scale (fp16 stays finite)
        sharp = (torch.rand(2 * batch, k, generator=gen) * 2 - 1) * scale
        teacher = sharp / tau_ratio + center
        student = torch.cat([sharp[(j % 2) * batch : (j % 2 + 1) * batch] for j in range(n_crops)])
        student = student + (torch.rand(student.shape, generator=gen) - 0.5) * (1e-3 * scale)
    else:
        teacher = (torch.rand(2 * batch, k, generator=gen) * 2 - 1) * scale
        student = (torch.rand(n_crops * batch, k, generator=gen) * 2 - 1) * scale
    return student.to(dtype).to(DEVICE), teacher.to(DEVICE), center.to(DEVICE)


def fp32(x: float) -> float:
    """The value the kernel sees for a Python-float temperature (it computes in fp32)."""
    return float(torch.tensor(x, dtype=torch.float32))


def assert_matches_reference(student, teacher, center, tau_s, tau_t, config=None, temps_as_tensors=False):
    """Kernel vs float64 reference: loss and center at fp32 tolerances (the kernel accumulates in
    fp32 whatever the student dtype); the gradient at the student dtype's tolerances, relative to
    its natural scale g / (tau_s P B) (|dS| <= 2 g / (tau_s P B))."""
    tau_s, tau_t = fp32(tau_s), fp32(tau_t)
    batch = teacher.shape[0] // 2
    n_pairs = 2 * (student.shape[0] // batch - 1)
    cotangent = torch.randn((), device=DEVICE)
    s = student.clone().requires_grad_()
    if temps_as_tensors:
        temps = (torch.tensor(tau_s, device=DEVICE), torch.tensor(tau_t, device=DEVICE))
    else:
        temps = (tau_s, tau_t)
    loss, batch_center = dino_loss_triton(
        s, teacher, center, student_temp=temps[0], teacher_temp=temps[1], config=config
    )
    loss.backward(cotangent)
    ref_loss, ref_center, ref_grad = reference_float64(student, teacher, center, tau_s, tau_t, cotangent)

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert batch_center.dtype == torch.float32 and batch_center.shape == center.shape
    assert s.grad.dtype == student.dtype and s.grad.shape == student.shape
    assert torch.isfinite(loss) and torch.isfinite(batch_center).all() and torch.isfinite(s.grad).all()
    rtol32, atol32 = TOLERANCES[torch.float32]
    loss, batch_center, grad = loss.cpu(), batch_center.cpu(), s.grad.cpu()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol32, atol=atol32)
    # A mean of 2B rows: error ~ eps * max|T|, whatever the sign pattern.
    torch.testing.assert_close(batch_center.double(), ref_center, rtol=rtol32, atol=atol32 * teacher.abs().max().item())
    rtol, atol = TOLERANCES[student.dtype]
    # p = exp(arg) carries eps32 * |arg| relative error, and |arg| <~ 64 wherever p is not negligible.
    atol = max(atol, 64 * FP32_EPS)
    unit = abs(cotangent.item()) / (tau_s * n_pairs * batch)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol * unit)


# ----------------------------------------------------------------------------- values


@st.composite
def loss_cases(draw):
    return dict(
        n_crops=draw(st.integers(2, 12)),
        batch=draw(st.integers(1, 3)),
        k=draw(st.integers(1, 300)),
        dtype=draw(st.sampled_from(DTYPES)),
        tau_s=draw(st.floats(0.01, 1.0)),
        tau_t=draw(st.floats(0.01, 1.0)),
        scale=draw(st.sampled_from([1e-2, 1.0, 30.0, 1e4])),
        agree=draw(st.booleans()),
        config=draw(st.sampled_from((None,) + SMALL_CONFIGS)),
        temps_as_tensors=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@given(case=loss_cases())
@example(
    case=dict(
        n_crops=12,
        batch=1,
        k=257,
        dtype=torch.bfloat16,
        tau_s=0.1,
        tau_t=0.04,
        scale=1.0,
        agree=False,
        config=LaunchConfig(16, 3),
        temps_as_tensors=True,
        seed=1,
    )
)
@example(
    case=dict(
        n_crops=5,
        batch=2,
        k=131,
        dtype=torch.float16,
        tau_s=0.01,
        tau_t=0.01,
        scale=1e4,
        agree=True,
        config=LaunchConfig(16, 128),
        temps_as_tensors=False,
        seed=2,
    )
)
@example(
    case=dict(
        n_crops=2,
        batch=1,
        k=1,
        dtype=torch.float32,
        tau_s=1.0,
        tau_t=0.5,
        scale=30.0,
        agree=False,
        config=None,
        temps_as_tensors=False,
        seed=3,
    )
)
def test_matches_float64_reference(case):
    student, teacher, center = make_inputs(
        case["n_crops"],
        case["batch"],
        case["k"],
        case["dtype"],
        case["scale"],
        case["seed"],
        case["agree"],
        tau_ratio=case["tau_s"] / case["tau_t"],
    )
    assert_matches_reference(
        student, teacher, center, case["tau_s"], case["tau_t"], case["config"], case["temps_as_tensors"]
    )


@pytest.mark.parametrize(
    "n_crops,batch,k",
    [(2, 1, 262144), (MAX_CROPS, 2, 1000), (3, 1, 1)],
    ids=["largest-K", "most-crops", "K=1"],
)
def test_extreme_shapes_with_pinned_config(n_crops, batch, k):
    student, teacher, center = make_inputs(n_crops, batch, k, torch.float32, scale=1.0)
    assert_matches_reference(student, teacher, center, 0.1, 0.04)


def test_pinned_config_is_valid_for_every_v():
    for n_crops in range(2, MAX_CROPS + 1):
        for batch, k in [(1, 1), (1, 262144), (64, 65536), (128, 4096)]:
            block_k, n_split = launch_config(n_crops, batch, k)
            assert block_k >= 16 and block_k & (block_k - 1) == 0
            assert 1 <= n_split <= math.ceil(k / block_k)


# ----------------------------------------------------------------------------- transforms


def _loss_and_center(student, teacher, center, tau_s, tau_t):
    return dino_loss_triton(student, teacher, center, student_temp=tau_s, teacher_temp=tau_t)


@pytest.fixture(scope="module")
def compiled_grad_and_value():
    """The file's one compiled graph: grad_and_value of the kernel-backed loss, with a counter of
    dynamo compilations (a temperature change must not recompile)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    fn = torch.func.grad_and_value(_loss_and_center, has_aux=True)
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def test_compiled_gradient_equals_eager(compiled_grad_and_value):
    compiled, counter = compiled_grad_and_value
    student, teacher, center = make_inputs(3, 2, 40, torch.float32)
    eager = torch.func.grad_and_value(_loss_and_center, has_aux=True)
    for tau_s in (0.1, 0.07):  # a schedule's new value: same graph, new data
        temps = (torch.tensor(tau_s, device=DEVICE), torch.tensor(0.04, device=DEVICE))
        before = launch_count()
        grad, (loss, batch_center) = compiled(student, teacher, center, *temps)
        assert launch_count() - before == 4, "the compiled function must run the kernels (3 forward + 1 backward)"
        e_grad, (e_loss, e_center) = eager(student, teacher, center, *temps)
        for got, want in ((grad, e_grad), (loss, e_loss), (batch_center, e_center)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        _, _, ref_grad = reference_float64(student, teacher, center, tau_s, 0.04, torch.ones(()))
        torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert counter.frame_count == 1


def test_func_grad_matches_reference():
    student, teacher, center = make_inputs(4, 2, 50, torch.float32, scale=3.0)
    grad = torch.func.grad(lambda s: _loss_and_center(s, teacher, center, 0.1, 0.04)[0])(student)
    _, _, ref_grad = reference_float64(student, teacher, center, fp32(0.1), fp32(0.04), torch.ones(()))
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", [None, LaunchConfig(16, 3)], ids=["pinned", "multi-chunk"])
def test_bitwise_deterministic(config):
    student, teacher, center = make_inputs(5, 3, 100, torch.bfloat16, scale=10.0)

    def run():
        s = student.clone().requires_grad_()
        loss, batch_center = dino_loss_triton(s, teacher, center, student_temp=0.1, teacher_temp=0.04, config=config)
        loss.backward()
        return loss, batch_center, s.grad

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


def test_grad_output_is_read_on_device():
    student, teacher, center = make_inputs(3, 2, 30, torch.float32)

    def grad_of(scale=None, grad_output=None):
        s = student.clone().requires_grad_()
        loss, _ = dino_loss_triton(s, teacher, center, student_temp=0.1, teacher_temp=0.04)
        if scale is not None:
            loss = loss * scale
        (g,) = torch.autograd.grad(loss, s, grad_output)
        return g

    unit = grad_of()
    torch.testing.assert_close(grad_of(scale=3.7), 3.7 * unit, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_of(grad_output=torch.tensor(-2.5, device=DEVICE)), -2.5 * unit, rtol=1e-6, atol=0)
    assert torch.equal(grad_of(grad_output=torch.tensor(0.0, device=DEVICE)), torch.zeros_like(unit))


@requires_cuda
def test_no_host_sync_on_cuda():
    student, teacher, center = make_inputs(4, 8, 4096, torch.bfloat16)
    temps = dict(student_temp=torch.tensor(0.1, device="cuda"), teacher_temp=torch.tensor(0.04, device="cuda"))
    s = student.clone().requires_grad_()
    dino_loss_triton(s, teacher, center, **temps)[0].backward()  # compile the kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = dino_loss_triton(s, teacher, center, **temps)
        (loss * torch.tensor(3.7, device="cuda")).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_stop_gradient_to_teacher_center_and_temperatures():
    student, teacher, center = make_inputs(3, 2, 20, torch.float32)
    s, t, c = (x.clone().requires_grad_() for x in (student, teacher, center))
    tau_s = torch.tensor(0.1, device=DEVICE, requires_grad=True)
    tau_t = torch.tensor(0.04, device=DEVICE, requires_grad=True)
    loss, batch_center = dino_loss_triton(s, t, c, student_temp=tau_s, teacher_temp=tau_t)
    assert not batch_center.requires_grad
    loss.backward()
    assert s.grad is not None
    assert t.grad is None and c.grad is None and tau_s.grad is None and tau_t.grad is None


def test_dispatcher_impl_triton_matches_reference():
    student, teacher, center = make_inputs(4, 2, 33, torch.float32, scale=2.0)
    kw = dict(student_temp=0.1, teacher_temp=0.04)
    for got, want in zip(
        dino_loss(student, teacher, center, impl="triton", **kw), dino_loss_reference(student, teacher, center, **kw)
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_non_contiguous_inputs_are_handled():
    student, teacher, center = make_inputs(3, 2, 24, torch.float32)
    base = student.t().contiguous().requires_grad_()  # [K, V*B]; its transpose is non-contiguous
    wide_teacher = torch.stack([teacher, teacher], dim=-1)  # [2B, K, 2]; [..., 0] has stride 2
    loss, batch_center = dino_loss_triton(base.t(), wide_teacher[..., 0], center, student_temp=0.1, teacher_temp=0.04)
    loss.backward()
    s = student.clone().requires_grad_()
    want_loss, want_center = dino_loss_triton(s, teacher, center, student_temp=0.1, teacher_temp=0.04)
    want_loss.backward()
    assert torch.equal(loss, want_loss) and torch.equal(batch_center, want_center)
    assert torch.equal(base.grad.t(), s.grad)


def _call(student, teacher, center, **kw):
    kw = dict(dict(student_temp=0.1, teacher_temp=0.04), **kw)
    return dino_loss_triton(student, teacher, center, **kw)


@pytest.mark.parametrize(
    "shapes,kw,error,match",
    [
        (((6, 8), (4, 8), (8,)), dict(n_global_crops=3), ValueError, "n_global_crops must be 2"),
        (((6, 8), (4, 9), (8,)), {}, ValueError, "K mismatch"),
        (((48,), (4, 8), (8,)), {}, ValueError, "2-D tensor"),
        (((6, 8), (4, 8), (9,)), {}, ValueError, "center must have shape"),
        (((7, 8), (4, 8), (8,)), {}, ValueError, "rows"),
        ((((MAX_CROPS + 1) * 2, 8), (4, 8), (8,)), {}, ValueError, "maximum"),
        (((6, 0), (4, 0), (0,)), {}, ValueError, "K must be >= 1"),
        (((6, 8), (4, 8), (8,)), dict(student_temp=-1.0), ValueError, "student_temp must be > 0"),
        (((6, 8), (4, 8), (8,)), dict(config=LaunchConfig(24, 1)), ValueError, "block_k"),
        (((6, 8), (4, 8), (8,)), dict(config=LaunchConfig(16, 0)), ValueError, "n_split"),
    ],
    ids=[
        "n_global_crops",
        "K-mismatch",
        "1-D-student",
        "center-shape",
        "rows-not-V*B",
        "too-many-crops",
        "K=0",
        "negative-temperature",
        "block_k",
        "n_split",
    ],
)
def test_input_errors(shapes, kw, error, match):
    tensors = [torch.randn(shape, device=DEVICE) for shape in shapes]
    with pytest.raises(error, match=match):
        _call(*tensors, **kw)


def test_dtype_and_device_errors(monkeypatch):
    student, teacher, center = (torch.randn(shape, device=DEVICE) for shape in ((6, 8), (4, 8), (8,)))
    with pytest.raises(TypeError, match="floating point"):
        _call(student.to(torch.int32), teacher, center)
    with pytest.raises(ValueError, match="center is on meta"):
        _call(student, teacher, center.to("meta"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            _call(student, teacher, center)


# ----------------------------------------------------------------------------- benchmark smoke test


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_benchmark_providers_agree_on_cpu(dtype, tmp_path):
    """Every provider and mode of bench/bench_dino_loss.py, once, on tiny CPU shapes; the compiled
    provider uses the aot_eager backend (the file's one inductor graph is the fixture above)."""
    bench = load_bench_module("bench_dino_loss")
    providers = bench.make_providers(compile_backend="aot_eager")
    assert tuple(providers) == bench.PROVIDERS
    inputs = bench.make_inputs(2, 40, dtype, DEVICE, n_crops=4)
    want_loss, want_center = dino_loss_reference(*inputs[:3], student_temp=inputs[3], teacher_temp=inputs[4])
    (want_grad,) = torch.autograd.grad(want_loss, inputs[0])
    rtol, atol = TOLERANCES[dtype]
    rows = []
    for name, provider in providers.items():
        start = time.perf_counter()
        loss, batch_center = bench.make_call(provider, "fwd", inputs)()
        ms = (time.perf_counter() - start) * 1e3
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch_center, want_center, rtol=1e-5, atol=1e-6)
        for mode in ("bwd", "fwd+bwd"):
            call = bench.make_call(provider, mode, inputs)
            for _ in range(2):  # twice: the bwd mode reuses one retained graph
                (grad,) = call()
                torch.testing.assert_close(grad, want_grad, rtol=rtol, atol=atol * want_grad.abs().max().item())
        # Table plumbing only: one measured CPU time; no copy bandwidth or peak memory on the CPU.
        rows.append(bench.make_row(name, "fwd", 2, 40, dtype, ms, peak_mb=math.nan, copy_bw=math.nan, n_crops=4))
    path = bench.write_results(rows, copy_bw=math.nan, gpu="cpu smoke test", out_dir=tmp_path)
    assert path.exists() and len(path.read_text().splitlines()) == 6 + len(bench.PROVIDERS)
    assert bench.model_bytes("fwd+bwd", 2, 40, dtype, 4) == (
        bench.model_bytes("fwd", 2, 40, dtype, 4) + bench.model_bytes("bwd", 2, 40, dtype, 4)
    )
