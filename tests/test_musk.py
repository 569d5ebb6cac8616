"""Musk1 through h5 files, the importer and fit: reading, files, fold-wise standardisation, a quick CV run."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mrantool.cohorts.classical import load_mil_csv
from mrantool.errors import LabelsError
from mrantool.store import FeatureStore
from mrantool.training.data import ArrayData
from mrantool.training.labels import make_labels
from mrantool.training.musk import FoldStandardised, MuskProtocol, reproduce_musk, write_mil_h5
from mrantool.training.splits import make_splits

from .conftest import shared_file


@pytest.fixture(scope="module")
def musk_csv():
    return shared_file("mil/musk1.csv")


def test_load_musk1(musk_csv):
    bags, labels, names = load_mil_csv(musk_csv)
    assert len(bags) == 92 and int(labels.sum()) == 47 and sum(len(b) for b in bags) == 476
    assert all(b.shape[1] == 166 and b.dtype == np.float32 for b in bags)
    assert len(set(names)) == 92 and names[0].startswith("musk1_bag")


def test_load_musk1_refuses_other_csv(tmp_path):
    bad = tmp_path / "musk1.csv"
    bad.write_text("1,2,3\n")
    with pytest.raises(LabelsError, match="168"):
        load_mil_csv(bad)


def test_write_musk_h5_features_only(musk_csv, tmp_path):
    bags, labels, names = load_mil_csv(musk_csv)
    files = write_mil_h5(musk_csv, tmp_path)
    rows = files.labels.read_text().splitlines()
    assert rows[0] == "slide_id,label" and rows[6] == f"{names[5]},{labels[5]}"
    assert len(files.h5) == 92 and files.h5[5].stem == names[5]
    with h5py.File(files.h5[5], "r") as h5:
        assert set(h5) == {"features"} and h5.attrs["encoder"] == "musk1-166"
        np.testing.assert_array_equal(h5["features"][:], bags[5])


def test_fold_statistics_come_from_training_slides_only():
    rng = np.random.default_rng(0)
    patches = {f"s{i}": rng.normal(i, 1.0, (1, 3, 2)).astype(np.float32) for i in range(8)}
    labels = make_labels(list(patches), ["a", "b"] * 4)
    splits = make_splits(labels, folds=2, repeats=1, val_fraction=0.5, seed=0)
    data = FoldStandardised(ArrayData(patches), labels, splits)
    data.on_event("fold_start", {"index": 1, "fold": splits[1].fold, "n_train": len(splits[1].train)})
    train = np.concatenate([patches[labels.slide_ids[i]][0] for i in splits[1].train])
    np.testing.assert_allclose(data.mean, train.mean(0), rtol=1e-6)
    scaled, _ = data.read(labels.slide_ids[splits[1].train[0]], np.array([0]))
    assert scaled.dtype == np.float32 and scaled.shape == (1, 3, 2)


def test_quick_musk_cross_validation(musk_csv, tmp_path):
    protocol = MuskProtocol(repeats=1, folds=3, epochs=6, patience=6)
    imported, (result,) = reproduce_musk(musk_csv, tmp_path, models=("abmil",), protocol=protocol)
    assert imported.count("done") == 92 and imported.identity["encoder"] == "musk1-166"
    store = FeatureStore.open(tmp_path / "musk1.zarr")
    assert store.provenance(store.slide_ids()[0])["coords_unit"] == "none"
    assert len(result.fold_accuracy) == 3 and result.mean > 0.7
    assert (tmp_path / "runs" / "abmil" / "metrics.json").is_file()
