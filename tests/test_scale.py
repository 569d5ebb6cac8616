"""Beyond one machine, tested on this one: a local Ray cluster (2 CPUs) and a local S3 server (moto).

No mocks of the parts under test: real Ray actors and tasks, real HTTP requests to an S3 implementation, real
slides read through OpenSlide. Stores written by Ray or onto S3 must pass `check` and equal the arrays of a plain
local run.
"""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.config import ExtractConfig
from mrantool.extract.api import extract
from mrantool.store import FeatureStore, check_store
from tests.conftest import tissue_image
from tests.test_sweep import BASE, write_store

TINY = {"preset": "tiny", "workers": 0, "batch_size": 16, "device": "cpu"}
CLI_TINY = ["--preset", "tiny", "--workers", "0", "--batch-size", "16", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Three generated slides (4 bags each with the tiny preset)."""
    from mrantool.slides.writer import write_pyramid_tiff

    folder = tmp_path_factory.mktemp("cohort")
    for i in range(3):
        write_pyramid_tiff(folder / f"slide-{i}.tif", tissue_image(2048, seed=i), mpp=0.5)
    return folder


@pytest.fixture(scope="module")
def local_store(cohort: Path, tmp_path_factory) -> Path:
    """The reference: the cohort extracted by the local executor into a local store."""
    store = tmp_path_factory.mktemp("ref") / "local.zarr"
    report = extract(ExtractConfig(slides=[str(cohort)], store=str(store), **TINY))
    assert [r.status for r in report.results] == ["done"] * 3
    return store


def bucket(name: str) -> str:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    if not fs.exists(name):
        fs.mkdir(name)
    return name


def assert_same_arrays(store: str | Path, reference: Path) -> None:
    a, b = FeatureStore.open(store), FeatureStore.open(reference)
    assert a.slide_ids() == b.slide_ids()
    for slide_id in b.slide_ids():
        x, y = a.slide(slide_id), b.slide(slide_id)
        for name in ("coords", "patch_tissue", "patch_emb", "cell_emb", "cell_tissue"):
            np.testing.assert_array_equal(getattr(x, name)[:], getattr(y, name)[:], err_msg=f"{slide_id} {name}")


def test_ray_extract_survives_a_killed_actor_and_equals_local(cohort: Path, local_store: Path, ray_cluster: str,
                                                              tmp_path: Path) -> None:
    store = tmp_path / "ray.zarr"
    killed: list[int] = []

    def kill_an_encoder_mid_slide() -> None:  # kill -9 the actor process that is writing a slide
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for attempt in (store / "staging").glob("*.*.*.*") if (store / "staging").is_dir() else []:
                pid = int(attempt.name.rsplit(".", 2)[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.01)

    threading.Thread(target=kill_an_encoder_mid_slide, daemon=True).start()
    report = extract(ExtractConfig(slides=[str(cohort)], store=str(store), executor="ray", address=ray_cluster,
                                   **TINY))
    assert killed, "no actor was killed: the test did not exercise the retry"
    assert sorted((r.slide_id, r.status) for r in report.results) == [(f"slide-{i}", "done") for i in range(3)]
    assert check_store(store) == [] and not any((store / "staging").iterdir())
    assert_same_arrays(store, local_store)


def test_ray_reports_a_bad_slide_in_one_sentence_like_local(ray_cluster: str, tmp_path: Path) -> None:
    """A slide error raised in a Ray task reached the report with Ray's traceback banner around it."""
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a slide at all")
    local = extract(ExtractConfig(slides=[str(bad)], store=str(tmp_path / "l.zarr"), **TINY))
    on_ray = extract(ExtractConfig(slides=[str(bad)], store=str(tmp_path / "r.zarr"), executor="ray",
                                   address=ray_cluster, **TINY))
    assert [(r.status, r.message) for r in on_ray.results] == [(r.status, r.message) for r in local.results]
    assert on_ray.results[0].status == "failed" and "Traceback" not in on_ray.results[0].message


def test_store_and_slides_on_s3_through_the_cli(cohort: Path, local_store: Path, s3_server: str,
                                                tmp_path: Path) -> None:
    fs = fsspec.filesystem("s3")
    bucket("lab")
    for path in sorted(cohort.glob("*.tif")):
        fs.put_file(str(path), f"lab/slides/{path.name}")
    store = "s3://lab/cohort.zarr"
    runner = CliRunner()
    result = runner.invoke(app, ["extract", "s3://lab/slides/", "--store", store, *CLI_TINY])
    assert result.exit_code == 0, result.output
    assert [line.split(":")[1].split()[0] for line in result.output.splitlines() if line.startswith("slide-")] \
        == ["done"] * 3
    result = runner.invoke(app, ["check", store])
    assert result.exit_code == 0 and "ok (3 complete slides;" in result.output, result.output
    assert_same_arrays(store, local_store)
    assert FeatureStore.open(store).provenance("slide-0")["source"] == "s3://lab/slides/slide-0.tif"
    result = runner.invoke(app, ["extract", "s3://lab/slides/", "--store", store, *CLI_TINY])  # resume
    assert result.exit_code == 0 and "0 done, 3 already complete" in result.output, result.output
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nslide-0,a\nslide-1,b\nslide-2,a\n")
    result = runner.invoke(app, ["index", "build", "--store", store, "--out", str(tmp_path / "index"),
                                 "--kind", "flat"])
    assert result.exit_code == 0 and "of 3 slides" in result.output, result.output


def test_object_store_commit_marker_locks_and_leftovers(s3_server: str) -> None:
    """No rename on S3: a slide is visible only once its commit marker exists; half-written attempts are invisible
    and cleaned when the slide is locked again; lock objects use conditional writes."""
    from tests.test_store import features, identity, provenance

    bucket("proto")
    store = FeatureStore.create("s3://proto/s.zarr", identity(), lock_ttl_s=30)
    data = features(5)
    with store.lock("a") as held:
        writer = store.begin_slide("a", 5, provenance(), lock=held)
        writer.write(0, data["coords"], data["patch_tissue"], data["patch_emb"], data["cell_emb"])
        assert store.slide_ids() == [] and not store.is_complete("a")  # arrays written, no marker yet
        assert check_store("s3://proto/s.zarr") == []
        other = FeatureStore.open("s3://proto/s.zarr", writable=True)
        assert other.try_lock("a") is None  # conditional create refused: the lock object exists
        # the process dies here: no commit, lock left behind
    assert [name for name, _ in store.leftovers()] == [writer.location.split("s.zarr/")[1]]
    with store.lock("a") as held:  # taking the lock removes the dead attempt
        assert store.leftovers() == []
        writer = store.begin_slide("a", 5, provenance(), lock=held)
        writer.write(0, data["coords"], data["patch_tissue"], data["patch_emb"], data["cell_emb"])
        writer.commit()
    assert store.slide_ids() == ["a"] and check_store("s3://proto/s.zarr") == []
    np.testing.assert_array_equal(store.slide("a").patch_emb[:], data["patch_emb"].astype(np.float16))


def test_leases_across_two_hosts(ray_cluster: str, s3_server: str) -> None:
    """Two Ray worker processes with different host names share an S3 store: the heartbeat keeps a lease past its
    TTL; once its host dies, the other host takes the slide over only after the lease expires."""
    import ray

    bucket("hosts")
    from tests.test_store import identity

    FeatureStore.create("s3://hosts/s.zarr", identity())

    class Host:
        def __init__(self, name: str) -> None:
            os.environ["MRANTOOL_HOSTNAME"] = name
            self.store = FeatureStore.open("s3://hosts/s.zarr", writable=True, lock_ttl_s=3)
            self.held = None

        def lock(self) -> bool:
            self.held = self.store.try_lock("x")
            return self.held is not None

    ray.init(address=ray_cluster, log_to_driver=False)
    try:
        host = ray.remote(num_cpus=0)(Host)
        a, b = host.remote("host-a"), host.remote("host-b")
        assert ray.get(a.lock.remote())
        time.sleep(4.5)  # longer than the TTL: only the heartbeat keeps A's lease alive
        assert not ray.get(b.lock.remote())
        ray.kill(a)  # host A dies without releasing
        died = time.time()
        assert not ray.get(b.lock.remote())  # B cannot see A's pid: it must wait for the lease to expire
        while not ray.get(b.lock.remote()):
            assert time.time() - died < 15, "the lease of a dead host never expired"
            time.sleep(0.3)
        assert time.time() - died >= 1.0
    finally:
        ray.shutdown()


def test_ray_sweep_on_an_s3_store_equals_the_local_sweep(ray_cluster: str, s3_server: str, tmp_path: Path) -> None:
    bucket("sweep")
    store = "s3://sweep/features.zarr"
    write_store(store)  # type: ignore[arg-type]
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"s{i:02d},{'tumour' if i % 2 else 'normal'}\n"
                                                   for i in range(12)))
    spec = tmp_path / "sweep.toml"
    spec.write_text(BASE.format(store=store, labels=labels) + 'threads = 1\n[grid]\nmodel = ["mean", "abmil"]\n')
    runner = CliRunner()
    local = runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    on_ray = runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "ray"), "--executor", "ray",
                                 "--address", ray_cluster, "--cpus-per-run", "1"])
    assert on_ray.exit_code == 0 and "2 ran" in on_ray.output, on_ray.output
    again = runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "ray"), "--executor", "ray",
                                "--address", ray_cluster])
    assert again.exit_code == 0 and "0 ran, 2 already finished" in again.output, again.output

    def rows(folder: str) -> list[dict]:
        with (tmp_path / folder / "results.csv").open(newline="") as fh:
            return sorted(csv.DictReader(fh), key=lambda r: (r["hash"], r["repeat"], r["fold"]))

    assert rows("local") == rows("ray")


