"""Training-step throughput: eager `train_step_eager` vs compiled `train_step`, side by side.

    python bench/bench_step.py [--device cpu|cuda] [--preset small32] [--batch-size 64] [--steps 20]

Both run the same preset, batch and number of timed steps in one process, after warm-up steps
(the compiled warm-up includes compilation, reported separately). Random crops are used so the
data loader does not enter the number. Writes ``bench/results/step-<device>-<preset>.md`` and
``.json`` with images/s per path and the compiled/eager ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import fdino

RESULTS = Path(__file__).resolve().parent / "results"


def _batch(cfg: fdino.DinoConfig, device: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    return [torch.randn(cfg.batch_size, 3, s, s, generator=g).to(device) for s in sizes]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(step_fn, cfg: fdino.DinoConfig, device: str, warmup: int, steps: int) -> dict[str, float]:
    """Seconds of the warm-up (compilation included) and images/s over the timed steps."""
    state = fdino.init_state(cfg, device=device)
    batches = [_batch(cfg, device, i) for i in range(4)]

    def timed(n: int) -> float:
        nonlocal state
        t0 = time.perf_counter()
        for i in range(n):
            state, metrics = step_fn(state, batches[i % 4])
        float(metrics["loss"])  # wait for the last step
        _sync(device)
        return time.perf_counter() - t0

    warm_s, timed_s = timed(warmup), timed(steps)
    return {
        "warmup_s": round(warm_s, 1),
        "step_ms": round(1000 * timed_s / steps, 1),
        "images_per_s": round(steps * cfg.batch_size / timed_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="small32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    precision = "bf16" if args.device == "cuda" else "fp32"
    cfg = fdino.presets.preset(args.preset, batch_size=args.batch_size, precision=precision)
    rows = {
        "eager": measure(fdino.train_step_eager, cfg, args.device, args.warmup, args.steps),
        "compiled": measure(fdino.train_step, cfg, args.device, args.warmup, args.steps),
    }
    ratio = rows["compiled"]["images_per_s"] / rows["eager"]["images_per_s"]
    machine = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    record = {
        "preset": args.preset,
        "arch": cfg.arch,
        "batch_size": cfg.batch_size,
        "precision": precision,
        "machine": machine,
        "torch": torch.__version__,
        "rows": rows,
        "compiled_over_eager": round(ratio, 2),
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"step-{args.device}-{args.preset}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Training-step throughput: {args.preset} ({cfg.arch}), batch {cfg.batch_size}, {precision}",
        "",
        f"Machine: {machine}; torch {torch.__version__}. "
        f"Measured by `python bench/bench_step.py --device {args.device} --preset {args.preset} "
        f"--batch-size {cfg.batch_size} --steps {args.steps}`.",
        "",
        "| path | warm-up incl. compile (s) | ms / step | images / s |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {r['warmup_s']} | {r['step_ms']} | {r['images_per_s']} |" for name, r in rows.items()),
        "",
        f"compiled / eager throughput: **{ratio:.2f}x**",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
