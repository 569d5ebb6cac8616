"""`mrantool export-qupath`: QuPath GeoJSON (level-0 polygons, attention measurements, top-K annotations)."""

from __future__ import annotations

import json
import uuid

import numpy as np
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.interop.qupath import export_qupath
from mrantool.store import FeatureStore

PATCH_L0 = 256  # tiny preset on the 0.5 mpp demo-like slides: 64 px patches at 2 mpp
CELL_L0 = 128  # 2 x 2 cells per patch


def bbox(feature: dict) -> tuple[float, float, float, float]:
    ring = np.asarray(feature["geometry"]["coordinates"][0])
    return ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()


def test_patch_detections_and_top_annotations_follow_qupath_conventions(demo_like, tmp_path):
    result = CliRunner().invoke(app, ["export-qupath", "--run", str(demo_like.run), "--store", str(demo_like.store),
                                      "--slide", "synth-001", "--out", str(tmp_path), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "Import objects" in result.output
    doc = json.loads((tmp_path / "synth-001.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and doc["mrantool"]["label"] == "tumor"
    detections = [f for f in doc["features"] if f["properties"]["objectType"] == "detection"]
    annotations = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(annotations) == 3 and len(detections) + 3 == len(doc["features"])
    for feature in doc["features"]:
        assert feature["type"] == "Feature" and uuid.UUID(feature["id"])
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        cls = feature["properties"]["classification"]
        assert isinstance(cls["name"], str) and len(cls["color"]) == 3
        assert all(isinstance(v, float | int) for v in feature["properties"]["measurements"].values())
    assert len({f["id"] for f in doc["features"]}) == len(doc["features"])

    slide = FeatureStore.open(demo_like.store).slide("synth-001")
    coords, tissue = slide.coords[:], slide.patch_tissue[:]
    assert len(detections) == int((tissue >= 0.25).sum())  # the run's patch_min_tissue
    for feature in detections:
        m = feature["properties"]["measurements"]
        bag, patch = int(m["Bag"]), int(m["Patch"])
        row, col = divmod(patch, 4)
        x0, y0 = coords[bag] + np.array([col, row]) * PATCH_L0
        assert bbox(feature) == (x0, y0, x0 + PATCH_L0, y0 + PATCH_L0)  # level-0 pixels, origin top-left
        assert 0 <= m["Attention patch percentile"] <= 100
    shares = [f["properties"]["measurements"]["Attention patch"] for f in detections]
    assert abs(sum(shares) - 1.0) < 1e-3  # shares of the slide's attention
    ranked = sorted(detections, key=lambda f: -f["properties"]["measurements"]["Attention patch"])
    assert bbox(annotations[0]) == bbox(ranked[0]) and annotations[0]["properties"]["measurements"]["Rank"] == 1
    assert max(f["properties"]["measurements"]["Attention patch percentile"] for f in detections) == 100


def test_cell_level_and_all_slides(demo_like, tmp_path):
    report = export_qupath(demo_like.run, demo_like.store, tmp_path, level="cell", top=0)
    assert [r.status for r in report.results] == ["done"] * 4
    doc = json.loads((tmp_path / "synth-000.geojson").read_text())
    tissue = FeatureStore.open(demo_like.store).slide("synth-000").patch_tissue[:]
    assert len(doc["features"]) == int((tissue >= 0.25).sum()) * 4
    x0, y0, x1, y1 = bbox(doc["features"][0])
    assert (x1 - x0, y1 - y0) == (CELL_L0, CELL_L0)
    again = export_qupath(demo_like.run, demo_like.store, tmp_path / "again", slides=["synth-000"], level="cell",
                          top=0)
    assert again.results[0].path.read_text() == (tmp_path / "synth-000.geojson").read_text()  # stable ids


def test_export_qupath_errors(demo_like, tmp_path):
    runner = CliRunner()
    both = runner.invoke(app, ["export-qupath", "--run", str(demo_like.run), "--store", str(demo_like.store),
                               "--out", str(tmp_path), "--slide", "synth-000", "--all"])
    assert both.exit_code == 1 and "--slide ID (repeatable) or --all" in both.output
    missing = runner.invoke(app, ["export-qupath", "--run", str(demo_like.run), "--store", str(demo_like.store),
                                  "--out", str(tmp_path), "--slide", "synth-009"])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert "no attention for slide 'synth-009'" in " ".join(missing.output.split())
    assert not list(tmp_path.iterdir())
