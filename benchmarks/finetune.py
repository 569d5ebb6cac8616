"""Fine-tuning from the cache vs the frozen-cache MRAN head, on a generated cohort with a weak frozen encoder.

The `tiny` preset (ResNet-18 cut after stage 2, random init, 64 px patches) is a deliberately weak encoder.
On the same folds: `fit` (frozen cache, MRAN, 3 folds) vs `finetune` from that run; validation and test AUC
for both; seconds per fine-tuning step and per epoch vs one reference-style epoch that encodes every bag of
every training slide with gradients through the whole encoder. Writes benchmarks/results/finetune.json + .md.

    nice -n 10 python -m benchmarks.finetune [--slides 12] [--size 2048] [--epochs 3] [--fit-epochs 20]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/finetune.py` finds benchmarks.common

from benchmarks.common import hardware, load_average, markdown_table, write_results
from mrantool.cohorts.synthetic import make_cohort
from mrantool.config import ExtractConfig, FitConfig
from mrantool.encoders.rebuild import rebuild_encoder
from mrantool.extract.api import extract
from mrantool.store import FeatureStore
from mrantool.training.api import fit
from mrantool.training.data import StoreData
from mrantool.training.labels import read_labels
from mrantool.training.pixels.finetune import encode, finetune
from mrantool.training.pixels.source import BagPixels, transform_preset
from mrantool.training.runs import load_checkpoint

RESULTS = Path(__file__).parent / "results"
TABLES = {"folds": ["fold", "frozen val AUC", "frozen test AUC", "tuned val AUC", "tuned test AUC", "best epoch",
                    "s/step", "s/epoch"]}  # columns of finetune.md


def reference_epoch(store_path: Path, labels_csv: Path, run: Path, threads: int) -> dict[str, float]:
    """One epoch over fold_0's training slides encoding EVERY bag with gradients through the whole encoder."""
    torch.set_num_threads(threads)
    store = FeatureStore.open(store_path)
    labels = read_labels(labels_csv, store.slide_ids())
    split = json.loads((run / "splits.json").read_text())[0]
    y_of = dict(zip(labels.slide_ids, labels.y.tolist(), strict=True))
    encoder = rebuild_encoder(store.identity)
    encoder.model.requires_grad_(True)
    head, _ = load_checkpoint(run / split["name"])
    head.train()
    preset = transform_preset(store.identity)
    data = StoreData(store, labels.slide_ids, cells=True, patch_min_tissue=0.25, cache_gb=1.0)
    pixels = BagPixels(store, preset.geometry)
    optimizer = torch.optim.Adam([*head.parameters(), *encoder.model.parameters()], lr=1e-5)
    p, steps, bags = preset.geometry.n_patches, [], 0
    start = time.perf_counter()
    for slide_id in split["train"]:
        tic = time.perf_counter()
        n = data.n_bags(slide_id)
        patch, cells = encode(encoder, pixels.read(slide_id, np.arange(n)), preset, torch.device("cpu"))
        out = head(patch.reshape(n, p, -1), cells.reshape(n, p, *cells.shape[1:]),
                   torch.from_numpy(data.mask(slide_id)))
        loss, _ = head.compute_loss(out, torch.tensor(y_of[slide_id]), epoch=0, n_epochs=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps.append(time.perf_counter() - tic)
        bags += n
    pixels.close()
    return {"seconds_per_epoch": time.perf_counter() - start, "seconds_per_step": float(np.mean(steps)),
            "bags_per_step": bags / len(steps)}


def fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=12)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fit-epochs", type=int, default=20)
    parser.add_argument("--bags-per-slide", type=int, default=2)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="mrantool-ft-"))
    timings: dict[str, float] = {}
    tic = time.perf_counter()
    labels = make_cohort(work / "slides", n_slides=args.slides, seed=0, size=(args.size, args.size), n_foci=3,
                         workers=2)
    timings["cohort_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    slides = sorted(str(p) for p in (work / "slides").glob("*.tiff"))
    extract(ExtractConfig(slides=slides, store=str(work / "tiny.zarr"), preset="tiny", workers=0, device="cpu"))
    timings["extract_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    frozen = fit(FitConfig(store=str(work / "tiny.zarr"), labels=str(labels), out=str(work / "frozen"),
                           model="mran", folds=3, epochs=args.fit_epochs, patience=args.fit_epochs, device="cpu",
                           threads=args.threads, save_attention=False))
    timings["fit_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    tuned = finetune(work / "tiny.zarr", labels, work / "tuned", init_run=work / "frozen", layers=args.layers,
                     bags_per_slide=args.bags_per_slide, epochs=args.epochs, device="cpu", threads=args.threads)
    timings["finetune_s"] = time.perf_counter() - tic
    reference = reference_epoch(work / "tiny.zarr", labels, work / "frozen", args.threads)
    fit_metrics = json.loads((work / "frozen" / "metrics.json").read_text())
    rows: list[dict[str, Any]] = []
    for frozen_fold, fold in zip(fit_metrics["folds"], tuned.folds, strict=True):
        best = frozen_fold["history"][frozen_fold["best_epoch"] - 1]
        rows.append({"fold": fold.name, "frozen_val_auc": best["val_auc"], "frozen_test_auc": frozen_fold["auc"],
                     "start_val_auc": fold.start_val_auc, "start_test_auc": fold.start_metrics["auc"],
                     "tuned_val_auc": fold.val_auc, "tuned_test_auc": fold.metrics["auc"],
                     "best_epoch": fold.best_epoch, "seconds_per_step": fold.seconds_per_step,
                     "seconds_per_epoch": fold.seconds_per_epoch})
    report = {"hardware": hardware(), "load_average": load_average(), "args": {k: str(v) for k, v in
              vars(args).items()}, "timings": timings, "folds": rows, "frozen_mean": frozen.mean,
              "tuned_mean": tuned.mean, "reference_epoch": reference,
              "note": "start_* = the init head with every bag re-encoded by the not-yet-tuned encoder (fp32)."}
    md = ["# Fine-tuning from the cache vs frozen cache (tiny preset, generated cohort)", "",
          f"{args.slides} slides of {args.size} px, n_foci=3, 3 folds; fine-tuning {args.epochs} epochs, last "
          f"{args.layers} stage(s), {args.bags_per_slide} bags/slide; {args.threads} thread(s); load "
          f"{report['load_average']}; {report['hardware']['cpu']}, {report['hardware']['date']}.", "",
          markdown_table(TABLES["folds"],
                         [[r["fold"], fmt(r["frozen_val_auc"]), fmt(r["frozen_test_auc"]), fmt(r["tuned_val_auc"]),
                           fmt(r["tuned_test_auc"]), r["best_epoch"], fmt(r["seconds_per_step"]),
                           fmt(r["seconds_per_epoch"])] for r in rows], [False] + [True] * 7), "",
          f"Reference-style epoch (every bag of fold_0's training slides, whole encoder with gradients): "
          f"{reference['seconds_per_epoch']:.2f} s ({reference['seconds_per_step']:.3f} s/step, "
          f"{reference['bags_per_step']:.1f} bags/step).", "",
          f"Mean test AUC: frozen {fmt(frozen.mean['auc'])}, fine-tuned {fmt(tuned.mean['auc'])}.", ""]
    json_path, _ = write_results(RESULTS, "finetune", report, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
