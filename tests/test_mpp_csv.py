"""`--mpp-csv FILE` (slide,mpp) for extract and preview: rows win, missing and mismatching rows are one sentence."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.errors import ConfigError
from mrantool.slides.mpp_table import read_mpp_table
from mrantool.slides.writer import write_pyramid_tiff
from mrantool.store import FeatureStore
from tests.conftest import tissue_image


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Two slides without resolution tags (a scanner that omits the mpp) and one with 0.5 mpp metadata."""
    folder = tmp_path_factory.mktemp("nompp")
    write_pyramid_tiff(folder / "a.tif", tissue_image(1024, seed=1), mpp=None)
    write_pyramid_tiff(folder / "b.tif", tissue_image(1024, seed=2), mpp=None)
    write_pyramid_tiff(folder / "c.tif", tissue_image(1024, seed=3), mpp=0.5)
    return folder


def table(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def oneline(text: str) -> str:
    return " ".join(text.split())


def test_table_rows_win_and_a_missing_row_fails_only_that_slide(slides, tmp_path):
    csv = table(tmp_path / "mpp.csv", "slide,mpp\na,0.5\nc.tif,0.4\n")  # by id or by file name
    store = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, ["extract", str(slides), "--store", str(store), "--preset", "tiny",
                                      "--workers", "0", "--mpp-csv", str(csv), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output  # b failed, the others were extracted
    fs = FeatureStore.open(store)
    assert fs.slide_ids() == ["a", "c"]
    assert fs.provenance("a")["slide_mpp"] == 0.5 and fs.provenance("a")["slide_mpp_source"] == "mpp table"
    assert fs.provenance("c")["slide_mpp"] == 0.4  # the row wins over the file's 0.5 mpp metadata
    # 0.4 mpp makes a tiny bag (256 px at 2 mpp) span 1280 level-0 px instead of 1024.
    assert fs.provenance("c")["bag_size_l0"] == 1280 and fs.provenance("a")["bag_size_l0"] == 1024
    message = fs.failures()["b"]["message"]
    assert message == (f"{slides / 'b.tif'} has no microns-per-pixel metadata and no row in mpp table {csv}; add the "
                       "line 'b,0.25' with its scan resolution.")


def test_a_row_for_no_slide_stops_before_any_work(slides, tmp_path):
    csv = table(tmp_path / "mpp.csv", "slide,mpp\na,0.5\nb,0.5\nslide-z,0.5\n")
    result = CliRunner().invoke(app, ["extract", str(slides), "--store", str(tmp_path / "s.zarr"), "--preset",
                                      "tiny", "--workers", "0", "--mpp-csv", str(csv)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "has rows for slides that are not among the SLIDES (slide-z)" in oneline(result.output)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(("text", "expected"), [
    ("name,mpp\na,0.5\n", "needs the columns slide,mpp (found: name, mpp)"),
    ("slide,mpp\na,0.5\nb,fast\n", "line 3: mpp 'fast' for slide 'b' is not a positive number"),
    ("slide,mpp\na,-1\n", "line 2: mpp '-1' for slide 'a' is not a positive number"),
    ("slide,mpp\na,0.5\na,0.25\n", "lists slide 'a' twice (lines 2 and 3)"),
    ("slide,mpp\n,0.5\n", "line 2 has no slide name"),
    ("slide,mpp\n", "has no rows"),
])
def test_malformed_tables_are_one_sentence_with_the_line(tmp_path, text, expected):
    with pytest.raises(ConfigError, match="mpp table") as info:
        read_mpp_table(table(tmp_path / "t.csv", text))
    assert expected in str(info.value) and str(tmp_path / "t.csv") in str(info.value)
    with pytest.raises(ConfigError, match="check the --mpp-csv path"):
        read_mpp_table(tmp_path / "absent.csv")


def test_preview_reads_the_table(slides, tmp_path):
    runner = CliRunner()
    csv = table(tmp_path / "mpp.csv", "slide,mpp\na,0.5\n")
    ok = runner.invoke(app, ["preview", str(slides / "a.tif"), "--preset", "tiny", "--mpp-csv", str(csv),
                             "--out", str(tmp_path / "a.png")])
    assert ok.exit_code == 0 and "slide 0.5 mpp" in ok.output and (tmp_path / "a.png").is_file()
    missing = runner.invoke(app, ["preview", str(slides / "b.tif"), "--preset", "tiny", "--mpp-csv", str(csv),
                                  "--out", str(tmp_path / "b.png")])
    assert missing.exit_code == 1 and f"no row in mpp table {csv}" in oneline(missing.output)
