"""``fdino report RUN_DIR``: one self-contained HTML page of a training run.

Every picture is inlined as a base64 ``data:`` URI and the page has no script and no link, so it can
be mailed, attached to an issue or opened offline as one file. Each section appears only when its
inputs are in the run folder (summary.json, run.json, metrics.jsonl, curves.png, embeddings/,
attention/), so a run that is still training gets a report too. `load_run` and `write_report` are
the only I/O; `render_page` builds the page from what was loaded.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import field_doc
from .diagnostics import collapse_mode

_STEP_PNG = re.compile(r"step-(\d+)\.png")
# metrics.jsonl keys drawn by `training_figure`: (key, panel title), in panel order.
CURVES = (
    ("loss", "DINO loss"),
    ("lr", "learning rate"),
    ("teacher_temp", "teacher temperature"),
    ("momentum", "teacher momentum"),
    ("teacher_entropy", "teacher entropy (nats)"),
    ("kl", "KL(teacher || student)"),
    ("teacher_effective_dims", "teacher effective dims"),
    ("center_norm", "center norm"),
    ("grad_norm", "gradient norm"),
)


@dataclass(frozen=True, kw_only=True)
class RunFiles:
    """What the page shows, as read from a run folder; nothing is read after loading."""

    run_dir: str
    """The run folder as given (shown in the header)."""
    run: dict[str, Any] | None = None
    """run.json: {"config": DinoConfig fields, "options": TrainOptions fields}; None when absent."""
    summary: dict[str, Any] | None = None
    """summary.json, written when a run ends; None while it trains."""
    metrics: tuple[dict[str, Any], ...] = ()
    """The step records of metrics.jsonl in step order (a resumed run's last write of a step wins)."""
    events: tuple[dict[str, Any], ...] = ()
    """The event records of metrics.jsonl (``{"event": kind, "message": ...}``), in the order written."""
    curves: bytes | None = None
    """The run's own curves.png."""
    embeddings: tuple[tuple[str, bytes], ...] = ()
    """(caption, PNG) of embeddings/step-*.png in step order."""
    attention: tuple[tuple[str, bytes], ...] = ()
    """(caption, PNG) of the PNGs under attention/: named ones by name, then step-*.png in step order."""
    notes: tuple[str, ...] = ()
    """Problems met while reading (a corrupt metrics.jsonl line, say), shown on the page."""


# --- reading --------------------------------------------------------------------------------------------
def parse_metrics(text: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """metrics.jsonl text -> (step records in step order, event records, notes on the lines skipped).

    A run killed mid-write leaves a partial last line: it is skipped with a note naming its line
    number rather than losing the whole history.
    """
    by_step: dict[int, dict[str, Any]] = {}
    events, notes = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            notes.append(f"metrics.jsonl line {number} is not valid JSON ({err.msg}); skipped it")
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
        elif isinstance(record, dict) and "event" in record:
            events.append(record)
        else:
            notes.append(f"metrics.jsonl line {number} is neither a step record nor an event; skipped it")
    return [by_step[s] for s in sorted(by_step)], events, notes


def ordered_pngs(paths: list[Path], root: Path) -> list[tuple[str, Path]]:
    """(caption, path): named PNGs by name, then ``step-<n>.png`` by n (numeric: step-2 before step-10)."""
    stepped = sorted((int(m.group(1)), p) for p in paths if (m := _STEP_PNG.fullmatch(p.name)))
    named = sorted(p for p in paths if not _STEP_PNG.fullmatch(p.name))
    return [(str(p.relative_to(root).with_suffix("")), p) for p in named] + [(f"step {n}", p) for n, p in stepped]


def load_run(run_dir: str | Path) -> RunFiles:
    """Read a run folder; a folder that is not a run is an error saying what to do instead."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist or is not a folder: give the run folder of `fdino train`")
    run_json, summary_json = root / "run.json", root / "summary.json"
    if not run_json.is_file() and not summary_json.is_file():
        raise ValueError(
            f"{root} is not an fdino run folder (it has neither run.json nor summary.json): "
            f"run `fdino train --run-dir {root}` first, or give the folder such a run wrote"
        )

    def read_json(path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): rerun or resume the run to rewrite it") from None

    metrics_path = root / "metrics.jsonl"
    metrics, events, notes = parse_metrics(metrics_path.read_text()) if metrics_path.is_file() else ([], [], [])
    attention_dir = root / "attention"
    return RunFiles(
        run_dir=str(run_dir),
        run=read_json(run_json),
        summary=read_json(summary_json),
        metrics=tuple(metrics),
        events=tuple(events),
        curves=(root / "curves.png").read_bytes() if (root / "curves.png").is_file() else None,
        embeddings=tuple(
            (caption, p.read_bytes()) for caption, p in ordered_pngs(list(root.glob("embeddings/step-*.png")), root)
        ),
        attention=tuple(
            (caption, p.read_bytes()) for caption, p in ordered_pngs(list(attention_dir.rglob("*.png")), attention_dir)
        ),
        notes=tuple(notes),
    )


# --- figures (in memory) ---------------------------------------------------------------------------------
def _pyplot():
    import matplotlib  # noqa: PLC0415  (slow import, only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (after choosing the headless backend)

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return buffer.getvalue()


def knn_figure(summary: dict[str, Any]) -> bytes:
    """Teacher k-NN top-1 against the step, raw pixels and the network at init as dashed lines: PNG bytes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    history = summary["knn_history"]
    ax.plot([h["step"] for h in history], [h["knn_top1"] for h in history], "o-", color="tab:green", label="teacher")
    probe = [h for h in history if h.get("probe_top1") is not None]
    if probe:
        steps, top1 = [h["step"] for h in probe], [h["probe_top1"] for h in probe]
        ax.plot(steps, top1, "s-", color="tab:purple", label="online linear probe (held-out)")
    for key, label, color in (
        ("knn_top1_raw_pixels", "raw pixels", "tab:gray"),
        ("knn_top1_init", "network at init", "tab:red"),
    ):
        if summary.get(key) is not None:
            ax.axhline(summary[key], linestyle="--", color=color, label=f"{label} ({summary[key]:.2f}%)")
    ax.set(xlabel="step", ylabel=f"{summary.get('knn_k', 'k')}-NN top-1 (%)", title="teacher k-NN vs baselines")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def training_figure(records: list[dict[str, Any]] | tuple[dict[str, Any], ...], out_dim: int | None) -> bytes:
    """One panel per `CURVES` key present in ``records``; entropy with log K dashed (uniform collapse): PNG bytes."""
    plt = _pyplot()
    keys = [(key, title) for key, title in CURVES if any(r.get(key) is not None for r in records)]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot(*zip(*points), color="tab:blue")
        if key == "teacher_entropy" and out_dim:
            ax.axhline(math.log(out_dim), linestyle="--", color="tab:red", label=f"log K = {math.log(out_dim):.2f}")
            ax.legend(fontsize=8)
        ax.set(title=title, xlabel="step")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


# --- the page --------------------------------------------------------------------------------------------
def compact(value: Any) -> str:
    """A config value on one line: key=value pairs (backbone_kwargs, augment), lists in brackets."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={compact(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) for p in value):
            return ", ".join(f"{k}={compact(v)}" for k, v in value)
        return "[" + ", ".join(compact(v) for v in value) + "]"
    return str(value)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _figure(png: bytes, caption: str) -> str:
    return f"<figure>{_img(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _table(rows: list[tuple[str, ...]], head: tuple[str, ...] = ()) -> str:
    head_row = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" if head else ""
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head_row}{cells}</table>"


def _seconds(value: float) -> str:
    return f"{value:.1f} s ({value / 60:.1f} min)"


def header_rows(files: RunFiles) -> list[tuple[str, str]]:
    """(label, value) of the header; a run without summary.json reads what metrics.jsonl has so far."""
    summary, config = files.summary or {}, (files.run or {}).get("config", {})
    options, last = (files.run or {}).get("options", {}), files.metrics[-1] if files.metrics else {}
    total = summary.get("total_steps") or config.get("epochs", 0) * config.get("steps_per_epoch", 0) or "?"
    rows = [
        ("run folder", files.run_dir),
        ("data set", str(summary.get("data") or options.get("data", "?"))),
        ("architecture", str(summary.get("arch") or config.get("arch", "?"))),
        ("steps done / total", f"{summary.get('steps', last.get('step', 0))} / {total}"),
    ]
    if files.summary:
        rows += [
            ("wall time", _seconds(summary.get("wall_time_s") or 0.0)),
            ("images/s", f"{summary.get('images_per_s')}"),
        ]
    elif len(files.metrics) > 1 and "time" in files.metrics[0] and "time" in last:  # from the first log step
        rows.append(("wall time so far", _seconds(last["time"] - files.metrics[0]["time"])))
        rows.append(("images/s (last log step)", f"{last.get('images_per_s', 0):.1f}"))
    if summary.get("knn_top1_teacher") is not None:
        rows.append(
            (
                f"{summary['knn_k']}-NN top-1 on {summary['knn_eval_images']} held-out images",
                f"teacher {summary['knn_top1_teacher']:.2f}% | raw pixels {summary['knn_top1_raw_pixels']:.2f}% "
                f"| same network at init {summary['knn_top1_init']:.2f}%",
            )
        )
    return rows


def collapse_verdict(files: RunFiles) -> str | None:
    """One line: which collapse (`fdino.diagnostics.collapse_mode`) the last logged step shows, if any."""
    out_dim = (files.run or {}).get("config", {}).get("out_dim")
    if not files.metrics or not out_dim:
        return None
    last = files.metrics[-1]
    mode = collapse_mode(last, out_dim)
    shown = {"uniform": "uniform teacher", "one-hot": "one-hot teacher", None: "none"}[mode]
    readings = ", ".join(
        f"{k} {last[k]:.3g}" for k in ("teacher_entropy", "kl", "teacher_effective_dims") if last.get(k) is not None
    )
    where = f"K = {out_dim}, log K = {math.log(out_dim):.3g}"
    return f"Collapse verdict at step {last['step']} (the last logged): {shown} ({where}; {readings})"


def render_page(files: RunFiles) -> str:
    """The whole HTML page of a loaded run."""
    summary, out = files.summary, []
    out.append(_table(header_rows(files)))
    if summary is None:
        out.append(
            '<p class="note">This run has no summary yet (no summary.json): it is still training, or it stopped '
            f"before its end (resume it with <code>fdino train --resume {html.escape(files.run_dir)}</code>). "
            "What follows is what it logged so far.</p>"
        )
    out += [f'<p class="note">{html.escape(n)}</p>' for n in files.notes]
    if files.run:
        out.append("<h2>Config</h2>")
        config = files.run.get("config", {})
        out.append("<h3>DinoConfig</h3>")
        out.append(_table([(k, compact(v), field_doc(k)) for k, v in config.items()], ("field", "value", "meaning")))
        out.append("<h3>Options</h3>")
        out.append(_table([(k, compact(v)) for k, v in files.run.get("options", {}).items()], ("option", "value")))
    if summary and summary.get("knn_history"):
        out += ["<h2>k-NN history vs baselines</h2>", _figure(knn_figure(summary), "teacher k-NN top-1 against step")]
    if files.metrics or files.curves:
        out.append("<h2>Training curves</h2>")
        verdict = collapse_verdict(files)
        if verdict:
            out.append(f"<p>{html.escape(verdict)}</p>")
        warned = [e["message"] for e in files.events if e.get("event") == "collapse_warning"]
        out += [f'<p class="note">{html.escape(str(m))}</p>' for m in warned]
        if any(r.get(key) is not None for r in files.metrics for key, _ in CURVES):
            out_dim = (files.run or {}).get("config", {}).get("out_dim")
            out.append(_figure(training_figure(files.metrics, out_dim), "metrics.jsonl against step"))
        if files.curves:
            out.append(_figure(files.curves, "the run's curves.png"))
    if files.embeddings:
        out.append("<h2>Embedding snapshots</h2>")
        out += [_figure(png, f"embeddings, {caption}") for caption, png in files.embeddings]
    if files.attention:
        out.append("<h2>Attention maps</h2>")
        out += [_figure(png, f"attention, {caption}") for caption, png in files.attention]
    title = html.escape(f"fdino report: {files.run_dir}")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            f'<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{_STYLE}</style></head>',
            f"<body><h1>{title}</h1>",
            *out,
            "</body></html>",
            "",
        ]
    )


_STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;"
    "vertical-align:top;font-size:90%}.note{background:#fff6d5;padding:.4em .8em;border-left:4px solid #e0b000}"
    "figure{display:inline-block;margin:.5em}img{max-width:100%}figcaption{font-size:85%;color:#555}"
)


# --- edge: file and command line ------------------------------------------------------------------------
def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default RUN_DIR/report.html); warns about skipped lines."""
    files = load_run(run_dir)
    for note in files.notes:
        warnings.warn(note, stacklevel=2)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(files), encoding="utf-8")
    return path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="one self-contained HTML page of a training run",
        description="Write one HTML page of a run folder (images inlined, nothing to fetch): the summary, the "
        "config, the k-NN history against raw pixels and the network at init, the training curves with a "
        "collapse verdict, embedding snapshots and attention maps, each when the run folder has them.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run folder of `fdino train`")
    p.add_argument("--out", metavar="FILE", type=Path, help="where to write the page (default: RUN_DIR/report.html)")
    p.set_defaults(func=run_report_command)


def run_report_command(args: argparse.Namespace) -> int:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = write_report(args.run_dir, args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"fdino report: error: {err}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"fdino report: warning: {warning.message}", file=sys.stderr)
    print(path)
    return 0


__all__ = [
    "CURVES", "RunFiles", "collapse_verdict", "compact", "header_rows", "knn_figure", "load_run", "ordered_pngs",
    "parse_metrics", "register", "render_page", "run_report_command", "training_figure", "write_report",
]  # fmt: skip
