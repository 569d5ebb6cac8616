"""The viewer in a real browser: `mrantool view` in a subprocess, driven by headless Chromium through Selenium.

Opens a slide, turns the attention overlay on, clicks the most attended patch, checks the similar-patch panel, and
follows a hit to its slide, with a screenshot of each state. By default it runs on the small demo-like fixture and
keeps the screenshots in a temp folder; the README's screenshots come from a real `mrantool demo` output:

    MRANTOOL_VIEWER_DEMO=/path/to/demo MRANTOOL_SCREENSHOTS=docs/images pytest tests/test_browser.py
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrantool.store import FeatureStore
from mrantool.training.outputs import read_predictions
from mrantool.viz.slide_attention import load_slide_attention

CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1440,1000", "--hide-scrollbars")


def browser_paths() -> tuple[str, str]:
    """(chromium binary, chromedriver); a skip (a failure under CI=true) when they are not installed."""
    binary = next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if binary and driver:
        return binary, driver
    reason = "no chromium/chromedriver on PATH (apt-get install chromium chromium-driver; .ci/run installs them)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}, but CI=true: the browser test must run in CI")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def demo(request):
    """A `mrantool demo` output folder: the real one named by MRANTOOL_VIEWER_DEMO, else the demo-like fixture."""
    folder = os.environ.get("MRANTOOL_VIEWER_DEMO")
    if folder:
        root = Path(folder)
        return {"store": root / "store.zarr", "run": root / "runs" / "mran", "index": root / "index"}
    fixture = request.getfixturevalue("demo_like")
    return {"store": fixture.store, "run": fixture.run, "index": fixture.index}


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    """`mrantool view` on a free port, as a user starts it; stopped (by its pid) after the tests."""
    port = free_port()
    script = Path(sys.executable).with_name("mrantool")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mrantool.cli"]
    log_path = tmp_path_factory.mktemp("view") / "view.log"
    log = log_path.open("w+b")
    proc = subprocess.Popen([*command, "view", "--store", str(demo["store"]), "--run", str(demo["run"]), "--index",
                             str(demo["index"]), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"mrantool view exited: {log.read().decode()}")
        try:
            with urllib.request.urlopen(url + "api/cohort", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(up, 120, "mrantool view to answer")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="mrantool-chromium-")
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def ready(driver) -> bool:
    return bool(driver.execute_script("return Boolean(window.mrantool && window.mrantool.ready())"))


def images_loaded(driver, selector: str) -> bool:
    return bool(driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);", selector))


def shoot(driver, folder: Path, name: str) -> Path:
    path = folder / name
    driver.save_screenshot(str(path))
    pixels = np.asarray(Image.open(path).convert("RGB"), np.float32)
    assert pixels.std() > 10, f"{name} looks blank"
    return path


def test_open_overlay_click_and_follow_a_similar_patch(server, browser, demo, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    shots = Path(os.environ.get("MRANTOOL_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    predictions = read_predictions(demo["run"])
    slide_id = max((p for p in predictions.values() if p.predicted == p.label),
                   key=lambda p: (p.label == "tumor", p.confidence)).slide_id  # the most confident correct tumour
    att = load_slide_attention(demo["run"], FeatureStore.open(demo["store"]), slide_id)
    weights = np.where(att.defined["patch"], att.weights["patch"], -1.0)
    bag, patch = np.unravel_index(int(np.argmax(weights)), weights.shape)
    hot = att.boxes("patch")[bag, patch] + att.item_side("patch") / 2  # level-0 centre of the hottest patch

    browser.get(f"{server}?slide={slide_id}")
    wait_until(lambda: ready(browser), 60, "the slide's tiles")
    assert browser.find_element(By.ID, "slide-title").text == slide_id
    rows = browser.find_elements(By.CSS_SELECTOR, "#slides tbody tr")
    assert len(rows) == len(predictions) and "current" in browser.find_element(
        By.CSS_SELECTOR, f"#slides tr[data-slide='{slide_id}']").get_attribute("class")
    shoot(browser, shots, "viewer_slide.png")

    browser.find_element(By.CSS_SELECTOR, "#slides th[data-key='probability']").click()  # sort by probability
    first = browser.find_element(By.CSS_SELECTOR, "#slides tbody tr td:nth-child(4)").text
    values = [float(r.find_elements(By.TAG_NAME, "td")[3].text or 0) for r in
              browser.find_elements(By.CSS_SELECTOR, "#slides tbody tr")]
    assert values == sorted(values, reverse=True) and float(first) == max(values)

    browser.find_element(By.ID, "overlay-toggle").click()
    wait_until(lambda: ready(browser), 60, "the attention overlay")
    overlay = browser.find_element(By.ID, "attention-overlay")
    assert overlay.is_displayed() and overlay.get_attribute("data-level") == "patch"
    assert browser.find_element(By.ID, "legend").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#legend-ticks span")) == 5
    shoot(browser, shots, "viewer_overlay.png")

    x, y = browser.execute_script("return window.mrantool.imageToElement(arguments[0], arguments[1])", *hot)
    canvas = browser.find_element(By.ID, "osd")
    ActionChains(browser).move_to_element_with_offset(
        canvas, int(x - canvas.size["width"] / 2), int(y - canvas.size["height"] / 2)).click().perform()
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#similar-panel.open .hit"), 30, "similar patches")
    hits = browser.find_elements(By.CSS_SELECTOR, "#similar-hits .hit")
    assert len(hits) == 6 and all(h.get_attribute("data-slide") != slide_id for h in hits)  # other slides only
    assert "similarity" in hits[0].text and f"bag {bag}, patch {patch}" in browser.find_element(
        By.ID, "similar-query").text
    wait_until(lambda: images_loaded(browser, "#similar-panel img"), 30, "the patch thumbnails")
    assert browser.find_elements(By.CSS_SELECTOR, ".mark.query-mark")
    shoot(browser, shots, "viewer_similar.png")

    target = hits[0].get_attribute("data-slide")
    hits[0].click()
    wait_until(lambda: browser.find_element(By.ID, "slide-title").text == target, 30, "the hit's slide")
    wait_until(lambda: ready(browser), 60, "the hit's tiles")
    assert browser.find_elements(By.CSS_SELECTOR, ".mark.hit-mark")
    shoot(browser, shots, "viewer_jump.png")
