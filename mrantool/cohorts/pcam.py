"""PatchCamelyon tiles (Veeling et al. 2018) as kept in ../shared/data/real/pcam_valid and pcam_test: 96x96 px JPEG
tiles at 10x (~0.97 um/px) listed in `labels.csv` (path, label_metastasis: 1 = tumour in the centre 32x32 px),
the raw material of mosaic cohorts (`mrantool demo-data OUT --from-tiles pcam_valid --tile-mpp 0.97`)."""

from __future__ import annotations

from pathlib import Path

from mrantool.cohorts.tiles import TileList, read_tile_list

MPP = 0.97
LABEL_COLUMN = "label_metastasis"


def tiles(part: str | Path) -> TileList:
    """The distinct labelled tiles of one part's folder (byte-identical copies counted once)."""
    return read_tile_list(Path(part) / "labels.csv", part, LABEL_COLUMN)
