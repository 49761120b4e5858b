"""Recipe probe: one short training run of a preset variant, read the way `make demo` reads it.

    python bench/recipe_probe.py '{"out_dim": 4096}' [--preset small32_resnet] [--seed 0]
                                 [--steps 0] [--objective dino|contrastive] [--threads 1]

Why: issue 4 asks the demo's teacher to beat raw pixels on shapes10; the variants measured so far
are in `bench/results/demo-recipes-cpu.md`, all with this protocol: `fdino.train.run` with the
eager step, one loader worker, the preset's schedules (13 epochs of shapes10 for the demo preset),
weighted 20-NN on 1,000 held-out images against a 2,000-image train bank. Prints one JSON line
with the k-NN top-1 of the network at init, the teacher, the student and raw pixels, and the last
logged step's collapse diagnostics (teacher entropy, dimensions in use, KL, loss) as "final".

``--objective contrastive`` is a control, not a feature of fdino: it keeps the network, crops,
optimizer, schedules, teacher EMA and evaluation, and swaps only the DINO loss for NT-Xent
(SimCLR's loss, temperature 0.2) between the head outputs of each image's two global crops. When
it learns within a budget and DINO does not, the network and the data are not what holds DINO
back at that budget; it does not tell a ceiling from a late start (on shapes10 DINO's k-NN rises
only after ~1,000 steps; see the results file). Run two probes at a time with ``--threads 1``
each on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fdino.objective
from fdino import presets
from fdino.checkpoint import load_checkpoint
from fdino.config import DinoConfig
from fdino.run_log import read_metrics
from fdino.train import TrainOptions, run
from fdino.train_eval import EvalSets, evaluate_knn

CONTRASTIVE_TEMPERATURE = 0.2


def nt_xent_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    *,
    student_temp,
    teacher_temp,
    n_global_crops: int = 2,
    impl: str = "auto",
):
    """NT-Xent over the first two crops, with `fdino.loss.dino_loss`'s signature and outputs.

    Rows ``[0, B)`` and ``[B, 2B)`` of ``student_logits`` are the two global crops of B images;
    each row's positive is the other crop of its image, its negatives the other 2B - 2 rows.
    The batch center is still returned (the step keeps updating it; nothing reads it here).
    """
    del center, student_temp, teacher_temp, impl
    b = teacher_logits.shape[0] // n_global_crops
    z = F.normalize(student_logits[: 2 * b].float(), dim=-1)
    sim = (z @ z.T) / CONTRASTIVE_TEMPERATURE
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=sim.device), float("-inf"))
    positive = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(sim.device)
    return F.cross_entropy(sim, positive), teacher_logits.float().mean(dim=0)


@contextlib.contextmanager
def objective(name: str):
    """The step's objective (`fdino.objective`) reads `dino_loss` from its module at call time: swap it there."""
    if name == "dino":
        yield
        return
    original = fdino.objective.dino_loss
    fdino.objective.dino_loss = nt_xent_loss
    try:
        yield
    finally:
        fdino.objective.dino_loss = original


DIAGNOSTICS = ("teacher_entropy", "teacher_effective_dims", "kl", "loss")


def last_diagnostics(run_dir: Path) -> dict:
    """The collapse diagnostics of the last logged step (a soft teacher, entropy near log K, teaches little)."""
    rows = [r for r in read_metrics(run_dir) if "teacher_entropy" in r]
    return {k: round(rows[-1][k], 3) for k in DIAGNOSTICS if k in rows[-1]} if rows else {}


def probe(
    overrides: dict,
    *,
    preset: str = "small32_resnet",
    steps: int = 0,
    name: str = "dino",
    eval_every: int = 100,
    eval_samples: int = 2000,
    run_dir: str | None = None,
) -> dict:
    """Train one variant eagerly and return its k-NN numbers (percent) and wall time."""
    # from_dict turns JSON lists into tuples and names unknown fields.
    cfg = DinoConfig.from_dict({**presets.preset(preset).to_dict(), **overrides})
    with contextlib.ExitStack() as stack:
        folder = run_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="fdino-probe-"))
        opts = TrainOptions(
            data="shapes10",
            run_dir=folder,
            compile=False,
            workers=1,
            log_every=50,
            ckpt_every=10**6,
            max_steps=steps,
            eval_every=eval_every,
            eval_samples=eval_samples,
            progress=False,
            tensorboard=False,
            attention_images=0,
        )
        started = time.perf_counter()
        with objective(name):
            summary = run(cfg, opts, overwrite=True)
        state, _ = load_checkpoint(folder)
        student = evaluate_knn(EvalSets.build(opts, cfg, torch.device("cpu")), state, "student")
        final = last_diagnostics(Path(folder))
    return {
        "objective": name,
        "overrides": overrides,
        "steps": summary["steps"],
        "init": summary["knn_top1_init"],
        "teacher": summary["knn_top1_teacher"],
        "student": student,
        "raw_pixels": summary["knn_top1_raw_pixels"],
        "history": summary["knn_history"],
        "final": final,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="?", default="{}", help="JSON object of DinoConfig overrides")
    parser.add_argument("--preset", default="small32_resnet")
    parser.add_argument("--seed", type=int, default=None, help="shortcut for the 'seed' override")
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: the whole schedule)")
    parser.add_argument("--objective", choices=("dino", "contrastive"), default="dino")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    overrides = json.loads(args.overrides)
    if not isinstance(overrides, dict):
        sys.exit("overrides must be a JSON object, e.g. '{\"out_dim\": 4096}'")
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(probe(overrides, preset=args.preset, steps=args.steps, name=args.objective)))


if __name__ == "__main__":
    main()
