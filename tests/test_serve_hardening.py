"""`fdino serve` under hostile input: header-bounded decoding, formats, odd file names, host and token
checks, queue and timeouts, background re-indexing, symlinks. Each test names the hole it closes.

Requests go through httpx's in-process ASGI transport (concurrent on one event loop, no sockets) with
``Host: 127.0.0.1:8000``; the CLI test captures what `fdino serve` hands to uvicorn.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extras: pip install 'fdino[serve]'")
pytest.importorskip("python_multipart", reason="needs python-multipart (serve extras)")
httpx = pytest.importorskip("httpx", reason="needs httpx for the API tests")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import fdino  # noqa: E402
from fdino.checkpoint import save_checkpoint  # noqa: E402
from fdino.data import load_rgb  # noqa: E402
from fdino.serve import FeatureService, ServiceConfig, UploadError, create_app, decode_image  # noqa: E402
from fdino.weights import load_model  # noqa: E402

BASE = "http://127.0.0.1:8000"
MiB = 2**20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, fdino.init_state(fdino.presets.smoke(global_crop_size=32, local_crop_size=16)))
    return run


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_model(run_dir)


@pytest.fixture
def make_service(loaded, tmp_path):
    made = []

    def make(folder: Path | None = None, **config) -> FeatureService:
        svc = FeatureService(loaded, folder, config=ServiceConfig(**config), cache_dir=tmp_path / "cache")
        svc.refresh()
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()


def png(size=(32, 32), colour=(200, 30, 30), fmt="PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt, **save)
    return buf.getvalue()


@functools.lru_cache(maxsize=8)
def png_zeros(width: int, height: int, *, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A valid all-zero PNG written row by row (never held decoded): tiny file, huge decoded size."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\x00" * (1 + width * channels * bit_depth // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def run_requests(app, requests: list[tuple[str, str, dict]], delays=None) -> list[tuple[httpx.Response, float]]:
    """Send ``(method, url, kwargs)`` concurrently (after ``delays[i]`` s); ``(response, seconds)`` each."""

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE, timeout=120) as c:

            async def one(i, method, url, kwargs):
                await asyncio.sleep((delays or [0] * len(requests))[i])
                start = time.perf_counter()
                r = await c.request(method, url, **kwargs)
                return r, time.perf_counter() - start

            return await asyncio.gather(*(one(i, *req) for i, req in enumerate(requests)))

    return asyncio.run(main())


def upload(data: bytes, name: str = "x.png") -> dict:
    return {"files": {"file": (name, data, "application/octet-stream")}}


# --- 8. memory: work per request bounded from the header, decoding on a bounded pool -------------------------
def vm_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def test_hostile_uploads_are_refused_from_the_header_with_bounded_memory(make_service):
    # Hole: a 100 KB PNG of 4,000,000 x 10 pixels passed the pixel check and its resize asked for ~73 GiB;
    # 16-bit and RGBA 40-megapixel PNGs cost ~1 GB each, decoded by up to 6 threads at once.
    svc = make_service(max_upload_bytes=MiB)  # default limits otherwise; the compressed uploads are < 160 KB
    uploads = [png_zeros(4_000_000, 10)] * 3  # 40 MP (= max_pixels) but 400000:1
    uploads += [png_zeros(6300, 6300, bit_depth=16)] * 3  # 39.7 MP 16-bit grey: ~600 MiB to preprocess
    uploads += [png_zeros(6300, 6300, color_type=6)] * 2  # 39.7 MP RGBA: ~760 MiB
    app = create_app(svc)
    assert run_requests(app, [("POST", "/embed", upload(png()))])[0][0].status_code == 200  # warm up
    # Limit: 256 MiB, half of one request's decode budget (512 MiB): none of these may be decoded. Measured
    # before the fix: each of the 16-bit / RGBA uploads alone needs 600-900 MB, the aspect ones fail to allocate.
    base, peak, done = vm_rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], vm_rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        answers = run_requests(app, [("POST", "/embed", upload(u)) for u in uploads])
    finally:
        done.set()
        sampler.join()
    for (r, _), words in zip(answers, [("max_aspect_ratio", "20:1")] * 3 + [("max_decode_bytes", "Downscale")] * 5):
        assert r.status_code == 413, r.text
        assert all(w in r.json()["error"] for w in words), r.text
    assert max(peak[0], vm_rss()) - base < 256 * MiB, f"RSS grew by {(peak[0] - base) / MiB:.0f} MiB"


def test_decode_budget_messages_name_the_limit_and_the_fix():
    with pytest.raises(UploadError, match=r"aspect ratio 400000:1 exceeds the limit of 20:1.*crop") as err:
        decode_image(png_zeros(4_000_000, 10), max_pixels=40_000_000, resize_size=256)
    assert err.value.status == 413
    with pytest.raises(UploadError, match=r"need about \d+ MiB.*limit per request is 64 MiB.*Downscale") as err:
        decode_image(png_zeros(3000, 3000, bit_depth=16), max_pixels=10**8, max_decode_bytes=64 * MiB)
    assert err.value.status == 413
    small = decode_image(png_zeros(300, 200, bit_depth=16), max_pixels=10**8, max_decode_bytes=64 * MiB)
    assert small.size == (300, 200) and small.mode == "RGB"


def test_decoding_runs_on_a_bounded_pool(make_service, monkeypatch):
    svc = make_service(decode_workers=2)
    running, most, lock = [0], [0], threading.Lock()
    real = svc.decode

    def slow_decode(data):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return real(data)

    monkeypatch.setattr(svc, "decode", slow_decode)
    answers = run_requests(create_app(svc), [("POST", "/embed", upload(png()))] * 6)
    assert [r.status_code for r, _ in answers] == [200] * 6
    assert most[0] == 2  # before: asyncio.to_thread's pool ran up to min(32, cpus + 4) at once


# --- 9. formats and EXIF orientation ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["TIFF", "EPS", "ICO", "TGA", "PPM"])
def test_only_documented_formats_are_opened(make_service, fmt):
    data = png(fmt=fmt) if fmt != "EPS" else b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n"
    r = TestClient(create_app(make_service()), base_url=BASE).post("/embed", **upload(data))
    assert r.status_code == 415, r.text  # before: TIFF, ICO, TGA and PPM were decoded (200)
    assert "JPEG, PNG, WebP, BMP or GIF (first frame)" in r.json()["error"]


def oriented_jpeg() -> bytes:
    """A 40 x 20 JPEG, left half red and right half blue, stored with EXIF orientation 6 (rotate 90 cw)."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_exif_orientation_is_applied_in_service_and_training(tmp_path):
    (tmp_path / "o.jpg").write_bytes(oriented_jpeg())  # a training / indexed file
    for image in (decode_image(oriented_jpeg(), max_pixels=10**6), load_rgb(tmp_path / "o.jpg")):
        assert image.size == (20, 40)  # transposed: upright
        top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
        assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the left (red) half is now on top


