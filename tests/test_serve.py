"""The feature service: API answers, bad uploads, batching under 50 concurrent requests, the index cache.

A tiny ViT (fdino.presets.smoke at 32 px) and a dozen 32 px images keep this file at a few seconds.
API tests use FastAPI's TestClient; the concurrency test runs a real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import enlarged, grid_cell, png_pixels, tile_count

pytest.importorskip("fastapi", reason="needs the serve extras: pip install 'fdino[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extras: pip install 'fdino[serve]'")
pytest.importorskip("python_multipart", reason="needs python-multipart (serve extras)")
httpx = pytest.importorskip("httpx", reason="needs httpx for the API tests")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import fdino  # noqa: E402
from fdino.checkpoint import save_checkpoint  # noqa: E402
from fdino.data import build_dataset  # noqa: E402
from fdino.eval.render import CAPTION, grid_size  # noqa: E402
from fdino.serve import (  # noqa: E402
    BackgroundServer,
    BatchQueue,
    FeatureService,
    FolderIndex,
    ServiceConfig,
    create_app,
    scan_folder,
)
from fdino.serve.cli import build_service, register  # noqa: E402
from fdino.weights import ExportInfo, LoadedModel, load_model  # noqa: E402

N_IMAGES = 12


def write_images(folder: Path, n: int = N_IMAGES, start: int = 0) -> list[Path]:
    """``n`` distinct 32 px PNGs from the built-in data set (one per query-split item)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = build_dataset("shapes10", split="query", n=start + n).dataset
    paths = []
    for i in range(start, start + n):
        image, label = data[i]
        array = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image
        path = folder / f"img{i:03d}_class{int(label)}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run")
    save_checkpoint(path, fdino.init_state(fdino.presets.smoke(global_crop_size=32, local_crop_size=16)))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder)
    (folder / "sub").mkdir()
    write_images(folder / "sub", n=2, start=N_IMAGES)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # skipped, counted, never served
    (folder / "notes.txt").write_text("not an image extension: ignored")
    return folder


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_model(run_dir)


@pytest.fixture(scope="module")
def service(loaded, images, tmp_path_factory):
    # max_queue: test_50_concurrent_searches sends 50 at once (over the default bound of 32, which answers 503).
    config = ServiceConfig(
        max_upload_bytes=64 * 1024, max_pixels=512 * 512, max_wait_ms=20.0, max_batch=32, max_queue=64
    )
    svc = FeatureService(
        loaded, images, arch=loaded.info.arch, config=config, cache_dir=tmp_path_factory.mktemp("cache")
    )
    svc.refresh()
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    # The service answers only to its own host names (a DNS-rebinding guard), not TestClient's "testserver".
    with TestClient(create_app(service), base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as c:
        yield c


def indexed(images: Path) -> list[Path]:
    return sorted(p for p in images.rglob("img*.png"))


def upload(path: Path, field: str = "file") -> dict:
    return {field: (path.name, path.read_bytes(), "image/png")}


# --- answers -------------------------------------------------------------------------------------------
def test_health_reports_model_and_index(client, images):
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["images"] == N_IMAGES + 2  # recursive; broken.png and notes.txt are not indexed
    assert body["skipped_images"] == 1
    assert body["attention"] is True and body["feature_dim"] == 32 and body["image_size"] == 32


def test_embed_returns_the_backbone_feature(client, loaded, images):
    path = indexed(images)[0]
    r = client.post("/embed", files=upload(path))
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["feature"])
    m = loaded
    from fdino.data import EvalTransform, load_rgb

    with torch.no_grad():
        want = m.backbone(EvalTransform(m.image_size, mean=m.mean, std=m.std)(load_rgb(path))[None])[0]
    assert r.json()["dim"] == 32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_search_finds_the_query_itself_first(client, images):
    for path in indexed(images)[:4]:
        r = client.post("/search", files=upload(path), data={"k": "5"})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 5
        assert results[0]["path"] == path.relative_to(images).as_posix()
        assert results[0]["score"] > 0.9999
        scores = [h["score"] for h in results]
        assert scores == sorted(scores, reverse=True)
        assert client.get(results[0]["url"]).content == path.read_bytes()


