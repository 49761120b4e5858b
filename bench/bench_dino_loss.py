"""DINO loss benchmark: five implementations side by side, forward, backward and forward+backward.

Run on a CUDA machine, either way (both measure with the same timer and write the same table):

    pytest bench/bench_dino_loss.py    # or `pytest bench` / `make bench`; pytest-benchmark also
                                       # prints its own grouped host-side tables
    python bench/bench_dino_loss.py    # plain script: imports pytest, never uses pytest-benchmark

Without CUDA the pytest entry skips. ``tests/test_kernel_dino_loss.py`` runs every provider once on
tiny CPU shapes (the kernel in the Triton interpreter) so this file cannot rot unnoticed.

Providers (all take ``(student [V*B, K], teacher [2B, K], center [K], tau_s, tau_t)`` and return
``(loss, batch_center)``; all compute in fp32 whatever the student dtype, as ``fdino.loss`` does):
1. ``pair_loop``: the paper's reference code: a Python loop over the 2(V-1) (teacher, student) pairs,
   log-softmax recomputed for every pair.
2. ``lsm_once``: log-softmax once per student crop, then the pair products.
3. ``einsum``: ``fdino.loss.dino_loss_reference``: crops stacked, one einsum over all (teacher,
   student) pairs, the diagonal zeroed (wastes 2 of the 2V pair products).
4. ``compiled``: ``torch.compile`` of ``einsum`` (the eager formulation with the fewest kernels and
   the least saved memory; the table shows whether it is also the fastest eager one on your GPU).
5. ``triton``: the fused kernel, ``fdino.kernels.dino_loss.dino_loss_triton``.
Temperatures are 0-d device tensors, as in a training step driven by schedules.

Shapes: B in {32, 64, 128}, V = 12 (2 global + 10 local crops), K in {4096, 65536}, student fp32
and bf16 (teacher and center always fp32).

Timing: CUDA events around each call; before each call the L2 cache is flushed by writing a 256 MiB
buffer (outside the timed region); the median over up to 100 calls (at least 10, about 0.3 s per
case) is reported. Modes: ``fwd`` is the training forward (the student requires grad, so each
provider saves what its backward needs); ``bwd`` times ``autograd.grad`` on one retained graph;
``fwd+bwd`` times both. pytest-benchmark's own numbers are host wall times with a
``torch.cuda.synchronize()`` per call (launch overhead included); the written table uses the events.

Byte model (the same for every provider: the traffic of an ideal implementation of each pass,
s = bytes per student element): ``fwd`` = read S (V*B*K*s) + read T (2B*K*4) + read c (K*4) +
write batch center (K*4); ``bwd`` = read S, T and c again + write dS (V*B*K*s) (an ideal backward
recomputes the softmaxes instead of storing them: storing q or p costs as much as re-reading);
``fwd+bwd`` = the sum. The fused kernel itself reads T twice in the forward (loss statistics and
batch center), so its real traffic is 2B*K*4 bytes above the model there.

Columns: median time, model bytes, achieved GB/s (= model bytes / median), percent of the
device-to-device copy bandwidth measured in the same run (``dst.copy_(src)`` of 1 GiB, counted as
read + write), speedup of the row's provider over each provider (> 1: this row is faster), and peak
memory allocated during the call above what was allocated before it (for ``bwd``: above the
retained forward graph). Output: ``bench/results/dino_loss_<gpu>.md`` and ``.json`` with the GPU
name and the torch, triton and CUDA versions. Only measured numbers are written.
"""

import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fdino.loss import dino_loss_reference

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROVIDERS = ("pair_loop", "lsm_once", "einsum", "compiled", "triton")
MODES = ("fwd", "bwd", "fwd+bwd")
N_CROPS = 12
SHAPES = [(batch, k) for batch in (32, 64, 128) for k in (4096, 65536)]
DTYPES = (torch.float32, torch.bfloat16)
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


# ----------------------------------------------------------------------------- providers


