"""`mrantool demo`: the whole flow on a generated cohort — slides, extraction, MRAN with CV, heatmap, retrieval."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrantool.cohorts.synthetic import make_cohort
from mrantool.config import ExtractConfig, FitConfig
from mrantool.extract.api import extract
from mrantool.retrieval.cohort import build_index
from mrantool.retrieval.similar import from_top_attended, run_query
from mrantool.store import FeatureStore
from mrantool.training.api import fit
from mrantool.viz.heatmap import draw_heatmap


@dataclass
class DemoSettings:
    """The demo's knobs: defaults finish in a few minutes on a 2-core laptop CPU."""

    slides: int = 16
    seed: int = 0
    size: int = 4096  # level-0 px per side at 0.5 mpp
    n_foci: int = 5  # tumour foci per tumour slide: the MIL witness rate
    preset: str = "mran"
    folds: int = 4
    epochs: int = 40
    lr: float = 5e-4
    patience: int = 15
    workers: int = 1
    threads: int | None = 1  # small heads train fastest on one thread, especially on a busy machine


@dataclass
class DemoResult:
    """Where the demo put everything, and what it measured."""

    out: Path
    steps: list[tuple[str, float, str]] = field(default_factory=list)  # (step, seconds, summary)
    auc: float = float("nan")
    heatmap: Path | None = None
    gallery: Path | None = None
    query_gallery: Path | None = None


Say = Callable[[str], None]


def _step(result: DemoResult, say: Say, name: str, fn: Callable[[], tuple[Any, str]]) -> Any:
    t0 = time.perf_counter()
    value, summary = fn()
    seconds = time.perf_counter() - t0
    result.steps.append((name, seconds, summary))
    say(f"[{name}] {summary} ({seconds:.0f}s)")
    return value


def most_confident_positive(predictions_csv: Path, positive: str) -> str:
    """The slide whose held-out probability of the positive class is highest."""
    with predictions_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return max(rows, key=lambda r: float(r[f"prob_{positive}"]))["slide_id"]


def run_demo(out: str | Path, settings: DemoSettings | None = None, say: Say = print,
             extract_progress: Callable | None = None, fit_progress: Callable | None = None) -> DemoResult:
    """Generate the cohort, extract it, fit MRAN with CV, draw the heatmap of the most confidently positive
    slide, index the cohort and query that slide's most attended patches."""
    s = settings or DemoSettings()
    out = Path(out)
    result = DemoResult(out)
    slides_dir, store, run, index = out / "slides", out / "store.zarr", out / "runs" / "mran", out / "index"

    def cohort():
        labels = make_cohort(slides_dir, n_slides=s.slides, seed=s.seed, size=(s.size, s.size), n_foci=s.n_foci)
        return labels, f"{s.slides} slides ({s.size}x{s.size} px at 0.5 mpp) and {labels}"

    labels = _step(result, say, "cohort", cohort)

    def extraction():
        cfg = ExtractConfig(slides=[str(slides_dir)], store=str(store), preset=s.preset, workers=s.workers)
        report = extract(cfg, progress=extract_progress)
        rate = report.n_patches / max(report.seconds, 1e-9)
        return report, (f"{report.count('done') + report.count('skipped')} slides, {report.n_patches} patches "
                        f"({rate:.0f}/s) into {store}")

    _step(result, say, "extract", extraction)

    def training():
        cfg = FitConfig(store=str(store), labels=str(labels), out=str(run), model="mran", folds=s.folds,
                        epochs=s.epochs, lr=s.lr, patience=s.patience, seed=s.seed, threads=s.threads)
        report = fit(cfg, progress=fit_progress)
        result.auc = report.mean["auc"]
        return report, (f"mran {s.folds}-fold CV: AUC {report.mean['auc']:.3f} ± {report.sd['auc']:.3f}, accuracy "
                        f"{report.mean['accuracy']:.3f}; run in {run}")

    report = _step(result, say, "fit", training)
    positive = "tumor" if "tumor" in report.classes else report.classes[-1]
    slide_id = most_confident_positive(run / "predictions.csv", positive)

    def heat():
        hm = draw_heatmap(run, store, slide_id, out / f"heatmap_{slide_id}.png", level="cell", top=8)
        result.heatmap, result.gallery = hm.out, hm.gallery
        return hm, f"cell-level attention of {slide_id} -> {hm.out}, top-8 gallery -> {hm.gallery}"

    _step(result, say, "heatmap", heat)

    def indexing():
        idx = build_index(store, index, kind="hnsw")
        return idx, f"{idx.count} patch embeddings of {len(idx.slide_names)} slides in {index}"

    _step(result, say, "index", indexing)

    def querying():
        q = from_top_attended(FeatureStore.open(store), run, slide_id, 3)
        res = run_query(index, store, q, k=5, exclude_same_slide=True, gallery=out / "similar.png", run_dir=run)
        result.query_gallery = res.gallery
        labels_found = [r["label"] for r in res.rows]
        share = sum(lab == positive for lab in labels_found) / max(len(labels_found), 1)
        return res, (f"top-3 attended patches of {slide_id}: {share:.0%} of their 5 nearest patches on other slides "
                     f"come from {positive} slides; gallery -> {res.gallery}")

    _step(result, say, "query", querying)
    return result
