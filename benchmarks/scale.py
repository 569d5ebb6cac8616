"""Scale-out benchmark: the Ray executor against the local one on this machine, Ray's fixed costs, and a store on
object storage (S3 API) against a local store.

    nice python benchmarks/scale.py                                   # as reported in results/scale.md
    python benchmarks/scale.py --slides 2 --slide-px 2048 --rounds 1 --small-slides 2 --store-bags 8 --out /tmp/s
                                                                      # a quick check that it runs

Measured, each in `--rounds` rounds (medians; ratios taken within a round):
  (a) extraction throughput (patches/s) of `--slides` generated slides with the `--preset` preset: the local
      executor (DataLoader workers + encoder in this process) and the Ray executor on a local Ray cluster with
      the same CPUs (one encoder actor, read tasks on the other CPUs); target Ray >= 0.9x local, end to end
      (each Ray run starts its actor: the ratio is also given without the per-run fixed cost of (c));
  (b) Ray start-up: `ray.init` of a local cluster, and the first encoder actor ready (imports, encoder built);
  (c) per-slide overhead of the Ray executor and its fixed cost per run: cohorts of N and 2N one-bag slides
      (N = `--small-slides`); the marginal cost of N slides on Ray minus that on the local executor, per slide,
      and the Ray run's fixed cost (connect, actors, imports) 2 T(N) - T(2N);
  (d) store write and read: one slide of `--store-bags` bags with the preset's geometry written (stream + commit)
      and read back (all patch and cell embeddings) in a local store and in an S3 store (a local moto server,
      or `--s3-endpoint` for a real one: then network and service latency are part of the figure).
The load average is recorded before and after; on a shared machine the timings are noisy.
Writes scale.json and scale.md into `--out`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import hardware, load_average, markdown_table, median, write_results
from mrantool.config import ExtractConfig
from mrantool.extract.api import extract
from mrantool.slides.writer import write_pyramid_tiff
from mrantool.store import FeatureStore, make_identity
from mrantool.tiling.presets import get_preset

TARGET_RAY_RATIO = 0.9
# columns of scale.md (the git commit and the command are recorded by common.write_results)
TABLES = {"throughput": ["", "patches/s (median)"],
          "rounds": ["round", "local s", "Ray s", "patches", "ratio", "per-slide overhead s"],
          "store": ["", "write s", "read s"]}


def disc(size: int, seed: int) -> np.ndarray:
    """A white image with a textured pink disc (tissue) covering most of it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size * 0.45) ** 2
    img = np.full((size, size, 3), 245, np.uint8)
    pink = np.clip(np.array([215, 120, 170]) + rng.integers(-25, 25, (size, size, 1)), 0, 255).astype(np.uint8)
    img[inside] = pink[inside]
    return img


