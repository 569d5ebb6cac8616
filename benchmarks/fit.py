"""Training speed: (a) fold-fits per minute, batched vs the landed loop; (b) MRAN with cells on a cohort twice
the cache budget; (c) the model step against its FLOP count and the machine's matmul peak.

(a) A K-fold `fit_data` of abmil and mran on a Fox-sized set (200 bags of 2-13 instances, 230-d, generated
with Fox's shape; MRAN with cells off) and on the demo store (16 generated slides extracted with the `mran`
preset; MRAN with cells). Arms, each in its own process, interleaved and repeated: `landed`, the training
loop as landed at --baseline-ref (that commit's `mrantool`, extracted with `git archive`); `one-by-one`,
this code with one fold at a time and one slide per step; `together`, all folds stacked as members (the
same results, see tests/test_batched_training.py); `together+B`, also B slides per step (different
optimisation: its held-out AUC is in the table). Fixed epochs (no early stop), one-time imports excluded.
(b) One MRAN fold (cells on, every bag every step) on a generated store with cells: epoch time with the cache
holding the cohort (`ram`, after a warm-up epoch), with `cache_gb` at half the cohort (`half-cache`: float16
reads and decoding in the prefetch thread), and reading each slide's float32 h5 file per step as CLAM does
(`h5`). (c) Matmul peak (median GFLOP/s of a 2048^2 fp32 mm) against each step's FLOPs (torch's
FlopCounterMode: matmuls/convolutions of forward + backward) per second, one slide per step and batched.

Run `nice -n 10 python benchmarks/fit.py` on a quiet machine; `--smoke` runs every part with tiny settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # last: a child's PYTHONPATH decides which mrantool it runs (the baseline's or ours)
    sys.path.append(str(ROOT))

from benchmarks.common import hardware, load_average, markdown_table, median, write_results  # noqa: E402

FOX = {"bags": 200, "dim": 230, "min": 2, "max": 13, "mean": 6.5}
SIGNAL_DIMS, SIGNAL_SHIFT = 20, 0.6
ARMS_A = ("landed", "one-by-one", "together", "together+B")
TABLES = {"a": ["set/head", "arm", "seconds", "fold-fits/min", "x landed", "test AUC"],
          "b": ["arm", "cache_gb", "epoch s", "x ram"],
          "c": ["step", "GFLOP/step", "ms/step", "GFLOP/s", "of peak", "slide-steps/s"]}  # columns of fit.md


# ---------------------------------------------------------------- data


def fox_arrays(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Fox-shaped bags: (1, n_i, 230) float32 each, n_i in 2..13 (mean ~6.5); positives shift 1-3 instances."""
    rng = np.random.default_rng(seed)
    bags, labels = {}, []
    for i in range(FOX["bags"]):
        n = int(np.clip(rng.poisson(FOX["mean"] - FOX["min"]) + FOX["min"], FOX["min"], FOX["max"]))
        x = rng.standard_normal((n, FOX["dim"])).astype(np.float32)
        label = i % 2
        if label:
            x[rng.choice(n, min(n, int(rng.integers(1, 4))), replace=False), :SIGNAL_DIMS] += SIGNAL_SHIFT
        bags[f"fox{i:03d}"] = x[None]
        labels.append(label)
    return bags, np.array(labels, np.int64)


