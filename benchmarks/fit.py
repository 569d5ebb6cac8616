"""Epoch time of MIL training (abmil) from four data paths, each arm in its own subprocess.

(a) mrantool's StoreData (LRU cache holding the whole cohort) through `train_fold`: epoch 1 is cold
(reads the zarr store), epochs 2..n come from the cache; (b) the same `train_fold` on float32 tensors
already in RAM, the ceiling; (c) a CLAM-style loop that opens one float32 .h5 file per slide per step
with h5py (DataLoader, batch 1, no workers as CLAM on CPU); (d) torchmil's ABMIL trained its documented way
(ProcessedMILDataset over the same .h5 files, its collate_fn and Trainer), skipped when torchmil is absent.

The cohort (random float16 features with a weak signal in positive slides) is generated once under
--root and reused; --rebuild regenerates it. Arms run interleaved, one epoch of each arm in turn, so load
changes on a shared machine hit every arm alike; each arm's peak RSS is its own process's. Run it as
`nice -n 10 python benchmarks/fit.py` (add --profile to see where arm (a) spends its time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import hardware, load_average, markdown_table, median, write_results

ARMS = {"a": "mrantool StoreData + train_fold", "b": "tensors in RAM + train_fold (ceiling)",
        "c": "CLAM-style: h5py read per slide per step", "d": "torchmil ProcessedMILDataset + Trainer"}
GRID = 8  # 64 patches per bag
TABLES = {"arms": ["arm", "epoch 1 (cold) s", "median epochs 2..n s", "data s epoch 1", "data s median 2..n",
                   "RSS after setup MiB", "peak RSS MiB", "setup s", "all epochs s"],
          "ratios": ["ratio (warm medians)", "value", "target", "met"]}  # columns of fit.md
HIDDEN, ATTN = 500, 128  # abmil size in every arm (mrantool's defaults)
SIGNAL_DIMS, SIGNAL_SHIFT, SIGNAL_SHARE = 16, 0.5, 0.05


# ---------------------------------------------------------------- cohort


def cohort_meta(args: argparse.Namespace) -> dict[str, Any]:
    return {"slides": args.slides, "patches": args.patches, "dim": args.dim, "grid": GRID, "version": 1}


def slide_features(i: int, n_bags: int, dim: int) -> tuple[np.ndarray, int]:
    """float16 (n_bags, P, dim) features and the label of slide i; positives shift a few patches."""
    rng = np.random.default_rng(i)
    x = rng.standard_normal((n_bags, GRID * GRID, dim), dtype=np.float32)
    label = i % 2
    if label:
        flat = x.reshape(-1, dim)
        rows = rng.choice(len(flat), max(1, int(SIGNAL_SHARE * len(flat))), replace=False)
        flat[rows, :SIGNAL_DIMS] += SIGNAL_SHIFT
    return x.astype(np.float16), label


def build_cohort(root: Path, args: argparse.Namespace) -> float:
    """Write the store (root/store.zarr) and CLAM-style .h5 files (root/h5); return seconds (0 when reused)."""
    meta_path = root / "meta.json"
    meta = cohort_meta(args)
    if not args.rebuild and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return 0.0
    import h5py

    from mrantool.store import FeatureStore, make_identity

    start = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    (root / "h5").mkdir(parents=True)
    identity = make_identity(encoder="synthetic", weights="random", transforms={}, embed_dim=args.dim,
                             geometry={"bag_px": 512, "mpp": 0.5, "grid": GRID, "cells": 1}, preset=None,
                             has_cells=False)
    store = FeatureStore.create(root / "store.zarr", identity)
    n_bags = args.patches // (GRID * GRID)
    provenance = {"source": "generated", "fingerprint": None, "mpp": 0.5, "level0_size": [512 * n_bags, 512],
                  "bag_size_l0": 512}
    coords = np.stack([np.arange(n_bags) * 512, np.zeros(n_bags)], axis=1)
    labels = {}
    for i in range(args.slides):
        sid = f"s{i:04d}"
        x, labels[sid] = slide_features(i, n_bags, args.dim)
        writer = store.begin_slide(sid, n_bags, provenance)
        writer.write(0, coords, np.ones((n_bags, GRID * GRID), np.float32), x, None)
        writer.commit()
        with h5py.File(root / "h5" / f"{sid}.h5", "w") as fh:  # CLAM layout: features (N, D) float32, coords
            fh["features"] = x.reshape(-1, args.dim).astype(np.float32)
            fh["coords"] = np.zeros((x.shape[0] * x.shape[1], 2), np.int64)
            fh["labels"] = np.float32(labels[sid])  # torchmil reads the bag label from a file too
    (root / "labels.json").write_text(json.dumps(labels))
    meta_path.write_text(json.dumps(meta))
    return time.perf_counter() - start


# ---------------------------------------------------------------- arms (run in a child process)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def send(event: str, **info: Any) -> None:
    print(json.dumps({"event": event, **info}), flush=True)


class DataClock:
    """Wraps a data-producing callable and sums the seconds spent in it (reset after each epoch report)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tic = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - tic

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def wait_go() -> None:
    if sys.stdin.readline().strip() != "go":
        sys.exit(0)


