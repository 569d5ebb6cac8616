"""`run_sweep`: every run of a spec in worker processes that keep the features in RAM, resumable.

Each run is a normal fit run folder, SWEEP/runs/<hash>/, where the hash identifies its resolved settings
(spec.run_hash). A run is finished when its metrics.json exists and its inputs.json matches the current inputs:
the store's content (identity, and each slide's file fingerprint and commit time), the labels file's bytes, the id
and label columns read from it, and the mrantool version. Re-running the same sweep skips those and redoes the
others from scratch, so a re-extracted store or an edited labels.csv never reuses stale runs. A run that raises is
recorded (runs/<hash>/error.txt and the results) and the others go on.

Runs on the same data whose head, options and group settings match (they differ in, e.g., lr, seed or
folds) go to one worker as a group and their folds train together (`fit_many`); groups are split until
every worker has one. A group that fails is retried run by run, so one bad run cannot take others down.
End-to-end runs (`end_to_end = true`) read their pixels themselves and are never grouped.

Workers are started with forkserver (spawn where that does not exist), never by forking a process that
already runs torch threads. Each worker opens each store once and keeps one `StoreData` (an LRU feature
cache of `cache_gb`) per (store, labels, columns, cells, patch_min_tissue) across its runs, and uses
max(1, cores // workers) torch threads. With one worker the runs go in this process, without a start-up cost.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mrantool import __version__
from mrantool.config import FitConfig
from mrantool.errors import ConfigError, MrantoolError
from mrantool.models.registry import create_head
from mrantool.store import FeatureStore
from mrantool.sweep.ray_pool import RayResources, execute_on_ray
from mrantool.sweep.report import VariantSummary, read_outcome, summary_rows, write_json, write_report
from mrantool.sweep.spec import RunSpec, SweepSpec, load_spec
from mrantool.training.api import fit_many, train_together_key
from mrantool.training.data import StoreData
from mrantool.training.labels import Labels, read_labels
from mrantool.training.pixels.e2e import fit_end_to_end
from mrantool.training.splits import make_splits

Progress = Callable[[str, dict[str, Any]], None]
DUMMY_DIM = 8
# what the forkserver imports before forking workers: this module, and torch._dynamo, which the first
# optimizer a process builds imports lazily (seconds; once in the server instead of once per worker)
PRELOAD = [__name__, "torch._dynamo"]
INPUTS_FILE = "inputs.json"


@dataclass
class RunResult:
    """What happened to one run in this call: "ran", "skipped" (finished before) or "error"."""

    name: str
    hash: str
    status: str
    seconds: float = 0.0
    error: str | None = None


@dataclass
class SweepResult:
    """A finished sweep: its folder, this call's runs, and the ranked per-variant summary."""

    out: Path
    metric: str
    runs: list[RunResult]
    summary: list[VariantSummary]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        """Number of runs of this call with `status` ("ran", "skipped", "error")."""
        return sum(r.status == status for r in self.runs)

    def table(self) -> list[dict[str, str]]:
        """Rows of strings for a rich table (as summary.md): rank, variant, metrics, paired comparison."""
        return summary_rows(self.summary, self.metric)


