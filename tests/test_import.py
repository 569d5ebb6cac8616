"""h5 import: CLAM / TRIDENT / STAMP layouts into spatial bags, files without coordinates, bad files, resume."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from mrantool.errors import ConfigError, StoreError
from mrantool.interop.importers import group_by_lattice, import_h5, infer_step
from mrantool.store import FeatureStore, check_store, make_identity

from .conftest import shared_file


def write_h5(path: Path, datasets: dict[str, np.ndarray], attrs: dict[str, dict] | None = None) -> Path:
    """An h5 file with `datasets`; `attrs` maps '' (the file) or a dataset name to attributes."""
    with h5py.File(path, "w") as h5:
        for name, data in datasets.items():
            h5.create_dataset(name, data=data)
        for name, values in (attrs or {}).items():
            h5.attrs.update(values) if name == "" else h5[name].attrs.update(values)
    return path


def lattice(n: int, step: float, seed: int = 0, cols: int = 13) -> np.ndarray:
    """`n` distinct lattice positions (x, y) with spacing `step`, in shuffled order, away from the origin."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(cols * cols, size=n, replace=False)
    return np.stack([cells % cols + 3, cells // cols + 5], axis=1) * step


def stored_instances(store: FeatureStore, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(coords of each stored patch = bag corner + lattice offset, its features) over patches with tissue."""
    slide = store.slide(slide_id)
    grid, step = store.identity["geometry"]["grid"], slide.provenance["step"]
    bags, tissue = slide.coords[:], slide.patch_tissue[:].astype(np.float32)
    feats = slide.read_patches().astype(np.float32)
    b, p = np.nonzero(tissue > 0)
    offset = np.stack([p % grid, p // grid], axis=1) * step
    return bags[b] + offset, feats[b, p]


def assert_each_once(coords: np.ndarray, feats: np.ndarray, got_coords: np.ndarray, got_feats: np.ndarray) -> None:
    """Every original instance appears exactly once, at its coordinates, with its features (float16 close)."""
    assert len(got_coords) == len(coords)
    index = {tuple(c): i for i, c in enumerate(np.round(coords).astype(np.int64).tolist())}
    found = [index[tuple(c)] for c in np.round(got_coords).astype(np.int64).tolist()]
    assert sorted(found) == list(range(len(coords)))
    np.testing.assert_allclose(got_feats, feats[found], rtol=2e-3, atol=2e-3)


def test_real_stamp_style_file(tmp_path):
    path = shared_file("features/TCGA-AD-6964-01Z-00-DX1_features.h5")
    with h5py.File(path, "r") as h5:
        feats, coords = h5["feats"][:], h5["coords"][:]
    report = import_h5([path], tmp_path / "s.zarr")
    (result,) = report.results
    assert result.status == "done" and result.format == "stamp" and result.n_instances == 777
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.slide_ids() == ["TCGA-AD-6964-01Z-00-DX1_features"]  # X.h5 -> X, stem kept as is
    slide = store.slide(result.slide_id)
    prov = slide.provenance
    assert (prov["step"], prov["coords_unit"], prov["bag_size_l0"]) == (512, "level0_px", 2048)
    assert prov["fingerprint"]["size"] == path.stat().st_size and prov["n_instances"] == 777
    assert store.identity["encoder"] == "imported:stamp" and not store.identity["has_cells"]
    assert (slide.coords[:] % 2048 == 0).all()  # bag corners on the 4 x 512 px block lattice
    assert float(slide.patch_tissue[:].astype(np.float32).sum()) == 777
    assert_each_once(coords, feats, *stored_instances(store, result.slide_id))
    assert check_store(tmp_path / "s.zarr") == []


def test_clam_file_detected_with_level0_attrs(tmp_path):
    coords = lattice(50, 256).astype(np.int64)
    feats = np.random.default_rng(1).standard_normal((50, 32)).astype(np.float32)
    path = write_h5(tmp_path / "slide_a.h5", {"features": feats, "coords": coords},
                    {"coords": {"patch_size": 256, "patch_level": 0, "level_dim": [9000, 7000]}})
    events: list[tuple[str, dict]] = []
    report = import_h5([path], tmp_path / "s.zarr", bag_grid=2, progress=lambda e, i: events.append((e, i)))
    assert report.results[0].format == "clam" and report.results[0].status == "done"
    assert [e for e, _ in events][:2] == ["run_start", "slide_start"] and events[-1] == ("slide_end",
                                                                                         {"result": report.results[0]})
    assert sum(i["patches"] for e, i in events if e == "bags") == 50
    store = FeatureStore.open(tmp_path / "s.zarr")
    prov = store.provenance("slide_a")
    assert prov["level0_size"] == [9000, 7000] and prov["h5_attrs"]["coords"]["patch_size"] == 256
    assert store.identity["encoder"] == "imported:clam" and store.dims.n_patches == 4
    assert_each_once(coords, feats, *stored_instances(store, "slide_a"))


def test_trident_file_names_its_encoder(tmp_path):
    coords = lattice(40, 512, seed=2).astype(np.int64)
    feats = np.random.default_rng(2).standard_normal((40, 24)).astype(np.float32)
    path = write_h5(tmp_path / "t.h5", {"features": feats, "coords": coords},
                    {"features": {"encoder": "uni_v1", "name": "t"},
                     "coords": {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                                "target_magnification": 20, "overlap": 0}})
    report = import_h5([path], tmp_path / "s.zarr")
    assert report.results[0].format == "trident"
    assert report.identity["encoder"] == "uni_v1" and report.identity["weights"] == "imported"
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.provenance("t")["step"] == 512
    assert_each_once(coords, feats, *stored_instances(store, "t"))


def test_stamp_micrometre_coordinates(tmp_path):
    coords_um = lattice(30, 256.0, seed=3).astype(np.float32) + np.float32(1e-3)  # float µm, not exact
    feats = np.random.default_rng(3).standard_normal((30, 16)).astype(np.float16)
    attrs = {"": {"unit": "um", "tile_size_um": 256.0, "tile_size_px": 224, "extractor": "ctranspath",
                  "stamp_version": "2.2.0", "feat_type": "tile"}}
    path = write_h5(tmp_path / "m.h5", {"feats": feats, "coords": coords_um}, attrs)
    in_um = import_h5([path], tmp_path / "um.zarr")
    assert in_um.results[0].format == "stamp" and in_um.identity["encoder"] == "ctranspath"
    assert any("micrometres" in note for note in in_um.results[0].notes)
    prov = FeatureStore.open(tmp_path / "um.zarr").provenance("m")
    assert (prov["coords_unit"], prov["step"], prov["mpp"], prov["bag_size_l0"]) == ("um", 256, None, None)
    in_px = import_h5([path], tmp_path / "px.zarr", mpp=0.5)
    store = FeatureStore.open(tmp_path / "px.zarr")
    prov = store.provenance("m")
    assert (prov["coords_unit"], prov["step"], prov["mpp"], prov["bag_size_l0"]) == ("level0_px", 512, 0.5, 2048)
    assert in_px.results[0].status == "done"
    assert_each_once(coords_um / 0.5, feats.astype(np.float32), *stored_instances(store, "m"))


def test_file_without_coords_packs_instances_in_order(tmp_path):
    feats = np.random.default_rng(4).standard_normal((37, 8)).astype(np.float32)
    path = write_h5(tmp_path / "bag.h5", {"features": feats})
    report = import_h5([path], tmp_path / "s.zarr", bag_grid=2)
    (result,) = report.results
    assert result.status == "done" and result.n_bags == 10
    assert any("no coordinates" in note for note in result.notes)
    slide = FeatureStore.open(tmp_path / "s.zarr").slide("bag")
    tissue = slide.patch_tissue[:].astype(np.float32).ravel()
    assert tissue.sum() == 37 and (tissue[37:] == 0).all()  # the last bag is padded and masked
    stored = slide.read_patches().astype(np.float32).reshape(40, 8)
    np.testing.assert_allclose(stored[:37], feats, rtol=2e-3, atol=2e-3)
    assert (stored[37:] == 0).all() and (slide.coords[:] == 0).all()
    assert slide.provenance["coords_unit"] == "none" and slide.provenance["import_notes"]


def test_overlapping_lattices_keep_every_instance(tmp_path):
    a = lattice(20, 256, seed=5)
    b = lattice(15, 256, seed=6) + np.array([100, 37])  # a second contour on another lattice offset
    coords = np.concatenate([a, b, a[:3]])  # and three exact duplicates
    feats = np.random.default_rng(7).standard_normal((len(coords), 4)).astype(np.float32)
    assert infer_step(coords.astype(np.float64)) == 256
    grouping = group_by_lattice(coords.astype(np.float64), 2, 256.0, "coords")
    placed = grouping.table[grouping.table >= 0]
    assert sorted(placed.tolist()) == list(range(len(coords))) and grouping.n_stacked >= 3
    path = write_h5(tmp_path / "o.h5", {"features": feats, "coords": coords.astype(np.int64)})
    report = import_h5([path], tmp_path / "s.zarr", bag_grid=2)
    assert any("extra bags" in note for note in report.results[0].notes)
    slide = FeatureStore.open(tmp_path / "s.zarr").slide("o")
    assert float(slide.patch_tissue[:].astype(np.float32).sum()) == len(coords)


def test_bad_files_are_recorded_and_the_rest_import(tmp_path):
    good = write_h5(tmp_path / "good.h5", {"features": np.ones((5, 8), np.float32),
                                           "coords": lattice(5, 256).astype(np.int64)})
    text = tmp_path / "text.h5"
    text.write_text("not an hdf5 file")
    nofeat = write_h5(tmp_path / "nofeat.h5", {"coords": np.zeros((3, 2))})
    short = write_h5(tmp_path / "short.h5", {"features": np.ones((5, 8), np.float32),
                                             "coords": np.zeros((4, 2), np.int64)})
    nan = np.ones((5, 8), np.float32)
    nan[2, 3] = np.nan
    nans = write_h5(tmp_path / "nans.h5", {"features": nan, "coords": lattice(5, 256).astype(np.int64)})
    wide = write_h5(tmp_path / "wide.h5", {"features": np.ones((5, 16), np.float32)})
    report = import_h5([text, good, nofeat, short, nans, wide], tmp_path / "s.zarr")
    status = {r.slide_id: r.status for r in report.results}
    assert status == {"text": "failed", "good": "done", "nofeat": "failed", "short": "failed", "nans": "failed",
                      "wide": "failed"}
    messages = {r.slide_id: r.message for r in report.failed}
    assert "not a readable HDF5 file" in messages["text"]
    assert "no `features`" in messages["nofeat"]
    assert "(5, 2)" in messages["short"] and "(4, 2)" in messages["short"]
    assert "NaN" in messages["nans"]
    assert "16-d" in messages["wide"] and "8-d" in messages["wide"]
    for slide_id, message in messages.items():
        assert str(tmp_path / f"{slide_id}.h5") in message and message.count(". ") == 0
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.slide_ids() == ["good"]  # the NaN file left nothing half-written
    assert set(store.failures()) == set(messages)  # recorded, including the one before the store existed
    assert check_store(tmp_path / "s.zarr") == []


def test_reimport_skips_and_changed_file_is_replaced(tmp_path):
    path = write_h5(tmp_path / "r.h5", {"features": np.ones((6, 4), np.float32)})
    assert import_h5([path], tmp_path / "s.zarr").results[0].status == "done"
    again = import_h5([path, tmp_path], tmp_path / "s.zarr")  # a folder stands for its *.h5 files
    assert [r.status for r in again.results] == ["skipped", "failed"]  # the folder lists r.h5 a second time
    assert "same slide id" in again.results[1].message
    write_h5(path, {"features": np.full((9, 4), 2.0, np.float32)})
    os.utime(path, ns=(1, 1))
    changed = import_h5([path], tmp_path / "s.zarr")
    assert changed.results[0].status == "done"
    assert FeatureStore.open(tmp_path / "s.zarr").provenance("r")["n_instances"] == 9


def test_whole_run_problems_raise(tmp_path):
    path = write_h5(tmp_path / "x.h5", {"features": np.ones((3, 8), np.float32)})
    with pytest.raises(ConfigError, match="format"):
        import_h5([path], tmp_path / "a.zarr", fmt="hdf")
    extracted = make_identity(encoder="resnet18", weights="random-init", transforms={}, embed_dim=8,
                              geometry={"bag_px": 1024, "mpp": 1.0, "grid": 4, "cells": 2}, preset="x",
                              has_cells=True)
    FeatureStore.create(tmp_path / "e.zarr", extracted)
    with pytest.raises(StoreError, match="new --store"):
        import_h5([path], tmp_path / "e.zarr")
    import_h5([path], tmp_path / "g.zarr", bag_grid=2)
    with pytest.raises(StoreError, match="--bag-grid 2"):
        import_h5([path], tmp_path / "g.zarr", bag_grid=4)
    report = import_h5([tmp_path / "missing.h5"], tmp_path / "none.zarr")
    assert report.results[0].status == "failed" and not (tmp_path / "none.zarr").exists()
    assert report.notes and "not created" in report.notes[0]


def test_cli_import_real_h5_and_a_bad_file(tmp_path):
    """`mrantool import`: the real CLAM/STAMP-style bag imports, a non-h5 file is one sentence, exit 1."""
    from typer.testing import CliRunner

    from mrantool.cli import app
    from tests.conftest import shared_file

    real = shared_file("features/TCGA-AD-6964-01Z-00-DX1_features.h5")
    bad = tmp_path / "notes.h5"
    bad.write_text("not hdf5")
    result = CliRunner().invoke(app, ["import", str(real), str(bad), "--store", str(tmp_path / "i.zarr"), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "1 imported" in result.output and "not a readable HDF5 file" in result.output