def test_attention_png_shows_query_and_map(client, images):
    r = client.post("/attention", files=upload(indexed(images)[0]))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    assert image.size == (2 * 224 + 4, 224)  # 32 px input enlarged x7, side by side with a 4 px gap
    # Left: the query itself; right: it under a heat map of one colour per 4 px patch (28 px blocks),
    # 0.4 image + 0.6 heat (FeatureService.attention_png); another query gets another heat map.
    heats = []
    for path in indexed(images)[:2]:
        r = client.post("/attention", files=upload(path))
        pixels = png_pixels(r.content, size=(224, 2 * 224 + 4))
        left, gap, right = pixels[:, :224], pixels[:, 224:228], pixels[:, 228:]
        np.testing.assert_allclose(left, enlarged(path, 224), atol=1)
        assert (gap == 255).all() and np.abs(right - left).mean() > 20
        heat = ((right - 0.4 * left) / 0.6).reshape(8, 28, 8, 28, 3)
        assert np.ptp(heat, axis=(1, 3)).max() <= 3
        heats.append(heat.mean(axis=(1, 3)))
    assert np.abs(heats[0] - heats[1]).max() > 5


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    html = r.text
    assert 'id="file"' in html and "/search" in html and "/attention" in html
    assert "http://" not in html and "https://" not in html  # no CDN: the machine may have no internet