def fit_config(epochs: int, max_bags: int, threads: int) -> Any:
    from mrantool.config import FitConfig

    return FitConfig(store="-", labels="-", out="-", model="abmil", epochs=epochs, patience=epochs,
                     min_epochs=epochs, max_bags=max_bags, threads=threads, device="cpu", bag_mining=False,
                     lr=2e-4, patch_min_tissue=0.0)


def run_train_fold(data: Any, ids: list[str], y: np.ndarray, epochs: int, threads: int) -> None:
    """mrantool's train_fold, one epoch per 'go'; epoch seconds are train_fold's own."""
    from mrantool.models.registry import create_head
    from mrantool.training.loop import train_fold

    head = create_head("abmil", data.in_dim, 2, hidden=HIDDEN, attn_dim=ATTN)
    clock = data.bags = DataClock(data.bags)  # time spent producing each step's tensors
    cfg = fit_config(epochs, max(data.n_bags(s) for s in ids), threads)

    def progress(event: str, info: dict[str, Any]) -> None:
        send("epoch", seconds=info["seconds"], data_s=clock.take(), loss=info["train_loss"])
        if info["epoch"] < epochs:
            wait_go()

    wait_go()
    train_fold(head, data, ids, y, [], np.array([], np.int64), cfg, seed=0, progress=progress)


def arm_a(root: Path, ids: list[str], y: np.ndarray, epochs: int, threads: int) -> None:
    from mrantool.store import FeatureStore
    from mrantool.training.data import StoreData

    data = StoreData(FeatureStore.open(root / "store.zarr"), ids, cells=False, patch_min_tissue=0.0,
                     cache_gb=64.0)
    send("ready", rss_mb=peak_rss_mb())
    run_train_fold(data, ids, y, epochs, threads)
    send("done", peak_rss_mb=peak_rss_mb(), cache_mb=data.cache.nbytes / 2**20,
         cache_hits=data.cache.hits, cache_misses=data.cache.misses)


def arm_b(root: Path, ids: list[str], y: np.ndarray, epochs: int, threads: int) -> None:
    import torch

    from mrantool.store import FeatureStore
    from mrantool.training.data import Bags, MILData, StoreData

    class TensorData(MILData):
        """Every slide's float32 Bags built once; `bags` hands them out (all bags, any device = cpu)."""

        def __init__(self, source: StoreData) -> None:
            self.slide_ids, self.in_dim = source.slide_ids, source.in_dim
            self.has_cells = self.cells = False
            self._bags = {s: source.bags(s) for s in self.slide_ids}

        def n_bags(self, slide_id: str) -> int:
            return len(self._bags[slide_id].index)

        def mask(self, slide_id: str) -> np.ndarray:
            return self._bags[slide_id].mask.numpy()

        def read(self, slide_id: str, index: np.ndarray) -> tuple[np.ndarray, None]:
            return self._bags[slide_id].patches[torch.from_numpy(index)].numpy(), None

        def bags(self, slide_id: str, index: np.ndarray | None = None, device: Any = "cpu") -> Bags:
            return self._bags[slide_id]

    data = TensorData(StoreData(FeatureStore.open(root / "store.zarr"), ids, cells=False,
                                patch_min_tissue=0.0, cache_gb=0.0))
    send("ready", rss_mb=peak_rss_mb())
    run_train_fold(data, ids, y, epochs, threads)
    send("done", peak_rss_mb=peak_rss_mb())