def make_cohort(folder: Path, n: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_pyramid_tiff(folder / f"slide-{i:03d}.tif", disc(size, i), mpp=0.5)
    return folder


def timed_extract(slides: Path, store: Path, args: argparse.Namespace, **kw: Any) -> tuple[float, int]:
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    report = extract(ExtractConfig(slides=[str(slides)], store=str(store), preset=args.preset, device="cpu",
                                   batch_size=args.batch_size, workers=args.workers, **kw))
    seconds = time.perf_counter() - start
    bad = [r for r in report.results if r.status != "done"]
    if bad:
        raise SystemExit(f"extraction failed: {bad[0].slide_id}: {bad[0].message}")
    return seconds, report.n_patches


def store_io(root: str, bags: int, preset_name: str) -> tuple[float, float]:
    """(write s, read s) of one slide of `bags` bags with the preset's geometry (random float16 features)."""
    preset = get_preset(preset_name)
    g = preset.geometry
    identity = make_identity(encoder="bench", weights="random-init", transforms={}, embed_dim=preset.embed_dim,
                             geometry=g.to_dict(), preset=preset_name, has_cells=True)
    store = FeatureStore.create(root, identity)
    rng = np.random.default_rng(0)
    p, c, d = g.n_patches, g.cells ** 2, preset.embed_dim
    provenance = {"source": "generated", "fingerprint": None, "mpp": g.mpp, "level0_size": [1, 1], "bag_size_l0": 1}
    step = 4
    batches = [(rng.random((step, p, d), np.float32), np.maximum(rng.standard_normal((step, p, c, d), np.float32), 0))
               for _ in range(2)]
    start = time.perf_counter()
    with store.lock("s") as lock:
        writer = store.begin_slide("s", bags, provenance, lock=lock)
        for i in range(0, bags, step):
            n = min(step, bags - i)
            patch, cells = batches[(i // step) % 2]
            writer.write(i, np.zeros((n, 2)), np.ones((n, p)), patch[:n], cells[:n])
        writer.commit()
    written = time.perf_counter() - start
    start = time.perf_counter()
    slide = FeatureStore.open(root).slide("s")
    slide.patch_emb[:]
    for bag in range(bags):
        slide.read_bag(bag)
    return written, time.perf_counter() - start


def s3_endpoint(args: argparse.Namespace) -> tuple[str, Any]:
    """The S3 endpoint to use and the local moto server started for it (None with --s3-endpoint)."""
    if args.s3_endpoint:
        return args.s3_endpoint, None
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return f"http://{host}:{port}", server


def run(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    import fsspec
    import ray

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    report: dict[str, Any] = {"hardware": hardware(), "load_before": load_average(), "settings": vars(args).copy()}
    try:
        cohort = make_cohort(work / "cohort", args.slides, args.slide_px)
        small = make_cohort(work / "small", args.small_slides, 2048)  # 2048 px: one tiny-preset bag per slide
        double = make_cohort(work / "double", 2 * args.small_slides, 2048)
        start = time.perf_counter()
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a one-machine cluster on 127.0.0.1
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only: no token file written to ~/.ray
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - start
        start = time.perf_counter()
        timed_extract(small, work / "warm.zarr", args, executor="ray")  # first actor: imports, encoder
        first_run_s = time.perf_counter() - start
        rounds = []
        for r in range(args.rounds):
            local_s, patches = timed_extract(cohort, work / "local.zarr", args)
            ray_s, ray_patches = timed_extract(cohort, work / "ray.zarr", args, executor="ray")
            t = {name: timed_extract(folder, work / f"{name}.zarr", args, **kw)[0]
                 for name, folder, kw in (("local_n", small, {}), ("local_2n", double, {}),
                                          ("ray_n", small, {"executor": "ray"}),
                                          ("ray_2n", double, {"executor": "ray"}))}
            marginal = ((t["ray_2n"] - t["ray_n"]) - (t["local_2n"] - t["local_n"])) / args.small_slides
            rounds.append({"round": r, "local_s": local_s, "ray_s": ray_s, "patches": patches,
                           "local_patches_s": patches / local_s, "ray_patches_s": ray_patches / ray_s,
                           "ratio": (ray_patches / ray_s) / (patches / local_s), "per_slide_overhead_s": marginal,
                           "ray_run_fixed_s": 2 * t["ray_n"] - t["ray_2n"], **{f"small_{k}": v for k, v in t.items()}})
            print(f"round {r}: local {patches / local_s:.1f} patches/s, ray {ray_patches / ray_s:.1f} patches/s, "
                  f"ratio {rounds[-1]['ratio']:.2f}", flush=True)
        ray.shutdown()
        endpoint, server = s3_endpoint(args)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        fs = fsspec.filesystem("s3")
        if not fs.exists(args.bucket):
            fs.mkdir(args.bucket)
        io_rounds = []
        for r in range(args.rounds):
            lw, lr = store_io(str(work / f"io-{r}.zarr"), args.store_bags, args.preset)
            sw, sr = store_io(f"s3://{args.bucket}/bench-{os.getpid()}-{r}.zarr", args.store_bags, args.preset)
            io_rounds.append({"round": r, "local_write_s": lw, "local_read_s": lr, "s3_write_s": sw, "s3_read_s": sr})
        if server is not None:
            server.stop()
        report.update(ray_init_s=ray_init_s, ray_first_run_s=first_run_s, rounds=rounds, io_rounds=io_rounds,
                      s3="moto server on 127.0.0.1" if server is not None else endpoint)
        report["summary"] = {
            "local_patches_s": median([r["local_patches_s"] for r in rounds]),
            "ray_patches_s": median([r["ray_patches_s"] for r in rounds]),
            "ray_over_local": median([r["ratio"] for r in rounds]),
            "per_slide_overhead_s": median([r["per_slide_overhead_s"] for r in rounds]),
            "ray_run_fixed_s": median([r["ray_run_fixed_s"] for r in rounds]),
            "ray_over_local_without_fixed": median([
                (r["patches"] / max(r["ray_s"] - r["ray_run_fixed_s"], 1e-9)) / r["local_patches_s"] for r in rounds]),
            **{key: median([r[key] for r in io_rounds]) for key in io_rounds[0] if key != "round"},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_after"] = load_average()
    return report


def to_markdown(report: dict[str, Any]) -> str:
    s, hw = report["summary"], report["hardware"]
    ratio = s["ray_over_local"]
    verdict = "met" if ratio >= TARGET_RAY_RATIO else "not met"
    lines = [
        "# Scale-out benchmark (benchmarks/scale.py)", "",
        f"Date: {hw['date']}; {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB; torch {hw['torch']}; "
        f"load average {report['load_before']} before, {report['load_after']} after.", "",
        "## Extraction: Ray executor against the local one (same machine, same CPUs)", "",
        markdown_table(TABLES["throughput"], [["local executor", f"{s['local_patches_s']:.1f}"],
                                              ["Ray executor", f"{s['ray_patches_s']:.1f}"],
                                              [f"Ray / local (target >= {TARGET_RAY_RATIO})",
                                               f"{ratio:.2f} ({verdict})"],
                                              ["Ray / local without Ray's per-run fixed cost",
                                               f"{s['ray_over_local_without_fixed']:.2f}"]],
                       [False, True]), "",
        markdown_table(TABLES["rounds"],
                       [[r["round"], f"{r['local_s']:.1f}", f"{r['ray_s']:.1f}", r["patches"], f"{r['ratio']:.2f}",
                         f"{r['per_slide_overhead_s']:.2f}"] for r in report["rounds"]],
                       [False, True, True, True, True, True]), "",
        f"Ray fixed costs: `ray.init` of a local cluster {report['ray_init_s']:.1f} s; first Ray extraction "
        f"(worker start, imports, encoder) {report['ray_first_run_s']:.1f} s; each later run "
        f"{s['ray_run_fixed_s']:.1f} s (connect, actors); per-slide overhead {s['per_slide_overhead_s']:.2f} s "
        "(marginal cost of one-bag slides on Ray minus on the local executor).", "",
        f"## Store on object storage ({report['s3']}) against a local store", "",
        markdown_table(TABLES["store"],
                       [["local store", f"{s['local_write_s']:.2f}", f"{s['local_read_s']:.2f}"],
                        ["S3 store", f"{s['s3_write_s']:.2f}", f"{s['s3_read_s']:.2f}"]], [False, True, True]), "",
        f"One slide of {report['settings']['store_bags']} bags, {report['settings']['preset']} geometry, patch and "
        "cell embeddings (float16, zstd): streamed writes + commit, then every patch embedding and every bag's "
        "cells read back.", "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=8, help="Slides in the throughput cohort.")
    parser.add_argument("--slide-px", type=int, default=8192, help="Side of each generated slide (level 0 px).")
    parser.add_argument("--small-slides", type=int, default=16, help="One-bag slides for the per-slide overhead.")
    parser.add_argument("--preset", default="tiny", help="Extraction preset (tiny keeps CPU runs short).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the local executor.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store-bags", type=int, default=64, help="Bags of the slide written to each store.")
    parser.add_argument("--s3-endpoint", default=None, help="A real S3 endpoint instead of a local moto server.")
    parser.add_argument("--bucket", default="mrantool-bench")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    json_path, md_path = write_results(args.out, "scale", report, to_markdown(report))
    print(to_markdown(report))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
