"""Sweep runs in local worker processes (or in this process with one worker), each a `Worker` that keeps stores
and feature caches across its runs.

Workers are started with forkserver (spawn where that does not exist), never by forking a process that already
runs torch threads; the forkserver imports the worker code once and workers fork from it ready to train.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed

import torch

from mrantool.sweep.worker import RunResult, Task, Worker, record_error

# what the forkserver imports before forking workers: this module, and torch._dynamo, which the first
# optimizer a process builds imports lazily (seconds; once in the server instead of once per worker)
PRELOAD = [__name__, "torch._dynamo"]


def execute_locally(groups: list[list[Task]], workers: int, threads: int) -> Iterator[RunResult]:
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
        return [record_error(task, message, "".join(traceback.format_exception(exc)), 0.0) for task in group]


_WORKER: Worker | None = None


def _init_worker(threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = Worker()


def _run_in_worker(group: list[Task]) -> list[RunResult]:
    if _WORKER is None:
        raise RuntimeError("worker process was not initialised")
    return _WORKER.run(group)
