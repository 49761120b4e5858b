"""The run's record: metrics.jsonl and the trackers (TensorBoard, MLflow, W&B) while it trains;
curves.png, summary.json and the printed summary when it ends. Rank 0 writes; nothing here
evaluates a model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import DinoConfig
from .loop_state import LoopState, StepTimer, knn_record
from .trackers import Tracker


class MetricsLog:
    """metrics.jsonl (one JSON object per log step) and the run's trackers (fdino.trackers), rank 0 only.

    The trackers are made by the training job with their config already logged; this passes them the
    metrics of each log step and the final files, and closes them.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, trackers: Sequence[Tracker] = ()) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.trackers = list(trackers) if enabled else []
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, epoch: int, values: dict[str, float], *, images_per_s: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "epoch": epoch, "time": time.time(), "images_per_s": images_per_s, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"train/{name}": value for name, value in values.items()}
        scalars["train/images_per_s"] = images_per_s
        for tracker in self.trackers:
            tracker.log_metrics(scalars, step)

    def scalar(self, name: str, value: float, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_metrics({name: value}, step)

    def event(self, kind: str, message: str) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": kind, "message": message, "time": time.time()}) + "\n")

    def snapshot(self, snapshot) -> None:
        """An evaluation's snapshot (`fdino.train_eval.Snapshot`, None: none taken) to the trackers that take
        images and embeddings; trackers without those optional methods skip it."""
        if snapshot is None:
            return
        for tracker in self.trackers:
            if hasattr(tracker, "log_image"):
                for tag, path in snapshot.images.items():
                    tracker.log_image(tag, path, snapshot.step)
            if hasattr(tracker, "log_embedding"):
                tracker.log_embedding("teacher", snapshot.features, snapshot.labels, snapshot.thumbnails, snapshot.step)

    def artifacts(self, paths: Sequence[Path]) -> None:
        """The run's final files (curves, summary, attention maps) to every tracker."""
        for path in paths:
            for tracker in self.trackers:
                tracker.log_artifact(path)

    def close(self, *, failed: bool = False) -> None:
        """Close the trackers once (``failed``: the run stopped on an error); later calls do nothing."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed=failed)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The step records of metrics.jsonl (events left out), in the order written."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if "step" in r]


def save_curves(run_dir: Path, history: list[dict[str, Any]], records: list[dict[str, Any]]) -> Path:
    """loss (left) and k-NN top-1 (right) against the step, as curves.png; with an online linear probe, its
    held-out top-1 at the evaluations and its running training top-1 at the log steps join the k-NN."""
    import matplotlib  # noqa: PLC0415  (slow import, only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (after choosing the headless backend)

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
    probe = [h for h in history if h.get("probe_top1") is not None]
    train_probe = [s for s in steps if by_step[s].get("probe_train_top1") is not None]
    if probe or train_probe:
        ax_knn.plot([h["step"] for h in probe], [h["probe_top1"] for h in probe], "s-", color="tab:purple")
        ax_knn.plot(train_probe, [by_step[s]["probe_train_top1"] for s in train_probe], ":", color="tab:purple")
        ax_knn.legend(["k-NN (held-out)", "linear probe (held-out)", "linear probe (training, running)"], fontsize=7)
    ax_knn.set_xlabel("step")
    ax_knn.set_ylabel("top-1 (%)" if probe or train_probe else "k-NN top-1 (%)")
    ax_knn.set_title("teacher k-NN and online linear probe" if probe or train_probe else "teacher k-NN")
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# The per-evaluation pictures fdino.train_eval.evaluate_and_snapshot writes (listed in summary.json).
SNAPSHOTS = {
    "embeddings": "embeddings/step-*.png",
    "embeddings_tsne": "embeddings/tsne/step-*.png",
    "attention_steps": "attention/step-*.png",
}


def _stepped(run_dir: Path, pattern: str) -> list[tuple[int, Path]]:
    """(step, path) of the ``step-N.png`` files matching ``pattern``, in step order (numeric: 2 before 10)."""
    found = ((p.stem.removeprefix("step-"), p) for p in run_dir.glob(pattern))
    return sorted((int(n), p) for n, p in found if n.isdigit())


def snapshot_files(run_dir: Path) -> dict[str, list[str]]:
    """The snapshots in a run folder by kind (the keys of SNAPSHOTS), in step order.

    Read from the folder, not from this process's evaluations, so a resumed run lists the earlier ones too."""
    return {key: [str(p) for _, p in _stepped(run_dir, pattern)] for key, pattern in SNAPSHOTS.items()}


def remove_snapshots(run_dir: Path, *, after: int = -1) -> None:
    """Delete the snapshots of steps past ``after``: all of them when a run starts over in its folder, those
    a killed run wrote after its last checkpoint when it is resumed (as TensorBoard purges its events)."""
    for pattern in SNAPSHOTS.values():
        for step, path in _stepped(run_dir, pattern):
            if step > after:
                path.unlink()


def finish_report(
    run_dir: Path,
    cfg: DinoConfig,
    opts,
    loop: LoopState,
    timer: StepTimer,
    *,
    knn_queries: int | None,
    knn_split: str,
    attention: Path | None,
    skipped: dict[str, str],
    last_metrics: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Curves, summary.json and the printed summary of a finished run; returns the summary.

    The embedding and attention snapshots are listed from the run folder (``embeddings/step-N.png``,
    ``embeddings/tsne/step-N.png``, ``attention/step-N.png``, in step order), so a resumed run lists
    the ones written before it too.
    ``extra``: more keys for summary.json (a batched run records how many variants shared its steps).
    ``knn_queries``: held-out images of the k-NN evaluation (None: none ran; then the k-NN keys are
    absent), whose final reading is the last of ``loop.knn_history``.
    """
    history = [knn_record(r) for r in loop.knn_history]
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": opts.data,
        "arch": cfg.arch,
        "steps": loop.step,
        "total_steps": cfg.total_steps,
        "images_seen": loop.images,
        "wall_time_s": round(loop.elapsed, 1),
        "first_step_s": timer.first_step_s,
        "images_per_s": round(timer.images_per_s(cfg.batch_size), 1),
        "skipped_files": len(skipped),
        "final_loss": last_metrics.get("loss"),
        "collapse_warning": loop.collapse_warning,
        **(extra or {}),
    }
    if knn_queries is not None:
        summary.update(
            knn_k=opts.knn_k,
            knn_top1_teacher=history[-1]["knn_top1"],
            knn_top1_init=loop.knn_init,
            knn_top1_raw_pixels=loop.knn_raw_pixels,
            knn_eval_images=knn_queries,
            knn_split=knn_split,
            knn_history=history,
        )
        if history[-1].get("probe_top1") is not None:
            summary["probe_top1"] = history[-1]["probe_top1"]
    summary["curves"] = str(save_curves(run_dir, history, read_metrics(run_dir)))
    summary["attention"] = str(attention) if attention else None
    summary.update(snapshot_files(run_dir))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary, skipped))
    return summary


def format_summary(summary: dict[str, Any], skipped: dict[str, str]) -> str:
    """The summary as the few lines printed at the end of a run."""
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
            f"  {k}-NN top-1 on {summary['knn_eval_images']} held-out images: "
            f"teacher {summary['knn_top1_teacher']:.2f}% | "
            f"same network at init {summary['knn_top1_init']:.2f}% | raw pixels {summary['knn_top1_raw_pixels']:.2f}%"
        )
    if summary.get("probe_top1") is not None:
        lines.append(f"  online linear probe top-1 on the same held-out images: {summary['probe_top1']:.2f}%")
    if summary.get("budget"):
        b = summary["budget"]
        lines.append(
            f"  budget {b['budget']}: {b['job_wall_s']} s in this process, {100 * b['schedule_completed']:.0f}% of the "
            f"{b['schedule_steps']}-step schedule done"
        )
    if summary.get("precision"):
        lines.append(f"  precision: {summary['precision']}")
    if summary.get("compile"):
        lines.append(f"  {summary['compile']['note']} (inductor cache {summary['compile']['cache_dir']})")
    lines.append(f"  skipped files: {summary['skipped_files']}")
    for path, reason in list(skipped.items())[:5]:
        lines.append(f"    {path}: {reason}")
    if summary.get("collapse_warning"):
        lines.append(f"  {summary['collapse_warning']}")
    lines.append(
        f"  curves: {summary['curves']}" + (f", attention maps: {summary['attention']}" if summary["attention"] else "")
    )
    snapshots = [
        f"{len(summary[key])} {what} in {Path(summary[key][0]).parent}"
        for key, what in (("embeddings", "PCA"), ("embeddings_tsne", "t-SNE"), ("attention_steps", "attention"))
        if summary.get(key)
    ]
    if snapshots:
        lines.append("  snapshots per evaluation: " + ", ".join(snapshots))
    return "\n".join(lines)
