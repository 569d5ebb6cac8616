"""Cell chunks of several bags (schema 2), and stores written with one bag per cell chunk (schema 1) still read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mrantool.store import FeatureStore, schema
from mrantool.store.check import check_store
from mrantool.store.schema import Dims
from mrantool.training.data import StoreData
from tests.test_store import DIM, C, P, identity, write_slide


def test_cell_chunks_hold_about_four_mib_of_bags() -> None:
    mran = Dims(n_patches=64, n_cells=16, dim=512)  # 1 MiB of float16 cells per bag
    assert mran.chunks(100)[schema.CELL_EMB] == (4, 64, 16, 512)
    assert mran.chunks(3)[schema.CELL_EMB] == (3, 64, 16, 512)
    assert Dims(n_patches=64, n_cells=49, dim=1024).chunks(10)[schema.CELL_EMB][0] == 1  # 6 MiB bags: one each


def test_a_version_1_store_with_one_bag_per_cell_chunk_still_reads(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "old.zarr"
    monkeypatch.setattr(schema, "CELL_CHUNK_BYTES", 1)  # what schema 1 wrote: one bag per cell chunk
    store = FeatureStore.create(path, identity())
    old = write_slide(store, "old", n=5)
    monkeypatch.undo()
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 1
    (path / "zarr.json").write_text(json.dumps(meta))
    store = FeatureStore.open(path, writable=True)
    assert store.schema_version == 1 and store.slide("old").cell_emb.chunks == (1, P, C, DIM)
    new = write_slide(store, "new", n=5, seed=1)  # a slide added now gets the schema-2 chunks
    assert store.slide("new").cell_emb.chunks == (5, P, C, DIM)
    assert check_store(path) == []
    data = StoreData(FeatureStore.open(path), ["old", "new"], cells=True, patch_min_tissue=0.0, cache_gb=1)
    for slide_id, written in (("old", old), ("new", new)):
        _, cells = data.read(slide_id, np.array([1, 3]))
        np.testing.assert_allclose(cells, written["cell_emb"][[1, 3]], rtol=1e-3, atol=1e-3)


def test_a_future_schema_is_refused_naming_the_versions_read(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    FeatureStore.create(path, identity())
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 3
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="reads versions 1, 2; use a new --store"):
        FeatureStore.open(path)
