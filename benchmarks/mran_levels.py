"""What each level of the cache can tell: supervised probes with the ground truth, cells against patches.

MRAN's cell level can only beat its patch level (`-O cells=false`) on a bag task where the cells' features
carry something the patches' do not. This measures that ceiling directly, with the instance labels no MIL
head sees, on the stores `benchmarks/mran.py` extracts (random-init encoders, and with `--encoder imagenet`
ImageNet EfficientNet-Lite0):

  crc   CRCHistoPhenotypes: a cell is positive when an annotated epithelial nucleus lies within 8 um of its
        centre (the attention check's rule), a patch when any of its cells is; cells in the 12 px white margin
        that pads each 500 px image to its bag are left out.
  pcam  PCam mosaics: a patch is a tile with its label; its centre cell is PCam's labelled 32 px centre.

For each level a logistic regression (standardised features, C = 0.1) is scored out of fold (5 folds grouped
by slide): the instance AUC, and the bag AUC of the max over a slide's instances (a supervised oracle for a
max-pooling MIL head at that level). A patch's cells also get the patch's own probability, so the cell rows
ask whether the cell features place the signal better than their patch does.

    python benchmarks/mran.py --work W [--encoder imagenet] ...   # the stores (this script only reads them)
    python benchmarks/mran_levels.py --work W                      # about a minute per store
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import hardware, load_average, markdown_table, write_results
from benchmarks.mran import ATTENTION_RADIUS_UM, CRC_ROOT, ENCODER_NOTES, ENCODERS, SHARED

FOLDS = 5
C = 0.1
CRC_IMAGE_PX = 500
ROWS = ("patch_x", "patch_y", "patch_slide", "cell_x", "cell_y", "cell_patch", "cell_slide")
TABLES = {"probes": ["data", "encoder", "level", "instances", "positive", "instance AUC", "bag AUC (max)"]}


def _add_patch(rows: dict[str, list[Any]], slide_id: str, features: np.ndarray, label: int,
               cells: list[tuple[np.ndarray, int]]) -> None:
    """One patch (features, label) and its kept cells (features, label) into the instance rows."""
    rows["patch_x"].append(features)
    rows["patch_y"].append(label)
    rows["patch_slide"].append(slide_id)
    for cell_features, cell_label in cells:
        rows["cell_x"].append(cell_features)
        rows["cell_y"].append(cell_label)
        rows["cell_patch"].append(len(rows["patch_y"]) - 1)
        rows["cell_slide"].append(slide_id)


def crc_instances(store: Any) -> dict[str, Any]:
    """Per cell of every CRC image: features, label, its patch's index; per patch: features, label; slide of each."""
    from mrantool.cohorts import crc
    from mrantool.evaluation.attention_truth import near_points
    from mrantool.store.geometry import bag_side_l0, cell_centres

    nuclei, bag_labels = crc.nuclei(CRC_ROOT), crc.labels(CRC_ROOT)
    g = store.identity["geometry"]
    radius = ATTENTION_RADIUS_UM / crc.MPP
    rows: dict[str, list[Any]] = {k: [] for k in ROWS}
    for image in bag_labels:
        slide = store.slide(image)
        centres = cell_centres(slide.coords[:], bag_side_l0(slide.provenance, image), g["grid"], g["cells"])
        inside = (centres[..., 0] < CRC_IMAGE_PX) & (centres[..., 1] < CRC_IMAGE_PX)
        near = near_points(centres, nuclei[image]["epithelial"], radius)
        patches, cells = np.asarray(slide.patch_emb[:]), np.asarray(slide.cell_emb[:])
        for b, p in zip(*np.nonzero(inside.any(-1)), strict=True):
            kept = np.nonzero(inside[b, p])[0]
            _add_patch(rows, image, patches[b, p], int(near[b, p, kept].any()),
                       [(cells[b, p, c], int(near[b, p, c])) for c in kept])
    return {**{k: np.asarray(v) for k, v in rows.items()}, "bags": bag_labels}


