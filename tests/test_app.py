"""``fdino app``: the tabs' logic without Gradio, the index cache (content hash + model), the page over
HTTP with gradio_client, and the page in a real headless Chromium.

A tiny ViT (the smoke preset at 32 px, saved as a run so teacher and student both exist) and the
2 x 12 image `two_class_folder` keep this file at about a minute on 2 busy cores.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gradio", reason="needs the app extra: pip install 'fdino[app]'")
gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (comes with gradio)")

from PIL import Image  # noqa: E402

import fdino  # noqa: E402
import fdino.eval.embed  # noqa: E402
from fdino.app import (  # noqa: E402
    attention_views,
    build_app,
    class_labels,
    embedding_map,
    launch,
    patch_pca_view,
    query_tensor,
    read_query,
    search,
)
from fdino.app.cli import attention_networks, register  # noqa: E402
from fdino.app.logic import MAP_THUMBNAIL, class_colour, map_html, map_thumbnails  # noqa: E402
from fdino.checkpoint import save_checkpoint  # noqa: E402
from fdino.eval.render import grid_size  # noqa: E402
from fdino.serve import FeatureService, ServiceConfig, UploadError, free_port  # noqa: E402
from fdino.weights import load_model  # noqa: E402

N_IMAGES = 24  # two_class_folder: class0/, class1/ with 12 PNGs each
QUERY = "class1/3.png"


def save_run(path: Path, seed: int) -> Path:
    save_checkpoint(path, fdino.init_state(fdino.presets.smoke(global_crop_size=32, local_crop_size=16, seed=seed)))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return save_run(tmp_path_factory.mktemp("run"), seed=0)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_model(run_dir)


@pytest.fixture(scope="module")
def service(loaded, two_class_folder, tmp_path_factory):
    svc = FeatureService(loaded, two_class_folder, arch=loaded.info.arch, cache_dir=tmp_path_factory.mktemp("cache"))
    svc.refresh()
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def networks(run_dir, loaded):
    """Teacher and student, as `fdino app` loads them for a training run."""
    args = app_parser().parse_args(["app", str(run_dir), "--images", "."])
    return attention_networks(args, loaded)


def app_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="fdino")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def query_of(service, path: Path) -> torch.Tensor:
    return query_tensor(service, read_query(path, service.config))


# --- the tabs' logic ------------------------------------------------------------------------------------
def test_search_finds_the_query_first_and_sorts_by_similarity(service, two_class_folder):
    hits = search(service, query_of(service, two_class_folder / QUERY), k=6)
    assert [h.path for h in hits][0] == QUERY and hits[0].score == pytest.approx(1.0, abs=1e-4)
    scores = [h.score for h in hits]
    assert len(hits) == 6 and scores == sorted(scores, reverse=True) and len({h.path for h in hits}) == 6
    # The same order as the index's own search over all rows (cosine on the cached features).
    everything = search(service, query_of(service, two_class_folder / QUERY), k=N_IMAGES)
    assert [h.path for h in everything[:6]] == [h.path for h in hits]
    with pytest.raises(UploadError, match="k=0 is invalid") as err:
        search(service, query_of(service, two_class_folder / QUERY), k=0)
    assert err.value.status == 422


def test_queries_follow_the_service_upload_limits(service, two_class_folder, tmp_path):
    small = ServiceConfig(max_upload_bytes=100)
    with pytest.raises(UploadError, match="upload too large") as err:
        read_query(two_class_folder / QUERY, small)
    assert err.value.status == 413
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UploadError, match="not an image") as err:
        read_query(tmp_path / "notes.png", service.config)
    assert err.value.status == 415
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(UploadError, match="exceeds the limit") as err:
        read_query(tmp_path / "big.png", ServiceConfig(max_pixels=200 * 200))
    assert err.value.status == 413


def test_attention_and_patch_pca_pictures(service, networks, two_class_folder):
    assert list(networks) == ["teacher", "student"]
    x = query_of(service, two_class_folder / QUERY)
    views = attention_views(networks, x, mean=service.model.mean, std=service.model.std)
    heads = 2  # smoke preset
    cell = 32 * 5  # 32 px enlarged to at least 160 px
    assert list(views) == ["teacher", "student"]
    for image in views.values():  # rows: image + heat maps, image + 60%-mass masks
        assert image.size[::-1] == grid_size(2, 1 + heads, (cell, cell), captions=True)
        assert np.asarray(image).std() > 10
    pca_image = patch_pca_view(service.backbone, x, mean=service.model.mean, std=service.model.std)
    assert pca_image.size[::-1] == grid_size(1, 2, (cell, cell), captions=True)
    right = np.asarray(pca_image)[2 : 2 + cell, 4 + cell : 4 + 2 * cell]  # the PCA cell: coloured, not flat
    assert right.std() > 10


def test_cnn_attention_and_patch_pca_say_what_is_needed(service, two_class_folder):
    import timm

    cnn = timm.create_model("resnet18", num_classes=0, pretrained=False).eval()
    x = query_of(service, two_class_folder / QUERY)
    with pytest.raises(ValueError, match="attention maps need a timm ViT; got ResNet"):
        attention_views({"teacher": cnn}, x, mean=service.model.mean, std=service.model.std)
    with pytest.raises(ValueError, match="patch features need a timm ViT; got ResNet"):
        patch_pca_view(cnn, x, mean=service.model.mean, std=service.model.std)


def test_embedding_map_is_coloured_by_subfolder(service):
    for method in ("pca", "tsne"):
        emb = embedding_map(service.index, method=method, tsne_iters=60)  # few iterations: shapes, not quality
        assert emb.points.shape == (N_IMAGES, 2) and torch.isfinite(emb.points).all()
        assert emb.class_names == ["class0", "class1"] and emb.labels.tolist() == [0] * 12 + [1] * 12
    labels, names = class_labels(["a/1.png", "top.png", "b/c/2.png"])
    assert labels.tolist() == [0, -1, 1] and names == ["a", "b"]
    with pytest.raises(ValueError, match="allowed"):
        embedding_map(service.index, method="umap")


def test_map_markup_has_a_point_with_its_picture_per_image(service, monkeypatch):
    """Issue 19: hovering a map point shows the image (Gradio's plots only show text tooltips)."""
    import base64
    import io
    import re

    emb = embedding_map(service.index, method="pca")
    cache: dict = {}
    pictures = map_thumbnails(service.index, emb.paths, cache)
    markup = map_html(emb.points, emb.labels, emb.class_names, pictures, emb.paths)
    points = re.findall(
        r'<div class="pt[^"]*" data-path="([^"]+)" style="[^"]*background:(#[0-9a-f]{6})">'
        r'<span class="tip"><img src="data:image/png;base64,([^"]+)"',
        markup,
    )
    assert [p for p, _, _ in points] == emb.paths and len(points) == N_IMAGES
    assert [c for _, c, _ in points] == [class_colour(c) for c in emb.labels.tolist()]
    assert len({c for _, c, _ in points}) == 2
    for _, _, data in points:  # the 20 px PNGs, enlarged to the stated size
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and image.size == (MAP_THUMBNAIL, MAP_THUMBNAIL)
    assert re.search(r"\.pt:hover \.tip \{ display: block; \}", markup) and ".pt .tip { display: none;" in markup
    assert all(f'{c}"></i>{n}</span>' in markup for c, n in [("#4e79a7", "class0"), ("#f28e2b", "class1")])
    assert "<script" not in markup and "http" not in markup  # offline, nothing to run

    # Encoded once per folder: a second map (other projection, page reload) reuses every picture.
    monkeypatch.setattr("fdino.app.logic.thumbnail_uri", lambda *a, **k: pytest.fail("re-encoded"))
    assert map_thumbnails(service.index, emb.paths[::-1], cache) == pictures[::-1]
    # Paths are escaped, files directly in the folder are grey and listed in the legend.
    odd = map_html(torch.eye(3, 2), torch.tensor([0, -1, 0]), ["a<b"], [None] * 3, ["a<b/1.png", "t&.png", "x"])
    assert "a&lt;b/1.png" in odd and "t&amp;.png" in odd and "(top level)</span>" in odd and "<img" not in odd


# --- the index cache: keyed by the model and each file's content ------------------------------------------
def test_index_cache_is_keyed_by_content_and_model(loaded, two_class_folder, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    shutil.copytree(two_class_folder, folder)
    changed = folder / "class0" / "0.png"
    # Stored PNG (no compression): any pixels give the same file size, so only the bytes differ.
    Image.open(changed).save(changed, compress_level=0)
    embedded = []
    real = fdino.eval.embed.embed_paths

    def counting(backbone, paths, **kwargs):
        embedded.extend(paths)
        return real(backbone, paths, **kwargs)

    monkeypatch.setattr(fdino.eval.embed, "embed_paths", counting)

    def start(model):  # what `fdino app` does at start: a service over the folder, refreshed
        svc = FeatureService(model, folder, cache_dir=tmp_path / "cache")
        svc.refresh()
        svc.close()
        return svc

    first = start(loaded)
    assert len(embedded) == N_IMAGES and len(first.index) == N_IMAGES
    embedded.clear()
    second = start(loaded)  # a second start: everything from the cache, nothing embedded
    assert embedded == [] and second.index.cache_path == first.index.cache_path
    torch.testing.assert_close(second.index.features, first.index.features)

    # Same size, same mtime, other bytes: the content hash finds it (stat alone would not).
    st = changed.stat()
    pixels = np.asarray(Image.open(changed)).copy()
    Image.fromarray(255 - pixels).save(changed, compress_level=0)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (changed.stat().st_size, changed.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    third = start(loaded)
    assert [Path(p).name for p in embedded] == ["0.png"] and len(third.index) == N_IMAGES
    hits = search(third, query_of(third, changed), k=1)
    assert hits[0].path == "class0/0.png" and hits[0].score == pytest.approx(1.0, abs=1e-4)

    embedded.clear()  # another model: its own cache (all embedded); the first model's stays valid
    other = dataclasses.replace(loaded, backbone=load_model(save_run(tmp_path / "other", seed=1)).backbone)
    assert start(other).index.cache_path != first.index.cache_path and len(embedded) == N_IMAGES
    embedded.clear()
    start(loaded)
    assert embedded == []


# --- CLI --------------------------------------------------------------------------------------------------
def test_cli_binds_localhost_and_explains_a_missing_gradio(run_dir, two_class_folder, monkeypatch, capsys):
    args = app_parser().parse_args(["app", str(run_dir), "--images", str(two_class_folder)])
    assert (args.host, args.which, args.max_upload_mb) == ("127.0.0.1", "teacher", 10.0) and callable(args.func)

    from fdino.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "fdino.app.cli")
    assert main(["app", str(run_dir), "--images", str(two_class_folder)]) == 2
    assert "pip install 'fdino[app]'" in capsys.readouterr().err


# --- the page, served ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app_url(service, networks):
    demo = build_app(service, networks, default_k=5)
    _, url, _ = launch(demo, service, host="127.0.0.1", port=free_port(), block=False)
    yield url.rstrip("/")
    demo.close()


def test_gradio_client_search_returns_the_neighbours_in_order(app_url, service, two_class_folder):
    assert app_url.startswith("http://127.0.0.1:")
    client = gradio_client.Client(app_url, verbose=False, download_files=False)
    gallery, table = client.predict(gradio_client.handle_file(str(two_class_folder / QUERY)), 5, api_name="/search")
    expected = search(service, query_of(service, two_class_folder / QUERY), k=5)
    assert [row[1] for row in table["data"]] == [h.path for h in expected]
    np.testing.assert_allclose([row[2] for row in table["data"]], [h.score for h in expected], atol=1e-4)
    assert [item["caption"].split()[0] for item in gallery] == [h.path for h in expected]
    note, teacher, student = client.predict(
        gradio_client.handle_file(str(two_class_folder / QUERY)), api_name="/attention"
    )
    assert note == "" and teacher is not None and student is not None


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def test_page_in_chromium_searches_and_map_hover_shows_the_image(app_url, two_class_folder, tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install -y chromium chromium-driver")
    pytest.importorskip("selenium", reason="needs selenium: pip install selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve_page import CHROMIUM_FLAGS

    profile = tempfile.mkdtemp(prefix="fdino-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, "--window-size=1280,1400", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)

    def wait(condition, timeout: float = 60):
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)

    try:
        driver.get(app_url + "/")
        thumbs = wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#folder .thumbnail-item"))
        captions = [t.find_element(By.CSS_SELECTOR, ".caption-label").text for t in thumbs]
        assert captions == sorted(str(p.relative_to(two_class_folder)) for p in two_class_folder.rglob("*.png"))
        thumbs[captions.index(QUERY)].click()
        first = wait(
            lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#results .caption-label")][:1] or None
        )
        assert first[0].split()[0] == QUERY and float(first[0].split()[1]) == pytest.approx(1.0, abs=1e-3)
        results = driver.find_elements(By.CSS_SELECTOR, "#results .caption-label")
        scores = [float(e.text.split()[1]) for e in results]
        assert len(results) == 5 and scores == sorted(scores, reverse=True)
        screenshot = tmp_path / "app.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000

        # Map tab: hovering a point shows its picture (so Gradio kept our <style>, <img> and data URI).
        next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Map").click()
        point = wait(lambda d: d.find_elements(By.CSS_SELECTOR, f'#map .pt[data-path="{QUERY}"]'))[0]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#map .pt")) == N_IMAGES
        picture = point.find_element(By.CSS_SELECTOR, ".tip img")
        assert not picture.is_displayed()
        ActionChains(driver).move_to_element(point).perform()
        wait(lambda d: picture.is_displayed(), timeout=10)
        assert driver.execute_script("return arguments[0].naturalWidth", picture) == MAP_THUMBNAIL
        assert QUERY in point.find_element(By.CSS_SELECTOR, ".tip").text
        assert driver.save_screenshot(str(tmp_path / "map.png"))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
