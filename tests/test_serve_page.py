"""The search page in a real headless Chromium: upload an image, see its nearest images and attention map.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``) and
selenium from PyPI; skipped with the reason when any is missing. Chromium runs offline as root:
no sandbox, no GPU, no background networking, a fresh empty profile.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import enlarged, png_pixels

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install -y chromium chromium-driver", allow_module_level=True
    )
pytest.importorskip("selenium", reason="needs selenium: pip install selenium")
pytest.importorskip("fastapi", reason="needs the serve extras: pip install 'fdino[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extras: pip install 'fdino[serve]'")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_serve import write_images  # noqa: E402  (tests/ is on sys.path)

import fdino  # noqa: E402
from fdino.checkpoint import save_checkpoint  # noqa: E402
from fdino.serve import BackgroundServer, FeatureService, ServiceConfig, create_app  # noqa: E402
from fdino.weights import load_model  # noqa: E402

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, fdino.init_state(fdino.presets.smoke(global_crop_size=32, local_crop_size=16)))
    images = tmp_path_factory.mktemp("images")
    write_images(images, n=8)
    loaded = load_model(run)
    service = FeatureService(
        loaded,
        images,
        arch=loaded.info.arch,
        cache_dir=tmp_path_factory.mktemp("cache"),
        config=ServiceConfig(max_upload_bytes=256 * 1024),
    )
    service.refresh()
    with BackgroundServer(create_app(service)) as url:
        yield url, images
    service.close()


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="fdino-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def test_upload_shows_similar_images_and_attention(server, browser):
    url, images = server
    query = sorted(images.glob("*.png"))[3]
    browser.get(url + "/")
    wait(browser, lambda d: "images indexed" in d.find_element(By.ID, "status").text)
    assert "8 images indexed" in browser.find_element(By.ID, "status").text

    browser.find_element(By.ID, "file").send_keys(str(query))
    cards = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result"))
    assert len(cards) == 8  # k defaults to 8 on the page
    assert cards[0].get_attribute("data-path") == query.name
    assert cards[0].find_element(By.CLASS_NAME, "score").text == "#1 1.0000"
    # Result thumbnails and the attention map are real images the browser decoded.
    wait(
        browser,
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
        ),
    )
    wait(
        browser,
        lambda d: d.execute_script(
            "const i = document.getElementById('attention-image');"
            "return !document.getElementById('attention').hidden && i.complete && i.naturalWidth > 0"
        ),
    )
    assert browser.find_element(By.ID, "error").text == ""
    # The attention image shown is the query (left) under a heat map (right), not a blank picture.
    shown = browser.execute_async_script(READ_ATTENTION_IMAGE)
    assert shown.startswith("data:image/png;base64,"), shown[:200]
    pixels = png_pixels(base64.b64decode(shown.split(",", 1)[1]), size=(224, 2 * 224 + 4))
    np.testing.assert_allclose(pixels[:, :224], enlarged(query, 224), atol=1)
    assert np.abs(pixels[:, 228:] - pixels[:, :224]).mean() > 20


# The bytes behind the page's attention <img> (a blob: URL) as a data: URL, handed to Selenium's callback.
READ_ATTENTION_IMAGE = """
const done = arguments[arguments.length - 1];
fetch(document.getElementById("attention-image").src).then(r => r.blob()).then(blob => {
  const reader = new FileReader();
  reader.onload = () => done(reader.result);
  reader.onerror = () => done("error: FileReader failed");
  reader.readAsDataURL(blob);
}, e => done("error: " + e));
"""


def test_bad_upload_shows_the_error(server, browser, tmp_path):
    url, _ = server
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    browser.get(url + "/")
    wait(browser, lambda d: "images indexed" in d.find_element(By.ID, "status").text)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    message = wait(browser, lambda d: d.find_element(By.ID, "error").text)
    assert "not an image" in message
    assert browser.find_elements(By.CSS_SELECTOR, "#results .result") == []