def arm_c(root: Path, ids: list[str], y: np.ndarray, epochs: int, threads: int) -> None:
    import h5py
    import torch
    from torch.utils.data import DataLoader, Dataset

    from mrantool.models.registry import create_head
    from mrantool.training.loop import class_weights, make_optimizer

    class H5Bags(Dataset):
        """CLAM's Generic_MIL_Dataset with use_h5: open the slide's .h5, read all features, close."""

        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            with h5py.File(root / "h5" / f"{ids[i]}.h5", "r") as fh:
                features = torch.from_numpy(fh["features"][:])
            return features, int(y[i])

    def collate_mil(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([b[0] for b in batch], dim=0), torch.LongTensor([b[1] for b in batch])

    torch.manual_seed(0)
    head = create_head("abmil", _dim(root, ids[0]), 2, hidden=HIDDEN, attn_dim=ATTN)
    optimizer = make_optimizer(fit_config(epochs, 1, threads), head.parameters())
    weights = class_weights(y, 2)
    loader = DataLoader(H5Bags(), batch_size=1, shuffle=True, collate_fn=collate_mil, num_workers=0)
    clock = DataClock(next)
    send("ready", rss_mb=peak_rss_mb())
    for _ in range(epochs):
        wait_go()
        tic = time.perf_counter()
        head.train()
        losses = []
        batches = iter(loader)
        for _ in range(len(loader)):
            features, label = clock(batches)
            x = features[None]  # one bag of N instances
            out = head(x, None, torch.ones(x.shape[:2], dtype=torch.bool))
            loss, parts = head.compute_loss(out, label[0], epoch=0, n_epochs=epochs, class_weights=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(parts["loss"])
        send("epoch", seconds=time.perf_counter() - tic, data_s=clock.take(), loss=float(np.mean(losses)))
    send("done", peak_rss_mb=peak_rss_mb())


def _dim(root: Path, slide_id: str) -> int:
    import h5py

    with h5py.File(root / "h5" / f"{slide_id}.h5", "r") as fh:
        return int(fh["features"].shape[1])


def arm_d(root: Path, ids: list[str], y: np.ndarray, epochs: int, threads: int) -> None:
    import h5py
    import torch
    from torch.utils.data import DataLoader
    from torchmil.data import collate_fn
    from torchmil.datasets import ProcessedMILDataset
    from torchmil.models import ABMIL
    from torchmil.utils import Trainer

    def read_h5(path: str, key: str) -> np.ndarray:
        """torchmil's default h5 reader slices with [:], which a scalar label dataset refuses; [()] reads both."""
        with h5py.File(path, "r") as fh:
            return np.asarray(fh[key][()])

    class TimedDataset(ProcessedMILDataset):
        """ProcessedMILDataset with the seconds of each __getitem__ (read, cache, TensorDict) summed."""

        clock = DataClock(ProcessedMILDataset.__getitem__)

        def __getitem__(self, index: int) -> Any:
            return self.clock(self, index)

    torch.manual_seed(0)
    folder = str(root / "h5")
    dataset = TimedDataset(features_path=folder, labels_path=folder, bag_names=ids, bag_keys=["X", "Y"],
                                  file_ext=".h5", read_file_fn=read_h5, verbose=False)
    dim = _dim(root, ids[0])
    feat_ext = torch.nn.Sequential(torch.nn.Linear(dim, HIDDEN), torch.nn.ReLU())
    model = ABMIL(in_shape=(dim,), att_dim=ATTN, feat_ext=feat_ext)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-4)
    train = DataLoader(dataset, batch_size=1, shuffle=True, collate_fn=collate_fn)
    val = DataLoader(torch.utils.data.Subset(dataset, [0]), batch_size=1, collate_fn=collate_fn)
    trainer = Trainer(model, optimizer, device="cpu", disable_pbar=True, verbose=False)
    send("ready", rss_mb=peak_rss_mb())
    for _ in range(epochs):
        wait_go()
        tic = time.perf_counter()
        trainer.train(1, train, val)  # one training epoch + its validation pass over one slide
        send("epoch", seconds=time.perf_counter() - tic, data_s=TimedDataset.clock.take())
    send("done", peak_rss_mb=peak_rss_mb())


ARM_FNS: dict[str, Callable[[Path, list[str], np.ndarray, int, int], None]] = {
    "a": arm_a, "b": arm_b, "c": arm_c, "d": arm_d}


def child(args: argparse.Namespace) -> None:
    """Run one arm, talking JSON lines on stdout and waiting for 'go' on stdin before each epoch."""
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    labels = json.loads((root / "labels.json").read_text())
    ids = sorted(labels)
    y = np.array([labels[s] for s in ids], np.int64)
    fn = ARM_FNS[args.arm]
    if not args.profile:
        fn(root, ids, y, args.epochs, args.threads)
        return
    profiler = cProfile.Profile()
    profiler.enable()
    fn(root, ids, y, args.epochs, args.threads)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    (root / f"profile_{args.arm}.txt").write_text(text.getvalue())


# ---------------------------------------------------------------- parent


def torchmil_available() -> bool:
    try:
        import torchmil  # noqa: F401
    except ImportError:
        return False
    return True


def start_arm(arm: str, args: argparse.Namespace) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--child", "--arm", arm, "--root", args.root, "--epochs", str(args.epochs),
           "--threads", str(args.threads)] + (["--profile"] if args.profile and arm == "a" else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)


