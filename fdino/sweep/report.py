"""A sweep's report: results.json, results.md, curves.png and (2-D grids) heatmap.png.

Everything is read back from the run folders (summary.json, metrics.jsonl), so a report can be
rebuilt at any time from what is on disk; the numbers are means +- sample standard deviations
over the seeds of each variant.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..diagnostics import collapse_mode
from ..run_log import read_metrics
from .spec import STUDIES, SweepSpec, Variant

_END = ("teacher_entropy", "kl", "teacher_effective_dims")


def mean_std(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _run_record(run_dir: Path, out_dim: int) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    metrics = read_metrics(run_dir)
    last = metrics[-1] if metrics else {}
    history = summary.get("knn_history") or []
    return {
        "run_dir": str(run_dir),
        "steps": summary.get("steps"),
        # A --budget run: the share of its fitted schedule it finished (1.0 unless stopped on time).
        "schedule_completed": (summary.get("budget") or {}).get("schedule_completed"),
        "knn_final": summary.get("knn_top1_teacher"),
        "knn_best": max((h["knn_top1"] for h in history), default=None),
        "knn_init": summary.get("knn_top1_init"),
        "knn_raw_pixels": summary.get("knn_top1_raw_pixels"),
        "knn_history": history,
        "images_per_s": summary.get("images_per_s"),
        "wall_time_s": summary.get("wall_time_s"),
        "batched_variants": summary.get("batched_variants", 1),
        "collapse": collapse_mode(last, out_dim) if last else None,
        **{f"{k}_end": last.get(k) for k in _END},
        "diagnostics": [{"step": r["step"], **{k: r.get(k) for k in _END}} for r in metrics],
    }


def summarize(spec: SweepSpec, runs: list[tuple[Variant, int, Path]]) -> dict[str, Any]:
    """results.json's content: per run and per variant (mean +- std over seeds), plus baselines."""
    out_dims = {v.name: cfg.out_dim for v, _, cfg, _ in spec.runs()}
    variants: dict[str, dict[str, Any]] = {v.name: {"overrides": dict(v.overrides), "runs": {}} for v in spec.variants}
    for variant, seed, run_dir in runs:
        record = _run_record(run_dir, out_dims[variant.name])
        if record is not None:
            variants[variant.name]["runs"][str(seed)] = record
    for entry in variants.values():
        records = list(entry["runs"].values())
        keys = ("knn_final", "knn_best", "steps", "schedule_completed", "images_per_s", "wall_time_s")
        for key in (*keys, *(f"{k}_end" for k in _END)):
            entry[key] = mean_std([r[key] for r in records])
        entry["collapse"] = sorted({r["collapse"] for r in records if r["collapse"]})
        entry["seeds_done"] = len(records)
        entry["batched_variants"] = max((r["batched_variants"] for r in records), default=None)
    every = [r for e in variants.values() for r in e["runs"].values()]
    # A batched run's wall time is its whole group's: each of its k runs counts 1/k of it.
    training = sum(r["wall_time_s"] / r["batched_variants"] for r in every if r["wall_time_s"] is not None)
    return {
        "name": spec.name,
        "study": spec.study,
        "paper": STUDIES[spec.study][1] if spec.study else None,
        "preset": spec.preset,
        "config": dict(spec.config),
        "options": dict(spec.options),
        "seeds": list(spec.seeds),
        "training_time_s": round(training, 1),
        "baselines": {
            "knn_raw_pixels": mean_std([r["knn_raw_pixels"] for r in every]),
            "knn_init": mean_std([r["knn_init"] for r in every]),
        },
        "variants": variants,
    }


def _fmt(pair: tuple[float, float] | None, digits: int = 1, unit: str = "") -> str:
    return "n/a" if pair is None else f"{pair[0]:.{digits}f} +- {pair[1]:.{digits}f}{unit}"


def reading(results: dict[str, Any]) -> list[str]:
    """Plain sentences: which variants collapsed and how, which is best, how it compares to the baselines."""
    lines = []
    for name, entry in results["variants"].items():
        for mode in entry["collapse"]:
            what = "uniform teacher (entropy near log K, KL near 0)" if mode == "uniform" else "one-hot teacher"
            lines.append(f"- {name}: collapsed to a {what} in at least one seed.")
    scored = [(e["knn_final"][0], n) for n, e in results["variants"].items() if e["knn_final"]]
    if scored:
        best, name = max(scored)
        lines.append(f"- Best final k-NN top-1: {name} ({best:.1f}%).")
        raw = results["baselines"]["knn_raw_pixels"]
        init = results["baselines"]["knn_init"]
        if raw and init:
            beat = [n for s, n in scored if s > max(raw[0], init[0])]
            lines.append(
                f"- Above both raw pixels ({raw[0]:.1f}%) and the network at init ({init[0]:.1f}%): "
                f"{', '.join(beat) if beat else 'none'}."
            )
    return lines or ["- No finished runs yet."]


