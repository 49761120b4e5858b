"""N variants as one batched (vmapped) step vs N runs one after another, side by side in one process.

    python bench/bench_batched.py [--device cpu|cuda] [--preset small32_resnet] [--variants 1,2,4,8]
                                  [--steps 10] [--data shapes10] [--eager]

For each N, the variants differ in teacher temperature (and, end to end, in seed):
- ``step``: the step alone on random crops: N calls of the single compiled `fdino.train_step` per
  step vs one `fdino.batched.batched_train_step` of the stacked states;
- ``end to end``: with the data loader as the training job uses it (``--workers`` processes per
  loader), (a) variants with one seed (crops rendered once for all of them: a hyperparameter grid)
  and (b) every variant its own seed (its own loader: seeds batched). Sequential = each variant's
  steps with its own loader, one variant after another.
Columns: images/s of all variants together (N x batch per step), per variant, and batched /
sequential. Compile time (warm-up) is reported apart: the batched step compiles one graph for all
N variants, a sequential sweep one per variant (the single step's graph depends on the config).
Writes ``bench/results/batched-<device>-<preset>.md`` and ``.json``. Only measured numbers are written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import torch

import fdino
from fdino.batched import batched_train_step, batched_train_step_eager, init_batched
from fdino.batched.measure import random_crops
from fdino.data import build_dataset, multicrop_loader

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP_NOTE = (
    "The sequential warm-up compiles the single step once (the N=1 row) and reuses that graph for larger N in "
    "this process; a sequential sweep compiles once per variant, because the single step's graph depends on "
    "the config. The batched step compiles one graph per N, for any values of the variants."
)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _variants(cfg: fdino.DinoConfig, n: int, own_seeds: bool) -> list[fdino.DinoConfig]:
    temps = [0.02 + 0.05 * i / max(n - 1, 1) for i in range(n)]
    return [cfg.replace(teacher_temp=t, warmup_teacher_temp=t, seed=i if own_seeds else 0) for i, t in enumerate(temps)]


def _timed(fn, steps: int, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn()
    float(out["loss"].sum())
    _sync(device)
    return time.perf_counter() - t0


def step_alone(cfgs, device: str, steps: int, single_fn, batched_fn) -> dict[str, float]:
    n, crops = len(cfgs), random_crops(cfgs[0], device)
    # One config for the sequential states: the compiled single step builds a graph per config (a
    # sequential sweep compiles once per variant); the timed steps are the same with one graph.
    states = [fdino.init_state(cfgs[0], device=device) for _ in cfgs]

    def sequential():
        for i in range(n):
            states[i], m = single_fn(states[i], crops)
        return m

    bstate = init_batched(cfgs, device=device)
    stacked = [c.expand(n, *c.shape) for c in crops]

    def batched():
        return batched_fn(bstate, stacked)[1]

    t0 = time.perf_counter()
    sequential()
    seq_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched()
    bat_warm = time.perf_counter() - t0
    return dict(
        sequential_s=_timed(sequential, steps, device) / steps,
        batched_s=_timed(batched, steps, device) / steps,
        sequential_warmup_s=seq_warm,
        batched_warmup_s=bat_warm,
    )


def end_to_end(cfgs, dataset, device: str, steps: int, workers: int, single_fn, batched_fn) -> dict[str, float]:
    """Seconds per step of all variants with the loaders: one batched run vs one run after another."""
    seeds = list(dict.fromkeys(c.seed for c in cfgs))

    def stream(cfg):
        loader = multicrop_loader(cfg, dataset, num_workers=workers)
        return (crops for _, _, crops, _ in loader.steps(0))

    # One after another: each variant with its own loader (startup and the first batch untimed).
    seq = 0.0
    for cfg in cfgs:
        batches, state = stream(cfg), fdino.init_state(cfgs[0], device=device)  # one graph, as above
        state, _ = single_fn(state, [c.to(device) for c in next(batches)])
        _sync(device)
        t0 = time.perf_counter()
        for crops in itertools.islice(batches, steps):
            state, m = single_fn(state, [c.to(device) for c in crops])
        float(m["loss"])
        _sync(device)
        seq += time.perf_counter() - t0
    # Batched: one loader per seed, each variant its seed's crops (as fdino.batched.train does).
    streams = {s: stream(next(c for c in cfgs if c.seed == s)) for s in seeds}
    index = [seeds.index(c.seed) for c in cfgs]
    bstate = init_batched(cfgs, device=device)

    def batch():
        drawn = [[c.to(device) for c in next(streams[s])] for s in seeds]
        return [torch.stack([drawn[i][v] for i in index]) for v in range(len(drawn[0]))]

    bstate, _ = batched_fn(bstate, batch())
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        bstate, m = batched_fn(bstate, batch())
    float(m["loss"].sum())
    _sync(device)
    return dict(sequential_s=seq / steps, batched_s=(time.perf_counter() - t0) / steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="small32_resnet")
    p.add_argument("--variants", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data", default="shapes10")
    p.add_argument("--workers", type=int, default=2, help="loader processes per loader (the training job's default)")
    p.add_argument("--eager", action="store_true", help="eager steps (default: compiled, as the sweep trains)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    cfg = fdino.presets.PRESETS[args.preset]()
    single_fn = fdino.train_step_eager if args.eager else fdino.train_step
    batched_fn = batched_train_step_eager if args.eager else batched_train_step
    dataset = build_dataset(args.data, split="train", image_size=cfg.global_crop_size).dataset
    rows = []
    for n in (int(v) for v in args.variants.split(",")):
        row = {
            "variants": n,
            "step": step_alone(_variants(cfg, n, False), args.device, args.steps, single_fn, batched_fn),
        }
        for kind, own in (("e2e_one_seed", False), ("e2e_own_seeds", True)):
            cfgs = _variants(cfg, n, own)
            row[kind] = end_to_end(cfgs, dataset, args.device, args.steps, args.workers, single_fn, batched_fn)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write(args, cfg, rows)


def write(args, cfg: fdino.DinoConfig, rows: list[dict]) -> None:
    threads = torch.get_num_threads()
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU, {threads} threads"
    path = "eager" if args.eager else "compiled"
    lines = [
        f"# {args.variants} variants of {args.preset} ({cfg.arch}, batch {cfg.batch_size}): batched vs one by one, "
        f"{path}",
        "",
        f"Machine: {machine}; torch {torch.__version__}. Measured by `python bench/bench_batched.py --device "
        f"{args.device} --preset {args.preset} --variants {args.variants} --steps {args.steps} --data {args.data} "
        f"--workers {args.workers}{' --eager' if args.eager else ''}`.",
        "",
        "images/s counts every variant's images (N x batch per step); per variant = that / N.",
        "",
        "| N | what | sequential img/s | batched img/s | per variant, batched | batched / sequential |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        n = row["variants"]
        for kind, label in (("step", "step alone"), ("e2e_one_seed", "with loader, one seed"),
                            ("e2e_own_seeds", "with loader, own seeds")):  # fmt: skip
            m = row[kind]
            seq, bat = n * cfg.batch_size / m["sequential_s"], n * cfg.batch_size / m["batched_s"]
            lines.append(f"| {n} | {label} | {seq:.0f} | {bat:.0f} | {bat / n:.0f} | **{bat / seq:.2f}x** |")
    warm = [(r["variants"], r["step"]["sequential_warmup_s"], r["step"]["batched_warmup_s"]) for r in rows]
    lines += ["", "Warm-up (first call, compilation included): " + "; ".join(
        f"N={n}: sequential {s:.1f} s, batched {b:.1f} s" for n, s, b in warm), "", WARMUP_NOTE]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"batched-{args.device}-{args.preset}{'-eager' if args.eager else ''}"
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    meta = {"machine": machine, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