def baseline_tree(root: Path, ref: str) -> Path:
    """That commit's `mrantool` package under root/baseline-<ref> (git archive), made once."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    folder = root / f"baseline-{commit.strip()[:12]}"
    if not (folder / "mrantool" / "__init__.py").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit.strip(), "mrantool"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def build_demo_store(root: Path, baseline: Path, slides: int, size: int) -> tuple[Path, Path]:
    """The demo cohort extracted with the `mran` preset, by the baseline code (a store every arm can read)."""
    folder = root / f"demo-{slides}-{size}"
    store, labels = folder / "store.zarr", folder / "slides" / "labels.csv"
    if not (folder / "done").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        code = ("import sys; from mrantool.slides.synthetic import make_cohort; from mrantool.config import "
                "ExtractConfig; from mrantool.extract.api import extract; "
                f"make_cohort({str(folder / 'slides')!r}, n_slides={slides}, seed=0, size=({size}, {size})); "
                f"extract(ExtractConfig(slides=[{str(folder / 'slides')!r}], store={str(store)!r}, preset='mran', "
                "workers=1, quiet=True))")
        # cwd outside the project: `python -c` puts the working folder first on sys.path, ahead of PYTHONPATH
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(baseline)}, check=True,
                       cwd=root)
        (folder / "done").write_text("ok")
    return store, labels


def build_cell_store(root: Path, slides: int, bags: int, dim: int) -> tuple[Path, Path, Path]:
    """A store with cells (8x8 patches of 4x4 cells per bag) and the same features as float32 h5 per slide."""
    import h5py

    from mrantool.store import FeatureStore, make_identity

    folder = root / f"cells-{slides}-{bags}-{dim}"
    store_path, h5_dir, labels_path = folder / "store.zarr", folder / "h5", folder / "labels.csv"
    if (folder / "done").is_file():
        return store_path, h5_dir, labels_path
    shutil.rmtree(folder, ignore_errors=True)
    h5_dir.mkdir(parents=True)
    identity = make_identity(encoder="synthetic", weights="random", transforms={}, embed_dim=dim,
                             geometry={"bag_px": 512, "mpp": 1.0, "grid": 8, "cells": 4}, preset=None,
                             has_cells=True)
    store = FeatureStore.create(store_path, identity)
    provenance = {"source": "generated", "fingerprint": None, "mpp": 1.0, "level0_size": [512 * bags, 512],
                  "bag_size_l0": 512}
    rows = ["slide_id,label"]
    for i in range(slides):
        rng = np.random.default_rng(i)
        cells = np.abs(rng.standard_normal((bags, 64, 16, dim), dtype=np.float32))
        if i % 2:
            cells[rng.integers(bags), rng.choice(64, 4, replace=False), :, :SIGNAL_DIMS] += 1.0
        cells = cells.astype(np.float16)
        patches = cells.astype(np.float32).mean(2).astype(np.float16)
        writer = store.begin_slide(f"c{i:03d}", bags, provenance)
        writer.write(0, np.zeros((bags, 2)), np.ones((bags, 64), np.float32), patches, cells)
        writer.commit()
        with h5py.File(h5_dir / f"c{i:03d}.h5", "w") as fh:  # CLAM keeps float32 features, one file per slide
            fh["features"], fh["cells"] = patches.astype(np.float32), cells.astype(np.float32)
        rows.append(f"c{i:03d},{i % 2}")
    labels_path.write_text("\n".join(rows) + "\n")
    (folder / "done").write_text("ok")
    return store_path, h5_dir, labels_path


# ---------------------------------------------------------------- child jobs (one process each)


def job_fit(spec: dict[str, Any]) -> dict[str, Any]:
    """One K-fold fit_data of an arm of part (a); seconds exclude imports and the first optimiser's set-up."""
    import torch

    from mrantool.config import FitConfig
    from mrantool.training.api import fit_data
    from mrantool.training.data import ArrayData, StoreData
    from mrantool.training.labels import Labels, read_labels

    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # its one-time imports happen here, untimed
    if spec["dataset"] == "fox":
        bags, y = fox_arrays()
        data: Any = ArrayData(bags)
        labels = Labels(list(bags), y, ["0", "1"], list(bags))
    else:
        from mrantool.store import FeatureStore

        store = FeatureStore.open(spec["store"])
        labels = read_labels(spec["labels"], store.slide_ids())
        data = StoreData(store, labels.slide_ids, cells=spec["cells"], patch_min_tissue=0.25, cache_gb=8.0)
    settings = {"folds": spec["folds"], "epochs": spec["epochs"], "patience": spec["epochs"],
                "min_epochs": spec["epochs"], "threads": spec["threads"], "device": spec["device"],
                "save_attention": False, "seed": 0, "lr": spec["lr"]}
    if spec["arm"] != "landed":
        settings.update(parallel_folds=1 if spec["arm"] == "one-by-one" else 0,
                        batch_size=spec["batch_size"] if spec["arm"] == "together+B" else 1)
    with tempfile.TemporaryDirectory() as out:
        cfg = FitConfig(store="-", labels="-", out=str(Path(out) / "run"), model=spec["model"],
                        options=spec["options"], **settings)
        tic = time.perf_counter()
        report = fit_data(cfg, data, labels)
        seconds = time.perf_counter() - tic
    import mrantool

    return {"seconds": seconds, "auc": report.mean["auc"], "fold_auc": [f.metrics["auc"] for f in report.folds],
            "mrantool": str(Path(mrantool.__file__).parent)}


