"""`mrantool export`: CLAM / TRIDENT h5 files from a store, and an import of them giving back the same features."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.errors import ConfigError
from mrantool.interop.h5_export import export_h5
from mrantool.interop.importers import import_h5
from mrantool.store import FeatureStore


def patches_by_corner(store: FeatureStore, slide_id: str, step: float) -> dict[tuple[int, int], np.ndarray]:
    """Every stored patch with tissue > 0 keyed by its level-0 corner (bag corner + offset), float16 features."""
    slide = store.slide(slide_id)
    grid = store.identity["geometry"]["grid"]
    feats, tissue, bags = slide.read_patches(), slide.patch_tissue[:], slide.coords[:]
    out = {}
    for b, p in zip(*np.nonzero(tissue > 0), strict=True):
        row, col = divmod(int(p), grid)
        out[(round(bags[b][0] + col * step), round(bags[b][1] + row * step))] = feats[b, p]
    return out


def test_trident_export_imports_back_to_the_same_features(demo_like, tmp_path):
    result = CliRunner().invoke(app, ["export", "--format", "trident", "--store", str(demo_like.store),
                                      "--out", str(tmp_path / "features")])
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(demo_like.store)
    ids = store.slide_ids()
    assert sorted(p.stem for p in (tmp_path / "features").glob("*.h5")) == ids
    assert f"{len(ids)} slides" in result.output
    with h5py.File(tmp_path / "features" / f"{ids[0]}.h5") as h5:
        attrs = dict(h5["coords"].attrs)
        assert h5["features"].dtype == np.float32 and h5["coords"].dtype == np.int64
        assert h5["features"].attrs["encoder"] == "resnet18"
    # tiny preset: 64 px patches at 2 mpp on a 0.5 mpp slide = 256 level-0 px; TRIDENT's magnification = 10 / mpp.
    assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["mpp"], attrs["target_mpp"]) == (64, 256, 0.5, 2)
    assert (attrs["level0_magnification"], attrs["target_magnification"], attrs["overlap"]) == (20, 5, 0)

    report = import_h5([tmp_path / "features"], tmp_path / "back.zarr", bag_grid=4)
    assert [r.format for r in report.results] == ["trident"] * len(ids) and not report.failed
    back = FeatureStore.open(tmp_path / "back.zarr")
    for slide_id in ids:
        original = store.slide(slide_id)
        n_all = original.n_bags * original.n_patches
        assert back.provenance(slide_id)["n_instances"] == n_all  # every patch, tissue or not
        want = patches_by_corner(store, slide_id, 256.0)
        got = patches_by_corner(back, slide_id, back.provenance(slide_id)["step"])
        assert want.keys() <= got.keys()
        for corner, vector in want.items():
            assert np.array_equal(got[corner], vector)  # float16 -> float32 -> float16: bit for bit


def test_clam_export_writes_h5_and_pt_files(demo_like, tmp_path):
    report = export_h5(demo_like.store, tmp_path, fmt="clam", slides=["synth-001"], min_tissue=0.5)
    (result,) = report.results
    assert result.status == "done" and [p.relative_to(tmp_path).as_posix() for p in result.files] == [
        "h5_files/synth-001.h5", "pt_files/synth-001.pt"]
    slide = FeatureStore.open(demo_like.store).slide("synth-001")
    assert result.n_patches == int((slide.patch_tissue[:] >= 0.5).sum()) > 0
    with h5py.File(tmp_path / "h5_files" / "synth-001.h5") as h5:
        features, coords = h5["features"][:], h5["coords"][:]
        assert dict(h5["coords"].attrs)["patch_level"] == 0 and dict(h5["coords"].attrs)["patch_size"] == 256
    assert np.array_equal(torch.load(tmp_path / "pt_files" / "synth-001.pt").numpy(), features)
    assert (coords % 256 == 0).all()  # patch corners on the 256 px lattice of this 0.5 mpp slide
    assert not list(tmp_path.rglob(".*tmp*"))  # no temp file left behind
    imported = import_h5([tmp_path / "h5_files"], tmp_path / "c.zarr", bag_grid=2)
    assert imported.results[0].format == "clam" and imported.results[0].n_instances == result.n_patches


def test_export_errors_are_one_sentence(demo_like, tmp_path):
    with pytest.raises(ConfigError, match="--format clam or --format trident"):
        export_h5(demo_like.store, tmp_path, fmt="stamp")
    result = CliRunner().invoke(app, ["export", "--store", str(demo_like.store), "--out", str(tmp_path / "o"),
                                      "--slide", "synth-000", "--slide", "nope"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (tmp_path / "o" / "synth-000.h5").is_file() and not (tmp_path / "o" / "nope.h5").exists()
    assert "Slide 'nope' is not in store" in " ".join(result.output.split())
