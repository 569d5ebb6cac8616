"""Readers of the real labelled sets the benchmarks use, checked against the files' own cross-references."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from mrantool.cohorts import crc, pcam
from tests.conftest import shared_file


def test_crc_labels_nuclei_and_images_agree():
    root = shared_file("real/crchistophenotypes/labels.csv").parent
    labels, centres, files = crc.labels(root), crc.nuclei(root), crc.images(root)
    assert list(labels) == list(files) == [f"img{i}" for i in range(1, 101)] and sum(labels.values()) == 51
    with (root / "labels.csv").open(newline="") as fh:
        counts = {row["image"]: row for row in csv.DictReader(fh)}
    for image, by_class in centres.items():
        for name in ("epithelial", "fibroblast", "inflammatory", "others"):
            assert len(by_class[name]) == int(counts[image][f"n_{name}"])
        assert len(by_class["detection"]) == int(counts[image]["n_detection"])
        assert labels[image] == int(len(by_class["epithelial"]) > 0)  # the MIL label: "has an epithelial nucleus"
        every = np.concatenate(list(by_class.values()))
        assert every.dtype == np.float32 and ((every >= 0) & (every <= 500)).all()  # a few sit on the edge


@pytest.mark.parametrize("part", ["pcam_valid", "pcam_test"])
def test_pcam_tile_lists_count_each_content_once(part):
    folder = shared_file(f"real/{part}/labels.csv").parent
    tiles = pcam.tiles(folder)
    assert tiles.n_rows == 3000 and tiles.n_conflicting == 0
    assert len(tiles.tiles) + tiles.n_copies == 3000 and tiles.n_copies > 0  # SOURCES.md: some copies
    assert len({t.digest for t in tiles.tiles}) == len(tiles.tiles)
    assert len(tiles.with_label(0)) + len(tiles.with_label(1)) == len(tiles.tiles)
