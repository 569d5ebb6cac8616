"""Labels the way datasets ship them: --id-column / --label-column for fit and sweep, and their errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.errors import LabelsError
from mrantool.training.labels import read_labels
from tests import test_sweep, test_training
from tests.conftest import shared_file

FIT = ["--model", "mean", "--folds", "2", "--epochs", "2", "--device", "cpu", "--threads", "1", "--quiet"]


def dataset_labels(path: Path, ids: list[str]) -> Path:
    """A CRCHistoPhenotypes-style file: id column `image`, other columns, the label in `has_tumour`."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "split", "n_cells", "has_tumour"])
        writer.writerows([sid, "train", 10 * i, i % 2] for i, sid in enumerate(ids))
    return path


def test_real_crc_labels_read_as_shipped():
    path = shared_file("real/crchistophenotypes/labels.csv")
    ids = [f"img{i}" for i in range(1, 101)]
    labels = read_labels(path, ids, id_column="image", label_column="mil_label_has_epithelial")
    assert labels.slide_ids == ids and labels.classes == ["0", "1"]
    assert labels.counts() == {"0": 49, "1": 51}  # SOURCES.md: 51 positive of 100
    with pytest.raises(LabelsError, match=r"lacks column\(s\) slide_id, label \(it has: image, split_sfcn_opi, .*"
                                          r"--id-column and --label-column"):
        read_labels(path, ids)


def test_column_errors_name_the_option(tmp_path):
    path = dataset_labels(tmp_path / "labels.csv", ["a", "b"])
    with pytest.raises(LabelsError, match=r"lacks column\(s\) has_tumor \(it has: image, split, n_cells, "
                                          r"has_tumour\); check the names given to --id-column / --label-column"):
        read_labels(path, id_column="image", label_column="has_tumor")
    with pytest.raises(LabelsError, match="both name 'image'"):
        read_labels(path, id_column="image", label_column="image")


def test_fit_and_sweep_read_dataset_columns_from_the_command_line(tmp_path):
    runner = CliRunner()
    store = test_training.write_store(tmp_path / "s.zarr", n=12)
    labels = dataset_labels(tmp_path / "labels.csv", [f"s{i:02d}" for i in range(12)])
    common = ["--store", str(store.path), "--labels", str(labels)]
    refused = runner.invoke(app, ["fit", *common, "--out", str(tmp_path / "refused"), *FIT])
    assert refused.exit_code == 1 and "lacks column(s) slide_id, label" in " ".join(refused.output.split())
    run = tmp_path / "run"
    done = runner.invoke(app, ["fit", *common, "--out", str(run), "--id-column", "image", "--label-column",
                               "has_tumour", *FIT])
    assert done.exit_code == 0, done.output
    with (run / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["slide_id"]: r["label"] for r in rows} == {f"s{i:02d}": str(i % 2) for i in range(12)}
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["id_column"], config["label_column"]) == ("image", "has_tumour")

    sweep_store = test_sweep.write_store(tmp_path / "sweep.zarr")
    sweep_labels = dataset_labels(tmp_path / "sweep.csv", [f"s{i:02d}" for i in range(test_sweep.N_SLIDES)])
    spec = tmp_path / "sweep.toml"
    spec.write_text(test_sweep.BASE.format(store=sweep_store, labels=sweep_labels) + '[[variant]]\nname = "mean"\n'
                    'model = "mean"\n')
    refused = runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "SW0")])
    assert refused.exit_code == 1 and "lacks column(s) slide_id, label" in " ".join(refused.output.split())
    swept = runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "SW"), "--id-column", "image",
                                "--label-column", "has_tumour"])
    assert swept.exit_code == 0, swept.output
    assert "1 ran, 0 already finished, 0 failed" in swept.output
