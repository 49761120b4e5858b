"""Peak memory of one training step per batch size, with and without activation checkpointing.

    python bench/bench_memory.py [--device cpu|cuda] [--preset small32] [--batch-sizes 32 64 128]

Each (batch size, checkpointing) point runs in a fresh subprocess so peaks do not mix:
- CUDA: ``torch.cuda.max_memory_allocated`` over two training steps (the second step has the
  AdamW moments allocated), minus the memory held before the first step (the state).
- CPU: the process's peak resident set size (``ru_maxrss``) after two steps, minus the peak of a
  twin subprocess that builds the same state and batch but takes no step. CPU numbers include
  allocator slack and are coarser than the CUDA counter.
The eager step is measured (torch.compile's own memory planning would be a separate row).
Writes ``bench/results/memory-<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _measure_child(preset: str, batch_size: int, checkpointing: bool, device: str, take_steps: bool) -> float:
    """Runs inside the subprocess; returns peak MiB (see module docstring)."""
    import fdino

    cfg = fdino.presets.preset(
        preset,
        batch_size=batch_size,
        grad_checkpointing=checkpointing,
        precision="bf16" if device == "cuda" else "fp32",
    )
    state = fdino.init_state(cfg, device=device)
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    batch = [torch.randn(batch_size, 3, s, s, device=device) for s in sizes]
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    if take_steps:
        for _ in range(2):
            state, _ = fdino.train_step_eager(state, batch)
    if device == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _run_child(*args: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(preset: str, batch_sizes: list[int], device: str) -> list[dict]:
    rows = []
    for b in batch_sizes:
        row = {"batch_size": b}
        for ckpt in (False, True):
            args = [preset, str(b), str(int(ckpt)), device]
            peak = _run_child(*args, "1")
            if device == "cpu":
                peak -= _run_child(*args, "0")
            row["checkpointing" if ckpt else "plain"] = round(peak, 1)
        row["saving"] = round(1 - row["checkpointing"] / row["plain"], 3) if row["plain"] > 0 else None
        rows.append(row)
    return rows


def write_table(rows: list[dict], preset: str, device: str) -> Path:
    import fdino

    cfg = fdino.presets.preset(preset)
    if device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    meta = {
        "device": device,
        "machine": machine,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "preset": preset,
        "arch": cfg.arch,
        "crops": f"{cfg.n_global_crops}x{cfg.global_crop_size} + {cfg.n_local_crops}x{cfg.local_crop_size}",
        "out_dim": cfg.out_dim,
        "what": "peak memory of two eager training steps above the state (MiB)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"memory-{device}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Peak step memory: {preset} ({meta['arch']}, {meta['crops']}, K={cfg.out_dim})",
        "",
        f"Machine: {machine}; torch {torch.__version__}; {meta['what']}.",
        "Measured by `python bench/bench_memory.py --device " + device + f" --preset {preset}`.",
        "",
        "| batch | plain (MiB) | activation checkpointing (MiB) | saving |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        saving = f"{100 * r['saving']:.0f}%" if r["saving"] is not None else "n/a"
        lines.append(f"| {r['batch_size']} | {r['plain']:.0f} | {r['checkpointing']:.0f} | {saving} |")
    path = RESULTS / f"memory-{device}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        preset, b, ckpt, device, steps = argv[1:]
        print(_measure_child(preset, int(b), bool(int(ckpt)), device, bool(int(steps))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="small32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    args = parser.parse_args(argv)
    rows = measure(args.preset, args.batch_sizes, args.device)
    path = write_table(rows, args.preset, args.device)
    print(path.read_text())


if __name__ == "__main__":
    main()