def receive(proc: subprocess.Popen[str], arm: str) -> dict[str, Any]:
    line = proc.stdout.readline() if proc.stdout is not None else ""
    if not line:
        raise RuntimeError(f"arm {arm} ended early with code {proc.wait()}; run it alone with --child --arm {arm}.")
    return json.loads(line)


def go(proc: subprocess.Popen[str], arm: str) -> dict[str, Any]:
    """Let an arm run one epoch and return its report."""
    if proc.stdin is None:
        raise RuntimeError(f"arm {arm} has no stdin pipe.")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return receive(proc, arm)


def run_arms(arms: Sequence[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Start every arm, then run epoch e of each arm in turn (interleaved); collect times and RSS."""
    results: dict[str, dict[str, Any]] = {}
    procs = {}
    for arm in arms:  # set up one at a time so setups do not compete
        tic = time.perf_counter()
        procs[arm] = start_arm(arm, args)
        ready = receive(procs[arm], arm)
        results[arm] = {"setup_s": round(time.perf_counter() - tic, 2), "rss_after_setup_mb": ready["rss_mb"],
                        "epochs_s": [], "data_s": [], "load": []}
    for epoch in range(args.epochs):
        for arm in arms:
            msg = go(procs[arm], arm)
            results[arm]["epochs_s"].append(round(msg["seconds"], 3))
            results[arm]["data_s"].append(round(msg["data_s"], 4))
            results[arm]["load"].append(load_average())
            print(f"epoch {epoch + 1} arm {arm}: {msg['seconds']:.2f} s (load {load_average()})", flush=True)
    for arm in arms:
        done = receive(procs[arm], arm)
        procs[arm].wait()
        results[arm].update({k: v for k, v in done.items() if k != "event"})
    return results


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for r in results.values():
        r["first_epoch_s"] = r["epochs_s"][0]
        r["warm_epoch_median_s"] = round(median(r["epochs_s"][1:]), 3)
        r["first_data_s"] = r["data_s"][0]
        r["warm_data_median_s"] = round(median(r["data_s"][1:]), 4)
    warm = {arm: r["warm_epoch_median_s"] for arm, r in results.items()}
    ratios: dict[str, Any] = {}
    if "a" in warm and "b" in warm:
        ratios["a/b"] = {"value": round(warm["a"] / warm["b"], 3), "target": "<= 1.25"}
        ratios["a/b"]["met"] = ratios["a/b"]["value"] <= 1.25
    for arm, target in (("c", 3.0), ("d", 2.0)):
        if arm in warm and "a" in warm:
            value = round(warm[arm] / warm["a"], 3)
            ratios[f"{arm}/a"] = {"value": value, "target": f">= {target:g}", "met": value >= target}
    data = {arm: r["warm_data_median_s"] for arm, r in results.items()}
    for arm in ("b", "c", "d"):
        if arm in data and "a" in data and data["a"] > 0:
            ratios[f"data {arm}/a"] = {"value": round(data[arm] / data["a"], 2), "target": "(loader only)",
                                       "met": None}
    return ratios


def markdown(report: dict[str, Any]) -> str:
    rows = []
    for arm, r in report["arms"].items():
        rows.append([f"({arm}) {ARMS[arm]}", r["first_epoch_s"], r["warm_epoch_median_s"], r["first_data_s"],
                     r["warm_data_median_s"], f"{r['rss_after_setup_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                     r["setup_s"], " ".join(f"{t:.2f}" for t in r["epochs_s"])])
    table = markdown_table(TABLES["arms"], rows, [False] + [True] * 7 + [False])
    met = {True: "yes", False: "no", None: ""}
    ratio_rows = [[k, v["value"], v["target"], met[v["met"]]] for k, v in report["ratios"].items()]
    c = report["cohort"]
    hw = report["hardware"]
    lines = [
        "# fit: epoch time by data path (abmil)", "",
        f"{c['slides']} slides x {c['patches']} patches ({c['patches'] // GRID ** 2} bags of {GRID ** 2}) x "
        f"{c['dim']}-d, random float16 with a weak signal; abmil hidden {HIDDEN}, attention {ATTN}; one slide "
        f"per step, every patch every step; Adam; {report['threads']} torch thread(s) per arm; "
        f"{report['epochs']} epochs per arm, interleaved; medians over epochs 2..{report['epochs']}. "
        "'data s' is the part of an epoch spent producing the step tensors (StoreData/tensor `bags`, the "
        "CLAM DataLoader, torchmil's dataset `__getitem__`); the rest is the model step.", "",
        table, "", markdown_table(TABLES["ratios"], ratio_rows,
                                  [False, True, False, False]), "",
        f"{hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, niceness {hw['niceness']}; load average "
        f"{report['load_before']} before, {report['load_after']} after (shared machine). Features were in the "
        "OS page cache (store and .h5 files written just before or reused), so cold reads measure decoding, "
        "not disk. (d) caches every bag as float32 after its first read (ProcessedMILDataset default) and runs "
        "its Trainer's validation pass over one slide each epoch.", ""]
    if report.get("skipped"):
        lines += [f"Skipped: {report['skipped']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=200)
    parser.add_argument("--patches", type=int, default=2048, help="patches per slide (a multiple of 64)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per arm; the first is the cold one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", default="abcd")
    parser.add_argument("--root", default="/tmp/mrantool_fit_bench")
    parser.add_argument("--rebuild", action="store_true", help="regenerate the cohort even when it matches")
    parser.add_argument("--profile", action="store_true", help="cProfile arm (a) into ROOT/profile_a.txt")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", default="a", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.patches % (GRID * GRID) or args.epochs < 2:
        parser.error("--patches must be a multiple of 64 and --epochs at least 2")
    arms = [a for a in args.arms if a in ARMS]
    skipped = None
    if "d" in arms and not torchmil_available():
        arms.remove("d")
        skipped = "(d) torchmil is not installed (pip install torchmil)."
        print(skipped, flush=True)
    load_before = load_average()
    build_s = build_cohort(Path(args.root), args)
    print(f"cohort: {f'built in {build_s:.1f} s' if build_s else 'reused'} at {args.root}", flush=True)
    results = run_arms(arms, args)
    report = {"cohort": cohort_meta(args), "cohort_build_s": round(build_s, 1), "epochs": args.epochs,
              "threads": args.threads, "hardware": hardware(), "load_before": load_before,
              "load_after": load_average(), "arms": results, "ratios": summarise(results), "skipped": skipped}
    text = markdown(report)
    if args.profile and (Path(args.root) / "profile_a.txt").is_file():
        report["profile_a"] = (Path(args.root) / "profile_a.txt").read_text()
    write_results(Path(args.out), "fit", report, text)
    print(text)


if __name__ == "__main__":
    main()
