"""Does pretraining pay off? DINO teachers against the supervised baseline at equal budgets in minutes.

For each pretraining seed i (a run folder of `fdino train`, or of a sweep's per-seed runs, which are
the same runs), `fdino.finetune.fewshot` measures k-NN, the linear probe and fine-tuning of its
teacher on label draw i, and the same backbone trained from scratch on the same labels. The
supervised baseline trains for the fine-tune's steps plus the pretraining's wall time in its own
measured steps (`matched_supervised_steps`), so pretraining + fine-tuning and the baseline cost the
same minutes on this machine. Rows are saved per seed as they finish (rerunning skips finished
seeds), then merged into fewshot.md / .json / .png in --out.

    python bench/pretraining_pays_off.py --data shapes10 --pretrain-seconds 290 \
        --runs runs/a/seed-0 runs/a/seed-1 runs/a/seed-2 --out bench/results/pretraining-pays-off-shapes10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from fdino.data import build_dataset
from fdino.finetune.fewshot import (
    FewshotConfig,
    dataset_labels,
    fewshot,
    matched_supervised_steps,
    save_fewshot,
    summarize,
)
from fdino.weights import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--runs", nargs="+", required=True, help="pretrained run folders, one per seed (seed i: draw i)")
    p.add_argument("--pretrain-seconds", type=float, required=True, help="wall time of one pretraining run")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = load_model(args.runs[0])
    train = build_dataset(args.data, split="memory", image_size=first.image_size).dataset
    test = build_dataset(args.data, split="query", image_size=first.image_size).dataset
    base = FewshotConfig(fractions=tuple(args.fractions), draws=1, steps=args.steps)
    budget_file = out / "budget.json"
    if budget_file.exists():
        budget = json.loads(budget_file.read_text())
    else:
        sup_steps = matched_supervised_steps(first.cfg, train, base, args.pretrain_seconds)
        budget = {
            "pretrain_seconds": args.pretrain_seconds,
            "finetune_steps": args.steps,
            "supervised_steps": sup_steps,
        }
        budget_file.write_text(json.dumps(budget, indent=2) + "\n")
    print(f"{args.data}: {len(train)} train / {len(test)} test images; budget {budget}", flush=True)
    rows = []
    for draw, run in enumerate(args.runs):
        done = out / f"rows-seed-{draw}.json"
        if not done.exists():
            started = time.perf_counter()
            cfg = dataclasses.replace(base, first_draw=draw, supervised_steps=budget["supervised_steps"])
            result = fewshot(
                load_model(run), train, test, cfg, on_row=lambda r, d=draw: print(f"  seed {d}: {r}", flush=True)
            )
            mine = [r | {"run": str(run)} for r in result["rows"]]
            done.write_text(json.dumps(mine, indent=2) + "\n")
            print(f"seed {draw} ({run}) done in {time.perf_counter() - started:.0f} s", flush=True)
        rows += json.loads(done.read_text())
    result = {
        "rows": rows, "summary": summarize(rows), "config": dataclasses.asdict(base), "budget": budget,
        "runs": [str(r) for r in args.runs], "num_classes": int(dataset_labels(train).max()) + 1,
    }  # fmt: skip
    save_fewshot(out, result, f"Does pretraining pay off? {args.data}, DINO teachers of {len(args.runs)} seeds")
    print((out / "fewshot.md").read_text())


if __name__ == "__main__":
    main()