def results_markdown(results: dict[str, Any]) -> str:
    opts = results["options"]
    lines = [
        f"# Sweep: {results['name']}",
        "",
        f"Preset `{results['preset']}` on `{opts.get('data', 'shapes10')}`, {_budget_text(opts)}, seeds "
        f"{results['seeds']}; config {results['config'] or '{}'}. Mean +- std over seeds.",
        "",
        "| variant | seeds | final k-NN top-1 (%) | best k-NN top-1 (%) | steps | schedule done "
        "| teacher entropy (end) | KL (end) | effective dims (end) | images/s | wall time (s) | trained with "
        "| collapse |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["variants"].items():
        lines.append(
            f"| {name} | {e['seeds_done']} | {_fmt(e['knn_final'])} | {_fmt(e['knn_best'])} | {_fmt(e['steps'], 0)} "
            f"| {_percent(e['schedule_completed'])} "
            f"| {_fmt(e['teacher_entropy_end'], 3)} | {_fmt(e['kl_end'], 3)} | {_fmt(e['teacher_effective_dims_end'])} "
            f"| {_fmt(e['images_per_s'], 0)} | {_fmt(e['wall_time_s'], 0)} | {_together(e['batched_variants'])} "
            f"| {', '.join(e['collapse']) or '-'} |"
        )
    base = results["baselines"]
    lines += [
        "",
        f"Baselines (same k-NN, same images): raw pixels {_fmt(base['knn_raw_pixels'])}%, "
        f"the network at initialization {_fmt(base['knn_init'])}%.",
        "",
        f"Training time of the whole sweep: {results['training_time_s']:.0f} s (a batched run's wall time, shared "
        "by its variants, is counted once; its images/s are per variant).",
        "",
        "## Reading (automatic)",
        "",
        *reading(results),
    ]
    if results["paper"]:
        lines += ["", "## What the paper reports", "", results["paper"]]
    return "\n".join(lines) + "\n"


def _budget_text(opts: dict[str, Any]) -> str:
    if opts.get("budget"):
        return f"budget {opts['budget']} per run (each run fits its own schedule to it on this machine)"
    if opts.get("max_steps"):
        return f"max_steps {opts['max_steps']}"
    return "the preset's whole schedule"


def _percent(pair: tuple[float, float] | None) -> str:
    """A schedule share (0-1) as percent; 'n/a' for runs without a budget."""
    return "n/a" if pair is None else _fmt((100 * pair[0], 100 * pair[1]), 0, "%")


def _together(batched_variants: int | None) -> str:
    if not batched_variants:
        return "n/a"
    return "alone" if batched_variants == 1 else f"a batch of {batched_variants}"


def save_curves(results: dict[str, Any], path: Path) -> Path:
    """k-NN top-1, teacher entropy and KL against the step: one line per variant (seed mean)."""
    import matplotlib  # noqa: PLC0415  (slow import, only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (after choosing the headless backend)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("knn_top1", "k-NN top-1 (%)"), ("teacher_entropy", "teacher entropy (nats)"), ("kl", "KL (nats)"))
    for name, entry in results["variants"].items():
        for ax, (key, _) in zip(axes, panels):
            series: dict[int, list[float]] = {}
            for record in entry["runs"].values():
                rows = record["knn_history"] if key == "knn_top1" else record["diagnostics"]
                for row in rows:
                    if row.get(key) is not None:
                        series.setdefault(row["step"], []).append(row[key])
            steps = sorted(series)
            if steps:
                ax.plot(steps, [statistics.fmean(series[s]) for s in steps], label=name)
    for label, key, style in (("raw pixels", "knn_raw_pixels", "--"), ("init", "knn_init", ":")):
        value = results["baselines"][key]
        if value:
            axes[0].axhline(value[0], color="gray", linestyle=style, label=label)
    for ax, (_, title) in zip(axes, panels):
        ax.set_xlabel("step")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle(results["name"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_heatmap(results: dict[str, Any], axes_values: tuple, path: Path) -> Path:
    """Final k-NN top-1 (seed mean) over a 2-D grid."""
    import matplotlib  # noqa: PLC0415  (slow import, only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (after choosing the headless backend)

    (row_field, rows), (col_field, cols) = axes_values
    grid = [[math.nan] * len(cols) for _ in rows]
    for entry in results["variants"].values():
        o = entry["overrides"]
        if entry["knn_final"] and row_field in o and col_field in o:
            grid[list(rows).index(o[row_field])][list(cols).index(o[col_field])] = entry["knn_final"][0]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(cols), 1.2 + 0.8 * len(rows)))
    image = ax.imshow(grid, cmap="viridis")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(col_field)
    ax.set_ylabel(row_field)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if math.isfinite(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax, label="final k-NN top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(spec: SweepSpec, out_dir: Path, runs: list[tuple[Variant, int, Path]]) -> dict[str, Any]:
    """results.json, results.md, curves.png and, for 2-D grids, heatmap.png in ``out_dir``."""
    results = summarize(spec, runs)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_markdown(results))
    save_curves(results, out_dir / "curves.png")
    if len(spec.grid) == 2:
        save_heatmap(results, spec.grid, out_dir / "heatmap.png")
    return results


__all__ = ["mean_std", "reading", "results_markdown", "summarize", "write_report"]