# --- 10. file names: not UTF-8, HTML, URL syntax ---------------------------------------------------------------
ODD_NAMES = [b"bad\xff.png", b"<img src=x onerror=alert(1)>.png", b"a#b?.png", b"sp ace%41.png"]


def odd_folder(folder: Path) -> dict[bytes, bytes]:
    folder.mkdir()
    files = {}
    for i, name in enumerate(ODD_NAMES):
        data = png(colour=(40 * i, 255 - 50 * i, 90))
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            f.write(data)
        files[name] = data
    return files


def test_odd_file_names_are_indexed_shown_as_text_and_served(make_service, tmp_path):
    files = odd_folder(tmp_path / "odd")
    svc = make_service(tmp_path / "odd")  # before: UnicodeEncodeError in refresh(), fdino serve did not start
    assert len(svc.index) == len(ODD_NAMES)
    client = TestClient(create_app(svc), base_url=BASE)
    r = client.post("/search", data={"k": "4"}, **upload(files[b"a#b?.png"]))
    assert r.status_code == 200, r.text
    hits = {h["path"]: h["url"] for h in r.json()["results"]}
    assert set(hits) == {n.decode("utf-8", "replace") for n in ODD_NAMES}  # text; U+FFFD for the bad byte
    assert hits["bad\ufffd.png"] == "/images/bad%FF.png"
    for name, data in files.items():
        url = hits[name.decode("utf-8", "replace")]
        assert not set(url[len("/images/") :]) & set("#?<> "), url  # percent-encoded
        got = client.get(url)
        assert got.status_code == 200 and got.content == data, (name, url)
    again = FeatureService(svc.model, tmp_path / "odd", config=svc.config, cache_dir=tmp_path / "cache")
    try:
        assert again.refresh().reused == len(ODD_NAMES)  # the cache round-trips such names
    finally:
        again.close()


def test_page_sets_names_as_text_only():
    from fdino.serve.app import page_html

    script = page_html()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
        assert sink not in script  # names reach the DOM only through textContent, attributes and URLs


