"""End-to-end training cost: the small-cnn encoder against tiny and ResNet-18 (mran), and a whole end-to-end fit.

Part 1, encoders (always): parameters, forward FLOPs per patch (torch.utils.flop_counter), and patches/s of a
training step (train mode: forward + backward + Adam step, channels_last, fp32, as `fit --end-to-end` runs it on
a CPU) and of inference (eval mode, no_grad), each preset at its own input size, on --threads threads; median of
--repeats timed steps after 2 warm-up steps, the presets interleaved round by round. `--bf16` adds rows under
CPU bf16 autocast (fast only where the CPU has AMX/AVX512-BF16; not what fit uses on a CPU).
Part 2, `--fit`: a generated cohort (mrantool's synthetic slides, tumour foci of large nuclei) extracted with
small-cnn; a cached fit (frozen random-init small-cnn features) and `fit --end-to-end` from random init on
the same folds: seconds per epoch and per step (one slide), test AUC per fold.
Writes benchmarks/results/end_to_end.json + .md (hardware, load before/after, date; common.write_results adds
the git commit and the command).

    python benchmarks/end_to_end.py                          # part 1: a few minutes on 2 quiet cores
    python benchmarks/end_to_end.py --fit                    # + part 2: about 15 more minutes
    python benchmarks/end_to_end.py --repeats 2 --batch 32 --presets small-cnn --fit --slides 8 --size 1024 \
        --epochs 1 --folds 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mrantool.cohorts.synthetic import make_cohort
from mrantool.config import ExtractConfig, FitConfig
from mrantool.encoders.registry import create_encoder
from mrantool.extract.api import extract
from mrantool.tiling.presets import get_preset
from mrantool.training.api import fit
from mrantool.training.pixels.e2e import fit_end_to_end

try:
    from benchmarks.common import hardware, load_average, markdown_table, median, write_results
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    from common import hardware, load_average, markdown_table, median, write_results

RESULTS = Path(__file__).parent / "results"
TABLES = {"encoders": ["encoder", "input px", "parameters", "MFLOPs/patch (fwd)", "train patches/s", "eval patches/s"],
          "fit": ["training", "s/epoch", "s/step (one slide)", "total s", "test AUC per fold", "mean AUC"]}


class EncoderBench:
    """One preset's encoder with a training step and an inference pass on a fixed random batch."""

    def __init__(self, preset: str, batch: int, bf16: bool) -> None:
        self.name = preset + (" (bf16 autocast)" if bf16 else "")
        self.bf16 = bf16
        p = get_preset(preset)
        self.encoder = create_encoder(p).to(memory_format=torch.channels_last)
        self.input_px = p.input_px
        self.x = torch.randn(batch, 3, p.input_px, p.input_px).contiguous(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.encoder.parameters(), lr=1e-4)
        self.params = sum(q.numel() for q in self.encoder.parameters())
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            self.encoder.eval()(self.x[:1])
        self.flops = counter.get_total_flops()
        self.train_s: list[float] = []
        self.eval_s: list[float] = []

    def train_step(self) -> float:
        self.encoder.train()
        tic = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            patch, cells = self.encoder(self.x)
        loss = patch.float().square().mean() + cells.float().square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - tic

    def eval_pass(self) -> float:
        self.encoder.eval()
        tic = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            self.encoder(self.x)
        return time.perf_counter() - tic


def bench_encoders(presets: list[str], batch: int, repeats: int, bf16: bool) -> list[dict[str, Any]]:
    benches = [EncoderBench(p, batch, False) for p in presets]
    benches += [EncoderBench(p, batch, True) for p in presets] if bf16 else []
    for b in benches:
        for _ in range(2):
            b.train_step()
            b.eval_pass()
    for _ in range(repeats):  # interleaved, so load changes hit every preset alike
        for b in benches:
            b.train_s.append(b.train_step())
            b.eval_s.append(b.eval_pass())
    return [{"encoder": b.name, "input_px": b.input_px, "params": b.params, "mflops_per_patch": b.flops / 1e6,
             "train_patches_per_s": batch / median(b.train_s), "eval_patches_per_s": batch / median(b.eval_s),
             "train_s": b.train_s, "eval_s": b.eval_s} for b in benches]


