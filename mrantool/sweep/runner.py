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

Runs execute in local worker processes (`local_pool`) or on a Ray cluster (`ray_pool`). Each worker opens each
store once and keeps one `StoreData` (an LRU feature cache of `cache_gb`) per (store, labels, columns, cells,
patch_min_tissue, cell_min_tissue) across its runs, and uses max(1, cores // workers) torch threads. With one
worker the runs go in this process, without a start-up cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrantool import __version__
from mrantool.config import FitConfig
from mrantool.errors import ConfigError, MrantoolError
from mrantool.models.registry import create_head
from mrantool.store import FeatureStore
from mrantool.sweep.local_pool import execute_locally
from mrantool.sweep.ray_pool import RayResources, execute_on_ray
from mrantool.sweep.report import VariantSummary, read_outcome, summary_rows, write_json, write_report
from mrantool.sweep.spec import DUMMY_DIM, RunSpec, SweepSpec, load_spec
from mrantool.sweep.worker import INPUTS_FILE, RunResult, group_tasks, labels_key, read_run_labels
from mrantool.training.labels import Labels
from mrantool.training.splits import make_splits

Progress = Callable[[str, dict[str, Any]], None]


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
                else execute_locally(group_tasks(tasks, workers), workers, threads))
    alone: list[RunResult] = []
    for index, result in enumerate(executed, 1):
        results[result.name] = result
        alone += [result] if result.note else []
        emit("run_end", {"index": index, "n_todo": len(todo), "name": result.name, "hash": result.hash,
                         "status": result.status, "seconds": result.seconds, "error": result.error})
    outcomes = [read_outcome(out / "runs" / r.hash, r.name, r.hash) for r in runs]
    summary, notes = write_report(out, outcomes, spec.metric, spec.baselines(runs), spec.source)
    if stale:
        more = " and more" if len(stale) > 3 else ""
        notes.insert(0, f"{len(stale)} finished run(s) were redone because their store, labels file or mrantool "
                        f"version changed since they ran ({', '.join(stale[:3])}{more}).")
    if alone:
        notes.insert(0, f"{len(alone)} run(s) ({', '.join(r.name for r in alone[:3])}) trained one by one because "
                        f"their folds failed to train together although each run trains alone ({alone[0].note}); "
                        "their results are right but took longer: please report this as an mrantool bug.")
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


def _open(cfg: FitConfig) -> tuple[FeatureStore, Labels] | MrantoolError:
    """The store and the run's labels, or the error that opening them raised."""
    try:
        store = FeatureStore.open(cfg.store)
        return store, read_run_labels(cfg, store)
    except MrantoolError as exc:
        return exc

