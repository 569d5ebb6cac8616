"""Shared fixtures: the real data in ../shared/data (skipped cleanly when absent) and small generated slides."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# ../shared/data beside the project; MRANTOOL_SHARED_DATA points elsewhere (e.g. from a git worktree).
SHARED = Path(os.environ.get("MRANTOOL_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def shared_file(relative: str) -> Path:
    """A file of ../shared/data, or a skip with the reason when this clone has no ../shared.

    Under CI=true the data must be there (CI clones the project beside ../shared), so a missing file fails.
    """
    path = SHARED / relative
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path} is absent but CI=true: CI must run the real-data tests (../shared/data)")
        pytest.skip(f"{path} is absent (real test data lives in ../shared/data beside the project)")
    return path


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    return shared_file("slides/CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def ndpi() -> Path:
    return shared_file("slides/Hamamatsu_test3-DAPI-2_387.ndpi")


def tissue_image(size: int = 2048, seed: int = 0) -> np.ndarray:
    """A white image with a pink, textured tissue disc in the middle (H&E-ish colours)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size * 0.35) ** 2
    img = np.full((size, size, 3), 245, np.uint8)
    noise = rng.integers(-20, 20, size=(size, size, 1))
    pink = np.clip(np.array([215, 120, 170]) + noise, 0, 255).astype(np.uint8)
    img[disc] = pink[disc]
    return img


@pytest.fixture(scope="session")
def small_slide(tmp_path_factory) -> Path:
    """A 2048 px pyramidal TIFF at 0.5 mpp with a tissue disc, written by the project's own writer."""
    from mrantool.slides.writer import write_pyramid_tiff

    path = tmp_path_factory.mktemp("slides") / "disc.tif"
    write_pyramid_tiff(path, tissue_image(), mpp=0.5)
    return path


@pytest.fixture(scope="session")
def demo_like(tmp_path_factory):
    """A small `mrantool demo`-style output (4 slides, tiny preset, real fit and index): see tests/demo_like.py."""
    from tests.demo_like import build_demo_like

    return build_demo_like(tmp_path_factory.mktemp("demo_like"))
