"""Sweep runs as Ray tasks: a pool of actors, each a `Worker` that opens each store and caches its features
once, with declared resources per run (CPUs, and a fraction of a GPU for a small head). A task is a group of
runs whose folds train together, grouped as for local workers (`group_tasks`, split until every actor has one);
a run is the same fit into the same run folder as with local workers, so resume and results do not depend on
the executor; the sweep folder must be on storage every node can write (a shared filesystem).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mrantool.errors import ConfigError
from mrantool.sweep.worker import RunResult, Task, Worker, group_tasks, record_error


@dataclass(frozen=True)
class RayResources:
    """Where and with what each run executes."""

    address: str | None = None
    workers: int | None = None  # actors; default: as many as the cluster's CPUs (or GPUs) allow
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0


class _RayWorker:
    """(a Ray actor) Runs fits in one process with `threads` torch threads, keeping stores and caches."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.worker = Worker()

    def run(self, group: list[Task]) -> list[RunResult]:
        return self.worker.run(group)


def execute_on_ray(tasks: list[Task], resources: RayResources) -> Iterator[RunResult]:
    """RunResults as run groups finish on the Ray cluster."""
    from mrantool.extract.executors.ray import connect

    if resources.cpus_per_run <= 0 or resources.gpus_per_run < 0:
        raise ConfigError("--cpus-per-run must be > 0 and --gpus-per-run >= 0 (e.g. --gpus-per-run 0.25 puts four "
                          "small heads on one GPU).")
    ray, started_here = connect(resources.address)
    try:
        cluster = ray.cluster_resources()
        fits = int(cluster.get("CPU", 1) // resources.cpus_per_run)
        if resources.gpus_per_run:
            fits = min(fits, int(cluster.get("GPU", 0) // resources.gpus_per_run))
        if fits < 1:
            raise ConfigError(f"The Ray cluster ({cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs) "
                              "cannot hold one run with these --cpus-per-run/--gpus-per-run; lower them.")
        groups = group_tasks(tasks, resources.workers or fits)
        count = max(1, min(resources.workers or fits, len(groups)))
        actor_class = ray.remote(_RayWorker).options(num_cpus=resources.cpus_per_run,
                                                    num_gpus=resources.gpus_per_run)
        actors = [actor_class.remote(max(1, int(resources.cpus_per_run))) for _ in range(count)]
        pending: dict[Any, tuple[Any, Any]] = {}
        queue = list(groups)
        idle = list(actors)
        try:
            while queue or pending:
                while queue and idle:
                    actor, group = idle.pop(), queue.pop(0)
                    pending[actor.run.remote(group)] = (actor, group)
                ready, _ = ray.wait(list(pending), num_returns=1)
                actor, group = pending.pop(ready[0])
                idle.append(actor)
                yield from _results(ray, ready[0], group)
        finally:
            for actor in actors:
                ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()


def _results(ray: Any, ref: Any, group: list[Task]) -> list[RunResult]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # the actor died: its runs are errors, the sweep goes on
        return [record_error(task, f"Ray worker failed: {type(exc).__name__}", str(exc), 0.0) for task in group]
