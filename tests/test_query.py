"""Retrieval wired to stores and runs: index build/add from a store, queries by patch, attention and image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.config import ExtractConfig
from mrantool.errors import MrantoolError
from mrantool.extract.api import extract
from mrantool.extract.dataset import cut_patches
from mrantool.retrieval.cohort import add_new_slides, build_index
from mrantool.retrieval.index import EmbeddingIndex
from mrantool.retrieval.similar import from_image, from_patch_spec, from_top_attended, patch_location, run_query
from mrantool.slides.reader import open_slide
from mrantool.slides.writer import write_pyramid_tiff
from mrantool.store import FeatureStore
from tests.conftest import tissue_image


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("query")
    for i in range(3):
        write_pyramid_tiff(root / f"q-{i}.tif", tissue_image(2048, seed=10 + i), mpp=0.5)
    path = root / "s.zarr"
    extract(ExtractConfig(slides=[str(root / f"q-{i}.tif") for i in range(2)], store=str(path), preset="tiny",
                          workers=0, device="cpu"))
    return path


def test_a_patch_finds_itself_first(store, tmp_path):
    index = build_index(store, tmp_path / "idx", kind="flat")
    fs = FeatureStore.open(store)
    assert index.count == sum((fs.slide(s).patch_tissue[:] >= 0.25).sum() for s in fs.slide_ids())
    q = from_patch_spec(fs, "q-0:1:5")
    result = run_query(tmp_path / "idx", store, q, k=3, gallery=tmp_path / "g.png")
    best = result.rows[0]
    assert (best["slide"], best["bag"], best["patch"]) == ("q-0", 1, 5)
    assert best["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert (best["x"], best["y"]) == patch_location(fs, "q-0", 1, 5)
    assert Image.open(result.gallery).size[0] > 3 * 128
    other = run_query(tmp_path / "idx", store, q, k=3, exclude_same_slide=True)
    assert {r["slide"] for r in other.rows} == {"q-1"}


def test_index_round_trip_and_add_without_rebuild(store, tmp_path):
    root = store.parent
    build_index(store, tmp_path / "idx", kind="hnsw")
    before = EmbeddingIndex.load(tmp_path / "idx")
    extract(ExtractConfig(slides=[str(root / "q-2.tif")], store=str(store), preset="tiny", workers=0, device="cpu"))
    assert add_new_slides(tmp_path / "idx", store) == ["q-2"]
    after = EmbeddingIndex.load(tmp_path / "idx")
    assert after.slide_names == [*before.slide_names, "q-2"] and after.count > before.count
    assert add_new_slides(tmp_path / "idx", store) == []
    hits = run_query(tmp_path / "idx", store, from_patch_spec(FeatureStore.open(store), "q-2:0:0"), k=1).rows
    assert hits[0]["slide"] == "q-2"


def test_image_query_uses_the_stores_encoder(store, tmp_path):
    """A tile cut from the slide at the store's mpp, encoded afresh, finds the stored patch it came from."""
    build_index(store, tmp_path / "idx", kind="flat")
    fs = FeatureStore.open(store)
    s = fs.slide("q-0")
    tissue = s.patch_tissue[:].astype(np.float32)
    bag, patch = np.argwhere((tissue > 0.4) & (tissue < 0.9))[0]  # an edge patch: interiors all look alike
    x0, y0 = s.coords[bag].tolist()
    with open_slide(store.parent / "q-0.tif") as slide:
        region = slide.read_region_mpp(x0, y0, 256, 2.0)
    Image.fromarray(cut_patches(region, 4)[patch]).save(tmp_path / "tile.png")
    hits = run_query(tmp_path / "idx", store, from_image(fs, tmp_path / "tile.png"), k=1).rows
    assert (hits[0]["slide"], hits[0]["bag"], hits[0]["patch"]) == ("q-0", bag, patch)
    assert hits[0]["similarity"] > 0.99


def test_top_attended_queries_and_cli(store, tmp_path):
    fs = FeatureStore.open(store)
    run = tmp_path / "run"
    (run / "attention").mkdir(parents=True)
    n = fs.slide("q-1").n_bags
    patch = np.zeros((n, 16), np.float32)
    patch[0, 3], patch[0, 7] = 0.7, 0.3
    np.savez(run / "attention" / "q-1.npz", patch=patch, bag=patch.sum(1))
    q = from_top_attended(fs, run, "q-1", 2)
    assert q.labels == ["q-1:0:3", "q-1:0:7"]
    build_index(store, tmp_path / "idx", kind="flat")
    out = CliRunner().invoke(app, ["query", "--index", str(tmp_path / "idx"), "--store", str(store), "--slide", "q-1",
                                   "--run", str(run), "--top-attended", "2", "-k", "2", "--gallery",
                                   str(tmp_path / "q.png")])
    assert out.exit_code == 0, out.output
    assert "q-1:0:3" in out.output and (tmp_path / "q.png").is_file()


def test_query_refuses_another_encoder(store, tmp_path):
    build_index(store, tmp_path / "idx", kind="flat")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    meta["provenance"]["encoder"]["encoder"] = "vit_small_patch16_224"
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(MrantoolError, match="vit_small_patch16_224"):
        run_query(tmp_path / "idx", store, from_patch_spec(FeatureStore.open(store), "q-0:0:0"), k=1)
    bad = CliRunner().invoke(app, ["query", "--index", str(tmp_path / "idx"), "--store", str(store), "--patch",
                                   "q-0:0:0"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
