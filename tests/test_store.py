"""Feature store: identity checks, streaming writes, atomic commits, locks, failures manifest and `check`."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from mrantool.errors import LockedError, StoreError
from mrantool.store import FeatureStore, check_store, file_fingerprint, make_identity, store_warnings
from mrantool.store.locks import describe, is_stale
from mrantool.store.schema import SCHEMA_VERSION, hostname

GRID, CELLS, DIM = 2, 2, 8
P, C = GRID * GRID, CELLS * CELLS


def identity(has_cells: bool = True, encoder: str = "resnet18", mpp: float = 2.0) -> dict:
    return make_identity(encoder=encoder, weights="random-init", transforms={"input_px": 64}, embed_dim=DIM,
                         geometry={"bag_px": 128, "mpp": mpp, "grid": GRID, "cells": CELLS}, preset="tiny",
                         has_cells=has_cells)


def provenance(source: str = "/data/a.svs") -> dict:
    return {"source": source, "fingerprint": {"size": 1, "mtime_ns": 2, "sha256_first_mib": "ab"}, "mpp": 0.25,
            "level0_size": [4000, 3000], "bag_size_l0": 1024, "scanner": "test"}


def features(n: int, seed: int = 0, cells: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    return {"coords": rng.integers(0, 4000, (n, 2)), "patch_tissue": rng.random((n, P)),
            "patch_emb": rng.standard_normal((n, P, DIM)).astype(np.float32),
            "cell_emb": rng.standard_normal((n, P, C, DIM)).astype(np.float32) if cells else None}


def write_slide(store: FeatureStore, slide_id: str, n: int = 7, seed: int = 0, step: int = 3) -> dict:
    data = features(n, seed, cells=store.identity["has_cells"])
    writer = store.begin_slide(slide_id, n, provenance())
    for start in range(0, n, step):
        part = {k: None if v is None else v[start:start + step] for k, v in data.items()}
        writer.write(start, part["coords"], part["patch_tissue"], part["patch_emb"], part["cell_emb"])
    writer.commit(timings={"encode_s": 1.5})
    return data


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore.create(tmp_path / "s.zarr", identity())


# --- opening -------------------------------------------------------------------------------------------------


def test_create_then_open_with_same_identity(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    created = FeatureStore.create(path, identity())
    again = FeatureStore.create(path, identity())
    opened = FeatureStore.open(path, identity())
    assert created.identity == again.identity == opened.identity == identity()
    assert opened.schema_version == SCHEMA_VERSION and opened.slide_ids() == []
    assert not opened.writable


def test_identity_mismatch_names_field_path_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    FeatureStore.create(path, identity())
    with pytest.raises(StoreError) as err:
        FeatureStore.open(path, identity(encoder="vit_small", mpp=0.5))
    message = str(err.value)
    assert str(path) in message and "use a new --store" in message
    assert "encoder (store: 'resnet18', requested: 'vit_small')" in message and "geometry.mpp" in message
    with pytest.raises(StoreError, match="encoder"):
        FeatureStore.create(path, identity(encoder="vit_small"))


def test_open_refuses_non_store_missing_and_other_schema(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    with pytest.raises(StoreError, match="not an mrantool feature store"):
        FeatureStore.open(tmp_path / "plain")
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.create(tmp_path / "plain", identity())
    path = tmp_path / "s.zarr"
    FeatureStore.create(path, identity())
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = SCHEMA_VERSION + 1
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}.*new --store"):
        FeatureStore.open(path)
    assert check_store(path) and "schema version" in check_store(path)[0]


@pytest.mark.parametrize("bad", ["", ".", "..", ".hidden", "a/b", "a\\b", "x\n", "é" * 101])
def test_invalid_slide_ids_are_refused(store: FeatureStore, bad: str) -> None:
    with pytest.raises(StoreError, match="Invalid slide id"):
        store.begin_slide(bad, 1, provenance())


# --- writing and reading -------------------------------------------------------------------------------------


def test_streamed_write_reads_back(store: FeatureStore) -> None:
    data = write_slide(store, "CMU-1.small", n=7, step=3)
    assert store.slide_ids() == ["CMU-1.small"]
    slide = store.slide("CMU-1.small")
    assert (slide.n_bags, slide.n_patches, slide.n_cells, slide.dim) == (7, P, C, DIM)
    np.testing.assert_array_equal(slide.coords[:], data["coords"])
    assert slide.patch_emb.dtype == np.float16 and slide.coords.dtype == np.int64
    np.testing.assert_allclose(slide.read_patches(), data["patch_emb"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(slide.patch_tissue[:], data["patch_tissue"], rtol=1e-3, atol=1e-3)
    patches, cells = slide.read_bag(5)
    np.testing.assert_allclose(patches, data["patch_emb"][5], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(cells, data["cell_emb"][5], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(slide.read_cells(6, 3), data["cell_emb"][6, 3], rtol=1e-3, atol=1e-3)
    prov = slide.provenance
    assert prov["source"] == "/data/a.svs" and prov["scanner"] == "test" and prov["timings"] == {"encode_s": 1.5}
    assert prov["identity"] == store.identity and prov["geometry"]["grid"] == GRID and prov["extracted_at"]
    assert slide.cell_emb.chunks == (7, P, C, DIM)  # several bags per cell chunk (schema 2): all 7 here
    with pytest.raises(StoreError, match="outside slide"):
        slide.read_bag(7)


def test_out_of_order_and_rewritten_bags_read_back(store: FeatureStore) -> None:
    n = 150  # patch_emb chunks hold 64 bags here, so writes below split, straddle and refill chunks
    data, newer = features(n, seed=0), features(n, seed=1)
    cuts = [0, 5, 6, 63, 64, 65, 100, 129, 150]
    order = np.random.default_rng(0).permutation(len(cuts) - 1)
    writer = store.begin_slide("a", n, provenance())
    for i in order:
        lo, hi = cuts[i], cuts[i + 1]
        writer.write(lo, **{k: v[lo:hi] for k, v in data.items()})
    for lo, hi in [(10, 13), (60, 70)]:  # rewrite bags whose chunks were already stored
        writer.write(lo, **{k: v[lo:hi] for k, v in newer.items()})
        for k in data:
            data[k][lo:hi] = newer[k][lo:hi]
    writer.commit()
    slide = store.slide("a")
    np.testing.assert_array_equal(slide.coords[:], data["coords"])
    np.testing.assert_allclose(slide.read_patches(), data["patch_emb"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(slide.cell_emb[:], data["cell_emb"], rtol=1e-3, atol=1e-3)
    assert check_store(store.path) == []


def test_unknown_slide_error_counts_slides(store: FeatureStore) -> None:
    write_slide(store, "a")
    with pytest.raises(StoreError, match=r"'b' is not in store .*\(1 complete slides\)"):
        store.slide("b")


def test_commit_refuses_unwritten_bags_and_bad_shapes(store: FeatureStore) -> None:
    data = features(6)
    writer = store.begin_slide("a", 6, provenance())
    writer.write(0, data["coords"][:2], data["patch_tissue"][:2], data["patch_emb"][:2], data["cell_emb"][:2])
    writer.write(5, data["coords"][5:], data["patch_tissue"][5:], data["patch_emb"][5:], data["cell_emb"][5:])
    with pytest.raises(StoreError, match="bags 2-4 were never written"):
        writer.commit()
    with pytest.raises(StoreError, match="outside slide"):
        writer.write(5, data["coords"][:2], data["patch_tissue"][:2], data["patch_emb"][:2], data["cell_emb"][:2])
    with pytest.raises(StoreError, match="shape"):
        writer.write(0, data["coords"][:1], data["patch_tissue"][:1], data["patch_emb"][:1, :, :4],
                     data["cell_emb"][:1])
    with pytest.raises(StoreError, match="stores cells"):
        writer.write(0, data["coords"][:1], data["patch_tissue"][:1], data["patch_emb"][:1])
    writer.abort()
    assert store.slide_ids() == [] and not any(store.layout.staging.iterdir())


def test_uncommitted_slide_is_invisible_and_crash_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path, identity())
    data = features(4)
    writer = store.begin_slide("a", 4, provenance())
    writer.write(0, data["coords"], data["patch_tissue"], data["patch_emb"], data["cell_emb"])
    assert store.slide_ids() == [] and not store.is_complete("a")
    with pytest.raises(StoreError):
        store.slide("a")
    FeatureStore.create(path, identity())  # a second writer's open keeps this live writer's staging
    assert writer.staging.is_dir()
    writer.commit()
    assert store.slide_ids() == ["a"]

    proc = mp.get_context("spawn").Process(target=crash_midway, args=(str(path), "b"))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    leftover = list(store.layout.staging.iterdir())
    assert len(leftover) == 1 and leftover[0].name.startswith(f"b.{hostname()}.{proc.pid}.")
    assert any("dead writer" in w for w in store_warnings(path))
    reopened = FeatureStore.create(path, identity())
    assert reopened.slide_ids() == ["a"] and not any(reopened.layout.staging.iterdir())
    assert check_store(path) == [] and store_warnings(path) == []


def crash_midway(path: str, slide_id: str) -> None:
    store = FeatureStore.create(path, identity())
    data = features(6)
    writer = store.begin_slide(slide_id, 6, provenance())
    writer.write(0, data["coords"][:3], data["patch_tissue"][:3], data["patch_emb"][:3], data["cell_emb"][:3])
    os._exit(3)


def test_recommit_swaps_in_new_features(store: FeatureStore) -> None:
    write_slide(store, "a", n=5, seed=0)
    store.record_failure("a", "/data/a.svs", "changed file failed once")
    new = write_slide(store, "a", n=3, seed=1)
    slide = store.slide("a")
    assert slide.n_bags == 3
    np.testing.assert_allclose(slide.read_patches(), new["patch_emb"], rtol=1e-3, atol=1e-3)
    assert store.failures() == {}
    assert not any(store.layout.trash.iterdir()) and not any(store.layout.staging.iterdir())
    assert check_store(store.path) == []


def test_is_complete_compares_fingerprints(tmp_path: Path, store: FeatureStore) -> None:
    source = tmp_path / "slide.svs"
    source.write_bytes(b"x" * 3000)
    fingerprint = file_fingerprint(source)
    assert fingerprint["size"] == 3000 and len(fingerprint["sha256_first_mib"]) == 64
    writer = store.begin_slide("slide", 1, {**provenance(str(source)), "fingerprint": fingerprint})
    writer.write(0, **features(1))
    assert not store.is_complete("slide", fingerprint)
    writer.commit()
    assert store.is_complete("slide", fingerprint) and store.is_complete("slide")
    source.write_bytes(b"y" * 3000)
    assert not store.is_complete("slide", file_fingerprint(source))


def test_store_without_cells(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "p.zarr", identity(has_cells=False))
    data = write_slide(store, "imported", n=4)
    slide = store.slide("imported")
    assert slide.cell_emb is None and slide.n_cells == 0
    patches, cells = slide.read_bag(1)
    assert cells is None
    np.testing.assert_allclose(patches, data["patch_emb"][1], rtol=1e-3, atol=1e-3)
    with pytest.raises(StoreError, match="no cell embeddings"):
        slide.read_cells(0, 0)
    writer = store.begin_slide("b", 1, provenance())
    with pytest.raises(StoreError, match="has no cells"):
        writer.write(0, **features(1))
    writer.abort()
    assert check_store(store.path) == []
    assert store.summary()[0]["cells"] is None


def test_cell_tissue_is_kept_or_taken_from_the_patch(store: FeatureStore) -> None:
    data = features(3)
    cell_tissue = np.random.default_rng(1).random((3, P, C))
    writer = store.begin_slide("given", 3, provenance())
    writer.write(0, **data, cell_tissue=cell_tissue)
    writer.commit()
    np.testing.assert_allclose(store.slide("given").cell_tissue[:], cell_tissue, atol=1e-3)
    write_slide(store, "unknown", n=4)  # a writer that knows only patch fractions: each cell gets its patch's
    slide = store.slide("unknown")
    np.testing.assert_allclose(slide.cell_tissue[:], np.repeat(slide.patch_tissue[:][..., None], C, -1))
    assert check_store(store.path) == []


def test_slides_written_before_cell_tissue_read_as_none_and_check_clean(store: FeatureStore) -> None:
    write_slide(store, "old", n=2)
    shutil.rmtree(store.path / "slides" / "old" / "cell_tissue")  # as written before cell tissue was kept
    assert store.slide("old").cell_tissue is None
    assert check_store(store.path) == [] and check_store(store.path, deep=True) == []


def test_check_names_cell_tissue_out_of_range(store: FeatureStore) -> None:
    data = features(2)
    writer = store.begin_slide("bad", 2, provenance())
    writer.write(0, **data, cell_tissue=np.full((2, P, C), 1.5))
    writer.commit()
    problems = check_store(store.path, deep=True)
    assert len(problems) == 1 and "bad" in problems[0] and "cell_tissue" in problems[0] and "[0, 1]" in problems[0]


# --- locks ---------------------------------------------------------------------------------------------------


def test_second_lock_is_refused_until_released(store: FeatureStore) -> None:
    with store.lock("a") as held:
        assert held.record["pid"] == os.getpid()
        with pytest.raises(LockedError, match=rf"'a' .*locked by pid {os.getpid()} on host {hostname()}"):
            store.lock("a")
        assert store.try_lock("a") is None
        assert [(lock["slide_id"], lock["stale"]) for lock in store.locks()] == [("a", False)]
    assert store.locks() == []
    lock = store.try_lock("a")
    assert lock is not None
    lock.release()


def write_lock(store: FeatureStore, slide_id: str, pid: int, host: str, started: datetime) -> Path:
    path = store.layout.lock(slide_id)
    path.write_text(json.dumps({"pid": pid, "host": host, "started": started.isoformat(), "token": "t"}))
    return path


def test_stale_locks_are_broken(store: FeatureStore) -> None:
    now = datetime.now(timezone.utc)
    write_lock(store, "dead", dead_pid(), hostname(), now)
    write_lock(store, "old", 1, "elsewhere", now - timedelta(days=2))
    write_lock(store, "live", 1, "elsewhere", now)
    assert {lock["slide_id"]: lock["stale"] for lock in store.locks()} == {"dead": True, "old": True, "live": False}
    with store.lock("dead"):
        pass
    with pytest.raises(LockedError, match="host elsewhere"):
        store.lock("live")
    assert store.clear_stale_locks() == ["old"]
    assert [lock["slide_id"] for lock in store.locks()] == ["live"]
    assert store.clear_locks(force=True) == ["live"] and store.locks() == []


def test_a_stale_lock_retaken_meanwhile_is_never_dropped(store: FeatureStore) -> None:
    """Issue 14 item 5: breaking by rename could drop a fresh lock taken in the rename window."""
    write_lock(store, "a", dead_pid(), hostname(), datetime.now(timezone.utc))
    files = store.backend.lock_files()
    judged_stale = files.read("a")
    assert is_stale(describe(judged_stale))
    with store.lock("a") as fresh:  # another breaker wins the race and takes the lock over
        assert files.replace("a", b"{}", judged_stale.tag) is None
        assert not files.remove("a", judged_stale.tag)
        assert fresh.held() and describe(files.read("a"))["token"] == fresh.token
        assert [p.name for p in store.layout.locks.iterdir()] == ["a.lock"]


def test_lease_on_another_host_expires_after_its_ttl_not_24h(tmp_path: Path) -> None:
    """Issue 14 item 5: a dead process's lock on another host was stale only after 24 h, whatever the user set."""
    store = FeatureStore.create(tmp_path / "s.zarr", identity(), lock_ttl_s=30)
    now = datetime.now(timezone.utc)
    path = write_lock(store, "gone", 4242, "other-host", now - timedelta(seconds=60))
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "expires": (now - timedelta(seconds=1)).timestamp(), "ttl": 30}))
    write_lock(store, "old-format", 4242, "other-host", now - timedelta(seconds=60))  # no expiry: age > TTL
    write_lock(store, "renewed", 4242, "other-host", now - timedelta(hours=2))
    record = json.loads(store.layout.lock("renewed").read_text())
    store.layout.lock("renewed").write_text(json.dumps({**record, "expires": now.timestamp() + 20}))
    assert {lock["slide_id"]: lock["stale"] for lock in store.locks()} == {
        "gone": True, "old-format": True, "renewed": False}
    with store.lock("gone"):
        pass
    with pytest.raises(LockedError, match="--clear-stale-locks"):
        store.lock("renewed")