def job_cells(spec: dict[str, Any]) -> dict[str, Any]:
    """Part (b): one MRAN fold, every bag every step; the seconds of each epoch."""
    import h5py
    import torch

    from mrantool.config import FitConfig
    from mrantool.models.registry import create_head
    from mrantool.store import FeatureStore
    from mrantool.training.data import MILData, StoreData
    from mrantool.training.labels import read_labels
    from mrantool.training.loop import train_fold

    class H5Data(MILData):
        """CLAM-style: every read opens the slide's float32 .h5 file and reads its arrays whole."""

        def __init__(self, folder: Path, ids: list[str], bags: int) -> None:
            self.folder, self.slide_ids, self.bags_per_slide = folder, ids, bags
            self.in_dim, self.has_cells, self.cells = spec["dim"], True, True

        def n_bags(self, slide_id: str) -> int:
            return self.bags_per_slide

        def mask(self, slide_id: str) -> np.ndarray:
            return np.ones((self.bags_per_slide, 64), bool)

        def read(self, slide_id: str, index: np.ndarray, cells: bool = True) -> tuple[np.ndarray, Any]:
            with h5py.File(self.folder / f"{slide_id}.h5", "r") as fh:
                features, cell_values = fh["features"][:], fh["cells"][:] if cells else None
            return features[index], None if cell_values is None else cell_values[index]

    torch.set_num_threads(spec["threads"])
    store = FeatureStore.open(spec["store"])
    labels = read_labels(spec["labels"], store.slide_ids())
    ids, y = labels.slide_ids, labels.y
    if spec["arm"] == "h5":
        data: MILData = H5Data(Path(spec["h5"]), ids, spec["bags"])
    else:
        data = StoreData(store, ids, cells=True, patch_min_tissue=0.0, cache_gb=spec["cache_gb"])
    cfg = FitConfig(store="-", labels="-", out="-", model="mran", epochs=spec["epochs"], patience=spec["epochs"],
                    min_epochs=spec["epochs"], max_bags=spec["bags"], threads=spec["threads"],
                    device=spec["device"], bag_mining=True)
    torch.manual_seed(0)
    head = create_head("mran", spec["dim"], 2)
    epochs: list[float] = []
    train_fold(head, data, ids, y, [], np.array([], np.int64), cfg, seed=0,
               progress=lambda event, info: epochs.append(info["seconds"]) if event == "epoch" else None)
    result: dict[str, Any] = {"epochs_s": epochs}
    if isinstance(data, StoreData):
        result.update(cache_hits=data.cache.hits, cache_misses=data.cache.misses,
                      cache_mb=data.cache.nbytes / 2**20, cohort_mb=data.cohort_bytes() / 2**20)
    return result


def job_flops(spec: dict[str, Any]) -> dict[str, Any]:
    """Part (c): the matmul peak, then FLOPs and seconds of training steps for each configuration."""
    import torch

    torch.set_num_threads(spec["threads"])
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peaks = []
    for _ in range(5):
        tic = time.perf_counter()
        torch.mm(a, b)
        peaks.append(2 * 2048**3 / (time.perf_counter() - tic) / 1e9)
    return {"peak_gflops": median(peaks), "cases": [_flop_case(case, spec["steps"]) for case in spec["cases"]]}