def bench_fit(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    labels = make_cohort(work / "slides", n_slides=args.slides, seed=0, size=(args.size, args.size), workers=1)
    slides = sorted(str(p) for p in (work / "slides").glob("*.tiff"))
    tic = time.perf_counter()
    extract(ExtractConfig(slides=slides, store=str(work / "small.zarr"), preset="small-cnn", workers=0,
                          device="cpu"))
    extract_s = time.perf_counter() - tic
    runs = {}
    for kind, train in (("cached", fit), ("end_to_end", fit_end_to_end)):
        cfg = FitConfig(store=str(work / "small.zarr"), labels=str(labels), out=str(work / kind), model=args.model,
                        folds=args.folds, epochs=args.epochs, lr=args.lr, threads=args.threads, device="cpu",
                        end_to_end=kind == "end_to_end", save_attention=False)
        epochs: list[dict[str, Any]] = []
        tic = time.perf_counter()
        report = train(cfg, progress=lambda e, i, log=epochs: log.append(i) if e == "epoch" else None)
        n_train = [f.n_train for f in report.folds]
        runs[kind] = {"seconds": time.perf_counter() - tic, "auc": [f.metrics["auc"] for f in report.folds],
                      "mean_auc": report.mean["auc"], "best_epoch": [f.best_epoch for f in report.folds],
                      "seconds_per_epoch": median([e["seconds"] for e in epochs]),
                      "seconds_per_step": median([e["seconds"] / n_train[e["index"]] for e in epochs])}
    return {"extract_s": extract_s, "runs": runs}


def fmt(value: float, digits: int = 3) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--batch", type=int, default=256, help="patches per encoder step (default 256)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per encoder (default 7)")
    parser.add_argument("--presets", nargs="+", default=["small-cnn", "tiny", "mran"])
    parser.add_argument("--bf16", action="store_true", help="also time CPU bf16 autocast")
    parser.add_argument("--fit", action="store_true", help="part 2: a cached and an end-to-end fit")
    parser.add_argument("--slides", type=int, default=16, help="--fit: generated slides (default 16)")
    parser.add_argument("--size", type=int, default=2048, help="--fit: slide side in px at 0.5 mpp (default 2048)")
    parser.add_argument("--epochs", type=int, default=20, help="--fit: epochs (default 20)")
    parser.add_argument("--folds", type=int, default=4, help="--fit: folds (default 4)")
    parser.add_argument("--model", default="abmil", help="--fit: head (default abmil)")
    parser.add_argument("--lr", type=float, default=1e-3, help="--fit: learning rate (default 1e-3)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    encoders = bench_encoders(args.presets, args.batch, args.repeats, args.bf16)
    fitted = bench_fit(args, args.work or Path(tempfile.mkdtemp(prefix="mrantool-e2e-"))) if args.fit else None
    report = {"hardware": hardware(), "load_before": load_before, "load_after": load_average(),
              "args": {k: str(v) for k, v in vars(args).items()}, "encoders": encoders, "fit": fitted}
    hw = report["hardware"]
    md = ["# End-to-end training cost", "",
          f"{hw['cpu']}, {args.threads} thread(s), torch {hw['torch']}; load {load_before} before, "
          f"{report['load_after']} after; {hw['date']}.", "",
          f"Encoders: batch of {args.batch} patches at each preset's input size, channels_last; median of "
          f"{args.repeats} steps. A training step is forward + backward + Adam in train mode (BatchNorm batch "
          "statistics).", "",
          markdown_table(TABLES["encoders"],
                         [[r["encoder"], r["input_px"], f"{r['params']:,}", fmt(r["mflops_per_patch"], 1),
                           f"{r['train_patches_per_s']:.0f}", f"{r['eval_patches_per_s']:.0f}"] for r in encoders],
                         [False, True, True, True, True, True]), ""]
    if fitted:
        runs = fitted["runs"]
        md += [f"Fit: {args.slides} generated slides of {args.size} px, small-cnn preset (512 px bags of 8x8 "
               f"patches of 64 px), {args.model}, {args.folds} folds, {args.epochs} epochs, lr {args.lr}, the same "
               f"folds for both; extraction {fitted['extract_s']:.0f} s.", "",
               markdown_table(TABLES["fit"],
                              [[k, fmt(r["seconds_per_epoch"], 2), fmt(r["seconds_per_step"], 3),
                                f"{r['seconds']:.0f}", " / ".join(fmt(a, 2) for a in r["auc"]), fmt(r["mean_auc"])]
                               for k, r in runs.items()], [False, True, True, True, False, True]), ""]
    json_path, _ = write_results(RESULTS, "end_to_end", report, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {json_path} ({json.dumps({'load_after': report['load_after']})})")


if __name__ == "__main__":
    main()
