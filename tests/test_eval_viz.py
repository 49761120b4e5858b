"""PCA, exact t-SNE, scatter / patch-PCA pictures, and embed/search (fdino.eval.viz, .tsne, .embed)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import grid_cell, png_pixels, tile_count, tiny_vit
from hypothesis import given
from hypothesis import strategies as st
from matplotlib import colormaps
from PIL import Image

from fdino.eval import (
    Embeddings,
    embed_folder,
    load_embeddings,
    patch_pca_rgb,
    patch_tokens,
    pca,
    save_embeddings,
    save_patch_pca,
    save_scatter,
    save_search_grid,
    search,
    tsne,
)
from fdino.eval.render import CAPTION, cell_scale, grid_size
from fdino.eval.tsne import conditional_affinities, squared_distances

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n: int, classes: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 8
    labels = torch.arange(classes).repeat_interleave(n)
    return centers[labels] + torch.randn(len(labels), dim, generator=g), labels


# --- PCA and t-SNE --------------------------------------------------------------------------------------
@given(n=st.integers(3, 40), d=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_pca_matches_the_svd_reference_up_to_sign(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * torch.arange(1, d + 1)
    got = pca(x, 2).double()
    u, s, _ = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    ref = u[:, :2] * s[:2]
    if s[1] - s[2 if d > 2 and n > 2 else 1] < 1e-6 * s[0] or s[0] - s[1] < 1e-6 * s[0]:
        return  # degenerate spectrum: the components are not unique
    torch.testing.assert_close(got.abs(), ref.abs(), rtol=1e-4, atol=1e-4 * float(s[0]))


def test_perplexity_search_hits_the_target_entropy():
    x, _ = blobs(50, 3, 10)
    p = conditional_affinities(squared_distances(x), perplexity=20.0)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(dim=1)
    torch.testing.assert_close(entropy, torch.full_like(entropy, math.log(20.0)), rtol=0, atol=1e-4)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(150, dtype=torch.float64))
    assert p.diagonal().abs().max() == 0


def test_tsne_separates_clusters_and_is_deterministic():
    x, labels = blobs(40, 3, 20)
    y = tsne(x, perplexity=15, iters=300)
    assert y.shape == (120, 2) and torch.isfinite(y).all()
    # In the 2-D map every point's 5 nearest neighbours (Euclidean) share its cluster.
    dist = torch.cdist(y, y).fill_diagonal_(float("inf"))
    assert (labels[dist.topk(5, largest=False).indices] == labels[:, None]).all()
    torch.testing.assert_close(tsne(x, perplexity=15, iters=300), y)


def test_scatter_png_is_drawn(tmp_path):
    x, labels = blobs(30, 4, 5)
    path = save_scatter(pca(x), labels, tmp_path / "p" / "pca.png", title="PCA", class_names=list("abcd"), size_px=300)
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    assert pixels.shape == (300, 300, 3) and pixels.var() > 0
    pixels = png_pixels(path, size=(300, 300))
    for j in range(4):  # each class in its tab10 colour, its points reaching beyond its legend marker (~10 px)
        ys, xs = np.nonzero(np.abs(pixels - np.array(colormaps["tab10"].colors[j]) * 255).max(axis=-1) < 8)
        assert len(xs) > 100 and max(np.ptp(xs), np.ptp(ys)) > 30, f"class {j} has no points drawn"


def test_png_check_rejects_blank_and_wrong_pictures(tmp_path):
    """`helpers.png_pixels`, which the picture tests rely on, fails on what a broken plot writes."""
    noise = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    assert png_pixels(tmp_path / "noise.png", size=(40, 60)).shape == (40, 60, 3)
    checker = np.kron(np.indices((4, 6)).sum(axis=0) % 2, np.ones((10, 10)))[..., None] * np.full(3, 255)
    bad = {"white": np.full((40, 60, 3), 255), "grey": np.full((40, 60, 3), 128), "two-tone": checker}
    for name, array in bad.items():
        Image.fromarray(array.astype(np.uint8)).save(tmp_path / f"{name}.png")
        with pytest.raises(AssertionError, match="blank|distinct colours"):
            png_pixels(tmp_path / f"{name}.png")
    with pytest.raises(AssertionError, match="expected"):
        png_pixels(tmp_path / "noise.png", size=(60, 40))
    Image.fromarray(noise).save(tmp_path / "noise.jpg")
    with pytest.raises(AssertionError, match="not a PNG"):
        png_pixels((tmp_path / "noise.jpg").read_bytes())


# --- patch features -------------------------------------------------------------------------------------
def test_patch_pca_colours_and_figure(tmp_path):
    vit = tiny_vit()
    images = torch.randn(3, 3, 16, 16)
    images[2] = images[0]  # same image, same patch colours
    tokens = patch_tokens(vit, images)
    assert tokens.shape == (3, 4, 4, 32)
    rgb = patch_pca_rgb(tokens)
    assert rgb.shape == (3, 3, 4, 4) and rgb.min() >= 0 and rgb.max() <= 1
    # Each colour channel spans [0, 1] over the set of images (min-max over all patches).
    torch.testing.assert_close(rgb.amin(dim=(0, 2, 3)), torch.zeros(3))
    torch.testing.assert_close(rgb.amax(dim=(0, 2, 3)), torch.ones(3))
    fg = patch_pca_rgb(tokens, foreground=True)
    assert fg.shape == rgb.shape and (fg.sum(dim=1) == 0).any()  # background patches are black
    path = save_patch_pca(vit, images, tmp_path / "patch.png", mean=(0.5,) * 3, std=(0.25,) * 3)
    pixels = np.asarray(Image.open(path), dtype=np.float64)
    assert pixels.shape == (*grid_size(2, 3, 16 * cell_scale(16)), 3) and pixels.var() > 0
    # Top row: the images; bottom row: one PCA colour per 4 px patch (enlarged x6), as patch_pca_rgb says.
    cell = 16 * cell_scale(16)
    pixels = png_pixels(path, size=grid_size(2, 3, cell))
    shown = F.interpolate((images * 0.25 + 0.5).clamp(0, 1), size=(cell, cell), mode="bilinear", align_corners=False)
    for i in range(3):
        np.testing.assert_allclose(grid_cell(pixels, 0, i, cell), shown[i].permute(1, 2, 0).numpy() * 255, atol=1)
        patches = grid_cell(pixels, 1, i, cell).reshape(4, cell // 4, 4, cell // 4, 3)
        assert np.ptp(patches, axis=(1, 3)).max() == 0
        np.testing.assert_allclose(patches[:, 0, :, 0], rgb[i].permute(1, 2, 0).numpy() * 255, atol=1)
    assert len(np.unique(rgb.permute(0, 2, 3, 1).reshape(-1, 3).numpy(), axis=0)) == 32  # 3 images, 2 distinct
    assert np.array_equal(grid_cell(pixels, 1, 0, cell), grid_cell(pixels, 1, 2, cell))
    assert np.abs(grid_cell(pixels, 1, 0, cell) - grid_cell(pixels, 1, 1, cell)).mean() > 20


# --- embed and search -----------------------------------------------------------------------------------
@pytest.fixture
def image_folder(tmp_path):
    """Two classes of 16 px PNGs (random textures) plus one corrupt file."""
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "images"
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    (root / "cats" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_embed_and_search_round_trip(tmp_path, image_folder, suffix):
    vit = tiny_vit()
    emb, skipped = embed_folder(vit, image_folder, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=4)
    assert list(skipped) == [str(image_folder / "cats" / "broken.png")]
    assert emb.features.shape == (10, 32) and len(emb.paths) == 10
    assert emb.labels.tolist() == [0] * 5 + [1] * 5 and emb.info["classes"] == ["cats", "dogs"]

    path = save_embeddings(tmp_path / f"emb{suffix}", emb)
    if suffix == ".npy":
        assert path.with_suffix(".json").exists()
    loaded = load_embeddings(path)
    assert loaded.paths == emb.paths and torch.equal(loaded.labels, emb.labels)
    torch.testing.assert_close(loaded.features, emb.features)
    assert loaded.info["image_size"] == 16

    # A query equal to an embedded image finds itself first, with cosine ~1.
    scores, index = search(loaded.features[[3, 7]], loaded.features, k=4)
    assert index[:, 0].tolist() == [3, 7]
    torch.testing.assert_close(scores[:, 0], torch.ones(2), rtol=0, atol=1e-5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_embedding_files_are_checked(tmp_path):
    emb = Embeddings(torch.zeros(2, 3), ["a"], torch.zeros(2, dtype=torch.int64), {})
    with pytest.raises(ValueError, match="1 paths for 2"):
        save_embeddings(tmp_path / "e.npy", emb)
    with pytest.raises(ValueError, match="suffix"):
        save_embeddings(tmp_path / "e.txt", emb._replace(paths=["a", "b"]))
    np.save(tmp_path / "lonely.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="lonely.json"):
        load_embeddings(tmp_path / "lonely.npy")


def test_search_grid_png(tmp_path):
    query = torch.rand(3, 16, 16)
    results = [torch.rand(3, 16, 16) for _ in range(3)]
    path = save_search_grid(query, results, [0.99, 0.5, 0.25], tmp_path / "s.png")
    pixels = np.asarray(Image.open(path), dtype=np.float64)
    assert pixels.shape == (*grid_size(1, 4, 96, captions=True), 3) and pixels.var() > 0
    assert pixels.shape[0] == 96 + CAPTION + 4
    # Four tiles on white, each its image enlarged to 96 px, each with a caption of its own.
    pixels = png_pixels(path, size=grid_size(1, 4, 96, captions=True))
    assert tile_count(pixels[2:98]) == 4
    captions = []
    for j, image in enumerate([query, *results]):
        want = F.interpolate(image[None], size=(96, 96), mode="bilinear", align_corners=False).clamp(0, 1)[0]
        np.testing.assert_allclose(
            grid_cell(pixels, 0, j, 96, band=CAPTION), want.permute(1, 2, 0).numpy() * 255, atol=1
        )
        captions.append(pixels[98 : 98 + CAPTION, 2 + 98 * j : 2 + 98 * j + 96])
        assert (captions[-1] < 128).any(axis=-1).sum() > 20, f"caption {j} has no text"
    assert all(np.abs(a - b).mean() > 1 for a, b in itertools.pairwise(captions))