# --- 11. host, token, docs, 500s ----------------------------------------------------------------------------
def test_foreign_host_headers_are_refused(make_service):
    app = create_app(make_service(), allowed_hosts=["127.0.0.1:8123", "localhost:8123"])
    for host, status in (("127.0.0.1:8123", 200), ("localhost:8123", 200), ("evil.example:8123", 400)):
        assert TestClient(app, base_url=f"http://{host}").get("/health").status_code == status, host
    assert TestClient(app, base_url="http://127.0.0.1:9999").get("/health").status_code == 400
    default = create_app(make_service())  # loopback names on any port; a rebound domain is refused
    assert TestClient(default, base_url="http://attacker.example").get("/health").status_code == 400


def test_token_is_required_on_every_endpoint(make_service, tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(png())
    client = TestClient(create_app(make_service(tmp_path / "f"), token="s3cret"), base_url=BASE)
    calls = [("GET", "/", {}), ("GET", "/health", {}), ("GET", "/images/a.png", {})]
    calls += [("POST", p, upload(png())) for p in ("/embed", "/search", "/attention")]
    for method, path, kwargs in calls:
        assert client.request(method, path, **kwargs).status_code == 401, path
        bad = client.request(method, path, headers={"Authorization": "Bearer wrong"}, **kwargs)
        assert bad.status_code == 401 and "token" in bad.json()["error"]
        good = client.request(method, path, headers={"Authorization": "Bearer s3cret"}, **kwargs)
        assert good.status_code == 200, (path, good.text)
    assert client.get("/images/a.png?token=s3cret").status_code == 200  # the page's <img> URLs


def test_docs_are_off_unless_asked(make_service):
    svc = make_service()
    off, on = TestClient(create_app(svc), base_url=BASE), TestClient(create_app(svc, docs=True), base_url=BASE)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert off.get(path).status_code == 404 and on.get(path).status_code == 200


def test_internal_errors_do_not_echo_the_exception(make_service, monkeypatch, caplog):
    svc = make_service()

    async def broken(data):
        raise RuntimeError("secret detail /home/alice/.ssh")

    monkeypatch.setattr(svc, "embed", broken)
    with caplog.at_level(logging.ERROR, logger="fdino.serve"):
        r = TestClient(create_app(svc), base_url=BASE, raise_server_exceptions=False).post("/embed", **upload(png()))
    assert r.status_code == 500 and "secret" not in r.text and "RuntimeError" not in r.text
    request_id = r.json()["request_id"]
    assert request_id in r.json()["error"] and request_id in caplog.text and "secret detail" in caplog.text


def test_cli_requires_a_token_to_bind_publicly_and_passes_limits_to_uvicorn(run_dir, tmp_path, monkeypatch, capsys):
    import argparse

    from fdino.serve import BackgroundServer
    from fdino.serve.cli import check_exposure, register

    parser = argparse.ArgumentParser(prog="fdino")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", str(tmp_path / "no-run"), "--host", "0.0.0.0"])
    assert args.func(args) == 2 and "--token" in capsys.readouterr().err  # refused before loading anything
    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    argv = ["serve", str(run_dir), "--device", "cpu", "--host", "0.0.0.0", "--port", "8123", "--token", "t0k"]
    args = parser.parse_args([*argv, "--max-connections", "7", "--keep-alive", "3", "--allow-host", "box.lan:8123"])
    assert args.func(args) == 0
    assert (seen["limit_concurrency"], seen["timeout_keep_alive"], seen["host"]) == (7, 3, "0.0.0.0")
    client = TestClient(seen["app"], base_url="http://box.lan:8123")
    assert client.get("/health").status_code == 401
    assert client.get("/health", headers={"Authorization": "Bearer t0k"}).status_code == 200
    assert check_exposure(parser.parse_args(["serve", str(run_dir), "--host", "0.0.0.0", "--allow-public"])) is None
    svc = FeatureService(load_model(run_dir), None, config=ServiceConfig(max_connections=9, keep_alive_timeout=2))
    server = BackgroundServer(create_app(svc)).server.config  # (not started)
    assert (server.limit_concurrency, server.timeout_keep_alive) == (9, 2)
    svc.close()


# --- 12. backpressure, timeouts, background refresh, symlinks -------------------------------------------------
def test_full_queue_answers_503_with_retry_after(make_service, monkeypatch):
    svc = make_service(max_queue=2)
    real = svc.embed

    async def slow_embed(data):
        await asyncio.sleep(0.5)
        return await real(data)

    monkeypatch.setattr(svc, "embed", slow_embed)
    answers = run_requests(create_app(svc), [("POST", "/embed", upload(png()))] * 4, delays=[0, 0, 0.1, 0.1])
    statuses = sorted(r.status_code for r, _ in answers)
    assert statuses == [200, 200, 503, 503]  # before: all four queued (200)
    busy = [r for r, _ in answers if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "max_queue" in r.json()["error"] for r in busy)


def test_slow_requests_time_out(make_service, monkeypatch):
    svc = make_service(request_timeout=0.5)

    async def stuck(data):
        await asyncio.sleep(30)

    async def trickle():  # a client that sends part of its upload, then stalls
        yield b"--b\r\nContent-Disposition: form-data; name=file; filename=x.png\r\n\r\n"
        await asyncio.sleep(30)

    monkeypatch.setattr(svc, "embed", stuck)
    slow_upload = {"content": trickle(), "headers": {"content-type": "multipart/form-data; boundary=b"}}
    answers = run_requests(create_app(svc), [("POST", "/embed", upload(png())), ("POST", "/embed", slow_upload)])
    assert [r.status_code for r, _ in answers] == [504, 408]  # before: both waited for as long as it took
    assert all("0.5 s" in r.json()["error"] and seconds < 5 for r, seconds in answers)


def test_refresh_runs_in_the_background(make_service, tmp_path, monkeypatch):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(png())
    svc = make_service(tmp_path / "f", refresh_interval=0.0)
    real = svc.index.refresh
    monkeypatch.setattr(svc.index, "refresh", lambda: (time.sleep(4.0), real())[1])  # a slow re-index
    answers = run_requests(
        create_app(svc),
        [("POST", "/search", {"data": {"k": "1"}, **upload(png())}), ("POST", "/embed", upload(png()))],
        delays=[0, 0.3],
    )
    for r, seconds in answers:  # before: the search waited for the refresh, the embed behind it (4+ s)
        assert r.status_code == 200 and seconds < 2.5, (r.text, seconds)
    assert svc.health()["refreshing"]
    svc.refresh_in_background().result(timeout=30)


def test_symlinks_outside_the_folder_are_never_served(make_service, tmp_path):
    folder, outside = tmp_path / "f", tmp_path / "secret"
    folder.mkdir()
    outside.mkdir()
    (outside / "key.png").write_bytes(png(colour=(1, 2, 3)))
    (folder / "a.png").write_bytes(png())
    (folder / "b.png").write_bytes(png(colour=(9, 9, 9)))
    (folder / "inner.png").symlink_to(folder / "b.png")  # inside: indexed and served
    (folder / "leak.png").symlink_to(outside / "key.png")  # outside: neither
    svc = make_service(folder)
    assert [f.path for f in svc.index.files] == ["a.png", "b.png", "inner.png"]
    assert svc.health()["outside_links"] == 1
    client = TestClient(create_app(svc), base_url=BASE)
    assert client.get("/images/inner.png").status_code == 200 and client.get("/images/leak.png").status_code == 404
    (folder / "a.png").unlink()
    (folder / "a.png").symlink_to(outside / "key.png")  # replaced after indexing
    r = client.get("/images/a.png")
    assert r.status_code == 404 and r.content != (outside / "key.png").read_bytes()  # before: 200, the secret


def test_browser_shows_odd_names_as_text_with_a_token(make_service, tmp_path):
    """The search page in headless Chromium (skipped without it), opened as /?token=...: every result's
    name is shown as text (no injected element, no alert) and every thumbnail URL loads its file."""
    chromium, driver_path = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not (chromium.exists() and driver_path.exists()):
        pytest.skip(f"needs {chromium} and {driver_path}: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from fdino.serve import BackgroundServer

    odd_folder(tmp_path / "odd")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    (tmp_path / "q.png").write_bytes(png())
    with BackgroundServer(create_app(make_service(tmp_path / "odd"), token="s3cret")) as url:
        browser = webdriver.Chrome(service=Service(executable_path=str(driver_path)), options=options)
        try:
            browser.get(url + "/?token=s3cret")
            browser.execute_script("window.alerts = []; window.alert = (m) => window.alerts.push(m);")
            wait = WebDriverWait(browser, 60, poll_frequency=0.1)
            wait.until(lambda d: "4 images indexed" in d.find_element("id", "status").text)
            browser.find_element("id", "file").send_keys(str(tmp_path / "q.png"))
            wait.until(lambda d: len(d.find_elements("css selector", "#results .result")) == 4)
            shown = [e.text for e in browser.find_elements("css selector", "#results .result .path")]
            assert sorted(shown) == sorted(n.decode("utf-8", "replace") for n in ODD_NAMES)
            loaded = "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth)"
            wait.until(lambda d: d.execute_script(loaded))  # each quoted URL (with the token) served its file
            assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
            assert browser.execute_script("return window.alerts") == []
        finally:
            browser.quit()
