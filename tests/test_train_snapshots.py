"""Snapshots at every k-NN evaluation of `fdino train` (issue 19, "watch a run learn"): the PCA (and
t-SNE) scatter in embeddings/, attention maps in attention/, both in TensorBoard with the projector's
points, listed in summary.json; off with embedding_snapshots=False; and, the guard that matters most,
snapshots never change training: on and off end bitwise equal in deterministic mode."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import png_pixels

import fdino
from fdino import presets, trackers
from fdino.checkpoint import load_checkpoint
from fdino.data import SHAPES10_CLASSES
from fdino.run_log import format_summary, remove_snapshots, snapshot_files
from fdino.train import TrainOptions, resume, run

STEPS = (0, 2, 4)  # evaluations: at init, every 2 steps, and the end (step 4, evaluated once)
# shapes10 with 40 memory / 20 query images; eager, deterministic, one attention image.
OPTIONS = dict(
    data="shapes10",
    compile=False,
    workers=0,
    progress=False,
    eval_samples=40,
    attention_images=1,
    max_steps=4,
    log_every=2,
    eval_every=2,
    ckpt_every=4,
    deterministic=True,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4-step smoke run with snapshots (and t-SNE) on, and with them off."""
    root = tmp_path_factory.mktemp("snapshots")
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs would cost more than the work (conftest.one_thread)
    summaries = {}
    try:
        for name, extra in (("on", dict(embedding_tsne=True)), ("off", dict(embedding_snapshots=False))):
            torch.manual_seed(0)
            opts = TrainOptions(**OPTIONS, **extra, run_dir=str(root / name))
            summaries[name] = run(presets.smoke(), opts)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
    return root, summaries


def stepped(run_dir: Path, folder: str) -> list[str]:
    return [str(run_dir / folder / f"step-{s}.png") for s in STEPS]