def cpu_cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_sweep(spec: SweepSpec | str | Path, out_dir: str | Path, *, workers: int = 1,
              progress: Progress | None = None, base: dict[str, Any] | None = None,
              ray: RayResources | None = None) -> SweepResult:
    """Run every unfinished run of `spec` into `out_dir`/runs/<hash>/ and write results.csv, summary.md and
    metric.png. `base` overrides keys of a spec file's [base] table (the CLI's --id-column / --label-column).
    Problems in the spec, stores or labels raise one ConfigError before anything runs. With `ray`, the runs
    execute as Ray tasks on a cluster (same run folders and inputs keys, so resume and results are the same)."""
    started = time.perf_counter()
    spec = spec if isinstance(spec, SweepSpec) else load_spec(spec, base)
    if workers < 1:
        raise ConfigError(f"workers {workers} is not a number of processes; use --workers 1 or more.")
    runs = spec.runs()
    inputs = preflight(runs, spec.source)
    emit = progress or (lambda event, info: None)
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", {"source": spec.source, "spec": spec.model_dump(),
                                     "baselines": spec.baselines(runs),
                                     "runs": [{"name": r.name, "hash": r.hash, "variant": r.variant,
                                               "point": r.point, "config": r.config} for r in runs]})
    keys = {r.name: inputs[_data_key(r)] for r in runs}
    todo = [r for r in runs if not _finished(out / "runs" / r.hash, keys[r.name])]
    stale = [r.name for r in todo if (out / "runs" / r.hash / "metrics.json").is_file()]
    results = {r.name: RunResult(r.name, r.hash, "skipped") for r in runs if r not in todo}
    workers = max(1, min(workers, len(todo)))
    threads = max(1, cpu_cores() // workers)
    if ray is not None:
        workers, threads = ray.workers or 0, max(1, int(ray.cpus_per_run))
    emit("start", {"n_runs": len(runs), "n_todo": len(todo), "n_skipped": len(results), "workers": workers,
                   "threads": threads, "out": str(out), "executor": "ray" if ray else "local"})
    tasks = [(r, str(out / "runs" / r.hash), keys[r.name]) for r in todo]
    executed = (execute_on_ray(tasks, ray) if ray is not None and tasks
                else _execute(group_tasks(tasks, workers), workers, threads))
    for index, result in enumerate(executed, 1):
        results[result.name] = result
        emit("run_end", {"index": index, "n_todo": len(todo), "name": result.name, "hash": result.hash,
                         "status": result.status, "seconds": result.seconds, "error": result.error})
    outcomes = [read_outcome(out / "runs" / r.hash, r.name, r.hash) for r in runs]
    summary, notes = write_report(out, outcomes, spec.metric, spec.baselines(runs), spec.source)
    if stale:
        more = " and more" if len(stale) > 3 else ""
        notes.insert(0, f"{len(stale)} finished run(s) were redone because their store, labels file or mrantool "
                        f"version changed since they ran ({', '.join(stale[:3])}{more}).")
    result = SweepResult(out, spec.metric, [results[r.name] for r in runs], summary,
                         time.perf_counter() - started, notes)
    emit("end", {"out": str(out), "seconds": result.seconds, "n_ran": result.count("ran"),
                 "n_skipped": result.count("skipped"), "n_failed": result.count("error")})
    return result


def preflight(runs: list[RunSpec], source: str) -> dict[tuple[str, ...], str]:
    """Open each store and labels file once and check every run against them (cells, folds, defective slides),
    so that data problems surface before any run starts; one ConfigError lists them all. Returns the inputs key
    (`inputs_key`) of each `labels_key` (store, labels file, id and label columns)."""
    problems: dict[str, list[str]] = {}
    keys: dict[tuple[str, ...], str] = {}
    opened: dict[tuple[str, ...], tuple[FeatureStore, Labels] | MrantoolError] = {}
    for run in runs:
        cfg = run.fit_config("")
        key = labels_key(cfg)
        try:
            if key not in opened:
                opened[key] = _open(cfg)
            entry = opened[key]
            if isinstance(entry, MrantoolError):
                raise entry
            store, labels = entry
            needs_cells = create_head(cfg.model, DUMMY_DIM, 2, **cfg.options).needs_cells and not cfg.end_to_end
            if needs_cells and not store.dims.n_cells:
                raise ConfigError(f"head {cfg.model!r} with these options needs cell embeddings but store "
                                  f"{cfg.store} has none; set options.cells = false or use a patch head")
            make_splits(labels, cfg.folds, cfg.repeats, cfg.val_fraction, cfg.seed)
            if key not in keys:
                store.require_whole(labels.slide_ids, "the sweep")
                keys[key] = inputs_key(store, cfg)
        except MrantoolError as exc:
            problems.setdefault(str(exc).rstrip(". "), []).append(repr(run.name))
    if problems:
        lines = [f"{', '.join(names[:4])}{' and more' if len(names) > 4 else ''}: {message}"
                 for message, names in problems.items()]
        raise ConfigError(f"Sweep spec {source} cannot run: " + "; ".join(lines) + "; fix them and run the "
                          "sweep again.")
    return keys


def inputs_key(store: FeatureStore, cfg: FitConfig) -> str:
    """What a run's results depend on besides its settings: store content, labels bytes and the columns read from
    them, mrantool version."""
    text = json.dumps({"store": store.content_hash(), "labels": hashlib.sha256(Path(cfg.labels).read_bytes())
                       .hexdigest(), "id_column": cfg.id_column, "label_column": cfg.label_column,
                       "mrantool": __version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _data_key(run: RunSpec) -> tuple[str, ...]:
    return labels_key(run.fit_config(""))


def _finished(folder: Path, key: str) -> bool:
    """A run folder holds a finished run made from the current inputs."""
    record = folder / INPUTS_FILE
    if not (folder / "metrics.json").is_file() or not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("inputs") == key
    except (OSError, ValueError, AttributeError):
        return False


def labels_key(cfg: FitConfig) -> tuple[str, str, str, str]:
    """What identifies a run's labels: the store, the labels file and the columns read from it."""
    return cfg.store, cfg.labels, cfg.id_column, cfg.label_column


def read_run_labels(cfg: FitConfig, store: FeatureStore) -> Labels:
    return read_labels(cfg.labels, store.slide_ids(), id_column=cfg.id_column, label_column=cfg.label_column)


def _open(cfg: FitConfig) -> tuple[FeatureStore, Labels] | MrantoolError:
    """The store and the run's labels, or the error that opening them raised."""
    try:
        store = FeatureStore.open(cfg.store)
        return store, read_run_labels(cfg, store)
    except MrantoolError as exc:
        return exc


Task = tuple[RunSpec, str, str]  # the run, its folder, its inputs key


def group_tasks(tasks: list[Task], workers: int) -> list[list[Task]]:
    """Runs whose folds can train together, grouped (in spec order); an end-to-end run (it trains from pixels,
    one fold at a time) is a group of its own. The largest groups are halved until there are at least `workers`
    groups or every group is one run."""
    groups: dict[tuple[str, ...], list[Task]] = {}
    for index, task in enumerate(tasks):
        cfg = task[0].fit_config("")
        key = (("end_to_end", str(index)) if cfg.end_to_end else
               (*labels_key(cfg), str(cfg.patch_min_tissue), str(cfg.cell_min_tissue), str(cfg.cache_gb),
                train_together_key(cfg)))
        groups.setdefault(key, []).append(task)
    result = list(groups.values())
    while len(result) < workers and any(len(g) > 1 for g in result):
        largest = max(result, key=len)
        at = result.index(largest)
        result[at:at + 1] = [largest[:len(largest) // 2], largest[len(largest) // 2:]]
    return result


def _execute(groups: list[list[Task]], workers: int, threads: int) -> Iterator[RunResult]:
    """RunResults as runs finish: in this process with one worker, else in a pool of worker processes."""
    if not groups:
        return
    if workers == 1:
        worker, old = Worker(), torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for group in groups:
                yield from worker.run(group)
        finally:
            torch.set_num_threads(old)
        return
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    context = mp.get_context(method)
    if method == "forkserver":  # the server imports once, threads idle; workers fork from it ready to train
        context.set_forkserver_preload(PRELOAD)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,))
    with pool:
        futures: dict[Future[list[RunResult]], list[Task]] = {pool.submit(_run_in_worker, group): group
                                                              for group in groups}
        try:
            for future in as_completed(futures):
                yield from _results(future, futures[future])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _results(future: Future[list[RunResult]], group: list[Task]) -> list[RunResult]:
    """The worker's RunResults, or error results when the worker itself died."""
    try:
        return future.result()
    except Exception as exc:
        message = f"worker process failed: {type(exc).__name__}: {exc}"
        return [_record_error(task, message, "".join(traceback.format_exception(exc)), 0.0) for task in group]


class Worker:
    """Runs fits, keeping opened stores, labels and feature caches across runs."""

    def __init__(self) -> None:
        self.stores: dict[str, FeatureStore] = {}
        self.labels: dict[tuple[str, ...], Labels] = {}
        self.data: dict[tuple[object, ...], StoreData] = {}

    def run(self, group: list[Task]) -> list[RunResult]:
        """Fits into fresh run folders, their folds trained together; a failing group is retried run by run, and
        each run's exception becomes its error result and error.txt. Seconds are the group's, shared evenly."""
        started = time.perf_counter()
        for _, folder, _ in group:
            shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier attempt
        try:
            cfgs = [run.fit_config(folder) for run, folder, _ in group]
            if all(cfg.end_to_end for cfg in cfgs):  # from pixels, which the fit reads itself: no feature cache
                for cfg in cfgs:
                    fit_end_to_end(cfg)
            else:
                store, labels, data = self._data(cfgs[0])
                fit_many(cfgs, data, labels, identity=store.identity)
            for _, folder, inputs in group:
                write_json(Path(folder) / INPUTS_FILE, {"inputs": inputs, "mrantool_version": __version__})
        except Exception as exc:
            if len(group) > 1:
                return [result for task in group for result in self.run([task])]
            return [_record_error(group[0], f"{type(exc).__name__}: {exc}", traceback.format_exc(),
                                  time.perf_counter() - started)]
        seconds = (time.perf_counter() - started) / len(group)
        return [RunResult(run.name, run.hash, "ran", seconds) for run, _, _ in group]

    def _data(self, cfg: FitConfig) -> tuple[FeatureStore, Labels, StoreData]:
        """The run's store, labels and feature cache, opened once per worker."""
        if cfg.store not in self.stores:
            self.stores[cfg.store] = FeatureStore.open(cfg.store)
        store = self.stores[cfg.store]
        key = labels_key(cfg)
        if key not in self.labels:
            self.labels[key] = read_run_labels(cfg, store)
        labels = self.labels[key]
        cells = create_head(cfg.model, store.dims.dim, labels.n_classes, **cfg.options).needs_cells
        data_key = (*key, cells, cfg.patch_min_tissue, cfg.cell_min_tissue)
        if data_key not in self.data:
            self.data[data_key] = StoreData(store, labels.slide_ids, cells=cells, patch_min_tissue=cfg.patch_min_tissue,
                                            cache_gb=cfg.cache_gb, cell_min_tissue=cfg.cell_min_tissue)
        return store, labels, self.data[data_key]


def _record_error(task: Task, message: str, details: str, seconds: float) -> RunResult:
    """error.txt in the run folder (the message, then the traceback) and an error result."""
    run, folder, _ = task
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "error.txt").write_text(f"{message}\n\n{details}")
    return RunResult(run.name, run.hash, "error", seconds, message)


_WORKER: Worker | None = None


def _init_worker(threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = Worker()


def _run_in_worker(group: list[Task]) -> list[RunResult]:
    if _WORKER is None:
        raise RuntimeError("worker process was not initialised")
    return _WORKER.run(group)
