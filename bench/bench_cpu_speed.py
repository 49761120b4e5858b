"""CPU training speed in one process: the reference imperative DINO loop vs fdino's step.

    python bench/bench_cpu_speed.py [--geometry vit_tiny|small32_resnet|all] [--steps 3] [--rounds 3]

Per geometry, four paths train side by side on the same random crops (no data loader):
- ``reference``: the classic loop of tests/classic_dino.py (nn.Module student and teacher,
  torch.optim.AdamW, per-pair Python loss loop, per-parameter EMA loop), fp32 eager: the
  structure of the paper's reference training step;
- ``fdino fp32 eager`` (`fdino.train_step_eager`), ``fdino fp32 compiled`` (`fdino.train_step`),
  ``fdino bf16 eager``, ``fdino bf16 compiled`` (``precision="bf16"``: CPU autocast to bfloat16).

Every path first runs warm-up steps (the first call of a compiled path includes compilation,
reported separately with what inductor's on-disk cache supplied; see `fdino.compile_cache`), then
``--rounds`` rounds in which each path runs ``--steps`` timed steps, the order rotating per round
so slow drifts of a shared machine hit every path alike. images/s is the median over rounds; the
ratio is to the reference's median. Geometries:
- ``vit_tiny``: timm ViT-tiny (192 wide, depth 12, 3 heads), patch 4, 2 x 32 px + 6 x 16 px crops,
  batch 32, K = 4096; the rest (head 512 -> 128, schedules) from the ``small32`` preset;
- ``small32_resnet``: the demo's preset (narrow ResNet, 2 x 32 px crops), batch 64.

``fdino bf16 eager`` is there too: the bf16 paths of ViTs run attention as explicit bf16 matrix
products on the CPU (`fdino.models.fused_attention_pays`), and the eager row shows that apart from
compilation.

Results merge into ``bench/results/cpu-speed.json`` (one entry per geometry, so the geometries can
be measured in separate invocations) and ``cpu-speed.md`` is rewritten from all entries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fdino
from fdino.compile_cache import compile_cache_stats, enable_compile_cache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from classic_dino import ClassicDino  # noqa: E402  (a test helper: tests/ is not a package)

RESULTS = ROOT / "bench" / "results"
GOAL = 1.5  # issue 21: at least 1.5x the reference loop's images/s on this CPU
PATHS = ("reference", "fdino fp32 eager", "fdino fp32 compiled", "fdino bf16 eager", "fdino bf16 compiled")


def geometry(name: str) -> fdino.DinoConfig:
    if name == "vit_tiny":
        return fdino.presets.small32(backbone_kwargs=(), batch_size=32, out_dim=4096)
    if name == "small32_resnet":
        return fdino.presets.small32_resnet(batch_size=64)
    raise ValueError(f"unknown geometry {name!r}; choose vit_tiny or small32_resnet")


def random_batch(cfg: fdino.DinoConfig, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [cfg.global_crop_size] * cfg.n_global_crops + [cfg.local_crop_size] * cfg.n_local_crops
    return [torch.randn(cfg.batch_size, 3, s, s, generator=g) for s in sizes]


class Runner:
    """One path under test: a step closure over its own state, plus its warm-up record."""

    def __init__(self, name: str, step: Callable[[list[torch.Tensor]], None]) -> None:
        self.name, self.step = name, step
        self.warmup: dict = {}
        self.rounds: list[float] = []  # images/s per round
        self.cpu_rounds: list[float] = []  # images per CPU second of this process, per round


def make_paths(cfg: fdino.DinoConfig) -> list[Runner]:
    def fdino_path(name: str, step_fn, path_cfg: fdino.DinoConfig) -> Runner:
        state = fdino.init_state(path_cfg, device="cpu")

        def step(batch):
            nonlocal state
            state, metrics = step_fn(state, batch)
            float(metrics["loss"])  # the step is done when its loss can be read

        return Runner(name, step)

    start = fdino.init_state(cfg, device="cpu")
    bf16 = cfg.replace(precision="bf16")
    return [
        Runner("reference", ClassicDino(cfg, start.student, start.student_buffers).step),
        fdino_path("fdino fp32 eager", fdino.train_step_eager, cfg),
        fdino_path("fdino fp32 compiled", fdino.train_step, cfg),
        fdino_path("fdino bf16 eager", fdino.train_step_eager, bf16),
        fdino_path("fdino bf16 compiled", fdino.train_step, bf16),
    ]


def run_steps(path: Runner, batches: list[list[torch.Tensor]], n: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process, all threads) of ``n`` steps."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        path.step(batches[i % len(batches)])
    return time.perf_counter() - t0, time.process_time() - c0


def measure(name: str, steps: int, rounds: int, warmup: int) -> dict:
    cfg = geometry(name)
    batches = [random_batch(cfg, i) for i in range(4)]
    paths = make_paths(cfg)
    for p in paths:
        before = compile_cache_stats()
        first = run_steps(p, batches, 1)[0]
        rest = run_steps(p, batches, warmup - 1)[0] / max(warmup - 1, 1)
        cache = compile_cache_stats().since(before)
        # The first call of a compiled path = compilation (or a cache load) + one step.
        p.warmup = {"first_call_s": round(first, 1), "compile_s": round(max(first - rest, 0.0), 1)}
        p.warmup.update(graphs_loaded=cache.loaded, graphs_built=cache.compiled, aot_cache_hits=cache.aot_hits)
        print(f"[{name}] warm-up {p.name}: {p.warmup}", flush=True)
    for r in range(rounds):
        for p in paths[r % len(paths) :] + paths[: r % len(paths)]:
            wall, cpu = run_steps(p, batches, steps)
            p.rounds.append(steps * cfg.batch_size / wall)
            p.cpu_rounds.append(steps * cfg.batch_size / cpu)
        done = ", ".join(f"{p.name} {p.rounds[-1]:.1f}" for p in paths)
        print(f"[{name}] round {r + 1}/{rounds}: {done}", flush=True)
    ref = statistics.median(paths[0].rounds)
    ref_cpu = statistics.median(paths[0].cpu_rounds)
    rows = {}
    for p in paths:
        med, med_cpu = statistics.median(p.rounds), statistics.median(p.cpu_rounds)
        rows[p.name] = {
            "images_per_cpu_s": round(med_cpu, 2),
            "vs_reference_cpu": round(med_cpu / ref_cpu, 2),
            **p.warmup,
            "images_per_s": round(med, 1),
            "ms_per_step": round(1000 * cfg.batch_size / med, 1),
            "images_per_s_rounds": [round(v, 1) for v in p.rounds],
            "vs_reference": round(med / ref, 2),
        }
    best = max(PATHS[1:], key=lambda k: rows[k]["vs_reference"])
    return {
        "arch": cfg.arch,
        "config": {
            "patch_size": cfg.patch_size,
            "backbone_kwargs": [list(kv) for kv in cfg.backbone_kwargs],
            "crops": f"{cfg.n_global_crops} x {cfg.global_crop_size} px + "
            f"{cfg.n_local_crops} x {cfg.local_crop_size} px",
            "batch_size": cfg.batch_size,
            "out_dim": cfg.out_dim,
            "head": f"{cfg.head_hidden_dim} -> {cfg.head_bottleneck_dim}",
        },
        "steps_per_round": steps,
        "rounds": rounds,
        "warmup_steps": warmup,
        "rows": rows,
        "best_path": best,
        "best_vs_reference": rows[best]["vs_reference"],
        "goal_met": rows[best]["vs_reference"] >= GOAL,
    }


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    isa = [f for f in ("avx512_bf16", "amx_bf16") if f in text]
    return {
        "cpu": f"{names[0] if names else 'unknown CPU'} ({platform.machine()}), {os.cpu_count()} cores, "
        f"{' '.join(isa) or 'no bf16 ISA'}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "niceness": os.nice(0),
    }


def render(record: dict) -> str:
    lines = [
        "# CPU training speed: fdino vs the reference imperative DINO loop",
        "",
        "Measured by `bench/bench_cpu_speed.py` (one process per geometry, paths interleaved in "
        "rotating order, median over rounds; random crops, no data loader). The reference is the "
        "classic loop in `tests/classic_dino.py` (fp32 eager). Goal (issue 21): at least "
        f"**{GOAL}x** the reference's images/s. images / CPU-s: images per second of CPU time this "
        "process used (all its threads), less sensitive to other jobs on a shared machine (threads that "
        "spin while preempted still count). compile (s): the first call minus a warm step; graphs "
        "loaded/built: what inductor's FX graph cache supplied.",
        "",
    ]
    for name, g in record["geometries"].items():
        m = g["machine"]
        cfgd = g["config"]
        lines += [
            f"## {name}: {g['arch']}, {cfgd['crops']}, batch {cfgd['batch_size']}, K = {cfgd['out_dim']}",
            "",
            f"Patch {cfgd['patch_size']}, backbone overrides {cfgd['backbone_kwargs'] or 'none'}, head "
            f"{cfgd['head']}. {g['rounds']} rounds x {g['steps_per_round']} timed steps per path after "
            f"{g['warmup_steps']} warm-up steps. Machine: {m['cpu']}; {m['threads']} threads; torch {m['torch']}; "
            f"run at niceness {m['niceness']}. Load average (1 min) {g['load_before']} before, "
            f"{g['load_after']} after. {g['note']}",
            "",
            "| path | images / s | ms / step | vs reference | per round | images / CPU-s | vs ref. (CPU) "
            "| compile (s) | graphs loaded/built |",
            "|---|---:|---:|---:|---|---:|---:|---:|---|",
        ]
        for path, r in g["rows"].items():
            compiled = "compiled" in path
            compile_s = r["compile_s"] if compiled else "-"
            graphs = f"{r['graphs_loaded']} / {r['graphs_built']}" if compiled else "-"
            rounds = ", ".join(str(v) for v in r["images_per_s_rounds"])
            lines.append(
                f"| {path} | {r['images_per_s']} | {r['ms_per_step']} | {r['vs_reference']:.2f}x | "
                f"{rounds} | {r.get('images_per_cpu_s', '-')} | {r.get('vs_reference_cpu', '-')} | "
                f"{compile_s} | {graphs} |"
            )
        verdict = "met" if g["goal_met"] else "**not met**"
        lines += [
            "",
            f"Best fdino path: {g['best_path']}, **{g['best_vs_reference']:.2f}x** the reference: goal {verdict}.",
            "",
        ]
        if g.get("findings"):
            lines += ["Findings:", "", *(f"- {f}" for f in g["findings"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="all", choices=["all", "vit_tiny", "small32_resnet"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per path (compilation included)")
    parser.add_argument(
        "--note",
        default="",
        help="how the machine was shared during the run (written into the results)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (default: torch's). On a shared machine, 1 thread makes images / CPU-s a clean "
        "measure of work per image: 2 threads spin in barriers while the other one is preempted",
    )
    parser.add_argument("--cache-dir", default=None, help="inductor cache (default: fdino.compile_cache)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = enable_compile_cache(args.cache_dir)
    print(f"inductor cache: {cache}", flush=True)
    names = ["vit_tiny", "small32_resnet"] if args.geometry == "all" else [args.geometry]
    stem = RESULTS / "cpu-speed"
    record = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    record.setdefault("geometries", {})
    for name in names:
        load_before = round(os.getloadavg()[0], 2)
        result = measure(name, args.steps, args.rounds, args.warmup)
        result.update(
            machine=machine(),
            note=args.note,
            load_before=load_before,
            load_after=round(os.getloadavg()[0], 2),
            inductor_cache=str(cache),
        )
        key = f"{name}, {torch.get_num_threads()} threads"
        old = record["geometries"].get(key, {})
        if "findings" in old:  # hand-written findings survive a re-measurement
            result["findings"] = old["findings"]
        record["geometries"][key] = result
        RESULTS.mkdir(exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        stem.with_suffix(".md").write_text(render(record))
    print(render(record))


if __name__ == "__main__":
    main()