def loss_pair_loop(student, teacher, center, student_temp, teacher_temp):
    """Paper reference code: one log-softmax per (teacher, student) pair, i != j."""
    n_global = 2
    batch = teacher.shape[0] // n_global
    q = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    s = (student.float() / student_temp).chunk(student.shape[0] // batch)
    total, n_pairs = 0.0, 0
    for i, q_i in enumerate(q):
        for j, s_j in enumerate(s):
            if i == j:
                continue
            total = total + torch.sum(-q_i * F.log_softmax(s_j, dim=-1), dim=-1).mean()
            n_pairs += 1
    return total / n_pairs, teacher.float().mean(dim=0)


def loss_lsm_once(student, teacher, center, student_temp, teacher_temp):
    """Log-softmax once per student crop, then the 2(V-1) pair products."""
    batch = teacher.shape[0] // 2
    q = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach().chunk(2)
    log_p = F.log_softmax(student.float() / student_temp, dim=-1).chunk(student.shape[0] // batch)
    terms = [torch.sum(q_i * log_p[j], dim=-1).mean() for i, q_i in enumerate(q) for j in range(len(log_p)) if i != j]
    return -torch.stack(terms).mean(), teacher.float().mean(dim=0)


def loss_einsum(student, teacher, center, student_temp, teacher_temp):
    """Stacked crops, one einsum, diagonal zeroed: ``fdino.loss.dino_loss_reference``."""
    return dino_loss_reference(student, teacher, center, student_temp=student_temp, teacher_temp=teacher_temp)


def loss_triton(student, teacher, center, student_temp, teacher_temp):
    """The fused Triton kernel."""
    from fdino.kernels.dino_loss import dino_loss_triton

    return dino_loss_triton(student, teacher, center, student_temp=student_temp, teacher_temp=teacher_temp)


def make_providers(compile_backend: str = "inductor") -> dict:
    """Name -> provider; ``compile_backend`` lets the CPU smoke test skip the inductor build."""
    compiled = torch.compile(loss_einsum, backend=compile_backend, dynamic=False)
    return dict(
        pair_loop=loss_pair_loop, lsm_once=loss_lsm_once, einsum=loss_einsum, compiled=compiled, triton=loss_triton
    )


def make_inputs(batch, k, dtype, device, n_crops=N_CROPS, seed=0):
    """Cosine-like logits in [-1, 1] (a weight-normalized head) at tau = 0.1 / 0.04."""
    gen = torch.Generator(device=device).manual_seed(seed)
    student = (torch.rand(n_crops * batch, k, generator=gen, device=device) * 2 - 1).to(dtype).requires_grad_()
    teacher = torch.rand(2 * batch, k, generator=gen, device=device) * 2 - 1
    center = (torch.rand(k, generator=gen, device=device) * 2 - 1) * 0.1
    temps = (torch.tensor(STUDENT_TEMP, device=device), torch.tensor(TEACHER_TEMP, device=device))
    return student, teacher, center, *temps


def make_call(provider, mode, inputs):
    """A zero-argument callable running ``mode`` of ``provider`` on ``inputs``."""
    student = inputs[0]
    if mode == "fwd":
        return lambda: provider(*inputs)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(provider(*inputs)[0], student)
    if mode == "bwd":
        loss = provider(*inputs)[0]
        grad_out = torch.ones_like(loss)
        return lambda: torch.autograd.grad(loss, student, grad_out, retain_graph=True)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def model_bytes(mode, batch, k, dtype, n_crops=N_CROPS):
    """Bytes of the module docstring's byte model."""
    s = n_crops * batch * k * torch.empty((), dtype=dtype).element_size()
    t = 2 * batch * k * 4
    fwd = s + t + 2 * k * 4
    bwd = s + t + k * 4 + s
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# ----------------------------------------------------------------------------- measurement


def time_cuda_ms(fn, flush, max_reps=100, min_reps=10, budget_s=0.3):
    """Median milliseconds of ``fn()`` by CUDA events, L2 flushed before every call."""
    fn()  # warm-up: compiles, autotunes nothing, fills the allocator's cache
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = int(min(max_reps, max(min_reps, budget_s / max(time.perf_counter() - t0, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def peak_extra_mb(fn):
    """Peak bytes allocated during ``fn()`` above the bytes allocated before it, in MB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def copy_gbps(flush):
    """Device-to-device copy bandwidth (read + write bytes per second), in GB/s."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda_ms(lambda: dst.copy_(src), flush)
    return 2 * src.numel() / ms / 1e6


class Bench:
    """Holds the flush buffer, the copy bandwidth, the current case's inputs and the result rows."""

    def __init__(self):
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        self.copy_gbps = copy_gbps(self.flush)
        # One compiled artifact per (dtype, B, K) case: lift the recompile limit so none falls back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(SHAPES) * len(DTYPES))
        self.providers = make_providers()
        self.rows = []
        self._case = None
        self._inputs = None

    def inputs(self, batch, k, dtype):
        if self._case != (batch, k, dtype):
            self._inputs = None  # free the previous case's tensors first
            torch.cuda.empty_cache()
            self._inputs = make_inputs(batch, k, dtype, "cuda")
            self._case = (batch, k, dtype)
        return self._inputs

    def measure(self, provider, mode, batch, k, dtype):
        call = make_call(self.providers[provider], mode, self.inputs(batch, k, dtype))
        ms = time_cuda_ms(call, self.flush)
        row = make_row(provider, mode, batch, k, dtype, ms, peak_extra_mb(call), self.copy_gbps)
        self.rows.append(row)
        return row, call


def make_row(provider, mode, batch, k, dtype, median_ms, peak_mb, copy_bw, n_crops=N_CROPS):
    """One result row from the measured median time, peak memory and copy bandwidth."""
    nbytes = model_bytes(mode, batch, k, dtype, n_crops)
    gbps = nbytes / median_ms / 1e6
    return dict(
        provider=provider,
        mode=mode,
        dtype=str(dtype).removeprefix("torch."),
        B=batch,
        V=n_crops,
        K=k,
        median_ms=median_ms,
        model_bytes=nbytes,
        gbps=gbps,
        pct_of_copy=100 * gbps / copy_bw,
        peak_mb=peak_mb,
    )


def write_results(rows, copy_bw, gpu=None, out_dir=RESULTS_DIR):
    """Markdown and JSON tables, named after the GPU; speedups computed within each case."""
    gpu = gpu or torch.cuda.get_device_name()
    import triton

    meta = dict(
        gpu=gpu,
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        copy_gbps=copy_bw,
    )
    by_case = {}
    for r in rows:
        by_case.setdefault((r["dtype"], r["B"], r["K"], r["mode"]), {})[r["provider"]] = r["median_ms"]
    for r in rows:
        times = by_case[(r["dtype"], r["B"], r["K"], r["mode"])]
        r["speedup_vs"] = {p: times[p] / r["median_ms"] for p in PROVIDERS if p in times}

    slug = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"dino_loss_{slug}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    head = ["dtype", "B", "K", "mode", "provider", "median ms", "MB (model)", "GB/s", "% copy"]
    head += [f"x vs {p}" for p in PROVIDERS] + ["peak MB"]
    lines = [
        f"# DINO loss benchmark on {gpu}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}. "
        f"V = {rows[0]['V']}. Device-to-device copy: {copy_bw:.0f} GB/s. Byte model and method: "
        "docstring of `bench/bench_dino_loss.py`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [
            r["dtype"],
            r["B"],
            r["K"],
            r["mode"],
            r["provider"],
            f"{r['median_ms']:.4f}",
            f"{r['model_bytes'] / 1e6:.1f}",
            f"{r['gbps']:.0f}",
            f"{r['pct_of_copy']:.1f}",
        ]
        cells += [f"{r['speedup_vs'][p]:.2f}" if p in r["speedup_vs"] else "" for p in PROVIDERS]
        cells.append(f"{r['peak_mb']:.1f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    path = out_dir / f"dino_loss_{slug}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


CASES = [
    (dtype, batch, k, mode, provider)
    for dtype in DTYPES
    for batch, k in SHAPES
    for mode in MODES
    for provider in PROVIDERS
]


# ----------------------------------------------------------------------------- pytest entry

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the DINO loss benchmark needs a CUDA GPU")


@pytest.fixture(scope="module")
def bench():
    """One Bench for the module; writes the results table after the last case."""
    state = Bench()
    yield state
    if state.rows:
        print(f"\nwrote {write_results(state.rows, state.copy_gbps)}")


@needs_cuda
@pytest.mark.parametrize(
    "dtype,batch,k,mode,provider",
    CASES,
    ids=[f"{str(d).removeprefix('torch.')}-B{b}-K{k}-{m}-{p}" for d, b, k, m, p in CASES],
)
def test_dino_loss(benchmark, bench, dtype, batch, k, mode, provider):
    row, call = bench.measure(provider, mode, batch, k, dtype)
    benchmark.group = f"{mode} {row['dtype']} B={batch} K={k}"
    benchmark.extra_info.update(
        {key: row[key] for key in ("median_ms", "model_bytes", "gbps", "pct_of_copy", "peak_mb")}
    )

    def synced():
        call()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, warmup_rounds=2, iterations=1)


# ----------------------------------------------------------------------------- script entry


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_dino_loss: no CUDA GPU; nothing measured", file=sys.stderr)
        return 1
    state = Bench()
    for dtype, batch, k, mode, provider in CASES:
        row, _ = state.measure(provider, mode, batch, k, dtype)
        print(
            f"{row['dtype']:>8} B={batch:<4} K={k:<6} {mode:<8} {provider:<10} {row['median_ms']:9.4f} ms "
            f"{row['gbps']:7.0f} GB/s {row['pct_of_copy']:5.1f}% copy {row['peak_mb']:9.1f} MB",
            flush=True,
        )
    print(f"wrote {write_results(state.rows, state.copy_gbps)}")
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench_dino_loss: unset TRITON_INTERPRET; the benchmark times compiled kernels on a GPU")
    sys.exit(main())
