"""The evaluation commands (fdino.eval.cli), run in-process through argparse as `fdino` runs them,
on a smoke-preset checkpoint and a tiny image folder with train/ and val/ splits."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from helpers import enlarged, grid_cell, png_pixels, tile_count
from matplotlib import colormaps
from PIL import Image

import fdino
from fdino.checkpoint import save_checkpoint
from fdino.eval.cli import register
from fdino.eval.render import CAPTION, cell_scale, grid_size

pytestmark = pytest.mark.usefixtures("one_thread")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdino")
    sub = p.add_subparsers(dest="command")
    register(sub)
    return p


def run(*argv) -> int:
    args = parser().parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    save_checkpoint(path, fdino.init_state(fdino.presets.smoke()))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/ (8 per class) and val/ (4 per class): reddish vs bluish 16 px images."""
    root = tmp_path_factory.mktemp("data")
    g = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + 30 * g.standard_normal((16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_every_command_has_help_with_defaults(capsys):
    texts = {}
    for argv in (["eval", "knn"], ["eval", "linear"], ["attention"], ["embed"], ["search"], ["viz"]):
        with pytest.raises(SystemExit) as exit_info:
            parser().parse_args([*argv, "--help"])
        assert exit_info.value.code == 0
        texts[argv[-1]] = capsys.readouterr().out
        assert texts[argv[-1]].startswith("usage: fdino")
    assert "(default: 0.07)" in texts["knn"] and "(default: 10 20 100 200)" in texts["knn"]
    assert "(default: fast)" in texts["linear"] and "(default: 0.6)" in texts["attention"]


def test_module_entry_point_runs():
    done = subprocess.run(
        [sys.executable, "-m", "fdino.eval.cli", "eval", "knn", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--temperature" in done.stdout


def test_knn_reports_features_and_raw_pixels(ckpt, data, tmp_path, capsys):
    out = tmp_path / "knn.json"
    assert run("eval", "knn", ckpt, "--data", data, "--k", 1, 3, "--raw-pixels", "--json", out) == 0
    report = json.loads(out.read_text())
    assert report["memory"] == 16 and report["query"] == 8
    assert set(report["features"]) == set(report["raw_pixels"]) == {"1", "3"}
    assert report["raw_pixels"]["3"]["top1"] == 100.0  # the colours are a give-away for pixels
    assert set(report["feature_stats"]) == {"mean_cosine", "normalized_std", "effective_rank"}
    text = capsys.readouterr().out
    assert "k-NN on" in text and "top-1" in text and "effective_rank" in text


def test_knn_with_plain_weights_and_last_blocks(tmp_path, data, capsys):
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2
    )
    torch.save(vit.state_dict(), tmp_path / "w.pth")
    assert (
        run(
            "eval",
            "knn",
            tmp_path / "w.pth",
            "--arch",
            "vit_tiny_patch16_224",
            "--model-kwargs",
            "embed_dim=32",
            "depth=2",
            "num_heads=2",
            "--data",
            data,
            "--k",
            2,
            "--n-last-blocks",
            2,
            "--avgpool",
        )
        == 0
    )
    assert "features   k=2" in capsys.readouterr().out


def test_linear_fast_and_paper_modes(ckpt, data, tmp_path):
    out = tmp_path / "lin.json"
    assert run("eval", "linear", ckpt, "--data", data, "--epochs", 3, "--lr", 0.1, 0.5, "--json", out) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"0.1", "0.5"} and all(0 <= r["top1"] <= 100 for r in results.values())
    assert run("eval", "linear", ckpt, "--data", data, "--mode", "paper", "--epochs", 1, "--probe-batch-size", 8) == 0


def test_attention_writes_one_grid_per_image(ckpt, data, tmp_path):
    files = sorted((data / "val" / "red").glob("*.png"))[:2]
    assert run("attention", ckpt, *files, "--out", tmp_path / "att") == 0
    assert run("attention", ckpt, "--data", data, "--n", 1, "--out", tmp_path / "att") == 0
    written = sorted((tmp_path / "att").glob("*.png"))
    assert [p.name for p in written] == ["0-attention.png", "1-attention.png", "query-0-attention.png"]
    heads = 2  # the smoke preset
    pixels = np.asarray(Image.open(written[0]), dtype=np.float64)
    assert pixels.shape == (*grid_size(1 + 2 * heads, 1, 16 * cell_scale(16)), 3) and pixels.var() > 0
    # Each grid: its file enlarged (16 px -> 96), heat maps over it, masks dimming part of it.
    cell, heats = 16 * cell_scale(16), []
    for path, source in zip(written, files):
        pixels = png_pixels(path, size=grid_size(1 + 2 * heads, 1, cell))
        image = grid_cell(pixels, 0, 0, cell)
        np.testing.assert_allclose(image, enlarged(source, cell), atol=1)
        for h in range(heads):
            overlay = grid_cell(pixels, 1 + h, 0, cell)
            assert np.abs(overlay - image).mean() > 20, "no heat map over the image"
            heats.append((overlay - 0.4 * image) / 0.6)  # attention_cells: 0.4 image + 0.6 heat
            dimmed = (np.abs(grid_cell(pixels, 1 + heads + h, 0, cell) - image).max(axis=-1) > 10).mean()
            assert 0.1 < dimmed < 0.9, f"the mask dims {dimmed:.0%} of the image"
    assert np.abs(heats[0] - heats[heads]).max() > 5  # the two files' maps differ
    png_pixels(written[2], size=grid_size(1 + 2 * heads, 1, cell))


def test_embed_then_search_finds_the_query_itself(ckpt, data, tmp_path, capsys):
    emb = tmp_path / "emb.safetensors"
    assert run("embed", ckpt, data / "train", "--out", emb) == 0
    assert "16 images" in capsys.readouterr().out
    query = data / "train" / "blue" / "3.png"
    assert run("search", emb, query, "--k", 3, "--out", tmp_path / "s.png") == 0
    lines = capsys.readouterr().out.splitlines()
    score, path = lines[1].split()
    assert path == str(query) and float(score) == pytest.approx(1.0, abs=1e-3)
    assert np.asarray(Image.open(tmp_path / "s.png"), dtype=np.float64).var() > 0
    # The query, then its 3 matches, the first of which is the query itself.
    pixels = png_pixels(tmp_path / "s.png", size=grid_size(1, 4, 96, captions=True))
    assert tile_count(pixels[2:98]) == 4
    tiles = [grid_cell(pixels, 0, j, 96, band=CAPTION) for j in range(4)]
    np.testing.assert_allclose(tiles[0], enlarged(query, 96), atol=1)
    assert np.array_equal(tiles[1], tiles[0]) and np.abs(tiles[2] - tiles[0]).mean() > 5


def test_viz_writes_scatter_plots_and_patch_pca(ckpt, data, tmp_path):
    assert (
        run(
            "viz",
            ckpt,
            "--data",
            data,
            "--split",
            "memory",
            "--max-points",
            12,
            "--tsne-iters",
            60,
            "--perplexity",
            3,
            "--patch-pca",
            2,
            "--out",
            tmp_path / "viz",
        )
        == 0
    )
    for name in ("pca.png", "tsne.png", "patch-pca.png"):
        pixels = np.asarray(Image.open(tmp_path / "viz" / name).convert("RGB"), dtype=np.float64)
        assert pixels.var() > 0, name
    for name in ("pca.png", "tsne.png"):
        pixels = png_pixels(tmp_path / "viz" / name, size=(800, 800))
        for j, label in enumerate(("blue", "red")):  # classes in tab10 colours, points away from the legend
            ys, xs = np.nonzero(np.abs(pixels - np.array(colormaps["tab10"].colors[j]) * 255).max(axis=-1) < 8)
            assert len(xs) and max(np.ptp(xs), np.ptp(ys)) > 30, f"{name}: no {label} points"
    pixels = png_pixels(tmp_path / "viz" / "patch-pca.png", size=grid_size(2, 2, 96))
    for i in range(2):  # under each image, 4 x 4 patches of one colour each
        patches = grid_cell(pixels, 1, i, 96).reshape(4, 24, 4, 24, 3)
        assert np.ptp(patches, axis=(1, 3)).max() == 0
        assert len(np.unique(patches[:, 0, :, 0].reshape(-1, 3), axis=0)) > 8


def test_user_errors_are_one_line_and_exit_code_2(tmp_path, data, capsys):
    assert run("eval", "knn", tmp_path / "nothing", "--data", data) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run("eval", "knn", "--data", data) == 2
    assert "--raw-pixels" in capsys.readouterr().err
