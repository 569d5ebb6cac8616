"""`mrantool demo-data`: the generated cohort, or with `--from-tiles` a mosaic cohort of real labelled tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mrantool.cohorts.mosaic import MosaicCohort, make_mosaic_cohort
from mrantool.cohorts.synthetic import DEFAULT_SIZE, FOCUS_UM, make_cohort
from mrantool.errors import ConfigError


def demo_data(out: str | Path, *, n_slides: int, seed: int, size: int | None = None, foci: int | None = None,
              focus_um: tuple[float, float] | None = None, from_tiles: str | Path | None = None,
              **mosaic: Any) -> Path | MosaicCohort:
    """The generated cohort's labels.csv (slides `size` px square, default 6144; `foci` tumour foci per tumour
    slide of radius `focus_um`, see `make_cohort`), or with `from_tiles` the mosaic cohort built with the `mosaic`
    settings of `make_mosaic_cohort` that are not None (tile_labels, tile_mpp, tiles_per_slide, positives,
    label_column, margin)."""
    given = {k: v for k, v in mosaic.items() if v is not None}
    if from_tiles is None:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ConfigError(f"Options {flags} are for mosaic cohorts: add --from-tiles DIR or drop them.")
        return make_cohort(out, n_slides=n_slides, seed=seed, size=(size, size) if size else DEFAULT_SIZE,
                           n_foci=foci, focus_um=focus_um or FOCUS_UM)
    generated = {"--size": size, "--foci": foci, "--focus-um": focus_um}
    flags = ", ".join(flag for flag, value in generated.items() if value is not None)
    if flags:
        raise ConfigError(f"Options {flags} are for the generated cohort: a mosaic slide's size follows from "
                          "--tiles-per-slide and the tiles' size, its signal from --positives; drop them.")
    if "tile_mpp" not in given:
        raise ConfigError("--from-tiles needs --tile-mpp, the tiles' microns per pixel (e.g. 0.97 for "
                          "PatchCamelyon).")
    return make_mosaic_cohort(out, from_tiles, n_slides=n_slides, seed=seed, **given)
