"""The viewer's web API: cohort table, Deep Zoom tiles, attention overlays, similar patches, and path safety."""

from __future__ import annotations

import io
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from starlette.testclient import TestClient
from typer.testing import CliRunner

from mrantool.cli import app as cli
from mrantool.store import FeatureStore
from mrantool.viz.slide_attention import load_slide_attention
from mrantool.web.app import create_app
from mrantool.web.cohort import UnknownSlide
from mrantool.web.server import build_viewer

PATCH_L0 = 256  # tiny preset on the 0.5 mpp demo-like slides


@pytest.fixture(scope="module")
def client(demo_like) -> TestClient:
    viewer = build_viewer(demo_like.store, run=demo_like.run, index=demo_like.index)
    with TestClient(create_app(viewer)) as test_client:
        yield test_client


def image(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_cohort_lists_labels_predictions_and_the_page_is_served(client, demo_like):
    cohort = client.get("/api/cohort").json()
    rows = {row["slide_id"]: row for row in cohort["slides"]}
    assert sorted(rows) == FeatureStore.open(demo_like.store).slide_ids()
    assert rows["synth-001"]["label"] == "tumor" and rows["synth-001"]["predicted"] in ("tumor", "normal")
    assert 0.5 <= rows["synth-001"]["probability"] <= 1.0 and cohort["index"] and cohort["head"] == "mran"
    page = client.get("/")
    assert page.status_code == 200 and "openseadragon.min.js" in page.text
    script = client.get("/static/openseadragon/openseadragon.min.js")
    assert script.status_code == 200 and "openseadragon 6" in script.text[:200]  # shipped, no CDN
    assert "http" not in page.text.replace("http://www.w3.org", "")


def test_deep_zoom_tiles_are_the_slide_at_each_level(client, demo_like):
    info = client.get("/api/slides/synth-001").json()
    assert (info["width"], info["height"], info["mpp"]) == (1536, 1536, 0.5)
    assert info["dzi"]["Image"]["Size"] == {"Width": "1536", "Height": "1536"}
    assert info["attention_levels"] == ["bag", "patch", "cell"] and info["similar"]
    top = 11  # ceil(log2(1536)): the level at full resolution
    with openslide.OpenSlide(str(demo_like.slides / "synth-001.tiff")) as ref:
        full = np.asarray(ref.read_region((256, 512), 0, (256, 256)).convert("RGB"), np.float32)
        wide = ref.read_region((512, 0), 0, (512, 512)).convert("RGB")
    tile = image(client.get(f"/api/slides/synth-001/tiles/{top}/1_2.jpeg"))
    assert tile.shape == (256, 256, 3) and np.abs(tile - full).mean() < 6  # JPEG noise only
    half = np.asarray(wide.resize((256, 256), Image.Resampling.BOX), np.float32)
    assert np.abs(image(client.get(f"/api/slides/synth-001/tiles/{top - 1}/1_0.jpeg")) - half).mean() < 10
    assert image(client.get(f"/api/slides/synth-001/tiles/{top - 1}/2_2.jpeg")).shape == (256, 256, 3)
    assert image(client.get("/api/slides/synth-001/tiles/8/0_0.jpeg")).shape == (192, 192, 3)  # 1536 / 8
    assert client.get(f"/api/slides/synth-001/tiles/{top}/6_0.jpeg").status_code == 404
    assert client.get(f"/api/slides/synth-001/tiles/{top + 1}/0_0.jpeg").status_code == 404


def test_attention_overlay_puts_the_hottest_patch_at_its_place(client, demo_like):
    att = load_slide_attention(demo_like.run, FeatureStore.open(demo_like.store), "synth-001")
    weights = np.where(att.defined["patch"], att.weights["patch"], -1)
    bag, patch = np.unravel_index(np.argmax(weights), weights.shape)
    row, col = divmod(int(patch), 4)
    x, y = att.coords[bag] + np.array([col, row]) * PATCH_L0 + PATCH_L0 // 2  # the hottest patch's centre
    legend = client.get("/api/slides/synth-001/attention/patch.json").json()
    assert legend["scale"] == "percentile" and len(legend["colors"]) == 11
    assert [t["at"] for t in legend["ticks"]] == [0, 0.25, 0.5, 0.75, 1]
    assert legend["n_items"] == int(att.defined["patch"].sum())
    png = image(client.get("/api/slides/synth-001/attention/patch.png"))
    ds = legend["width_l0"] / png.shape[1]  # level-0 px per overlay pixel
    hot = png[int(y / ds), int(x / ds)]
    assert hot[3] == 255 and "#" + bytes(hot[:3]).hex() == legend["colors"][-1]  # the top of the scale
    covered = {tuple(c) for c in att.coords.tolist()}
    empty = [(bx, by) for bx in range(0, 1536, 1024) for by in range(0, 1536, 1024) if (bx, by) not in covered]
    for bx, by in empty:  # no bag, no colour
        assert png[int((by + 10) / ds), int((bx + 10) / ds), 3] == 0
    linear = client.get("/api/slides/synth-001/attention/cell.json?scale=linear").json()
    assert linear["ticks"][-1]["label"].endswith("%") and linear["n_items"] == int(att.defined["cell"].sum())
    assert client.get("/api/slides/synth-001/attention/nucleus.png").status_code == 404
    assert client.get("/api/slides/synth-001/attention/patch.png?scale=log").status_code == 404
    svg = client.get("/api/slides/synth-001/tissue.svg")
    assert svg.status_code == 200 and svg.text.startswith("<svg") and "<polygon" in svg.text


def test_click_finds_the_patch_and_its_neighbours(client, demo_like):
    store = FeatureStore.open(demo_like.store)
    coords = store.slide("synth-001").coords[:]
    x, y = coords[0] + np.array([2, 1]) * PATCH_L0 + 40  # inside bag 0, patch row 1 col 2 = patch 6
    found = client.get(f"/api/slides/synth-001/similar?x={x}&y={y}&k=3").json()
    assert (found["query"]["bag"], found["query"]["patch"]) == (0, 6)
    assert (found["query"]["x"], found["query"]["y"], found["query"]["side"]) == (
        coords[0][0] + 512, coords[0][1] + 256, PATCH_L0)
    assert len(found["hits"]) == 3 and all(h["slide_id"] != "synth-001" for h in found["hits"])
    sims = [h["similarity"] for h in found["hits"]]
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
    assert {h["label"] for h in found["hits"]} <= {"tumor", "normal"}
    same = client.get(f"/api/slides/synth-001/similar?x={x}&y={y}&k=1&other=0").json()
    assert (same["hits"][0]["slide_id"], same["hits"][0]["bag"], same["hits"][0]["patch"]) == ("synth-001", 0, 6)
    assert same["hits"][0]["similarity"] == pytest.approx(1.0, abs=1e-3)  # the patch finds itself first
    thumb = image(client.get(found["hits"][0]["image"]))
    assert thumb.shape == (256, 256, 3)  # read at full resolution: 256 level-0 px
    outside = client.get("/api/slides/synth-001/similar?x=-50&y=-50").json()
    assert outside["query"] is None and "No extracted patch here" in outside["message"]
    assert client.get("/api/slides/synth-001/similar?x=abc&y=1").status_code == 404
    assert client.get(f"/api/slides/synth-001/similar?x={x}&y={y}&k=500").status_code == 404
    assert client.get("/api/slides/synth-001/patches/99/0.jpeg").status_code == 404


@pytest.mark.parametrize("path", [
    "/api/slides/../store.zarr", "/api/slides/..%2F..%2Fetc%2Fpasswd", "/api/slides/%2Fetc%2Fpasswd/tiles/0/0_0.jpeg",
    "/api/slides/synth-001%2F..%2Fsynth-002", "/api/slides/..", "/api/slides/.zarr", "/api/slides/zarr.json",
    "/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/cli.py", "/static/..%2F__init__.py",
    "/api/slides/synth-001/tiles/11/..%2F..%2F0_0.jpeg",
])
def test_ids_and_paths_from_the_browser_never_escape(client, path):
    response = client.get(path)
    assert response.status_code == 404 and b"root:" not in response.content and b"import" not in response.content


def test_a_symlinked_slide_outside_the_store_is_not_served(demo_like, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(demo_like.store, store)
    outside = tmp_path / "elsewhere"
    shutil.copytree(store / "slides" / "synth-000", outside)
    os.symlink(outside, store / "slides" / "sneaky")
    viewer = build_viewer(store)
    assert "sneaky" not in viewer.cohort.slide_ids() and "synth-000" in viewer.cohort.slide_ids()
    for bad in ("sneaky", "..", "../store.zarr", "/etc/passwd", "synth-000/../synth-001", "", "slides"):
        with pytest.raises(UnknownSlide):
            viewer.cohort.require(bad)
    with TestClient(create_app(viewer)) as client:
        assert client.get("/api/slides/sneaky").status_code == 404
        assert client.get("/api/slides/synth-000").status_code == 200


def test_moved_slides_are_one_sentence_and_slides_option_finds_them(demo_like, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(demo_like.slides, moved)
    store = tmp_path / "store.zarr"
    shutil.copytree(demo_like.store, store)
    for meta in (store / "slides").glob("*/zarr.json"):  # as if the slides had been extracted elsewhere
        meta.write_text(meta.read_text().replace(str(demo_like.slides), str(tmp_path / "gone")))
    with TestClient(create_app(build_viewer(store))) as client:
        lost = client.get("/api/slides/synth-000")
        assert lost.status_code == 422 and "--slides FOLDER" in lost.json()["error"]
    with TestClient(create_app(build_viewer(store, slides=[str(moved)]))) as client:
        assert client.get("/api/slides/synth-000").json()["width"] == 1536


def test_view_cli_errors(demo_like, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["view", "--store", str(tmp_path / "none.zarr")])
    assert missing.exit_code == 1 and "does not exist" in missing.output and "Traceback" not in missing.output
    not_run = runner.invoke(cli, ["view", "--store", str(demo_like.store), "--run", str(tmp_path)])
    assert not_run.exit_code == 1 and "is not a fit run" in " ".join(not_run.output.split())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = runner.invoke(cli, ["view", "--store", str(demo_like.store), "--port", str(port)])
    assert taken.exit_code == 1 and f"Port {port} on 127.0.0.1 is already in use" in taken.output


def test_static_files_ship_with_the_package():
    static = Path(__import__("mrantool.web", fromlist=["x"]).__file__).parent / "static"
    for name in ("index.html", "viewer.js", "viewer.css", "openseadragon/openseadragon.min.js",
                 "openseadragon/LICENSE.txt", "openseadragon/images/home_rest.png"):
        assert (static / name).is_file(), name


def test_without_run_or_index_the_page_still_works(demo_like):
    with TestClient(create_app(build_viewer(demo_like.store, labels=demo_like.labels))) as client:
        rows = {r["slide_id"]: r for r in client.get("/api/cohort").json()["slides"]}
        assert rows["synth-001"]["label"] == "tumor" and rows["synth-001"]["predicted"] == ""
        info = client.get("/api/slides/synth-001").json()
        assert info["attention_levels"] == [] and not info["similar"]
        assert "without --run" in client.get("/api/slides/synth-001/attention/patch.json").json()["error"]
        nearest = client.get("/api/slides/synth-001/similar?x=600&y=600")
        assert nearest.status_code == 404 and "--index" in nearest.json()["error"]
        assert client.get("/api/slides/synth-001/tiles/11/0_0.jpeg").status_code == 200
