"""torch.profiler table of fdino's compiled training step on the CPU, with a reading on top.

    python bench/profile_step.py --geometry vit_tiny|small32_resnet [--precision fp32] [--steps 3]
                                 [--threads N] [--reference]

Compiles `fdino.train_step` for a geometry of bench/bench_cpu_speed.py (with inductor's per-kernel
profiling on, so each fused C++ kernel is a row of its own instead of hiding in the graph's call),
runs warm-up steps, profiles ``--steps`` steps and writes
``bench/results/profile-step-cpu-<geometry>[-bf16].txt``: a short reading (where the self CPU time goes,
by kind of op), then ``key_averages()`` sorted by self CPU time (top ``--rows`` rows).
``--reference`` profiles the reference loop of bench/bench_cpu_speed.py instead (``-reference.txt``).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch._inductor.config
from bench_cpu_speed import RESULTS, ClassicDino, geometry, random_batch
from torch.profiler import ProfilerActivity, profile

import fdino
from fdino.compile_cache import compile_cache_stats, enable_compile_cache

# Kinds of op by name (first match wins); what is left is "other".
KINDS = (
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("convolutions", ("conv",)),
    ("GEMMs (mm, addmm, bmm, linear)", ("mm", "linear", "matmul", "gemm", "_mkl")),
    ("inductor fused C++ kernels", ("cpp_fused", "cpp_")),
    ("optimizer foreach ops", ("_foreach",)),
    ("copies and layout", ("copy_", "clone", "contiguous", "as_strided", "cat")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other"


def reading(events, steps: int, wall_s: float, label: str, remark: str) -> list[str]:
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1])
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:3]
    fused = [e for e in events if kind_of(e.key) == "inductor fused C++ kernels"]
    lines = [
        f"Reading ({label}): {1000 * wall_s / steps:.0f} ms wall per step, "
        f"{total / 1000 / steps:.0f} ms self CPU per step on the calling thread ({steps} steps profiled).",
        "Self CPU by kind: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in kinds) + ".",
        "Largest rows: " + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in top) + ".",
        f"{len(fused)} distinct fused C++ kernels; the largest takes "
        + (f"{100 * max(e.self_cpu_time_total for e in fused) / total:.1f}%." if fused else "0%."),
    ]
    lines.append(remark or "(no remark)")
    return lines


def compiled_step(cfg: fdino.DinoConfig):
    state = fdino.init_state(cfg, device="cpu")

    def step(batch):
        nonlocal state
        state, metrics = fdino.train_step(state, batch)
        float(metrics["loss"])

    return step


def reference_step(cfg: fdino.DinoConfig):
    if cfg.precision != "fp32":
        raise SystemExit("the reference loop runs in fp32 only")
    start = fdino.init_state(cfg, device="cpu")
    return ClassicDino(cfg, start.student, start.student_buffers).step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="small32_resnet", choices=["vit_tiny", "small32_resnet"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--reference", action="store_true", help="profile the reference loop instead (fp32 eager)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--remark", default="", help="a hand-written fifth line of the reading")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    enable_compile_cache()
    torch._inductor.config.cpp.enable_kernel_profile = True  # a row per fused kernel
    cfg = geometry(args.geometry).replace(precision=args.precision)
    step = reference_step(cfg) if args.reference else compiled_step(cfg)
    batches = [random_batch(cfg, i) for i in range(2)]
    t0 = time.perf_counter()
    for i in range(2):  # compile (or load from the cache) and settle
        step(batches[i % 2])
    warm_s = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(batches[i % 2])
        wall_s = time.perf_counter() - t0
    events = prof.key_averages()
    what = "reference loop (tests/classic_dino.py), eager" if args.reference else "compiled"
    label = f"{args.geometry}, {cfg.arch}, batch {cfg.batch_size}, {args.precision}, {what}"
    head = reading(events, args.steps, wall_s, label, args.remark)
    table = events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70)
    text = "\n".join(
        [
            *head,
            "",
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; warm-up (2 steps incl. compile) "
            f"{warm_s:.0f} s, {compile_cache_stats().describe()}. "
            f"`python bench/profile_step.py --geometry {args.geometry} --precision {args.precision} "
            f"--steps {args.steps}"
            + (f" --threads {args.threads}" if args.threads else "")
            + (" --reference" if args.reference else "")
            + "`",
            "",
            table,
        ]
    )
    suffix = ("" if args.precision == "fp32" else f"-{args.precision}") + ("-reference" if args.reference else "")
    out = RESULTS / f"profile-step-cpu-{args.geometry}{suffix}.txt"
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