def test_slide_cache_checks_etag_evicts_lru_and_refuses_what_cannot_fit(s3_server: str, tmp_path: Path) -> None:
    from mrantool.errors import SlideError
    from mrantool.slides.cache import TEMP_PREFIX, SlideCache

    fs = fsspec.filesystem("s3")
    bucket("cache")
    for name, fill in (("a.tif", b"a"), ("b.tif", b"b")):
        fs.pipe_file(f"cache/{name}", fill * 600_000)
    cache = SlideCache(tmp_path / "cache", max_gb=0.001)  # room for one 0.6 MB slide
    a = cache.fetch("s3://cache/a.tif")
    assert a.read_bytes()[:1] == b"a" and a.stat().st_size == 600_000
    assert cache.fetch("s3://cache/a.tif") == a  # cached: same file, not copied again
    cache.fetch("s3://cache/b.tif")
    assert not a.exists() and len(cache.entries()) == 1  # least recently used evicted to stay under the budget
    fs.pipe_file("cache/b.tif", b"c" * 600_000)  # the slide changed: new ETag
    fs.invalidate_cache()
    assert cache.fetch("s3://cache/b.tif").read_bytes()[:1] == b"c"
    fs.pipe_file("cache/big.tif", b"x" * 1_500_000)
    with pytest.raises(SlideError, match="raise --cache-gb"):
        cache.fetch("s3://cache/big.tif")
    stale = a.parent / f"{TEMP_PREFIX}dead"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    assert cache.clean() == 1 and not stale.exists()


