"""What the training job shows while and after it runs: k-NN of the teacher, metric logs, the
final summary, the loss / k-NN curves and attention maps. I/O lives here, not in the step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from .checkpoint import backbone_weights
from .config import DinoConfig
from .models import create_backbone, is_vit
from .state import TrainState


def _evenly_spaced(dataset: Dataset, n: int) -> Dataset:
    """A deterministic subset of ``n`` items spread over the whole data set (all classes present)."""
    if n <= 0 or n >= len(dataset):
        return dataset
    step = len(dataset) / n
    return Subset(dataset, [int(i * step) for i in range(n)])


def _has_labels(dataset: Dataset) -> bool:
    probe = [dataset[i][1] for i in range(min(len(dataset), 8))]
    return bool(probe) and all(int(label) >= 0 for label in probe)


@dataclass
class EvalSets:
    """Labeled memory bank and queries for k-NN, and a backbone module to load weights into."""

    memory: Dataset | None
    query: Dataset | None
    backbone: torch.nn.Module
    transform: Any
    k: int
    device: torch.device
    num_classes: int
    note: str = ""

    @property
    def labeled(self) -> bool:
        return self.memory is not None and self.query is not None

    @classmethod
    def build(cls, opts, cfg: DinoConfig, device: torch.device) -> "EvalSets":
        from .data import EvalTransform, build_dataset

        backbone = create_backbone(cfg.replace(grad_checkpointing=False), drop_path_rate=0.0).to(device).eval()
        transform = EvalTransform(cfg.global_crop_size)
        memory = query = None
        num_classes, note = 0, "no labels: k-NN skipped"
        build = lambda split: build_dataset(opts.data, root=opts.data_root, split=split,  # noqa: E731
                                            image_size=cfg.global_crop_size)
        try:
            mem_src = build("memory")
        except ValueError:
            mem_src = None  # e.g. a flat folder: nothing labeled to evaluate on
        if mem_src is not None and _has_labels(mem_src.dataset):
            try:
                mem, qry = mem_src.dataset, build("query").dataset
                note = "memory bank: train split, queries: held-out split"
            except ValueError:
                # A labeled folder without val/ or test/: every 5th image becomes a query. Training
                # still sees every image (without labels), as on ImageNet's train split.
                idx = range(len(mem_src.dataset))
                mem = Subset(mem_src.dataset, [i for i in idx if i % 5])
                qry = Subset(mem_src.dataset, [i for i in idx if not i % 5])
                note = "labeled folder without a val/ split: every 5th image is a k-NN query"
            if _has_labels(qry):
                memory = _evenly_spaced(mem, opts.eval_samples)
                query = _evenly_spaced(qry, opts.eval_samples // 2 if opts.eval_samples else 0)
                num_classes = mem_src.num_classes
        return cls(memory, query, backbone, transform, opts.knn_k, device, num_classes, note)

    def features(self, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        from .eval.features import extract_features

        return extract_features(self.backbone, dataset, batch_size=256, device=self.device, transform=self.transform)

    def raw_pixel_knn(self) -> float:
        from .eval.features import raw_pixel_knn

        result = raw_pixel_knn(self.memory, self.query, ks=(self.k,), num_classes=self.num_classes or None)
        return result[self.k]["top1"]


def evaluate_knn(evals: EvalSets, state: TrainState, which: str = "teacher") -> float:
    """Weighted k-NN top-1 (%) of the teacher's (or student's) backbone features."""
    from .eval.knn import knn_classify

    evals.backbone.load_state_dict(backbone_weights(state, which), strict=True)
    bank, bank_labels = evals.features(evals.memory)
    queries, query_labels = evals.features(evals.query)
    result = knn_classify(bank, bank_labels, queries, query_labels, ks=(evals.k,),
                          num_classes=evals.num_classes or None)
    return result[evals.k]["top1"]


class MetricsLog:
    """metrics.jsonl (one JSON object per log step) and TensorBoard scalars, rank 0 only."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, purge_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events a killed run logged after its last checkpoint.
                self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step or None)

    def write(self, step: int, epoch: int, values: dict[str, float], *, images_per_s: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "epoch": epoch, "time": time.time(), "images_per_s": images_per_s, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            self.writer.add_scalar("train/images_per_s", images_per_s, step)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def event(self, kind: str, message: str) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": kind, "message": message, "time": time.time()}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if "step" in r]


def save_curves(run_dir: Path, history: list[dict[str, Any]], records: list[dict[str, Any]]) -> Path:
    """loss (left) and k-NN top-1 (right) against the step, as curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 3.8))
    # A resumed run may have logged steps past its last checkpoint before dying: keep the last write.
    by_step = {r["step"]: r for r in records}
    steps = sorted(by_step)
    ax_loss.plot(steps, [by_step[s]["loss"] for s in steps], color="tab:blue")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("DINO loss")
    ax_loss.set_title("training loss")
    if history:
        ax_knn.plot([h["step"] for h in history], [h["knn_top1"] for h in history], "o-", color="tab:green")
    ax_knn.set_xlabel("step")
    ax_knn.set_ylabel("k-NN top-1 (%)")
    ax_knn.set_title("teacher k-NN")
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_attention(run_dir: Path, evals: EvalSets, state: TrainState, n_images: int) -> Path | None:
    """Attention maps of the trained teacher on the first query images (ViT backbones only)."""
    if n_images <= 0 or evals is None or not is_vit(evals.backbone) or evals.query is None:
        return None
    from .eval.attention import save_attention_grid

    evals.backbone.load_state_dict(backbone_weights(state, "teacher"), strict=True)
    images = torch.stack([evals.transform(evals.query[i][0]) for i in range(min(n_images, len(evals.query)))])
    return save_attention_grid(evals.backbone, images.to(evals.device), run_dir / "attention" / "teacher.png",
                               mean=evals.transform.mean, std=evals.transform.std)


def finish_report(run_dir: Path, cfg: DinoConfig, opts, state: TrainState, loop: dict[str, Any], evals: EvalSets | None,
                  timing: dict[str, Any], *, skipped: dict[str, str], last_metrics: dict[str, float]) -> dict[str, Any]:
    """Final k-NN, curves, attention maps, summary.json, and the printed summary."""
    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "data": opts.data, "arch": cfg.arch, "steps": int(state.step),
        "total_steps": cfg.total_steps, "images_seen": loop.get("images", 0), "wall_time_s": round(loop["elapsed"], 1),
        "first_step_s": timing["first_step_s"], "images_per_s": round(timing["steady_images_per_s"], 1),
        "skipped_files": len(skipped), "final_loss": last_metrics.get("loss"),
        "collapse_warning": loop.get("collapse_warning"),
    }
    if evals is not None and evals.labeled:
        final = evaluate_knn(evals, state)
        if not loop["history"] or loop["history"][-1]["step"] != int(state.step):
            loop["history"].append({"step": int(state.step), "knn_top1": final})
        summary.update(knn_k=opts.knn_k, knn_top1_teacher=final, knn_top1_init=loop.get("knn_init"),
                       knn_top1_raw_pixels=loop.get("knn_raw_pixels"), knn_eval_images=len(evals.query),
                       knn_split=evals.note, knn_history=list(loop["history"]))
    summary["curves"] = str(save_curves(run_dir, loop["history"], read_metrics(run_dir)))
    attention = save_attention(run_dir, evals, state, opts.attention_images)
    summary["attention"] = str(attention) if attention else None
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary, skipped))
    return summary


def format_summary(summary: dict[str, Any], skipped: dict[str, str]) -> str:
    lines = [
        "",
        f"fdino run summary ({summary['run_dir']})",
        f"  data {summary['data']}, backbone {summary['arch']}: {summary['steps']}/{summary['total_steps']} steps, "
        f"{summary['images_seen']} images, {summary['wall_time_s']} s",
        f"  speed: {summary['images_per_s']} images/s after the first step "
        f"(first step incl. compilation: {summary['first_step_s'] or 0:.1f} s)",
    ]
    if summary.get("knn_top1_teacher") is not None:
        k = summary["knn_k"]
        lines.append(
            f"  {k}-NN top-1 on {summary['knn_eval_images']} held-out images: teacher {summary['knn_top1_teacher']:.2f}% | "
            f"same network at init {summary['knn_top1_init']:.2f}% | raw pixels {summary['knn_top1_raw_pixels']:.2f}%")
    lines.append(f"  skipped files: {summary['skipped_files']}")
    for path, reason in list(skipped.items())[:5]:
        lines.append(f"    {path}: {reason}")
    if summary.get("collapse_warning"):
        lines.append(f"  {summary['collapse_warning']}")
    lines.append(f"  curves: {summary['curves']}" + (f", attention maps: {summary['attention']}" if summary['attention'] else ""))
    return "\n".join(lines)
