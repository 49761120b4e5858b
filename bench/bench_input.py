"""Input pipeline against the training step: images/s of the loader alone, the compiled step alone, and
both together (the training loop's shape), with the folder decode cache off (before) and on (after).

    nice -n 19 python bench/bench_input.py [--presets small32_resnet small32] [--images 5000]
        [--sizes 32 64] [--workers 2] [--steps 30] [--warmup 8] [--repeats 3]

One process. It writes ``--images`` shapes10 images as JPEG files (quality 90) of each ``--sizes``
side into a temporary folder (10 class subfolders), then per preset:
  * step alone: `bench_step.measure` (compiled `train_step` on random crops, compilation in the warm-up);
  * per folder and cache setting: the loader alone (``multicrop_loader`` with ``--workers`` worker
    processes; the main process only takes batches) and the loop (the same loader feeding the compiled
    step in the main process, as `fdino.train` does). The first ``--warmup`` batches (worker start-up,
    a cache's first mapping) are not timed.
Each measurement is repeated ``--repeats`` times, cache off and on interleaved, and reported as best and
median: on a shared machine the best run is the least disturbed one. "cache on" decodes into an empty
temporary cache folder on its first build (reported apart); later builds find that cache.
Writes ``bench/results/input-cpu.md`` and ``.json``.

``--cpu-cost`` measures instead what the loader's work costs in CPU time per image (decode or cache read,
then the multi-crop; in the main process, no workers, no compiled step), which a busy neighbour hardly
changes, and writes ``bench/results/input-cpu-cost.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_step import RESULTS, measure
from PIL import Image

import fdino
from fdino.data import build_dataset, multicrop_loader, shapes10
from fdino.data.decoded_cache import DecodeCacheOptions


def write_jpeg_folder(root: Path, n: int, size: int) -> float:
    """``n`` shapes10 training images of ``size`` px as JPEGs under ``root/<class>/``; seconds taken."""
    t0 = time.perf_counter()
    data = shapes10("train", n=n, size=size, seed=0)
    for name in data.classes:
        (root / name).mkdir(parents=True)
    for i in range(n):
        image, label = data[i]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / data.classes[label] / f"{i:05d}.jpg", quality=90)
    return time.perf_counter() - t0


@contextlib.contextmanager
def loader_steps(cfg, dataset, workers: int):
    """``multicrop_loader(...).steps()``; on exit its persistent worker processes are stopped, so that
    they do not compete with the next measurement."""
    loader = multicrop_loader(cfg, dataset, num_workers=workers)
    batches = loader.steps()
    try:
        yield batches
    finally:
        batches.close()
        del batches, loader
        gc.collect()


def measure_input(cfg, dataset, *, workers: int, warmup: int, steps: int, state=None) -> float:
    """Images/s of the loader alone (``state`` None) or of the loader feeding the compiled step."""
    metrics = None
    with loader_steps(cfg, dataset, workers) as batches:
        for k in range(warmup + steps):
            if k == warmup:  # worker start-up, the cache's first pages and a full prefetch queue are behind
                if metrics is not None:
                    float(metrics["loss"])  # wait for the warm-up steps
                t0 = time.perf_counter()
            _, _, crops, _ = next(batches)
            if state is not None:
                state, metrics = fdino.train_step(state, crops)
        if metrics is not None:
            float(metrics["loss"])  # wait for the last step
        return round(steps * cfg.batch_size / (time.perf_counter() - t0), 1)


def loader_cpu_ms(cfg, dataset, *, warmup: int, steps: int) -> float:
    """CPU milliseconds per image of the loader's work (decode or cache read, then the multi-crop), done
    in this process (no workers). CPU time leaves out the waits for a core that a busy neighbour holds,
    so unlike images/s it says what the work costs even on a shared machine."""
    with loader_steps(cfg, dataset, 0) as batches:
        for _ in range(warmup):
            next(batches)
        t0 = time.process_time()
        for _ in range(steps):
            next(batches)
        return round(1000 * (time.process_time() - t0) / (steps * cfg.batch_size), 3)


def measure_cpu_cost(name: str, folders: dict[int, Path], tmp: Path, args: argparse.Namespace) -> dict:
    """``--repeats`` interleaved rounds of `loader_cpu_ms` with the cache off and on, per folder."""
    cfg = fdino.presets.preset(name, batch_size=args.batch_size)
    rows = {}
    for px, root in folders.items():
        runs = {"off": [], "on": []}
        for _ in range(args.repeats):
            for cache, r in runs.items():
                options = DecodeCacheOptions(mode=cache, directory=str(tmp / f"cache-{px}"))
                dataset = build_dataset(root, image_size=cfg.global_crop_size, decode_cache=options).dataset
                r.append(loader_cpu_ms(cfg, dataset, warmup=args.warmup, steps=args.steps))
                print(f"{name} {px} px JPEGs, cache {cache}: {r[-1]} CPU ms/image", flush=True)
        best = {cache: min(r) for cache, r in runs.items()}  # the least disturbed run
        rows[f"{px} px"] = {
            **{f"cache_{c}_ms": {"best": best[c], "median": statistics.median(r), "runs": r} for c, r in runs.items()},
            "off_over_on": round(best["off"] / best["on"], 2),
        }
    return {
        "crops": f"{cfg.n_global_crops} x {cfg.global_crop_size} px + {cfg.n_local_crops} x {cfg.local_crop_size} px",
        "rows": rows,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _summary(values: list[float]) -> dict:
    """Best (the least disturbed run, as timeit reports) and median of repeated images/s."""
    return {"best": max(values), "median": round(statistics.median(values), 1), "runs": values}


def measure_preset(name: str, folders: dict[int, Path], tmp: Path, args: argparse.Namespace) -> dict:
    """Step alone, then per folder ``--repeats`` rounds of (cache off, cache on) x (loader alone, loop)."""
    cfg = fdino.presets.preset(name, batch_size=args.batch_size, precision="fp32")
    steps = [measure(fdino.train_step, cfg, "cpu", 3, args.steps) for _ in range(args.repeats)]  # 1st compiles
    step_alone = {**_summary([s["images_per_s"] for s in steps]), "compile_and_warmup_s": steps[0]["warmup_s"]}
    print(f"{name}: step alone {step_alone}", flush=True)
    state = fdino.init_state(cfg, device="cpu")
    kw = dict(workers=args.workers, warmup=args.warmup, steps=args.steps)
    rows = {}
    for px, root in folders.items():
        runs = {
            cache: {"build_s": [], "loader_alone": [], "loader_and_step": [], "load_avg": []} for cache in ("off", "on")
        }
        for _ in range(args.repeats):  # interleaved, so that both settings meet the same neighbours
            for cache, r in runs.items():
                options = DecodeCacheOptions(mode=cache, directory=str(tmp / f"cache-{name}-{px}"))
                t0 = time.perf_counter()
                dataset = build_dataset(root, image_size=cfg.global_crop_size, decode_cache=options).dataset
                r["build_s"].append(round(time.perf_counter() - t0, 2))
                r["loader_alone"].append(measure_input(cfg, dataset, **kw))
                r["loader_and_step"].append(measure_input(cfg, dataset, **kw, state=state))
                r["load_avg"].append(round(os.getloadavg()[0], 2))
                print(f"{name} {px} px JPEGs, cache {cache}: { ({k: v[-1] for k, v in r.items()}) }", flush=True)
        for cache, r in runs.items():
            rows[f"{px} px, cache {cache}"] = {
                "first_build_s": r["build_s"][0],
                "later_build_s": max(r["build_s"][1:], default=None),
                "loader_alone": _summary(r["loader_alone"]),
                "loader_and_step": _summary(r["loader_and_step"]),
                "load_avg_1min": r["load_avg"],
            }
    ratios = {}
    for px in folders:
        off, on = rows[f"{px} px, cache off"], rows[f"{px} px, cache on"]
        ratios[f"{px} px"] = {
            "loop_on_over_off": round(on["loader_and_step"]["best"] / off["loader_and_step"]["best"], 2),
            "loop_off_over_step": round(off["loader_and_step"]["best"] / step_alone["best"], 2),
            "loop_on_over_step": round(on["loader_and_step"]["best"] / step_alone["best"], 2),
        }
    crops = f"{cfg.n_global_crops} x {cfg.global_crop_size} px + {cfg.n_local_crops} x {cfg.local_crop_size} px"
    return {"arch": cfg.arch, "crops": crops, "step_alone": step_alone, "rows": rows, "ratios_of_best": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small32_resnet", "small32"])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cpu-cost", action="store_true", help="measure only the loader's CPU ms per image (input-cpu-cost.*)"
    )
    args = parser.parse_args()
    record = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads, nice {os.nice(0)}",
        "torch": torch.__version__,
        "args": vars(args),
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
        "presets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folders = {px: Path(tmp) / f"jpeg{px}" for px in args.sizes}
        for px, root in folders.items():
            print(f"writing {args.images} {px} px JPEGs: {write_jpeg_folder(root, args.images, px):.1f} s", flush=True)
        for name in args.presets:
            measured = measure_cpu_cost if args.cpu_cost else measure_preset
            record["presets"][name] = measured(name, folders, Path(tmp), args)
    (write_cpu_cost if args.cpu_cost else write_results)(record, args)


def write_results(record: dict, args: argparse.Namespace) -> None:
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / "input-cpu"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Input pipeline against the training step (CPU)",
        "",
        f"Machine: {record['machine']}; torch {record['torch']}. **Shared machine**: another engineer's "
        "timing runs used the same 2 cores and this ran at the lowest priority (nice 19), so every number is "
        "a lower bound and the runs scatter (1-minute load averages are in the .json). Each setting ran "
        f"{args.repeats} times, interleaved (cache off, cache on, off, on, ...) so that both met the same "
        "neighbours; the tables give the best run (the least disturbed, as timeit reports) and the median. "
        f"Measured by `nice -n 19 python bench/bench_input.py --images {args.images} --sizes "
        f"{' '.join(map(str, args.sizes))} --workers {args.workers} --steps {args.steps} --warmup {args.warmup} "
        f"--repeats {args.repeats}`: {args.images} shapes10 images written as JPEG files (quality 90), batch "
        f"{args.batch_size}, {args.workers} loader worker processes, {args.steps} timed batches after {args.warmup}.",
        "",
        "images/s. *loader alone*: the main process only takes batches; *step alone*: the compiled step on "
        "random crops; *loader + step*: the training loop. *cache off* decodes every JPEG on every access "
        "(before); *cache on* reads the decoded pixels from the memory-mapped cache (after). *first build*: "
        "`build_dataset`'s time, for *cache on* including the one-time decode into an empty cache folder; "
        "*later build*: the same call finding the cache.",
        "",
    ]
    for name, p in record["presets"].items():
        step = p["step_alone"]
        lines += [
            f"## {name} ({p['arch']}; {p['crops']})",
            "",
            f"Step alone: best **{step['best']}**, median {step['median']} images/s.",
            "",
            "| JPEG folder | first build (s) | later build (s) | loader alone, best (median) | "
            "loader + step, best (median) | loop / step alone (best) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for key, r in p["rows"].items():
            la, ls = r["loader_alone"], r["loader_and_step"]
            lines.append(
                f"| {key} | {r['first_build_s']} | {r['later_build_s']} | {la['best']} ({la['median']}) | "
                f"{ls['best']} ({ls['median']}) | {round(ls['best'] / step['best'], 2)} |"
            )
        lines += [
            "",
            "Loop throughput, cache on / cache off (best runs): "
            + ", ".join(f"{px} JPEGs **{r['loop_on_over_off']}x**" for px, r in p["ratios_of_best"].items()),
            "",
        ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def write_cpu_cost(record: dict, args: argparse.Namespace) -> None:
    stem = RESULTS / "input-cpu-cost"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# The loader's CPU cost per image, decode cache off and on (CPU)",
        "",
        f"Machine: {record['machine']}; torch {record['torch']}. Shared with another engineer's timing runs "
        "(this ran at nice 19), which is why this measures CPU time, not images/s: CPU time leaves out the "
        "waits for a core a neighbour holds (cache and memory contention still add some). "
        f"Measured by `nice -n 19 python bench/bench_input.py --cpu-cost --images {args.images} --sizes "
        f"{' '.join(map(str, args.sizes))} --steps {args.steps} --warmup {args.warmup} --repeats {args.repeats}`: "
        f"{args.images} shapes10 images as JPEG files (quality 90); the loader of each preset's crops, batch "
        f"{args.batch_size}, run in the main process (no workers); {args.steps} timed batches after "
        f"{args.warmup}; {args.repeats} rounds, cache off and on interleaved; best (least disturbed) and median.",
        "",
        "CPU ms per image: file decode (cache off) or cache read (cache on), then the multi-crop augmentation.",
        "",
        "| preset (crops) | JPEG folder | cache off, best (median) | cache on, best (median) | off / on |",
        "|---|---|---:|---:|---:|",
    ]
    for name, p in record["presets"].items():
        for px, r in p["rows"].items():
            off, on = r["cache_off_ms"], r["cache_on_ms"]
            lines.append(
                f"| {name} ({p['crops']}) | {px} | {off['best']} ({off['median']}) | {on['best']} ({on['median']}) "
                f"| **{r['off_over_on']}x** |"
            )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