def test_heartbeat_keeps_a_lease_alive_past_its_ttl(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s.zarr", identity(), lock_ttl_s=0.6)
    other = FeatureStore.open(tmp_path / "s.zarr", writable=True, lock_ttl_s=0.6)
    with store.lock("a") as held:
        time.sleep(1.5)
        assert held.held() and other.try_lock("a") is None
    assert other.try_lock("a") is not None


def race_for_locks(path: str, ids: list[str], barrier: mp.Barrier, results: mp.Queue) -> None:
    store = FeatureStore.open(path, writable=True)
    barrier.wait()
    held = [lock for slide_id in ids if (lock := store.try_lock(slide_id)) is not None]
    barrier.wait()  # hold every lock until both processes have tried all ids
    results.put([lock.slide_id for lock in held])


def test_two_processes_never_hold_the_same_lock(store: FeatureStore) -> None:
    ctx = mp.get_context("spawn")
    ids = [f"slide-{i}" for i in range(10)]
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=race_for_locks, args=(str(store.path), ids, barrier, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    won = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
    assert not set(won[0]) & set(won[1])
    assert sorted(won[0] + won[1]) == sorted(ids)


# --- failures, summary, check --------------------------------------------------------------------------------


def test_failures_manifest_round_trip_and_cleared_on_commit(store: FeatureStore) -> None:
    store.record_failure("a", Path("/data/a.svs"), "OpenSlide cannot open /data/a.svs.")
    store.record_failure("b", "/data/b.svs", "no tissue")
    failures = store.failures()
    assert set(failures) == {"a", "b"} and failures["a"]["source"] == "/data/a.svs"
    assert failures["b"]["message"] == "no tissue" and failures["b"]["pid"] == os.getpid()
    assert [p.name for p in sorted(store.layout.failures.iterdir())] == ["a.json", "b.json"]
    write_slide(store, "a")
    assert set(store.failures()) == {"b"}
    rows = {row["slide_id"]: row for row in store.summary()}
    assert rows["a"]["status"] == "complete" and rows["a"]["n_bags"] == 7 and rows["a"]["cells"] == f"{CELLS}x{CELLS}"
    assert rows["b"]["status"] == "failed" and rows["b"]["error"] == "no tissue"
    assert check_store(store.path) == [] and store_warnings(store.path) == ["slide 'b' failed: no tissue"]


def test_check_finds_nan_missing_array_and_stray_entries(store: FeatureStore) -> None:
    data = features(5)
    data["cell_emb"][3, 1, 0, 0] = np.nan
    data["patch_emb"][4, 0, 0] = np.inf
    writer = store.begin_slide("nan", 5, provenance())
    writer.write(0, **data)
    writer.commit()
    write_slide(store, "hole")
    shutil.rmtree(store.layout.slide("hole") / "patch_tissue")
    (store.layout.slides / "junk").mkdir()
    assert check_store(store.path) == ["slides/junk is not a committed slide group; delete it.",
                                       "slide 'hole': array patch_tissue is missing"]  # quick: no value reads
    defects = check_store(store.path, deep=True)
    assert "slide 'nan': cell_emb has 1 NaN/inf values (first in bag 3)" in defects
    assert "slide 'nan': patch_emb has 1 NaN/inf values (first in bag 4)" in defects
    assert "slide 'hole': array patch_tissue is missing" in defects
    assert "slides/junk is not a committed slide group; delete it." in defects
    assert len(defects) == 4


def test_check_finds_missing_chunk_and_bad_provenance(store: FeatureStore) -> None:
    write_slide(store, "a", n=3)
    group = store.layout.slide("a")
    (group / "cell_emb" / "c" / "0" / "0" / "0" / "0").unlink()  # the one cell chunk of these 3 bags
    chunk = group / "patch_emb" / "c" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    meta = json.loads((group / "zarr.json").read_text())
    del meta["attributes"]["fingerprint"]
    meta["attributes"]["identity"]["embed_dim"] = 16
    (group / "zarr.json").write_text(json.dumps(meta))
    defects = check_store(store.path, deep=True)
    assert "slide 'a': cell_emb lacks 1 of 1 chunks" in defects
    assert "slide 'a': provenance lacks fingerprint" in defects
    assert any("identity differs" in d and "embed_dim" in d for d in defects)
    assert any(d.startswith("slide 'a': patch_emb has an unreadable chunk") for d in defects)
    with pytest.raises(StoreError, match="damaged chunk"):
        store.slide("a").read_patches()


def test_creating_a_store_another_process_just_created_opens_it(tmp_path):
    """Two extractors starting on a new store: the one whose check came before the other's rename must not call
    the finished store 'not a feature store' (seen in CI as a race)."""
    from mrantool.store.backends.posix import PosixBackend

    attrs = {"schema_version": 1}
    PosixBackend(tmp_path / "s.zarr").create_root(attrs)  # the winner
    PosixBackend(tmp_path / "s.zarr").create_root(attrs)  # the loser: no error
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="exists and is not a feature store"):
        PosixBackend(tmp_path / "junk").create_root(attrs)