def test_slides_over_http_are_read_through_the_cache(cohort: Path, tmp_path: Path) -> None:
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(cohort)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/slide-0.tif"
        report = extract(ExtractConfig(slides=[url], store=str(tmp_path / "s.zarr"), cache_dir=str(tmp_path / "c"),
                                       **TINY))
        assert [(r.slide_id, r.status) for r in report.results] == [("slide-0", "done")]
        reference = extract(ExtractConfig(slides=[str(cohort / "slide-0.tif")], store=str(tmp_path / "l.zarr"),
                                          **TINY))
        assert reference.results[0].status == "done"
        assert_same_arrays(tmp_path / "s.zarr", tmp_path / "l.zarr")
        assert FeatureStore.open(tmp_path / "s.zarr").provenance("slide-0")["source"] == url
    finally:
        server.shutdown()


def test_damaged_slides_on_s3_are_named_redone_and_repaired(cohort: Path, s3_server: str) -> None:
    """The quick health check works on object storage too: a lost chunk of a committed attempt is a defect that
    `check` names, `extract` redoes, and `check --repair` takes out (marker first) so that extract redoes it."""
    fs = fsspec.filesystem("s3")
    bucket("damage")
    store, runner = "s3://damage/s.zarr", CliRunner()

    def lose_a_chunk(slide_id: str) -> None:
        fs.invalidate_cache()
        chunks = [key for key in fs.find(f"damage/s.zarr/slides/{slide_id}/") if "/patch_emb/c/" in key]
        fs.rm_file(chunks[0])
        fs.invalidate_cache()

    assert runner.invoke(app, ["extract", str(cohort), "--store", store, *CLI_TINY]).exit_code == 0
    lose_a_chunk("slide-1")
    checked = runner.invoke(app, ["check", store])
    assert checked.exit_code == 1 and "slide 'slide-1': patch_emb lacks 1 of" in checked.output, checked.output
    redone = runner.invoke(app, ["extract", str(cohort), "--store", store, *CLI_TINY])
    assert redone.exit_code == 0 and "1 done, 2 already complete" in redone.output, redone.output
    assert check_store(store) == []
    lose_a_chunk("slide-2")
    repaired = runner.invoke(app, ["check", store, "--repair"])
    assert repaired.exit_code == 0 and "repaired: took 'slide-2' out of the store" in repaired.output, \
        repaired.output
    after = FeatureStore.open(store)
    assert after.slide_ids() == ["slide-0", "slide-1"] and "removed by" in after.failures()["slide-2"]["message"]
    assert not fs.exists("damage/s.zarr/commits/slide-2.json")


def test_a_ray_encoder_actor_that_cannot_write_the_store_stops_the_run(monkeypatch, tmp_path: Path) -> None:
    """A full disk under a Ray actor's writer becomes the same one sentence as locally (the driver stops on it),
    not one failed slide after another. The actor class runs here in-process; Ray only ships its errors."""
    import errno

    import zarr.storage._local as local

    from mrantool.errors import FileSystemError
    from mrantool.extract.executors.ray import EncoderActor, EncoderSpec
    from mrantool.tiling.presets import get_preset
    from tests.test_store import identity, provenance

    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path, identity())
    actor = EncoderActor(str(path), 60.0, EncoderSpec(get_preset("tiny"), None, False, None, "cpu"))

    def full_disk(where, value, exclusive=False):
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(local, "_put", full_disk)
    with store.lock("a") as held, pytest.raises(FileSystemError, match=rf"Cannot write to store {path}: the disk is "
                                                                          "full"):
        actor.begin("a", 3, provenance(), held.record)
    assert not any((path / "staging").iterdir())  # no half-made attempt left behind
