"""A small version of `mrantool demo`'s output, built through the real API in seconds (tiny preset, 4 slides).

Layout as the demo writes it: slides/ (pyramidal TIFFs + labels.csv), store.zarr, runs/mran (a real fit with
attention), index/ (a real FAISS index).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mrantool.cohorts.synthetic import make_cohort
from mrantool.config import ExtractConfig, FitConfig
from mrantool.extract.api import extract
from mrantool.retrieval.cohort import build_index
from mrantool.training.api import fit


@dataclass(frozen=True)
class DemoLike:
    root: Path
    slides: Path
    labels: Path
    store: Path
    run: Path
    index: Path


def build_demo_like(root: Path, n_slides: int = 4) -> DemoLike:
    slides, store, run, index = root / "slides", root / "store.zarr", root / "runs" / "mran", root / "index"
    labels = make_cohort(slides, n_slides=n_slides, seed=0, size=(1536, 1536), workers=1, n_foci=2)
    extract(ExtractConfig(slides=[str(slides)], store=str(store), preset="tiny", workers=0, device="cpu",
                          quiet=True))
    fit(FitConfig(store=str(store), labels=str(labels), out=str(run), model="mran", folds=2, epochs=3,
                  min_epochs=1, seed=0, threads=1, device="cpu"))
    build_index(store, index, kind="flat")
    return DemoLike(root, slides, labels, store, run, index)
