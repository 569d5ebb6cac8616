"""Similar-patch retrieval benchmark: HNSW, HNSW over 8-bit codes + re-ranking, IVF-PQ+refine vs exact search.

    python benchmarks/retrieval.py                 # 1M x 512, as reported in benchmarks/results/retrieval.md
    python benchmarks/retrieval.py --n 20000       # a quick run

Data: `--clusters` anisotropic Gaussian clusters (a random centre plus a random rank-`--rank` spread and isotropic
noise), float32, generated deterministically from `--seed`; `--queries` held-out points from the same clusters.
For each index: build time, bytes per vector (faiss.serialize_index / N), latency per query (one query at a time,
and in a batch of 100; medians over `--runs`), recall@10 against exact search, and the exact/approximate latency
ratio; for the HNSW kinds also the distance computations per single query (faiss hnsw_stats) and CPU ns per
distance, which show what bounds a query (graph walk over vectors that do not fit in cache). Writes
`retrieval.json` and `retrieval.md` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/retrieval.py` finds benchmarks.common

from benchmarks.common import table_header, write_results
from mrantool.retrieval.index import EmbeddingIndex

K = 10
BATCH = 100
TARGET_MS = 1.0
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 20.0
HNSW_EF_SEARCH = (16, 32, 64, 128, 256)
SQ8_SETTINGS = ((16, 4), (32, 2), (32, 4), (64, 2), (64, 4), (128, 4))  # (ef_search, k_factor)
IVFPQ_SETTINGS = ((8, 4), (16, 4), (16, 8), (32, 8), (64, 8), (64, 16))  # (nprobe, k_factor)


TABLES = {"indexes": ["index", "search params", "build s", "bytes/vector", "single ms", "single CPU ms", "batch ms",
                      "recall@10", "speedup single", "speedup batch", "distances/query",
                      "CPU ns/distance"]}  # columns of retrieval.md


def clustered_vectors(n: int, dim: int, n_clusters: int, rank: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """`n` float32 points: a random cluster centre + a rank-`rank` Gaussian spread + isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    bases = rng.standard_normal((n_clusters, rank, dim), dtype=np.float32) * np.float32(0.6 / np.sqrt(rank))
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        labels = rng.integers(0, n_clusters, size=stop - start)
        latent = rng.standard_normal((stop - start, rank), dtype=np.float32)
        block = centres[labels] + np.einsum("nr,nrd->nd", latent, bases[labels], optimize=True)
        block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(0.15)
        out[start:stop] = block
    return out