def test_every_evaluation_writes_a_pca_tsne_and_attention_snapshot_listed_in_the_summary(runs):
    root, summaries = runs
    run_dir, summary = root / "on", summaries["on"]
    assert [h["step"] for h in summary["knn_history"]] == list(STEPS)
    assert summary["embeddings"] == stepped(run_dir, "embeddings")
    assert summary["embeddings_tsne"] == stepped(run_dir, "embeddings/tsne")
    assert summary["attention_steps"] == stepped(run_dir, "attention")
    assert json.loads((run_dir / "summary.json").read_text())["embeddings"] == summary["embeddings"]
    for path in summary["embeddings"] + summary["embeddings_tsne"] + summary["attention_steps"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    # A closer look at one of each (a full pixel check of every PNG costs seconds).
    for path in (summary["embeddings"][-1], summary["embeddings_tsne"][-1]):
        png_pixels(path, size=(800, 800))  # save_scatter's 800 px figure, with points drawn
    png_pixels(summary["attention_steps"][0])
    # The last evaluation's attention is the final teacher's: the same picture as attention/teacher.png.
    assert Path(summary["attention_steps"][-1]).read_bytes() == (run_dir / "attention" / "teacher.png").read_bytes()
    assert "snapshots per evaluation: 3 PCA in" in format_summary(summary, {})


def test_tensorboard_holds_the_snapshots_and_the_projector_points(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = runs[0] / "on" / "tb"
    events = EventAccumulator(str(tb), size_guidance={"images": 0})
    events.Reload()
    for tag in ("embeddings/pca", "embeddings/tsne", "attention/teacher"):
        assert [e.step for e in events.Images(tag)] == list(STEPS), tag
    assert (events.Images("embeddings/pca")[0].width, events.Images("embeddings/pca")[0].height) == (800, 800)
    config = (tb / "projector_config.pbtxt").read_text()
    assert [f'tensor_name: "teacher:{s:05d}"' in config for s in STEPS] == [True] * 3
    for s in STEPS:
        folder = tb / f"{s:05d}" / "teacher"
        rows = (folder / "tensors.tsv").read_text().splitlines()
        assert len(rows) == 20 and len(rows[0].split("\t")) == 32  # 20 queries x the smoke ViT's width
        names = (folder / "metadata.tsv").read_text().split()
        assert len(names) == 20 and set(names) <= set(SHAPES10_CLASSES)
        png_pixels(folder / "sprite.png", size=(5 * 16, 5 * 16))  # 20 thumbnails of 16 px, 5 to a row


def test_with_snapshots_off_none_are_written_and_training_is_bitwise_the_same(runs):
    root, summaries = runs
    off = root / "off"
    assert not (off / "embeddings").exists() and not (off / "tb" / "projector_config.pbtxt").exists()
    assert sorted(p.name for p in (off / "attention").iterdir()) == ["teacher.png"]
    assert summaries["off"]["embeddings"] == summaries["off"]["attention_steps"] == []
    a, loop_a = load_checkpoint(root / "on")
    b, loop_b = load_checkpoint(root / "off")
    assert int(a.step) == int(b.step) == 4 and fdino.tree_allclose(a, b)  # bitwise: rtol = atol = 0
    assert summaries["on"]["knn_history"] == summaries["off"]["knn_history"]


@pytest.mark.usefixtures("one_thread")
def test_a_resume_keeps_earlier_snapshots_and_drops_a_killed_runs_later_ones(runs, tmp_path):
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs[0] / "on", run_dir)
    (run_dir / "run.json").write_text((run_dir / "run.json").read_text().replace(str(runs[0] / "on"), str(run_dir)))
    stale = run_dir / "embeddings" / "step-5.png"  # as if a killed run had evaluated past its checkpoint
    shutil.copy(run_dir / "embeddings" / "step-4.png", stale)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        summary = resume(run_dir, max_steps=6)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    assert not stale.exists()
    assert summary["embeddings"] == [str(run_dir / "embeddings" / f"step-{s}.png") for s in (*STEPS, 6)]
    config = (run_dir / "tb" / "projector_config.pbtxt").read_text()
    assert [config.count(f'tensor_name: "teacher:{s:05d}"') for s in (*STEPS, 6)] == [1, 1, 1, 1]


def test_snapshot_files_sort_numerically_and_remove_snapshots_keeps_earlier_steps(tmp_path):
    for step in (10, 2, 0):
        for folder in ("embeddings", "embeddings/tsne", "attention"):
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / f"step-{step}.png").write_bytes(b"")
    (tmp_path / "attention" / "teacher.png").write_bytes(b"")
    assert snapshot_files(tmp_path)["embeddings"] == [
        str(tmp_path / "embeddings" / f"step-{s}.png") for s in (0, 2, 10)
    ]
    remove_snapshots(tmp_path, after=2)
    assert [len(v) for v in snapshot_files(tmp_path).values()] == [2, 2, 2]
    remove_snapshots(tmp_path)
    assert snapshot_files(tmp_path) == {"embeddings": [], "embeddings_tsne": [], "attention_steps": []}
    assert (tmp_path / "attention" / "teacher.png").exists()


def test_mlflow_keeps_snapshot_images_as_artifacts_and_skips_the_points(tmp_path):
    pytest.importorskip("mlflow", reason="the MLflow tracker needs the mlflow extra: pip install 'fdino[mlflow]'")
    from PIL import Image

    png = tmp_path / "embeddings" / "step-2.png"
    png.parent.mkdir()
    Image.new("RGB", (4, 4)).save(png)
    (tracker,) = trackers.make_trackers(("mlflow",), tmp_path, {}, 0)
    tracker.log_image("embeddings/pca", png, 2)
    tracker.log_embedding("teacher", torch.zeros(3, 2), ["a", "b", "c"], None, 2)
    tracker.close()
    artifacts = tracker.client.list_artifacts(tracker.run_id, "embeddings/pca")
    assert [a.path for a in artifacts] == ["embeddings/pca/step-2.png"]


def test_the_report_page_shows_the_snapshots_in_step_order(runs):
    from fdino.report import write_report

    alts = re.findall(r'<img[^>]*alt="([^"]*)"', write_report(runs[0] / "on").read_text())
    assert [a for a in alts if a.startswith("embeddings")] == [f"embeddings, step {s}" for s in STEPS]
    assert [a for a in alts if a.startswith("attention")] == ["attention, teacher"] + [
        f"attention, step {s}" for s in STEPS
    ]