def _flop_case(case: dict[str, Any], steps: int) -> dict[str, Any]:
    """FLOPs (forward + backward) and median seconds of a training step of G members x S slides."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mrantool.config import FitConfig
    from mrantool.models.registry import create_head
    from mrantool.training.batched.stack import MemberStack
    from mrantool.training.loop import make_optimizer

    g, s, n_bags, p, c, d = (case[k] for k in ("members", "slides", "bags", "patches", "cells", "dim"))
    torch.manual_seed(0)
    stack = MemberStack([create_head(case["model"], d, 2, **case["options"]) for _ in range(g)])
    optimizer = make_optimizer(FitConfig(store="-", labels="-", out="-"),
                               [q for m in range(g) for q in stack.parameters(m)])
    patches = torch.randn(g, s, n_bags, p, d)
    cells = torch.randn(g, s, n_bags, p, c, d).abs() if c else None
    mask = torch.ones(g, s, n_bags, p, dtype=torch.bool)
    labels, weights = torch.randint(0, 2, (g, s)), torch.ones(g, 2)

    def step() -> None:
        loss = stack(list(range(g)), patches, cells, mask, labels, weights, None, 0, 10)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()

    step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    seconds, flops = median(times), counter.get_total_flops()
    return {**case, "gflop_per_step": flops / 1e9, "step_ms": seconds * 1e3, "gflops": flops / seconds / 1e9,
            "slide_steps_per_s": g * s / seconds}


JOBS = {"fit": job_fit, "cells": job_cells, "flops": job_flops}


def run_child(spec: dict[str, Any], pythonpath: Path | None = None) -> dict[str, Any]:
    """Run one job in a fresh process (threads pinned); its last stdout line is the JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "PYTHONPATH": f"{pythonpath}{os.pathsep}{ROOT}" if pythonpath else str(ROOT)}  # whose mrantool runs
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"job {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- parts


def part_a(args: argparse.Namespace, root: Path, baseline: Path) -> dict[str, Any]:
    store, labels = (build_demo_store(root, baseline, args.demo_slides, args.demo_size) if "demo" in args.datasets
                     else (Path("-"), Path("-")))
    cases = []
    for dataset in args.datasets:
        for model in args.heads:
            options = {"cells": False} if model == "mran" and dataset == "fox" else {}
            cases.append({"dataset": dataset, "model": model, "options": options, "cells": model == "mran"
                          and dataset == "demo", "folds": args.fox_folds if dataset == "fox" else args.demo_folds,
                          "epochs": args.epochs, "lr": args.lr, "threads": args.threads, "device": "cpu",
                          "batch_size": args.batch_size, "store": str(store), "labels": str(labels)})
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for repeat in range(args.repeats):
        for case in cases:
            key = f"{case['dataset']}/{case['model']}"
            arms = ARMS_A[repeat % len(ARMS_A):] + ARMS_A[:repeat % len(ARMS_A)]  # rotate the order
            for arm in arms:
                out = run_child({**case, "job": "fit", "arm": arm}, baseline if arm == "landed" else None)
                out["load"] = load_average()
                results.setdefault(key, {}).setdefault(arm, []).append(out)
                print(f"(a) {key} {arm}: {out['seconds']:.1f} s, auc {out['auc']:.3f} (load {out['load']})",
                      flush=True)
    summary = {}
    for key, arms in results.items():
        case = next(c for c in cases if f"{c['dataset']}/{c['model']}" == key)
        seconds = {arm: median([r["seconds"] for r in runs]) for arm, runs in arms.items()}
        summary[key] = {arm: {"seconds": round(seconds[arm], 2),
                              "fold_fits_per_min": round(case["folds"] * 60 / seconds[arm], 2),
                              "vs_landed": round(seconds["landed"] / seconds[arm], 2),
                              "auc": round(median([r["auc"] for r in arms[arm]]), 4)} for arm in arms}
    return {"cases": cases, "runs": results, "summary": summary}


