"""One sweep worker's job, whichever executor hosts it: run groups of runs (`Worker`), grouping runs whose folds can
train together (`group_tasks`), and recording a run that failed (`record_error`). The local process pool
(`local_pool`) and the Ray actor pool (`ray_pool`) both run `Worker`s; `runner` decides which executor runs."""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from mrantool import __version__
from mrantool.config import FitConfig
from mrantool.models.registry import create_head
from mrantool.store import FeatureStore
from mrantool.sweep.report import write_json
from mrantool.sweep.spec import RunSpec
from mrantool.training.api import fit_many, train_together_key
from mrantool.training.data import StoreData
from mrantool.training.labels import Labels, read_labels
from mrantool.training.pixels.e2e import fit_end_to_end

INPUTS_FILE = "inputs.json"
Task = tuple[RunSpec, str, str]  # the run, its folder, its inputs key


@dataclass
class RunResult:
    """What happened to one run in this call: "ran", "skipped" (finished before) or "error"."""

    name: str
    hash: str
    status: str
    seconds: float = 0.0
    error: str | None = None
    note: str | None = None


def labels_key(cfg: FitConfig) -> tuple[str, str, str, str]:
    """What identifies a run's labels: the store, the labels file and the columns read from it."""
    return cfg.store, cfg.labels, cfg.id_column, cfg.label_column


def read_run_labels(cfg: FitConfig, store: FeatureStore) -> Labels:
    return read_labels(cfg.labels, store.slide_ids(), id_column=cfg.id_column, label_column=cfg.label_column)


def group_tasks(tasks: list[Task], workers: int) -> list[list[Task]]:
    """Runs whose folds can train together, grouped (in spec order); an end-to-end run (it trains from pixels,
    one fold at a time) is a group of its own. The largest groups are halved until there are at least `workers`
    groups or every group is one run."""
    groups: dict[tuple[str, ...], list[Task]] = {}
    for index, task in enumerate(tasks):
        cfg = task[0].fit_config("")
        key = (("end_to_end", str(index)) if cfg.end_to_end else
               (*labels_key(cfg), str(cfg.patch_min_tissue), str(cfg.cell_min_tissue), str(cfg.tissue_weights),
                str(cfg.cache_gb), train_together_key(cfg)))
        groups.setdefault(key, []).append(task)
    result = list(groups.values())
    while len(result) < workers and any(len(g) > 1 for g in result):
        largest = max(result, key=len)
        at = result.index(largest)
        result[at:at + 1] = [largest[:len(largest) // 2], largest[len(largest) // 2:]]
    return result


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
                results = [result for task in group for result in self.run([task])]
                if all(r.status == "ran" for r in results):  # no run's own fault: the grouping is, so say it
                    for r in results:
                        r.note = f"{type(exc).__name__}: {exc}"
                return results
            return [record_error(group[0], f"{type(exc).__name__}: {exc}", traceback.format_exc(),
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
        data_key = (*key, cells, cfg.patch_min_tissue, cfg.cell_min_tissue, cfg.tissue_weights)
        if data_key not in self.data:
            self.data[data_key] = StoreData(store, labels.slide_ids, cells=cells, patch_min_tissue=cfg.patch_min_tissue,
                                            cache_gb=cfg.cache_gb, cell_min_tissue=cfg.cell_min_tissue,
                                            tissue_weights=cfg.tissue_weights)
        return store, labels, self.data[data_key]


def record_error(task: Task, message: str, details: str, seconds: float) -> RunResult:
    """error.txt in the run folder (the message, then the traceback) and an error result."""
    run, folder, _ = task
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "error.txt").write_text(f"{message}\n\n{details}")
    return RunResult(run.name, run.hash, "error", seconds, message)
