"""MRAN options compared on validation splits only (CRCHistoPhenotypes by default): how `mran`'s defaults are chosen.

Every variant is `fit` with the settings of benchmarks/mran.py (same store, folds, seeds, 40 epochs, lr 2e-4) and
one change of head options or fit settings. A fold's score is its kept epoch's validation loss (the lowest) and
that epoch's validation AUC, on the 20% of its training slides that early stopping uses; test folds are never
read. The table gives, per variant, the mean over folds for each seed and how many seeds it beats the default on.
Rule fixed before the runs: a variant replaces the default only if its validation loss is lower on every seed and
its mean validation AUC is not lower.

    python benchmarks/mran_defaults.py                                   # 4 variants, 5 seeds: ~35 min
    python benchmarks/mran_defaults.py --variants lam2 --seeds 2         # some of them
    python benchmarks/mran_defaults.py --variants tissue-spread --name mran_defaults_tissue_spread  # ~32 min
    python benchmarks/mran_defaults.py --dataset cellfoci-rep --variants tissue-spread \
        --name mran_defaults_glass_cellfoci_rep     # the same rule on whole slides whose white is glass
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import hardware, load_average, markdown_table, write_results
from benchmarks.mran import SHARED, Dataset, prepare

FOLDS = {"crc": 10, "pcam": 5, "generated": 4, "cellfoci": 5, "cellfoci-rep": 5}  # as in benchmarks/mran.py
# name -> (head options, fit settings) on top of `mran`'s defaults
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "lam2": ({"lam": 2.0}, {}),  # deep supervision (patch and cell terms) 2.5x and 6x lighter
    "dropout.25": ({"dropout": 0.25}, {}),
    "adapter256": ({"adapter": 256}, {}),
    "adapter64": ({"adapter": 64}, {}),
    "t0": ({"t": 0.0}, {}),  # no threshold: every cell keeps its share of the norm
    "ema": ({}, {"weight_ema": 0.99}),  # docs/fit.md: worse on seeds 0-2 already
    "tissue": ({}, {"tissue_weights": True}),  # each level's weights x tissue area (results/mran_defaults_tissue.md)
    "tissue-centred": ({}, {"tissue_weights": True, "tissue_centring": True}),  # + cells centred at their fraction
    "tissue-spread": ({}, {"tissue_weights": True, "tissue_centring": True, "tissue_spread": True}),  # + scaled
}
DEFAULT_VARIANTS = ("lam2", "dropout.25", "adapter256", "t0")
TABLES = {"variants": ["variant", "change", "val loss per seed", "val AUC per seed", "mean loss", "mean AUC",
                       "loss lower (seeds)", "meets the rule"]}


def validate(args: tuple[str, Dataset, int, Path, int]) -> dict[str, Any]:
    """Fit one variant for one seed; per fold, the kept epoch's validation loss and AUC."""
    import torch

    from mrantool.config import FitConfig
    from mrantool.training.api import fit

    variant, data, seed, work, epochs = args
    torch.set_num_threads(1)
    options, settings = VARIANTS[variant]
    out = work / "defaults" / data.name / variant / f"seed{seed}"
    done = out / "validation.json"
    if done.exists():
        return json.loads(done.read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    curves: dict[str, list[tuple[float, float]]] = {}

    def progress(kind: str, event: dict[str, Any]) -> None:
        if kind == "epoch":
            curves.setdefault(str(event["name"]), []).append((event["val_loss"], event["val_auc"]))

    tic = time.perf_counter()
    fit(FitConfig(store=data.store, labels=data.labels, id_column=data.id_column, label_column=data.label_column,
                  out=str(out), model="mran", options=options, folds=FOLDS[data.name], seed=seed, epochs=epochs,
                  lr=2e-4, threads=1, **{**data.fit, **settings}), progress=progress)
    folds = {}
    for name, curve in curves.items():
        best = int(np.argmin([loss for loss, _ in curve]))
        folds[name] = {"val_loss": curve[best][0], "val_auc": curve[best][1], "kept_epoch": best + 1}
    result = {"variant": variant, "dataset": data.name, "seed": seed, "folds": folds,
              "val_loss": float(np.mean([f["val_loss"] for f in folds.values()])),
              "val_auc": float(np.nanmean([f["val_auc"] for f in folds.values()])),
              "seconds": time.perf_counter() - tic}
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: per-seed validation loss and AUC, means, seeds with a lower loss than the default, the rule."""
    by = {(r["variant"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        loss = [by[variant, s]["val_loss"] for s in seeds if (variant, s) in by]
        aucs = [by[variant, s]["val_auc"] for s in seeds if (variant, s) in by]
        base = [by["default", s] for s in seeds if ("default", s) in by and (variant, s) in by]
        lower = sum(by[variant, b["seed"]]["val_loss"] < b["val_loss"] for b in base)
        rule = (variant != "default" and len(base) == len(loss) and lower == len(base)
                and np.mean(aucs) >= np.mean([b["val_auc"] for b in base]))
        rows.append({"variant": variant, "change": VARIANTS[variant], "val_loss": loss, "val_auc": aucs,
                     "mean_loss": float(np.mean(loss)), "mean_auc": float(np.mean(aucs)),
                     "lower_loss_seeds": lower if variant != "default" else None, "seeds": len(base),
                     "meets_rule": bool(rule)})
    return rows


def markdown(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    lines = [
        "# MRAN options on validation splits", "",
        f"{report['date']} · {hw.get('cpu', '?')} · {hw.get('cores', '?')} cores · data {report['dataset']} · "
        f"seeds {report['seeds']} · {report['epochs']} epochs at most · load average before {report['load_before']}, "
        f"after {report['load_after']} · {report['seconds'] / 60:.0f} min.", "",
        "Per fold: the kept epoch's validation loss (the lowest) and that epoch's validation AUC, on the slides "
        "early stopping uses (20% of each fold's training slides); cells: mean over folds per seed. Test folds are "
        "never read. Rule: a variant replaces the default only if its validation loss is lower on every seed and "
        "its mean validation AUC is not lower.", "",
    ]
    rows = []
    for r in report["variants"]:
        options, settings = r["change"]
        change = ", ".join(f"{k}={v}" for k, v in {**options, **settings}.items()) or "—"
        rows.append([r["variant"], change, " / ".join(f"{v:.3f}" for v in r["val_loss"]),
                     " / ".join(f"{v:.3f}" for v in r["val_auc"]), f"{r['mean_loss']:.3f}", f"{r['mean_auc']:.3f}",
                     "—" if r["lower_loss_seeds"] is None else f"{r['lower_loss_seeds']} of {r['seeds']}",
                     "—" if r["variant"] == "default" else ("yes" if r["meets_rule"] else "no")])
    lines += markdown_table(TABLES["variants"], rows).splitlines()
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="crc", choices=list(FOLDS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        choices=[v for v in VARIANTS if v != "default"], help="compared with the default")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mrantool_bench_mran"), help="scratch (reused)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="mran_defaults")
    args = parser.parse_args(argv)
    if not SHARED.exists():
        raise SystemExit(f"{SHARED} is absent: this benchmark needs the real data beside the project.")
    started, load_before = time.perf_counter(), load_average()
    data = prepare(args.dataset, args.work, e2e=False)
    jobs = [(v, data, s, args.work, args.epochs) for s in range(args.seeds) for v in ["default", *args.variants]]
    with ProcessPoolExecutor(args.workers) as pool:
        results = []
        for r in pool.map(validate, jobs):
            results.append(r)
            print(f"{r['variant']} seed {r['seed']}: val loss {r['val_loss']:.4f} AUC {r['val_auc']:.4f}", flush=True)
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hardware": hardware(), "dataset": args.dataset,
              "seeds": args.seeds, "epochs": args.epochs, "variants": summarise(results), "runs": results,
              "seconds": time.perf_counter() - started, "load_before": load_before, "load_after": load_average()}
    _, md_path = write_results(args.out, args.name, report, markdown(report))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