def median_times(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of `runs` calls of `fn`."""
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def latencies_ms(index: EmbeddingIndex, queries: np.ndarray, n_single: int, runs: int) -> dict[str, float]:
    """Per-query wall and CPU milliseconds: one query per call (the first `n_single`), and a batch of `BATCH`.

    CPU time counts every thread; a single hnsw/ivfpq query runs on one thread, so its CPU time is close to
    the latency it would have on idle cores.
    """
    singles = queries[:n_single]

    def one_by_one() -> None:
        for i in range(len(singles)):
            index.search(singles[i : i + 1], K)

    faiss.cvar.hnsw_stats.reset()
    single, single_cpu = median_times(one_by_one, runs)
    distances = faiss.cvar.hnsw_stats.ndis / (runs * len(singles))
    batch, batch_cpu = median_times(lambda: index.search(queries[:BATCH], K), runs)
    return {
        "single_ms": single * 1e3 / len(singles),
        "single_cpu_ms": single_cpu * 1e3 / len(singles),
        "batch_ms": batch * 1e3 / BATCH,
        "batch_cpu_ms": batch_cpu * 1e3 / BATCH,
        "distances_per_query": distances,
        "cpu_ns_per_distance": single_cpu * 1e9 / len(singles) / distances if distances else None,
    }


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k found, per query."""
    hits = [len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / truth.shape[1])


def build_timed(vectors: np.ndarray, kind: str, **params: Any) -> tuple[EmbeddingIndex, dict[str, float]]:
    """Build an index; report build seconds, FAISS bytes per vector and id-map bytes per vector."""
    n = len(vectors)
    ids = {"slide": np.zeros(n, dtype=np.int64), "bag": np.arange(n) // 64, "patch": np.arange(n) % 64}
    provenance = {"encoder": {"name": "synthetic-gaussian-clusters"}, "geometry": None}
    start = time.perf_counter()
    index = EmbeddingIndex.build(vectors, ids, kind=kind, provenance=provenance, slide_names=["bench"], **params)
    seconds = time.perf_counter() - start
    size = len(faiss.serialize_index(index.faiss_index))
    return index, {"build_s": seconds, "bytes_per_vector": size / n, "id_bytes_per_vector": 8.0 * len(ids)}


def search_in_batches(index: EmbeddingIndex, queries: np.ndarray) -> np.ndarray:
    return np.concatenate([index.search(queries[i : i + BATCH], K)[1] for i in range(0, len(queries), BATCH)])


def sweep(
    index: EmbeddingIndex,
    settings: list[dict[str, int]],
    queries: np.ndarray,
    truth: np.ndarray,
    exact: dict[str, float],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Recall and latency at each search setting, with the exact/approximate latency ratios."""
    rows = []
    for setting in settings:
        index.set_search_params(**setting)
        recall = recall_at_k(search_in_batches(index, queries), truth)
        lat = latencies_ms(index, queries, args.single, args.runs)
        rows.append(
            {
                "search_params": setting,
                "recall_at_10": recall,
                **lat,
                "speedup_single": exact["single_ms"] / lat["single_ms"],
                "speedup_batch": exact["batch_ms"] / lat["batch_ms"],
            }
        )
        print(f"  {setting}: recall@10 {recall:.3f}, {lat['single_ms']:.3f} ms single, {lat['batch_ms']:.3f} ms batch")
    return rows


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest single-query setting that reaches the recall target."""
    good = [r for r in rows if r["recall_at_10"] >= TARGET_RECALL]
    return min(good, key=lambda r: r["single_ms"]) if good else None


def hardware() -> dict[str, Any]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()
    start = time.perf_counter()
    data = clustered_vectors(args.n + args.queries, args.dim, args.clusters, args.rank, args.seed)
    vectors, queries = data[: args.n], data[args.n :]
    print(f"data {vectors.shape} + {len(queries)} queries in {time.perf_counter() - start:.1f} s")

    flat, flat_build = build_timed(vectors, "flat")
    truth = search_in_batches(flat, queries)
    runs_exact = max(1, min(args.runs, 3))
    exact = {**flat_build, **latencies_ms(flat, queries, min(args.single, 20), runs_exact)}
    print(f"flat: {exact}")
    del flat

    results: dict[str, Any] = {"exact": exact}
    hnsw, hnsw_build = build_timed(vectors, "hnsw", ef_construction=args.ef_construction)
    print(f"hnsw: {hnsw_build}")
    results["hnsw"] = {
        "build": hnsw_build,
        "params": hnsw.params,
        "sweep": sweep(hnsw, [{"ef_search": e} for e in HNSW_EF_SEARCH], queries, truth, exact, args),
    }
    del hnsw
    sq8, sq8_build = build_timed(vectors, "hnsw-sq8", ef_construction=args.ef_construction)
    print(f"hnsw-sq8: {sq8_build}")
    results["hnsw-sq8"] = {
        "build": sq8_build,
        "params": sq8.params,
        "sweep": sweep(sq8, [{"ef_search": e, "k_factor": f} for e, f in SQ8_SETTINGS], queries, truth, exact, args),
    }
    del sq8
    ivfpq, ivfpq_build = build_timed(vectors, "ivfpq")
    print(f"ivfpq: {ivfpq_build}")
    settings = [{"nprobe": p, "k_factor": f} for p, f in IVFPQ_SETTINGS]
    results["ivfpq"] = {
        "build": ivfpq_build,
        "params": ivfpq.params,
        "sweep": sweep(ivfpq, settings, queries, truth, exact, args),
    }
    return {
        "dataset": {
            "n": args.n,
            "dim": args.dim,
            "clusters": args.clusters,
            "rank": args.rank,
            "queries": args.queries,
            "seed": args.seed,
        },
        "k": K,
        "batch": BATCH,
        "runs": args.runs,
        "targets": {"ms_per_query": TARGET_MS, "recall_at_10": TARGET_RECALL, "speedup": TARGET_SPEEDUP},
        "hardware": {**hardware(), "load_average_1min": [load_before[0], os.getloadavg()[0]]},
        "results": results,
    }


KIND_LABELS = (("hnsw", "HNSW (M=32)"), ("hnsw-sq8", "HNSW-SQ8 (M=32) + refine"), ("ivfpq", "IVF-PQ + refine"))


def _number(value: float | None) -> str:
    return "-" if not value else f"{value:,.0f}"


def markdown(report: dict[str, Any]) -> str:
    hw, ds, res = report["hardware"], report["dataset"], report["results"]
    exact = res["exact"]
    lines = [
        "# Retrieval benchmark",
        "",
        f"{ds['n']:,} x {ds['dim']} float32 vectors in {ds['clusters']} Gaussian clusters (rank-{ds['rank']} spread "
        f"+ noise), {ds['queries']} held-out queries, cosine similarity, k = {report['k']}.",
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['faiss_threads']} FAISS threads; faiss {hw['faiss']}, "
        f"numpy {hw['numpy']}, Python {hw['python']}; {hw['date']}; 1-minute load average "
        f"{hw['load_average_1min'][0]:.1f} at the start and {hw['load_average_1min'][1]:.1f} at the end "
        "(timings on a shared machine are pessimistic).",
        f"Latency: milliseconds per query, one query per call ('single') or in a batch of {report['batch']} "
        f"('batch'), median of {report['runs']} runs; 'single CPU ms' is process CPU time per single query (all "
        "threads; an hnsw/ivfpq single query uses one thread, so this is about its latency on idle cores). "
        "Speedup: exact latency / index latency in the same mode (wall time). "
        "Bytes/vector: faiss.serialize_index size / N (the id map adds "
        f"{exact['id_bytes_per_vector']:.0f} B).",
        "",
        table_header(TABLES["indexes"], [False, False] + [True] * 10),
        f"| exact (IndexFlatIP) | - | {exact['build_s']:.1f} | {exact['bytes_per_vector']:.0f} | "
        f"{exact['single_ms']:.2f} | {exact['single_cpu_ms']:.2f} | {exact['batch_ms']:.3f} | 1.000 | 1x | 1x | "
        f"{ds['n']:,} | - |",
    ]
    for kind, label in KIND_LABELS:
        entry = res[kind]
        build = entry["build"]
        chosen = best(entry["sweep"])
        for row in entry["sweep"]:
            params = ", ".join(f"{k}={v}" for k, v in row["search_params"].items())
            mark = " **(chosen)**" if row is chosen else ""
            lines.append(
                f"| {label} | {params}{mark} | {build['build_s']:.1f} | {build['bytes_per_vector']:.0f} | "
                f"{row['single_ms']:.3f} | {row['single_cpu_ms']:.3f} | {row['batch_ms']:.3f} | "
                f"{row['recall_at_10']:.3f} | "
                f"{row['speedup_single']:.0f}x | {row['speedup_batch']:.0f}x | "
                f"{_number(row.get('distances_per_query'))} | {_number(row.get('cpu_ns_per_distance'))} |"
            )
    lines += ["", "Build parameters:", ""]
    lines += [f"- {kind}: `{json.dumps(res[kind]['params'])}`" for kind, _ in KIND_LABELS]
    lines += [
        "",
        f"Targets: <= {TARGET_MS} ms/query at recall@10 >= {TARGET_RECALL}, >= {TARGET_SPEEDUP:.0f}x exact.",
        "",
    ]
    for kind, _ in KIND_LABELS:
        chosen = best(res[kind]["sweep"])
        if chosen is None:
            lines.append(f"- {kind}: no setting reached recall@10 {TARGET_RECALL}.")
            continue
        met = chosen["single_ms"] <= TARGET_MS and min(chosen["speedup_single"], chosen["speedup_batch"]) >= (
            TARGET_SPEEDUP
        )
        lines.append(
            f"- {kind} at {chosen['search_params']}: {chosen['single_ms']:.3f} ms single / "
            f"{chosen['batch_ms']:.3f} ms batch, recall@10 {chosen['recall_at_10']:.3f}, "
            f"{chosen['speedup_single']:.0f}x / {chosen['speedup_batch']:.0f}x exact: "
            f"{'targets met' if met else 'targets NOT met'}."
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=32, help="rank of each cluster's spread")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries for recall")
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--runs", type=int, default=5, help="timing runs (median)")
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    report = run(args)
    _, md_path = write_results(args.out, "retrieval", report, markdown(report))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