# --- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["/embed", "/search", "/attention"])
@pytest.mark.parametrize(
    "case, status, words",
    [
        ("not_image", 415, "not an image"),
        ("empty", 400, "empty"),
        ("truncated", 415, "not a decodable image"),
        ("oversized", 413, "too large"),  # beyond the request-body limit: refused from Content-Length
        ("oversized_file", 413, "the file has more than"),  # body within the limit's slack, file over 64 KiB
        ("too_many_pixels", 413, "pixels"),
        ("bomb_header", 413, "too large to decode"),  # a 67-byte PNG claiming 30000 x 30000 pixels
        ("wrong_field", 422, "'file'"),
        ("no_body", 422, "'file'"),
    ],
)
def test_bad_uploads_get_clear_json_errors(client, images, endpoint, case, status, words):
    good = indexed(images)[0].read_bytes()
    big = io.BytesIO()
    Image.new("RGB", (600, 600), (10, 200, 30)).save(big, format="PNG")  # 360,000 pixels > 512 x 512, ~2 KB
    requests = {
        "not_image": {"files": {"file": ("x.png", b"hello, I am text", "image/png")}},
        "empty": {"files": {"file": ("x.png", b"", "image/png")}},
        "truncated": {"files": {"file": ("x.png", good[: len(good) // 2], "image/png")}},
        "oversized": {"files": {"file": ("x.png", os.urandom(200 * 1024), "image/png")}},
        "oversized_file": {"files": {"file": ("x.png", os.urandom(80 * 1024), "image/png")}},
        "too_many_pixels": {"files": {"file": ("x.png", big.getvalue(), "image/png")}},
        "bomb_header": {"files": {"file": ("x.png", _png_claiming(30000, 30000), "image/png")}},
        "wrong_field": {"files": {"image": ("x.png", good, "image/png")}},
        "no_body": {},
    }
    r = client.post(endpoint, **requests[case])
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and words in body["error"]


def test_declared_oversized_body_is_refused_before_reading(client):
    r = client.post(
        "/embed",
        content=b"x" * 10,
        headers={"content-length": str(10**9), "content-type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 413 and "limited to 65536 bytes" in r.json()["error"]


def test_streamed_oversized_body_without_length_is_refused(client):
    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(40):
            yield b"x" * 8192

    r = client.post("/embed", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "too large" in r.json()["error"]


def test_malformed_multipart_and_bad_k(client, images):
    r = client.post("/search", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 400 and "error" in r.json()
    for k, words in (("abc", "'k'"), ("0", "k=0"), ("1000", "k=1000")):
        r = client.post("/search", files=upload(indexed(images)[0]), data={"k": k})
        assert r.status_code == 422 and words in r.json()["error"], r.text
    assert client.get("/health").json()["status"] == "ok"  # still serving


def test_only_indexed_files_are_served(client, images):
    assert client.get("/images/broken.png").status_code == 404
    assert client.get("/images/notes.txt").status_code == 404
    assert client.get("/images/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.get("/images/sub/" + indexed(images / "sub")[0].name).status_code == 200


class TinyCNN(torch.nn.Module):
    """A non-ViT backbone: ``[B, 3, H, W] -> [B, 8]``."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_service_without_folder_or_vit(loaded):
    cnn = LoadedModel(
        TinyCNN().eval(), ExportInfo(arch="tiny-cnn", image_size=32, mean=loaded.mean, std=loaded.std), "timm"
    )
    svc = FeatureService(cnn, None, arch="tiny-cnn")
    try:
        with TestClient(create_app(svc), base_url="http://localhost:8000") as c:
            assert c.get("/health").json()["attention"] is False
            r = c.post("/search", files={"file": ("a.png", _png(), "image/png")})
            assert r.status_code == 409 and "--images" in r.json()["error"]
            r = c.post("/attention", files={"file": ("a.png", _png(), "image/png")})
            assert r.status_code == 409 and "ViT" in r.json()["error"]
            r = c.post("/embed", files={"file": ("a.png", _png(), "image/png")})
            assert r.status_code == 200 and r.json()["dim"] == 8
    finally:
        svc.close()


def _png_claiming(width: int, height: int) -> bytes:
    """A 1-pixel PNG whose header (with a valid CRC) claims ``width x height`` pixels."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _png(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# --- concurrency and batching (real server) ------------------------------------------------------------
def test_50_concurrent_searches_all_find_themselves(service, images):
    paths = indexed(images)
    before = service.queue.stats()

    async def main(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:

            async def one(i: int):
                path = paths[i % len(paths)]
                r = await c.post("/search", files=upload(path), data={"k": "3"})
                return path, r

            return await asyncio.gather(*(one(i) for i in range(50)))

    with BackgroundServer(create_app(service)) as url:
        assert url.startswith("http://127.0.0.1:")
        answers = asyncio.run(main(url))
    for path, r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["path"] == path.relative_to(images).as_posix()
    after = service.queue.stats()
    assert after["items"] - before["items"] == 50
    assert after["batches"] - before["batches"] < 50  # requests shared forward passes
    assert after["largest_batch"] > 1


def test_batch_queue_returns_each_row_to_its_caller():
    calls = []

    def fn(batch):
        calls.append(len(batch))
        return batch * 2

    with ThreadPoolExecutor(1) as pool:
        queue = BatchQueue(fn, executor=pool, max_batch=8, max_wait_ms=50)

        async def main():
            xs = [torch.full((3,), float(i)) for i in range(20)]
            out = await asyncio.gather(*(queue.submit(x) for x in xs))
            await queue.aclose()
            return xs, out

        xs, out = asyncio.run(main())
    for x, y in zip(xs, out):
        torch.testing.assert_close(y, x * 2)
    assert sum(calls) == 20 and max(calls) <= 8 and len(calls) < 20


def test_batch_queue_delivers_errors_without_dying():
    def fn(batch):
        if (batch < 0).any():
            raise ValueError("negative input")
        return batch

    with ThreadPoolExecutor(1) as pool:
        queue = BatchQueue(fn, executor=pool, max_batch=4, max_wait_ms=0)

        async def main():
            with pytest.raises(ValueError, match="negative"):
                await queue.submit(torch.tensor([-1.0]))
            ok = await queue.submit(torch.tensor([1.0]))  # the worker survived
            await queue.aclose()
            return ok

        assert asyncio.run(main()).item() == 1.0


# --- the index cache ---------------------------------------------------------------------------------
class CountingBackbone(torch.nn.Module):
    """The backbone, counting the images it embeds."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.rows = backbone, 0
        self.num_features = backbone.num_features

    def forward(self, batch):
        self.rows += len(batch)
        return self.backbone(batch)


def test_index_cache_reuses_rows_and_refreshes_changed_files(loaded, tmp_path):
    folder = tmp_path / "imgs"
    paths = write_images(folder, n=5)
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    m = loaded
    cache = tmp_path / "cache" / "index.safetensors"

    def make(key="model-a"):
        counting = CountingBackbone(m.backbone)
        return FolderIndex(
            folder,
            counting,
            m.image_size,
            m.mean,
            m.std,
            key,
            cache_path=cache,
            model_info={"source": "run", "arch": None, "which": "teacher"},
        ), counting

    index, counter = make()
    result = index.refresh()
    assert (result.added, result.skipped, counter.rows) == (5, 1, 5) and cache.exists()
    assert list(index.skipped) == ["bad.jpg"]
    features = index.features.clone()

    index, counter = make()  # a new process: everything comes from the disk cache, the bad file is not retried
    result = index.refresh()
    assert (result.added, result.reused, result.skipped, counter.rows) == (0, 5, 0, 0)
    torch.testing.assert_close(index.features, features)

    st = paths[1].stat()  # same bytes, newer mtime: re-embedded; a deleted file drops out; a new one is added
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    paths[2].unlink()
    write_images(folder, n=1, start=7)
    result = index.refresh()
    assert (result.added, result.removed, result.reused, counter.rows) == (2, 2, 3, 2)
    assert [f.path for f in index.files] == [f.path for f in scan_folder(folder) if f.path != "bad.jpg"]
    assert index.refresh() == (0, 0, 0, 5)  # unchanged folder: nothing to do

    other, _ = make("model-b")
    assert len(other) == 0  # another model never reuses the rows


def test_cache_is_an_embeddings_file(service):
    """The cache is in `fdino embed`'s format, so `fdino search CACHE query.png` reads it."""
    from fdino.eval.embed import load_embeddings

    emb = load_embeddings(service.index.cache_path)
    assert emb.features.shape == (N_IMAGES + 2, 32) and len(emb.paths) == N_IMAGES + 2
    assert all(Path(p).is_absolute() and Path(p).exists() for p in emb.paths)
    assert emb.info["image_size"] == 32 and set(emb.info["model"]) >= {"arch"}


def test_search_notices_new_files(service, client, images):
    new = write_images(images / "added", n=1, start=40)[0]
    service._last_check = 0.0  # the folder is checked every refresh_interval (2 s): make this search check it
    try:
        client.post("/search", files=upload(new), data={"k": "1"})  # starts a refresh in the background
        service.refresh_in_background().result(timeout=60)  # (the one running) done: later searches see it
        r = client.post("/search", files=upload(new), data={"k": "1"})
        assert r.json()["results"][0]["path"] == "added/" + new.name
    finally:
        new.unlink()
        (images / "added").rmdir()
        service._last_check = 0.0
        service.refresh()


# --- CLI -------------------------------------------------------------------------------------------------
def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdino")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_serve_cli_defaults_and_service(run_dir, images, tmp_path):
    args = serve_parser().parse_args(["serve", str(run_dir), "--images", str(images), "--cache-dir", str(tmp_path)])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.which == "teacher" and callable(args.func)
    svc = build_service(args)
    try:
        svc.refresh()
        assert len(svc.index) == N_IMAGES + 2 and svc.config.max_upload_bytes == 10 * 2**20
    finally:
        svc.close()
    # The cache names its model, so `fdino search CACHE QUERY` works on it without --model.
    from fdino.cli import main

    query = indexed(images)[5]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            main(
                [
                    "search",
                    str(svc.index.cache_path),
                    str(query),
                    "--k",
                    "2",
                    "--device",
                    "cpu",
                    "--out",
                    str(tmp_path / "search.png"),
                ]
            )
            == 0
        )
    assert (tmp_path / "search.png").exists()
    pixels = png_pixels(tmp_path / "search.png", size=grid_size(1, 3, 96, captions=True))  # query + 2 matches
    assert tile_count(pixels[2:98]) == 3
    tiles = [grid_cell(pixels, 0, j, 96, band=CAPTION) for j in range(3)]
    np.testing.assert_allclose(tiles[0], enlarged(query, 96), atol=1)
    assert np.array_equal(tiles[1], tiles[0]) and np.abs(tiles[2] - tiles[0]).mean() > 5  # itself, then another
    first = out.getvalue().splitlines()[1].split()
    assert float(first[0]) > 0.9999 and Path(first[1]) == query.resolve()


def test_serve_cli_rejects_missing_folder_and_source(run_dir, tmp_path, capsys):
    parser = serve_parser()
    args = parser.parse_args(["serve", str(run_dir), "--images", str(tmp_path / "nope")])
    assert args.func(args) == 2 and "not a folder" in capsys.readouterr().err
    args = parser.parse_args(["serve", str(tmp_path / "missing-run")])
    assert args.func(args) == 2 and "does not exist" in capsys.readouterr().err
