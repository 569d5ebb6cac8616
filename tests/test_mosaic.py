"""Mosaic cohorts from labelled tiles: counts, each tile at most once, copies, errors, determinism, the TIFFs and
the ground-truth file against the pixels, and `mrantool demo-data --from-tiles`."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.cohorts.mosaic import make_mosaic_cohort
from mrantool.cohorts.tiles import read_tile_list
from mrantool.errors import ConfigError
from mrantool.slides.reader import open_slide
from tests.conftest import shared_file

TILE = 16


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """30 label-0 and 12 label-1 distinct 16 px PNG tiles (label 1 tiles are bluer), a byte-identical copy of a
    label-1 tile, and one content listed under both labels; labels.csv: path,tumour."""
    folder = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    listed = []
    for label, n in ((0, 30), (1, 12)):
        (folder / str(label)).mkdir()
        for i in range(n):
            rgb = rng.integers(0, 200, (TILE, TILE, 3), dtype=np.uint8)
            rgb[..., 2] = 230 if label else 20
            Image.fromarray(rgb).save(folder / f"{label}/t{i:02d}.png")
            listed.append((f"{label}/t{i:02d}.png", label))
    shutil.copy(folder / "1/t00.png", folder / "1/copy.png")
    shutil.copy(folder / "0/t29.png", folder / "1/mislabelled.png")
    listed += [("1/copy.png", 1), ("1/mislabelled.png", 1)]
    with (folder / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "tumour"), *listed])
    return folder


def test_tile_list_counts_copies_once_and_drops_conflicts(tiles):
    tl = read_tile_list(tiles / "labels.csv", tiles)
    assert (tl.n_rows, tl.n_copies, tl.n_conflicting) == (44, 1, 2)
    assert len(tl.with_label(0)) == 29 and len(tl.with_label(1)) == 12  # 0/t29 is left out with its twin
    assert "1/copy.png" not in {t.source for t in tl.tiles}


def test_cohort_counts_and_each_tile_once(tiles, tmp_path):
    cohort = make_mosaic_cohort(tmp_path, tiles, tile_mpp=0.5, n_slides=4, tiles_per_slide=8, positives=3, seed=1)
    labels = {r["slide_id"]: int(r["label"]) for r in rows(cohort.labels)}
    assert sorted(labels.values()) == [0, 0, 1, 1]
    placed = rows(cohort.placements)
    assert len(placed) == 4 * 8
    for slide_id, label in labels.items():
        mine = [int(r["label"]) for r in placed if r["slide_id"] == slide_id]
        assert sum(mine) == (3 if label else 0) and len(mine) == 8
    digests = [hashlib.sha256((tiles / r["source"]).read_bytes()).hexdigest() for r in placed]
    assert len(set(digests)) == len(digests)  # no tile twice, a byte-identical copy included
    assert all(int(r["label"]) == int(r["source"].startswith("1/")) for r in placed)
    positions = {(r["x"], r["y"]) for r in placed if r["label"] == "1"}
    assert len(positions) > 3  # positive tiles are placed at random, not always first


def test_too_few_distinct_tiles_is_one_sentence(tiles, tmp_path):
    # 12 distinct label-1 tiles (13 rows with the copy): 2 positive slides x 7 needs 14, and the copy does not help.
    with pytest.raises(ConfigError, match=r"need \d+ label-0 and 14 label-1 distinct tiles, but .* has 29 and 12 "
                                          r"\(1 byte-identical copies counted once, 2 rows with conflicting labels "
                                          r"left out\); lower --slides, --tiles-per-slide or --positives"):
        make_mosaic_cohort(tmp_path, tiles, tile_mpp=0.5, n_slides=4, tiles_per_slide=7, positives=7)
    with pytest.raises(ConfigError, match=r"--positives 5 \(use 1 to --tiles-per-slide\)"):
        make_mosaic_cohort(tmp_path, tiles, tile_mpp=0.5, n_slides=4, tiles_per_slide=4, positives=5)
    assert not (tmp_path / "labels.csv").exists()


def test_same_seed_same_cohort(tiles, tmp_path):
    a = make_mosaic_cohort(tmp_path / "a", tiles, tile_mpp=0.5, n_slides=4, tiles_per_slide=6, positives=2, seed=3)
    b = make_mosaic_cohort(tmp_path / "b", tiles, tile_mpp=0.5, n_slides=4, tiles_per_slide=6, positives=2, seed=3)
    c = make_mosaic_cohort(tmp_path / "c", tiles, tile_mpp=0.5, n_slides=4, tiles_per_slide=6, positives=2, seed=4)
    assert rows(a.placements) == rows(b.placements) != rows(c.placements)
    assert rows(a.labels) == rows(b.labels)
    with open_slide(tmp_path / "a/mosaic-001.tiff") as sa, open_slide(tmp_path / "b/mosaic-001.tiff") as sb:
        np.testing.assert_array_equal(sa.read_region_mpp(0, 0, 48, 0.5), sb.read_region_mpp(0, 0, 48, 0.5))


def test_slides_open_with_the_mpp_and_the_truth_matches_the_pixels(tiles, tmp_path):
    cohort = make_mosaic_cohort(tmp_path, tiles, tile_mpp=0.5, n_slides=2, tiles_per_slide=8, positives=1, seed=0,
                                margin=5)
    # 8 tiles: 3 columns, 3 rows (the last place is glass), a 5 px glass margin.
    assert cohort.grid == (3, 3) and cohort.slide_size == (3 * TILE + 10, 3 * TILE + 10)
    for slide_id in ("mosaic-000", "mosaic-001"):
        with open_slide(tmp_path / f"{slide_id}.tiff") as slide:
            assert slide.backend == "openslide" and slide.mpp == pytest.approx(0.5)
            assert slide.dimensions == cohort.slide_size
            for r in (r for r in rows(cohort.placements) if r["slide_id"] == slide_id):
                x, y, w, h = (int(r[k]) for k in "xywh")
                assert (w, h) == (TILE, TILE)
                region = slide.read_region_mpp(x, y, w, 0.5)
                np.testing.assert_array_equal(region, np.asarray(Image.open(tiles / r["source"]).convert("RGB")))
            glass = slide.read_region_mpp(5 + 2 * TILE, 5 + 2 * TILE, TILE, 0.5)
            assert (glass == (242, 240, 244)).all()


def test_label_column_and_tile_list_errors(tiles, tmp_path):
    three = tmp_path / "three.csv"
    three.write_text("path,split,tumour\n" + "".join(f"0/t{i:02d}.png,a,0\n" for i in range(4))
                     + "1/t00.png,a,1\n1/t01.png,b,1\n")
    with pytest.raises(ConfigError, match=r"has columns path, split, tumour: .*--label-column"):
        read_tile_list(three, tiles)
    assert len(read_tile_list(three, tiles, label_column="tumour").tiles) == 6
    with pytest.raises(ConfigError, match="no column 'tumor'"):
        read_tile_list(three, tiles, label_column="tumor")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\n0/t00.png,2\n")
    with pytest.raises(ConfigError, match=r"label '2' on line 2; tile labels must be 0 or 1"):
        read_tile_list(bad, tiles)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\n0/t00.png,0\nnope.png,1\n")
    with pytest.raises(ConfigError, match=r"1 file\(s\) missing from .*'nope.png' \(line 3\)"):
        read_tile_list(missing, tiles)


def test_demo_data_from_tiles_on_the_command_line(tiles, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cohort"
    args = ["demo-data", str(out), "--from-tiles", str(tiles), "--slides", "4", "--tiles-per-slide", "4",
            "--positives", "1", "--seed", "2"]
    result = runner.invoke(app, [*args, "--tile-mpp", "0.5"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "41 distinct tiles in" in text and "1 byte-identical copies counted once" in text
    assert "wrote 4 mosaic slides (2x2 tiles of 16x16 px, 32x32 px at 0.5 mpp; 2 positive)" in text
    assert sorted(p.name for p in out.iterdir()) == ["labels.csv", *[f"mosaic-{i:03d}.tiff" for i in range(4)],
                                                     "tiles.csv"]
    missing_mpp = runner.invoke(app, args)
    assert missing_mpp.exit_code == 1 and "--from-tiles needs --tile-mpp" in missing_mpp.output
    stray = runner.invoke(app, ["demo-data", str(tmp_path / "x"), "--positives", "2"])
    assert stray.exit_code == 1 and "--positives are for mosaic cohorts" in " ".join(stray.output.split())


def test_pcam_mosaic_from_the_real_tiles(tmp_path):
    folder = shared_file("real/pcam_valid/labels.csv").parent
    result = CliRunner().invoke(app, ["demo-data", str(tmp_path), "--from-tiles", str(folder), "--tile-mpp", "0.97",
                                      "--slides", "2", "--tiles-per-slide", "4", "--positives", "1"])
    assert result.exit_code == 0, result.output
    assert "3000 rows, 93 byte-identical copies counted once" in " ".join(result.output.split())
    placed = rows(tmp_path / "tiles.csv")
    assert {r["source"].split("/")[0] for r in placed if r["label"] == "1"} == {"1"}
    with open_slide(tmp_path / "mosaic-000.tiff") as slide:
        assert slide.dimensions == (192, 192) and slide.mpp == pytest.approx(0.97)


def test_demo_data_refusals_name_the_option(tiles, tmp_path):
    """A negative seed, a file where the cohort folder goes and --size or --focus-um (generated cohorts only) are
    one sentence each, with nothing written."""
    runner = CliRunner()
    args = ["--from-tiles", str(tiles), "--tile-mpp", "0.5", "--slides", "2", "--tiles-per-slide", "4"]
    negative = runner.invoke(app, ["demo-data", str(tmp_path / "a"), *args, "--seed", "-1"])
    assert negative.exit_code == 1 and "--seed -1 (use 0 or more)" in negative.output
    assert not (tmp_path / "a").exists()
    a_file = tmp_path / "taken"
    a_file.write_text("")
    taken = runner.invoke(app, ["demo-data", str(a_file), *args])
    assert taken.exit_code == 1 and "is a file, but a folder is written there" in " ".join(taken.output.split())
    sized = runner.invoke(app, ["demo-data", str(tmp_path / "b"), *args, "--size", "1024", "--focus-um", "25", "40"])
    assert sized.exit_code == 1 and "--size, --focus-um are for the generated cohort" in sized.output
    assert not (tmp_path / "b").exists()
