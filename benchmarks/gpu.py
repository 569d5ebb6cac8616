"""The GPU check (run it through benchmarks/gpu.sh): extraction throughput and batched fold-fits per minute.

On one CUDA GPU, within --budget-min minutes (default 7.5):
  extract  the real pipeline (`LocalExecutor`: OpenSlide reads in DataLoader workers, channels_last, bf16
           autocast, float16 store writes) on generated JPEG-tiled slides, for ResNet-50 at 224 px (CLAM's
           truncated ResNet-50, `resnet50-trunc` with 224 px patches) and a ViT-L/16 shape (`uni`, random init):
           each batch size at the default worker count, then each worker count at the best batch size;
           nvidia-smi samples GPU utilisation and memory during every run. The bare encoder on tensors already
           on the GPU (fp16 and bf16, channels_last) is the compute ceiling;
  fit      a 10-fold fit_data of abmil on a Fox-sized set and on 200 slide-sized bags (32 x 64 patches x 512-d)
           on the GPU: one fold at a time vs the folds stacked vs stacked with 8 slides per step.
Writes benchmarks/results/gpu.{json,md}. Target: >= 3,000 patches/s end to end for ResNet-50 at 224 px on
one H100-class GPU with 16 CPU cores. Nothing is downloaded (random-init weights).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import GpuSampler, hardware, markdown_table, usable_cores, write_results
from mrantool.cohorts.synthetic import make_cohort
from mrantool.encoders.registry import create_encoder
from mrantool.extract.executors.base import store_identity
from mrantool.extract.executors.local import LocalExecutor
from mrantool.extract.inputs import collect_slides
from mrantool.store.reader import FeatureStore
from mrantool.tiling.presets import Preset, get_preset

NO_GPU = ("benchmarks/gpu.sh needs a CUDA GPU and torch.cuda.is_available() is False here; run it on a machine "
          "with an NVIDIA GPU and a CUDA build of torch.")
TARGET = 3000.0
TABLES = {"extract": ["batch", "workers", "patches", "patches/s", "GPU util mean %", "GPU util max %", "GPU MiB"],
          "fit": ["set", "arm", "seconds", "fold-fits/min", "test AUC", "GPU util mean %"]}  # columns of gpu.md
ENCODERS = {"resnet50@224": ("resnet50-trunc", 896), "vit-l16@224": ("uni", 896)}  # preset, bag px (4x4 of 224)


class Budget:
    """Wall-clock budget: `left()` seconds; parts check it before each run and record what they skipped."""

    def __init__(self, minutes: float) -> None:
        self.end = time.perf_counter() + minutes * 60
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, what: str, seconds: float) -> bool:
        if self.left() >= seconds:
            return True
        self.skipped.append(what)
        return False


def preset_for(name: str) -> Preset:
    preset, bag_px = ENCODERS[name]
    return get_preset(preset).with_overrides(bag_px=bag_px, grid=4)


def run_extract(preset: Preset, encoder: torch.nn.Module, slides_dir: Path, store: Path, batch: int, workers: int,
                device: str, max_patches: int) -> dict[str, Any]:
    """One end-to-end extraction of the first slides holding about `max_patches` patches."""
    shutil.rmtree(store, ignore_errors=True)
    slides = collect_slides([str(slides_dir)])
    n_slides = max(1, round(max_patches / 640))  # a generated 8192 px slide holds ~40 bags of 16 patches here
    with GpuSampler() as gpu:
        tic = time.perf_counter()
        db = FeatureStore.create(store, store_identity(preset, encoder))
        report = LocalExecutor(db, preset, encoder, device=device, batch_size=batch, workers=workers).run(
            slides[:n_slides])
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
    return {"batch": batch, "workers": workers, "patches": report.n_patches, "seconds": round(seconds, 2),
            "patches_per_s": round(report.n_patches / seconds, 1), **gpu.summary()}


@torch.inference_mode()
def run_bare(preset: Preset, encoder: torch.nn.Module, batch: int, dtype: torch.dtype, device: str,
             seconds: float) -> dict[str, Any]:
    """The encoder alone on random normalised inputs already on the device, channels_last, for ~`seconds`."""
    encoder = copy.deepcopy(encoder).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, preset.input_px, preset.input_px, device=device).contiguous(
        memory_format=torch.channels_last)
    if device == "cuda" and dtype == torch.float16:
        encoder, x = encoder.half(), x.half()
    autocast = torch.autocast("cuda", dtype=dtype, enabled=device == "cuda" and dtype == torch.bfloat16)
    with autocast:
        encoder(x)  # warm-up (cuDNN autotuning, allocator)
    n, tic = 0, time.perf_counter()
    with GpuSampler() as gpu, autocast:
        while time.perf_counter() - tic < seconds:
            encoder(x)
            n += batch
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - tic
    return {"dtype": str(dtype).replace("torch.", ""), "batch": batch, "patches_per_s": round(n / elapsed, 1),
            **gpu.summary()}


def part_extract(args: argparse.Namespace, root: Path, budget: Budget) -> dict[str, Any]:
    slides_dir = root / f"slides-{args.slides}-{args.size}"
    if not (slides_dir / "labels.csv").is_file():
        shutil.rmtree(slides_dir, ignore_errors=True)
        make_cohort(slides_dir, n_slides=args.slides, seed=0, size=(args.size, args.size))
    out: dict[str, Any] = {}
    for name in args.encoders:
        preset = preset_for(name)
        encoder = create_encoder(preset)  # once: a ViT-L takes seconds to initialise
        runs: list[dict[str, Any]] = []
        for batch in args.batch_sizes:
            if budget.allows(f"extract {name} batch {batch}", 30):
                runs.append(run_extract(preset, encoder, slides_dir, root / "store.zarr", batch, args.workers[0],
                                        args.device, args.max_patches))
                print(f"extract {name}: {runs[-1]}", flush=True)
        best = max(runs, key=lambda r: r["patches_per_s"])["batch"] if runs else args.batch_sizes[0]
        for workers in args.workers[1:]:
            if budget.allows(f"extract {name} workers {workers}", 30):
                runs.append(run_extract(preset, encoder, slides_dir, root / "store.zarr", best, workers,
                                        args.device, args.max_patches))
                print(f"extract {name}: {runs[-1]}", flush=True)
        bare = []
        for dtype in (torch.float16, torch.bfloat16):
            if budget.allows(f"bare {name} {dtype}", 20):
                bare.append(run_bare(preset, encoder, best, dtype, args.device, args.bare_seconds))
                print(f"bare {name}: {bare[-1]}", flush=True)
        out[name] = {"runs": runs, "bare": bare}
    return out


def part_fit(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    from mrantool.config import FitConfig
    from mrantool.training.api import fit_data
    from mrantool.training.data import ArrayData
    from mrantool.training.labels import Labels

    rng = np.random.default_rng(0)
    sets = {
        "fox-sized": {f"b{i:03d}": rng.standard_normal((1, int(rng.integers(2, 14)), 230), dtype=np.float32)
                      for i in range(200)},
        "slide-sized": {f"s{i:03d}": rng.standard_normal((32, 64, 512), dtype=np.float32).astype(np.float16)
                        for i in range(args.fit_slides)},
    }
    arms = {"one-by-one": {"parallel_folds": 1}, "together": {"parallel_folds": 0},
            "together+8": {"parallel_folds": 0, "batch_size": 8}}
    out: dict[str, Any] = {}
    for name, bags in sets.items():
        y = np.arange(len(bags)) % 2
        for x, label in zip(bags.values(), y, strict=True):
            x[..., :16] += 0.3 * label  # a weak signal
        labels, data = Labels(list(bags), y, ["0", "1"], list(bags)), ArrayData(bags)
        for arm, settings in arms.items():
            if not budget.allows(f"fit {name} {arm}", 45):
                continue
            with tempfile.TemporaryDirectory() as tmp, GpuSampler() as gpu:
                cfg = FitConfig(store="-", labels="-", out=f"{tmp}/run", model="abmil", folds=10,
                                epochs=args.fit_epochs, patience=args.fit_epochs, min_epochs=args.fit_epochs,
                                device=args.device, threads=1 if args.device == "cpu" else None,
                                save_attention=False, **settings)
                tic = time.perf_counter()
                report = fit_data(cfg, data, labels)
                seconds = time.perf_counter() - tic
            out.setdefault(name, {})[arm] = {"seconds": round(seconds, 2),
                                             "fold_fits_per_min": round(10 * 60 / seconds, 1),
                                             "auc": round(report.mean["auc"], 4), **gpu.summary()}
            print(f"fit {name} {arm}: {out[name][arm]}", flush=True)
    return out


def markdown(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    lines = ["# GPU check: extraction throughput and batched fold-fits", "",
             f"{hw.get('gpu', 'no GPU')} ({hw.get('gpu_memory_gib', '?')} GiB), {hw['cores']} CPU cores "
             f"({hw['cpu']}), torch {hw['torch']}, CUDA {hw.get('cuda_version')}; {hw['date']}; "
             f"{report['seconds']:.0f} s in all.", "",
             f"## Extraction ({report['settings']['slides']} generated slides of {report['settings']['size']}^2 px, "
             "end to end into a new store)", ""]
    for name, entry in report.get("extract", {}).items():
        rows = [[r["batch"], r["workers"], r["patches"], r["patches_per_s"], r.get("gpu_util_mean", "-"),
                 r.get("gpu_util_max", "-"), r.get("gpu_mem_max_mib", "-")] for r in entry["runs"]]
        rows += [[f"bare {b['dtype']}", b["batch"], "-", b["patches_per_s"], b.get("gpu_util_mean", "-"),
                  b.get("gpu_util_max", "-"), b.get("gpu_mem_max_mib", "-")] for b in entry["bare"]]
        table = markdown_table(TABLES["extract"], rows, [False, True, True, True, True, True, True])
        lines += [f"### {name}", "", table, ""]
    if "resnet50@224" in report.get("extract", {}) and report["extract"]["resnet50@224"]["runs"]:
        best = max(r["patches_per_s"] for r in report["extract"]["resnet50@224"]["runs"])
        lines += [f"ResNet-50 at 224 px, best end-to-end rate: {best:.0f} patches/s (target >= {TARGET:.0f}: "
                  f"{'met' if best >= TARGET else 'NOT met'}).", ""]
    rows = [[name, arm, r["seconds"], r["fold_fits_per_min"], r["auc"], r.get("gpu_util_mean", "-")]
            for name, arms in report.get("fit", {}).items() for arm, r in arms.items()]
    lines += ["## Batched fold-fits (abmil, 10 folds, "
              f"{report['settings']['fit_epochs']} epochs, no early stop)", "",
              markdown_table(TABLES["fit"], rows, [False, False, True, True, True, True]), ""]
    if report["skipped"]:
        lines += [f"Skipped to stay within the time budget: {', '.join(report['skipped'])}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=7.5)
    parser.add_argument("--slides", type=int, default=12)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--workers", nargs="+", type=int, default=None,
                        help="DataLoader workers, the first is the default (default: cores, cores/2, cores/4)")
    parser.add_argument("--max-patches", type=int, default=8192, help="patches per extraction run (about)")
    parser.add_argument("--bare-seconds", type=float, default=5.0)
    parser.add_argument("--fit-epochs", type=int, default=5)
    parser.add_argument("--fit-slides", type=int, default=200)
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "mrantool_gpu_bench"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # exercises the code on a CPU
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(NO_GPU, file=sys.stderr)
        sys.exit(1)
    args.device = "cuda" if not args.cpu_smoke else "cpu"
    cores = usable_cores()
    args.workers = args.workers or sorted({cores, max(1, cores // 2), max(1, cores // 4)}, reverse=True)
    if args.cpu_smoke:
        args.slides, args.size, args.batch_sizes, args.workers = 2, 2048, [32], [1]
        args.max_patches, args.bare_seconds, args.fit_epochs, args.fit_slides = 64, 0.5, 1, 20
        args.encoders = ["resnet50@224"]
    started = time.perf_counter()
    budget = Budget(args.budget_min)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"hardware": hardware(), "settings": {k: v for k, v in vars(args).items()}}
    report["extract"] = part_extract(args, root, budget)
    report["fit"] = part_fit(args, budget)
    report["skipped"], report["seconds"] = budget.skipped, time.perf_counter() - started
    text = markdown(report)
    write_results(Path(args.out) if not args.cpu_smoke else root / "results", "gpu", report, text)
    print(text)


if __name__ == "__main__":
    main()