def part_b(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    store, h5, labels = build_cell_store(root, args.cell_slides, args.cell_bags, args.cell_dim)
    cohort_gb = args.cell_slides * args.cell_bags * 64 * 17 * args.cell_dim * 2 / 2**30
    base = {"store": str(store), "labels": str(labels), "h5": str(h5), "bags": args.cell_bags,
            "dim": args.cell_dim, "epochs": args.cell_epochs, "threads": args.threads, "device": "cpu"}
    arms = {"ram": 2 * cohort_gb + 0.01, "half-cache": cohort_gb / 2, "h5": 0.0}
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for arm, cache_gb in list(arms.items())[repeat % 3:] + list(arms.items())[:repeat % 3]:
            out = run_child({**base, "job": "cells", "arm": arm, "cache_gb": cache_gb})
            out["load"] = load_average()
            runs.setdefault(arm, []).append(out)
            print(f"(b) {arm}: epochs {[round(s, 2) for s in out['epochs_s']]} (load {out['load']})", flush=True)
    warm = {arm: median([median(r["epochs_s"][1:]) for r in rs]) for arm, rs in runs.items()}
    return {"cohort_gb": round(cohort_gb, 3), "cache_gb": {k: round(v, 3) for k, v in arms.items()}, "runs": runs,
            "warm_epoch_s": {k: round(v, 3) for k, v in warm.items()},
            "half_cache_vs_ram": round(warm["half-cache"] / warm["ram"], 3),
            "h5_vs_ram": round(warm["h5"] / warm["ram"], 3)}


def part_c(args: argparse.Namespace) -> dict[str, Any]:
    demo = {"bags": 4, "patches": 64, "dim": 512}
    cases = [
        {"name": "abmil, Fox-sized bag", "model": "abmil", "options": {}, "members": 1, "slides": 1, "bags": 1,
         "patches": 7, "cells": 0, "dim": 230},
        {"name": "abmil, Fox-sized, 10 folds x 8 slides", "model": "abmil", "options": {}, "members": 10,
         "slides": 8, "bags": 1, "patches": 7, "cells": 0, "dim": 230},
        {"name": "abmil, demo slide", "model": "abmil", "options": {}, "members": 1, "slides": 1, "cells": 0,
         **demo},
        {"name": "abmil, demo, 4 folds x 4 slides", "model": "abmil", "options": {}, "members": 4, "slides": 4,
         "cells": 0, **demo},
        {"name": "mran with cells, demo slide", "model": "mran", "options": {}, "members": 1, "slides": 1,
         "cells": 16, **demo},
    ]
    return run_child({"job": "flops", "cases": cases, "steps": args.flop_steps, "threads": args.threads})


# ---------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    lines = ["# fit: batched training, cells at scale, FLOP/s", ""]
    if "a" in report:
        a = report["a"]
        rows = []
        for key, arms in a["summary"].items():
            for arm, r in arms.items():
                rows.append([key, arm, r["seconds"], r["fold_fits_per_min"], r["vs_landed"], r["auc"]])
        case = a["cases"][0]
        lines += ["## (a) fold-fits per minute, batched vs the landed loop", "",
                  f"K-fold fit_data, {case['epochs']} epochs per fold (no early stop), lr {case['lr']}, "
                  f"{report['threads']} torch thread(s); Fox-sized: {a['cases'][0]['folds']} folds; demo: "
                  f"{report['settings']['demo_folds']} folds; `together+B`: {case['batch_size']} slides per "
                  f"step. Medians of {report['settings']['repeats']} repeats, arms interleaved; AUC: mean over "
                  "held-out test folds. `landed` is the loop at git "
                  f"{report['baseline']}.", "",
                  markdown_table(TABLES["a"], rows, [False, False, True, True, True, True]), ""]
    if "b" in report:
        b = report["b"]
        rows = [[arm, b["cache_gb"][arm] if arm != "h5" else "-", s, round(s / b["warm_epoch_s"]["ram"], 3)]
                for arm, s in b["warm_epoch_s"].items()]
        lines += ["## (b) MRAN with cells on a cohort twice the cache budget", "",
                  f"{report['settings']['cell_slides']} slides x {report['settings']['cell_bags']} bags x 64 "
                  f"patches x 16 cells x {report['settings']['cell_dim']}-d ({b['cohort_gb']} GB in float16); one "
                  "fold, every bag every step, median epoch over epochs 2..n of each run, median over runs.", "",
                  markdown_table(TABLES["b"], rows, [False, True, True, True]), "",
                  f"half-cache / ram = {b['half_cache_vs_ram']} (target <= 1.25); h5 / ram = {b['h5_vs_ram']}.", ""]
    if "c" in report:
        c = report["c"]
        rows = [[r["name"], round(r["gflop_per_step"], 4), round(r["step_ms"], 2), round(r["gflops"], 2),
                 f"{100 * r['gflops'] / c['peak_gflops']:.1f}%", round(r["slide_steps_per_s"], 1)]
                for r in c["cases"]]
        lines += ["## (c) the model step against its FLOP count", "",
                  f"Matmul peak: {c['peak_gflops']:.1f} GFLOP/s (2048^2 fp32 mm, {report['threads']} thread(s)). "
                  "FLOPs of forward + backward from torch's FlopCounterMode (matmuls and convolutions only), one "
                  "optimiser step included in the time.", "",
                  markdown_table(TABLES["c"], rows, [False, True, True, True, True, True]), ""]
    lines += [f"{hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, niceness {hw['niceness']}; load average "
              f"{report['load_before']} before, {report['load_after']} after; {hw['date']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "mrantool_fit_bench"))
    parser.add_argument("--baseline-ref", default="84928da", help="commit whose training loop is 'landed'")
    parser.add_argument("--datasets", nargs="+", default=["fox", "demo"], choices=["fox", "demo"])
    parser.add_argument("--heads", nargs="+", default=["abmil", "mran"])
    parser.add_argument("--fox-folds", type=int, default=10)
    parser.add_argument("--demo-folds", type=int, default=4)
    parser.add_argument("--demo-slides", type=int, default=16)
    parser.add_argument("--demo-size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=8, help="slides per step of the together+B arm")
    parser.add_argument("--cell-slides", type=int, default=32)
    parser.add_argument("--cell-bags", type=int, default=8)
    parser.add_argument("--cell-dim", type=int, default=256)
    parser.add_argument("--cell-epochs", type=int, default=4)
    parser.add_argument("--flop-steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings for every part, results under --root (a check, not a result)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(JOBS[spec["job"]](spec)))
        return
    if args.smoke:
        args.repeats, args.epochs, args.fox_folds, args.demo_folds, args.demo_slides = 1, 2, 3, 2, 4
        args.demo_size, args.cell_slides, args.cell_bags, args.cell_dim, args.cell_epochs = 2048, 6, 2, 32, 2
        args.flop_steps = 3
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    baseline = baseline_tree(root, args.baseline_ref)
    report: dict[str, Any] = {"hardware": hardware(), "threads": args.threads, "load_before": load_average(),
                              "baseline": args.baseline_ref, "settings": vars(args)}
    if "a" in args.parts:
        report["a"] = part_a(args, root, baseline)
    if "b" in args.parts:
        report["b"] = part_b(args, root)
    if "c" in args.parts:
        report["c"] = part_c(args)
    report["load_after"] = load_average()
    text = markdown(report)
    out = Path(args.out) if args.out else root / "results" if args.smoke else Path(__file__).parent / "results"
    write_results(out, "fit", report, text)
    print(text)


if __name__ == "__main__":
    main()