def pcam_instances(store: Any, folder: Path) -> dict[str, Any]:
    """Per tile of every mosaic: its patch's features and the tile's label; its centre cell's features, same label."""
    from mrantool.store.geometry import bag_side_l0, cell_centres

    with (folder / "tiles.csv").open() as f:
        tiles = list(csv.DictReader(f))
    with (folder / "labels.csv").open() as f:
        bag_labels = {r["slide_id"]: int(r["label"]) for r in csv.DictReader(f)}
    side = int(tiles[0]["w"])  # the mosaics' tiles are all one size
    tile_label = {(r["slide_id"], int(r["x"]) // side, int(r["y"]) // side): int(r["label"]) for r in tiles}
    g = store.identity["geometry"]
    middle = g["cells"] ** 2 // 2
    rows: dict[str, list[Any]] = {k: [] for k in ROWS}
    for slide_id in bag_labels:
        slide = store.slide(slide_id)
        centres = cell_centres(slide.coords[:], bag_side_l0(slide.provenance, slide_id), g["grid"], g["cells"])
        patches, cells = np.asarray(slide.patch_emb[:]), np.asarray(slide.cell_emb[:])
        for b in range(len(patches)):
            for p in range(patches.shape[1]):
                x, y = centres[b, p, middle]
                label = tile_label.get((slide_id, int(x // side), int(y // side)))
                if label is not None:
                    _add_patch(rows, slide_id, patches[b, p], label, [(cells[b, p, middle], label)])
    return {**{k: np.asarray(v) for k, v in rows.items()}, "bags": bag_labels}


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """Probability of class 1 for every instance from a probe fitted on the other folds (grouped by slide)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.zeros(len(y))
    for train, test in GroupKFold(FOLDS, shuffle=True, random_state=seed).split(x, y, groups):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
        probe.fit(x[train], y[train])
        probs[test] = probe.predict_proba(x[test])[:, 1]
    return probs


def bag_auc(probs: np.ndarray, slides: np.ndarray, bags: dict[str, int]) -> float:
    """AUC of each slide's highest instance probability against its bag label."""
    from sklearn.metrics import roc_auc_score

    ids = [s for s in bags if (slides == s).any()]
    return float(roc_auc_score([bags[s] for s in ids], [probs[slides == s].max() for s in ids]))


def probe_levels(data: dict[str, Any]) -> dict[str, Any]:
    """Instance and max-pooled bag AUCs of the patch probe, the cell probe, and the patch probe read at cells."""
    from sklearn.metrics import roc_auc_score

    patch = out_of_fold(data["patch_x"], data["patch_y"], data["patch_slide"])
    cell = out_of_fold(data["cell_x"], data["cell_y"], data["cell_slide"])
    patch_at_cells = patch[data["cell_patch"]]
    return {
        "n_patches": len(patch), "patch_positive": float(data["patch_y"].mean()),
        "n_cells": len(cell), "cell_positive": float(data["cell_y"].mean()),
        "patch": {"instance_auc": float(roc_auc_score(data["patch_y"], patch)),
                  "bag_auc": bag_auc(patch, data["patch_slide"], data["bags"])},
        "cell": {"instance_auc": float(roc_auc_score(data["cell_y"], cell)),
                 "bag_auc": bag_auc(cell, data["cell_slide"], data["bags"])},
        "patch_probe_at_cells": {"instance_auc": float(roc_auc_score(data["cell_y"], patch_at_cells))},
    }


def markdown(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    rows = []
    for r in report["results"]:
        p = r["probes"]
        rows += [[r["dataset"], r["encoder"], "patch", p["n_patches"], f"{p['patch_positive']:.3f}",
                  f"{p['patch']['instance_auc']:.3f}", f"{p['patch']['bag_auc']:.3f}"],
                 [r["dataset"], r["encoder"], "cell", p["n_cells"], f"{p['cell_positive']:.3f}",
                  f"{p['cell']['instance_auc']:.3f}", f"{p['cell']['bag_auc']:.3f}"],
                 [r["dataset"], r["encoder"], "its patch's probe, read at the cell", p["n_cells"],
                  f"{p['cell_positive']:.3f}", f"{p['patch_probe_at_cells']['instance_auc']:.3f}", "—"]]
    lines = ["# What each level of the cache can tell (supervised probes)", "",
             f"{hw['date']} · {hw['cpu']} · {hw['cores']} cores · load average before {report['load_before']:.1f}, "
             f"after {report['load_after']:.1f} · {report['seconds']:.0f} s.", "",
             f"Logistic regression (standardised, C = {C}) per level on the instance labels no MIL head sees, scored "
             f"out of fold ({FOLDS} folds grouped by slide). Bag AUC: each slide's highest instance probability "
             "against its bag label (a supervised ceiling for max pooling at that level). crc: a cell is positive "
             f"within {ATTENTION_RADIUS_UM:.0f} um of an annotated epithelial nucleus, a patch when one of its cells "
             "is; pcam: a patch is a tile with its label, the cell is the tile's centre cell (PCam's labelled "
             "centre). Encoders: " + "; ".join(f"{k}: {ENCODER_NOTES[k]}" for k in report["encoders"]) + ".", "",
             markdown_table(TABLES["probes"], rows), ""]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mrantool_bench_mran"),
                        help="benchmarks/mran.py's --work (its stores are read; the imagenet ones in WORK/imagenet)")
    parser.add_argument("--encoders", default=",".join(ENCODERS), help=f"comma-separated: {', '.join(ENCODERS)}")
    parser.add_argument("--datasets", default="crc,pcam", help="comma-separated: crc, pcam")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="mran_levels", help="results are written to NAME.json and NAME.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not SHARED.exists():
        raise SystemExit(f"{SHARED} is absent: this benchmark needs the real data beside the project.")
    from mrantool.store import FeatureStore

    started, load_before = time.perf_counter(), load_average()
    encoders = [e for e in args.encoders.split(",") if e]
    results = []
    for encoder in encoders:
        work = args.work if encoder == "random" else args.work / encoder
        for dataset in [d for d in args.datasets.split(",") if d]:
            path = work / f"{dataset}.zarr"
            if not path.exists():
                raise SystemExit(f"{path} does not exist; extract it first with `python benchmarks/mran.py --work "
                                 f"{args.work} --encoder {encoder} --datasets {dataset}`.")
            store = FeatureStore.open(path)
            data = crc_instances(store) if dataset == "crc" else pcam_instances(store, work / "pcam_mosaic")
            probes = probe_levels(data)
            results.append({"dataset": dataset, "encoder": encoder, "store": str(path), "probes": probes})
            print(f"{dataset} {encoder}: patch {probes['patch']}, cell {probes['cell']}", flush=True)
    report = {"hardware": hardware(), "encoders": encoders, "results": results,
              "seconds": time.perf_counter() - started, "load_before": load_before, "load_after": load_average()}
    json_path, md_path = write_results(args.out, args.name, report, markdown(report))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
