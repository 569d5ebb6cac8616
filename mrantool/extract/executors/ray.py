"""The Ray executor: extraction across the nodes of a Ray cluster, same store format and per-slide protocol.

Shape: the driver (this process) claims slides through the shared `Ledger` (fingerprint, lock with heartbeat,
re-check) and keeps a few of them planned ahead by CPU tasks (fetch to the node's slide cache, thumbnail, tissue,
bag grid). Each planned slide goes to one encoder actor (one per GPU, or per few CPUs without GPUs) that owns its
writer. CPU tasks read and cut bag regions (the decode-bound part) and their results go straight to the slide's
actor, which encodes and streams them into the store; the actor commits when the last batch is in. At most
`inflight` read+encode batches exist at any time, so reading never runs far ahead of encoding (bounded memory).

A killed worker is retried by Ray; a killed actor is replaced and its slides start over from a fresh attempt (the
lock stays with the driver all along, so no other extractor takes them and no slide is committed twice). An OS
failure writing the store (a full disk, a read-only store) stops the run with one sentence, as locally.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrantool.errors import ConfigError, FileSystemError, MrantoolError
from mrantool.extract.executors.base import Claim, ExtractReport, Ledger, Plan, Progress, plan_source, store_write_error
from mrantool.extract.inputs import SlideInput
from mrantool.slides.cache import SlideCache
from mrantool.slides.mpp_table import MppTable
from mrantool.store.reader import FeatureStore
from mrantool.tiling.geometry import not_glass_share
from mrantool.tiling.presets import Geometry, Preset

MAX_ATTEMPTS = 3  # a slide whose actor dies is started over at most this many times
SLIDES_PER_ACTOR = 2  # slides assigned to one actor at once (the next one starts while the last batches finish)
WAIT_S = 0.5


@dataclass(frozen=True)
class EncoderSpec:
    """How each actor builds the encoder (the same weights file must be readable on every node)."""

    preset: Preset
    weights: str | None
    pretrained: bool
    arch: str | None
    device: str
    channels_last: bool = True
    threads: int | None = None


@dataclass
class _Slide:
    claim: Claim
    plan: Plan
    actor: int
    attempt: int = 1
    next_bag: int = 0
    committing: bool = False
    started: float = 0.0


_REMOTE: dict[str, Any] = {}
_HANDLE: dict[str, Any] = {}  # per worker process: the one slide it has open


def _read_bags(source: str, fingerprint: dict[str, Any], cache: SlideCache, slide_mpp: float, geometry: Geometry,
               coords: np.ndarray) -> dict[str, Any]:
    """(runs in a Ray task) The bag regions at `coords` cut into patches and their cells' non-glass shares, or
    {'error': message}."""
    from mrantool.extract.dataset import cut_patches
    from mrantool.slides.reader import open_slide

    try:
        local = cache.fetch(source, fingerprint)
        if _HANDLE.get("path") != str(local):
            if "slide" in _HANDLE:
                _HANDLE.pop("slide").close()
            _HANDLE.update(path=str(local), slide=open_slide(local, mpp=slide_mpp))
        slide = _HANDLE["slide"]
        regions = [cut_patches(slide.read_region_mpp(int(x), int(y), geometry.bag_px, geometry.mpp), geometry.grid)
                   for x, y in coords]
    except MrantoolError as exc:
        return {"error": str(exc)}
    patches = np.ascontiguousarray(np.stack(regions))
    return {"patches": patches, "not_glass": not_glass_share(patches, geometry.cells)}


class EncoderActor:
    """(a Ray actor) Encodes batches of one or more slides and streams them into the store; commits slides."""

    def __init__(self, store: str, lock_ttl_s: float, spec: EncoderSpec) -> None:
        import torch

        from mrantool.encoders.registry import create_encoder
        from mrantool.extract.executors.base import BatchEncoder

        if spec.threads:  # Ray sets OMP_NUM_THREADS=1 in its workers; an encoder on CPUs needs its share
            torch.set_num_threads(min(spec.threads, len(os.sched_getaffinity(0))))
        self.store = FeatureStore.open(store, writable=True, lock_ttl_s=lock_ttl_s)
        encoder = create_encoder(spec.preset, weights=spec.weights, pretrained=spec.pretrained, arch=spec.arch)
        self.encode = BatchEncoder(encoder, spec.preset, spec.device, spec.channels_last)
        self.writers: dict[str, Any] = {}

    def begin(self, slide_id: str, n_bags: int, provenance: dict[str, Any], lock_record: dict[str, Any]) -> None:
        from mrantool.store.locks import SlideLock

        lock = SlideLock(self.store.backend.lock_files(), slide_id, lock_record, tag=None)  # checked, not renewed
        try:
            self.writers[slide_id] = self.store.begin_slide(slide_id, n_bags, provenance, lock=lock)
        except OSError as exc:
            raise store_write_error(exc, self.store) from None

    def write(self, slide_id: str, start: int, coords: np.ndarray, tissue: np.ndarray, cell_tissue: np.ndarray,
              batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from mrantool.errors import SlideError
        from mrantool.store.schema import hostname

        if "error" in batch:
            raise SlideError(batch["error"])
        patch_emb, cell_emb = self.encode(torch.from_numpy(batch["patches"]))
        cell_tissue = np.minimum(cell_tissue, batch["not_glass"])  # capped by the pixels the read task saw
        try:
            self.writers[slide_id].write(start, coords, tissue, patch_emb, cell_emb, cell_tissue)
        except OSError as exc:
            raise store_write_error(exc, self.store) from None
        return {"node": hostname(), "n": len(coords)}

    def commit(self, slide_id: str, timings: dict[str, float]) -> None:
        try:
            self.writers.pop(slide_id).commit(timings=timings)
        except OSError as exc:
            raise store_write_error(exc, self.store) from None

    def abort(self, slide_id: str) -> None:
        writer = self.writers.pop(slide_id, None)
        if writer is not None:
            writer.abort()


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray; install it with `pip install 'mrantool[ray]'`.") from None
    if not _REMOTE:
        _REMOTE["plan"] = ray.remote(num_cpus=1)(plan_source)
        _REMOTE["read"] = ray.remote(num_cpus=1)(_read_bags)
        _REMOTE["actor"] = ray.remote(EncoderActor)
    return ray


def connect(address: str | None) -> tuple[Any, bool]:
    """Ray, connected to the cluster at `address` ('auto' joins the running one; None starts a local one)."""
    ray = _ray()
    if ray.is_initialized():
        return ray, False
    try:
        ray.init(address=address, log_to_driver=False, include_dashboard=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"Cannot connect to a Ray cluster at {address or 'a new local cluster'} ({exc}); start one "
                          "with `ray start --head` and pass --address auto, or leave --address out.") from None
    return ray, True


class RayExecutor:
    """Runs extraction on a Ray cluster (see the module docstring for the shape)."""

    def __init__(self, store: FeatureStore, spec: EncoderSpec, *, address: str | None = None,
                 encoders: int | None = None, batch_size: int = 64, slide_mpp: float | None = None,
                 mpp_table: MppTable | None = None, min_tissue: float = 0.1, cache: SlideCache | None = None,
                 inflight: int | None = None, progress: Progress | None = None,
                 provenance_extra: dict[str, dict[str, Any]] | None = None) -> None:
        self.store = store
        self.spec = spec
        self.geometry = spec.preset.geometry
        self.address = address
        self.encoders = encoders
        self.bags_per_batch = max(1, batch_size // self.geometry.n_patches)
        self.slide_mpp = slide_mpp
        self.mpp_table = mpp_table
        self.min_tissue = min_tissue
        self.cache = cache or SlideCache()
        self.inflight = inflight
        self.progress = progress or (lambda event, info: None)
        self.provenance_extra = provenance_extra or {}  # slide_id -> extra provenance keys

    def _actor_options(self, ray: Any) -> tuple[int, dict[str, Any]]:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if self.spec.device.startswith("cuda") or (self.spec.device == "auto" and gpus):
            if not gpus:
                raise ConfigError("--device cuda but the Ray cluster has no GPU; use --device cpu or add GPU nodes.")
            return self.encoders or gpus, {"num_gpus": 1, "num_cpus": 1}
        count = self.encoders or max(1, cpus // 4)
        if count >= cpus:
            raise ConfigError(f"{count} encoder actors would take all {cpus} CPUs of the Ray cluster and leave none "
                              "for reading; pass --encoders with fewer.")
        return count, {"num_cpus": 1, "threads": self.spec.threads or max(1, cpus // count)}

    def run(self, slides: list[SlideInput]) -> ExtractReport:
        ray, started_here = connect(self.address)
        report = ExtractReport()
        ledger = Ledger(self.store, report, self.progress)
        started = time.perf_counter()
        self.progress("run_start", {"n_slides": len(slides)})
        self._actors: list[Any] = []
        self._active: dict[int, _Slide] = {}
        self._refs: dict[Any, tuple[str, int, int]] = {}  # ref -> (kind, slide index, attempt)
        try:
            self._count, self._options = self._actor_options(ray)
            device = "cuda" if self._options.get("num_gpus") else "cpu"
            threads = self._options.pop("threads", self.spec.threads)
            self._spec = EncoderSpec(**{**self.spec.__dict__, "device": device, "threads": threads})
            self._loop(ray, slides, ledger, report)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            aborts = [self._actors[slide.actor].abort.remote(slide.claim.slide.slide_id)
                      for slide in self._active.values()]
            ray.wait(aborts, num_returns=len(aborts), timeout=30)
            for actor in self._actors:
                ray.kill(actor)
            ledger.close()
            if started_here:
                ray.shutdown()
        report.seconds = time.perf_counter() - started
        return report

    def _new_actor(self, ray: Any) -> Any:
        return _REMOTE["actor"].options(**self._options).remote(str(self.store.path), self.store.lock_ttl_s,
                                                                 self._spec)

    def _loop(self, ray: Any, slides: list[SlideInput], ledger: Ledger, report: ExtractReport) -> None:
        queue = deque(enumerate(slides))
        refs = self._refs
        planned: deque[tuple[Claim, Plan]] = deque()
        n_plans = 0
        inflight = self.inflight or 4 * self._count + 2
        while queue or n_plans or planned or self._active:
            while queue and n_plans + len(planned) < self._count + 1:
                index, item = queue.popleft()
                claim = ledger.claim(index, item)
                if claim is not None:
                    ref = _REMOTE["plan"].remote(item, claim.fingerprint, self.geometry, cache=self.cache,
                                                 slide_mpp=self.slide_mpp, min_tissue=self.min_tissue,
                                                 mpp_table=self.mpp_table,
                                                 extra=self.provenance_extra.get(item.slide_id))
                    refs[ref] = ("plan", index, 0)
                    n_plans += 1
            if planned and not self._actors:  # started only once there is a slide to extract
                self._actors = [self._new_actor(ray) for _ in range(self._count)]
            while planned and (actor := self._free_actor()) is not None:
                claim, plan = planned.popleft()
                self._start(claim, plan, actor)
            batches = sum(kind == "write" for kind, _, _ in refs.values())
            for slide in list(self._active.values()):
                while batches < inflight and slide.next_bag < len(slide.plan.coords):
                    refs[self._submit_batch(slide)] = ("write", slide.claim.index, slide.attempt)
                    batches += 1
                if slide.next_bag == len(slide.plan.coords) and not slide.committing:
                    slide.committing = True
                    timings = {**slide.plan.provenance["timings"]}
                    ref = self._actors[slide.actor].commit.remote(slide.claim.slide.slide_id, timings)
                    refs[ref] = ("commit", slide.claim.index, slide.attempt)
            if not refs:
                continue
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=WAIT_S)
            for ref in ready:
                kind, index, attempt = refs.pop(ref)
                if kind == "plan":
                    n_plans -= 1
                    self._planned(ray, ref, ledger.held[index], planned, ledger)
                    continue
                slide = self._active.get(index)
                if slide is None or slide.attempt != attempt:
                    continue  # a result of an attempt that was abandoned
                self._result(ray, ref, kind, slide, ledger, report)

    def _free_actor(self) -> int | None:
        load = [0] * len(self._actors)
        for slide in self._active.values():
            load[slide.actor] += 1
        best = min(range(len(load)), key=load.__getitem__)
        return best if load[best] < SLIDES_PER_ACTOR else None

    def _start(self, claim: Claim, plan: Plan, actor: int, attempt: int = 1) -> None:
        slide = _Slide(claim, plan, actor, attempt, started=time.perf_counter())
        self._active[claim.index] = slide
        ref = self._actors[actor].begin.remote(claim.slide.slide_id, len(plan.coords), plan.provenance,
                                               claim.lock.record)
        self._refs[ref] = ("begin", claim.index, attempt)
        self.progress("slide_start", {"slide_id": claim.slide.slide_id, "n_bags": len(plan.coords)})

    def _submit_batch(self, slide: _Slide) -> Any:
        start, stop = slide.next_bag, min(len(slide.plan.coords), slide.next_bag + self.bags_per_batch)
        slide.next_bag = stop
        coords = slide.plan.coords[start:stop]
        batch = _REMOTE["read"].remote(str(slide.claim.slide.path), slide.claim.fingerprint, self.cache,
                                       slide.plan.slide_mpp, self.geometry, coords)
        return self._actors[slide.actor].write.remote(slide.claim.slide.slide_id, start, coords,
                                                      slide.plan.patch_tissue[start:stop],
                                                      slide.plan.cell_tissue[start:stop], batch)

    def _planned(self, ray: Any, ref: Any, claim: Claim, planned: deque, ledger: Ledger) -> None:
        try:
            planned.append((claim, ray.get(ref)))
        except MrantoolError as exc:
            ledger.fail(claim, _cause(exc))
        except Exception as exc:  # an unexpected reader failure must not stop the run
            ledger.fail(claim, f"{claim.slide.path}: {type(exc).__name__}: {_cause(exc)}")

    def _result(self, ray: Any, ref: Any, kind: str, slide: _Slide, ledger: Ledger, report: ExtractReport) -> None:
        try:
            value = ray.get(ref)
        except ray.exceptions.RayActorError:
            self._actor_died(ray, slide.actor, ledger)
            return
        except FileSystemError as exc:  # the store cannot be written (full disk, read-only): stop the run
            raise FileSystemError(_cause(exc)) from None
        except MrantoolError as exc:
            self._fail(slide, ledger, _cause(exc))
            return
        except Exception as exc:
            self._fail(slide, ledger, f"{slide.claim.slide.path}: {type(exc).__name__}: {_cause(exc)}")
            return
        if kind == "begin":
            return
        if kind == "write":
            n = value["n"]
            report.n_patches += n * self.geometry.n_patches
            self.progress("bags", {"n": n, "patches": n * self.geometry.n_patches, "node": value["node"]})
        else:
            del self._active[slide.claim.index]
            ledger.done(slide.claim, len(slide.plan.coords), time.perf_counter() - slide.started)

    def _fail(self, slide: _Slide, ledger: Ledger, message: str) -> None:
        del self._active[slide.claim.index]
        self._actors[slide.actor].abort.remote(slide.claim.slide.slide_id)
        ledger.fail(slide.claim, message)

    def _actor_died(self, ray: Any, actor: int, ledger: Ledger) -> None:
        """Replace the actor; its slides start over from a fresh attempt (their locks never left the driver)."""
        self._actors[actor] = self._new_actor(ray)
        for slide in [s for s in self._active.values() if s.actor == actor]:
            del self._active[slide.claim.index]
            self.store.backend.abandon_attempts(slide.claim.slide.slide_id)
            if slide.attempt >= MAX_ATTEMPTS:
                ledger.fail(slide.claim, f"the encoder actor died {slide.attempt} times while extracting this "
                                         "slide; check the Ray workers' memory and logs, then rerun extract.")
                continue
            self._start(slide.claim, slide.plan, actor, slide.attempt + 1)


def _cause(exc: Exception) -> str:
    """The original error's message of a Ray task error, without Ray's traceback banner."""
    cause = getattr(exc, "cause", None)
    return str(cause) if cause is not None else str(exc).strip().splitlines()[-1]
