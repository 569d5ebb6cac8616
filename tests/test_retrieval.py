"""Similar-patch retrieval: FAISS index build/save/load/add/search, slide exclusion, provenance checks."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from mrantool.errors import ConfigError, MrantoolError
from mrantool.retrieval.index import KINDS, EmbeddingIndex, check_compatible
from mrantool.retrieval.query import COLUMNS, result_rows, search_rows

DIM = 32
PER_SLIDE = 400
ENCODER = {"name": "resnet18", "weights": "random-init", "dim": DIM}
PROVENANCE = {"store": "cohort.zarr", "encoder": ENCODER, "geometry": {"bag_px": 1024, "mpp": 1.0}}


def cohort(
    n_slides: int, seed: int = 0, *, shared_types: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """Tight Gaussian clusters: one per slide (a vector's nearest neighbours are on its own slide), or, with
    `shared_types`, 8 tissue types common to all cohorts that every slide mixes."""
    rng = np.random.default_rng(seed)
    slide = np.repeat(np.arange(n_slides), PER_SLIDE)
    if shared_types:
        centres = np.random.default_rng(99).standard_normal((8, DIM))
        cluster = rng.integers(0, len(centres), size=len(slide))
    else:
        centres, cluster = rng.standard_normal((n_slides, DIM)), slide
    vectors = (centres[cluster] + 0.3 * rng.standard_normal((len(slide), DIM))).astype(np.float32)
    local = np.tile(np.arange(PER_SLIDE), n_slides)
    ids = {"slide": slide, "bag": local // 64, "patch": local % 64}
    return vectors, ids, [f"slide-{seed}-{i}" for i in range(n_slides)]


def build(
    kind: str, n_slides: int = 6, shared_types: bool = False, **params: object
) -> tuple[EmbeddingIndex, np.ndarray, dict[str, np.ndarray]]:
    vectors, ids, names = cohort(n_slides, shared_types=shared_types)
    index = EmbeddingIndex.build(vectors, ids, kind=kind, provenance=PROVENANCE, slide_names=names, **params)
    return index, vectors, ids


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """One OpenMP thread: HNSW builds are then deterministic (and nothing waits on busy cores)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module", params=KINDS)
def built(request: pytest.FixtureRequest) -> tuple[EmbeddingIndex, np.ndarray, dict[str, np.ndarray]]:
    return build(request.param)


def test_save_load_round_trip_gives_identical_results(built, tmp_path: Path) -> None:
    index, vectors, _ = built
    sims, rows = index.search(vectors[::37], 10)
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    sims2, rows2 = loaded.search(vectors[::37], 10)
    np.testing.assert_array_equal(rows2, rows)
    np.testing.assert_array_equal(sims2, sims)
    assert loaded.kind == index.kind and loaded.params == index.params and loaded.count == len(vectors)
    assert loaded.provenance == PROVENANCE and loaded.slide_names == index.slide_names
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert {"kind", "params", "dim", "count", "provenance", "created", "faiss_version"} <= set(meta)
    for npy in (tmp_path / "idx").glob("*.npy"):
        np.load(npy, allow_pickle=False)  # plain arrays, no pickle
    assert {p.name for p in (tmp_path / "idx").glob("*.npy")} == {
        "ids_slide.npy",
        "ids_bag.npy",
        "ids_patch.npy",
        "slide_names.npy",
    }


def test_nearest_neighbour_is_the_vector_itself(built) -> None:
    index, vectors, ids = built
    picks = np.arange(0, len(vectors), 23)
    sims, rows = index.search(vectors[picks], 5)
    np.testing.assert_array_equal(rows[:, 0], picks)
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-4)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)  # best first
    found = index.lookup(rows[:, 0])
    np.testing.assert_array_equal(found["patch"], ids["patch"][picks])
    assert found["slide_name"][0] == index.slide_names[ids["slide"][picks[0]]]


@pytest.mark.parametrize("kind", KINDS)
def test_add_new_slides_without_rebuild(kind: str, tmp_path: Path) -> None:
    index, _, _ = build(kind, n_slides=4, shared_types=True)
    new_vectors, new_ids, new_names = cohort(2, seed=1, shared_types=True)
    index.add(new_vectors, new_ids, new_names)
    assert index.count == 6 * PER_SLIDE and index.slide_names[4:] == new_names
    _, rows = index.search(new_vectors[::50], 3)
    np.testing.assert_array_equal(rows[:, 0], 4 * PER_SLIDE + np.arange(0, len(new_vectors), 50))
    assert set(index.lookup(rows[:, 0])["slide_name"]) == set(new_names)
    index.save(tmp_path / "grown")
    np.testing.assert_array_equal(EmbeddingIndex.load(tmp_path / "grown").search(new_vectors[::50], 3)[1], rows)
    with pytest.raises(MrantoolError, match="already in the index"):
        index.add(new_vectors, new_ids, new_names)


def test_exclude_same_slide_matches_brute_force_and_widens() -> None:
    index, vectors, ids = build("flat")
    picks = np.arange(5, len(vectors), 97)
    own = ids["slide"][picks]
    sims, rows = index.search(vectors[picks], 10, exclude_slides=own)
    assert (rows >= 0).all()  # all 10 found although the first ~400 neighbours are on the query's slide
    assert not (ids["slide"][rows] == own[:, None]).any()
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit[picks] @ unit.T
    scores[ids["slide"][None, :] == own[:, None]] = -np.inf
    np.testing.assert_allclose(sims, -np.sort(-scores, axis=1)[:, :10], atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_exclude_same_slide_approximate(kind: str) -> None:
    """Each slide is its own cluster, so hits from other slides lie far away (ivfpq must probe more lists)."""
    index, vectors, ids = build(kind)
    picks = np.arange(0, len(vectors), 101)
    own = ids["slide"][picks]
    _, rows = index.search(vectors[picks], 10, exclude_slides=own)
    assert (rows >= 0).all() and not (ids["slide"][rows] == own[:, None]).any()
    _, plain = index.search(vectors[picks], 10, exclude_slides=-1)
    assert (ids["slide"][plain] == own[:, None]).all()


def test_exclusion_pads_when_too_few_hits_remain() -> None:
    vectors, ids, names = cohort(2)
    index = EmbeddingIndex.build(
        vectors[:420], {k: v[:420] for k, v in ids.items()}, kind="flat", provenance=PROVENANCE, slide_names=names
    )
    sims, rows = index.search(vectors[:1], 30, exclude_slides=[0])
    assert (rows[0, :20] >= PER_SLIDE).all() and (rows[0, 20:] == -1).all() and np.isneginf(sims[0, 20:]).all()
    hits = search_rows(index, vectors[:1], 30, query_slides=[names[0]], exclude_same_slide=True)
    assert len(hits) == 20 and {h["slide"] for h in hits} == {names[1]}


def test_search_rows_columns_and_cells() -> None:
    vectors, ids, names = cohort(2)
    ids["cell"] = np.arange(len(vectors)) % 16
    index = EmbeddingIndex.build(vectors, ids, kind="flat", provenance=PROVENANCE, slide_names=names)
    hits = search_rows(index, vectors[[0, 500]], 3)
    assert [tuple(h) for h in hits] == [COLUMNS] * 6
    assert [(h["query"], h["rank"]) for h in hits] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert hits[0]["slide"] == names[0] and hits[0]["cell"] == 0 and hits[3]["cell"] == 500 % 16
    assert hits[3]["slide"] == names[1] and hits[3]["bag"] == (500 - PER_SLIDE) // 64
    assert abs(hits[0]["similarity"] - 1.0) < 1e-5
    assert result_rows(index, *index.search(vectors[:1], 2))[0]["patch"] == 0
    with pytest.raises(MrantoolError, match="query_slides"):
        search_rows(index, vectors[:2], 3, exclude_same_slide=True)


def test_check_compatible_names_both_encoders() -> None:
    check_compatible(PROVENANCE, dict(ENCODER))
    other = {**ENCODER, "name": "vit_small_patch16_224"}
    with pytest.raises(MrantoolError) as err:
        check_compatible(PROVENANCE, other)
    message = str(err.value)
    assert "built with resnet18" in message and "encoded with vit_small_patch16_224" in message
    assert "rebuild the index or use the matching store" in message
    with pytest.raises(MrantoolError, match="weights"):
        check_compatible(PROVENANCE, {**ENCODER, "weights": "0123abcd"})
    store_identity = {"encoder": "resnet18", "weights": "random-init", "geometry": {"bag_px": 1024}}
    with pytest.raises(MrantoolError, match=r"built with resnet18 \(geometry=.*encoded with resnet18 \(geometry="):
        check_compatible({"encoder": store_identity}, {**store_identity, "geometry": {"bag_px": 512}})
    with pytest.raises(MrantoolError, match="no encoder"):
        check_compatible({"store": "x"}, ENCODER)


def test_load_rejects_folders_that_are_not_indexes(built, tmp_path: Path) -> None:
    with pytest.raises(MrantoolError, match="not an mrantool index"):
        EmbeddingIndex.load(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "index.json").write_text("{not json")
    with pytest.raises(MrantoolError, match="not valid JSON"):
        EmbeddingIndex.load(tmp_path / "junk")
    index, _, _ = built
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    (tmp_path / "idx" / "index.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(MrantoolError, match="format version 99"):
        EmbeddingIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "columns"}))
    with pytest.raises(MrantoolError, match="lacks columns"):
        EmbeddingIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    (tmp_path / "idx" / "index.faiss").write_bytes(b"truncated")
    with pytest.raises(MrantoolError, match="damaged"):
        EmbeddingIndex.load(tmp_path / "idx")


def test_save_refuses_a_folder_that_is_not_an_index(tmp_path: Path) -> None:
    index, _, _ = build("flat", n_slides=1)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(MrantoolError, match="not an mrantool index"):
        index.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # replacing an index is fine
    assert EmbeddingIndex.load(tmp_path / "idx").count == PER_SLIDE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "notes"]


def test_search_params_are_validated_and_saved(tmp_path: Path) -> None:
    index, _, _ = build("hnsw", n_slides=1, ef_search=40)
    index.set_search_params(ef_search=64)
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert loaded.params["ef_search"] == 64 and loaded.faiss_index.hnsw.efSearch == 64
    with pytest.raises(ConfigError, match="nprobe"):
        loaded.set_search_params(nprobe=4)
    ivf, _, _ = build("ivfpq", n_slides=2, nprobe=3, k_factor=2)
    ivf.save(tmp_path / "ivf")
    loaded = EmbeddingIndex.load(tmp_path / "ivf")
    assert loaded.faiss_index.k_factor == 2 and loaded.params["nprobe"] == 3


def test_bad_inputs_raise_clear_errors() -> None:
    vectors, ids, names = cohort(1)
    kw = {"provenance": PROVENANCE, "slide_names": names}
    with pytest.raises(ConfigError, match="Unknown index kind"):
        EmbeddingIndex.build(vectors, ids, kind="lsh", **kw)
    with pytest.raises(ConfigError, match="ef_serch"):
        EmbeddingIndex.build(vectors, ids, kind="hnsw", ef_serch=10, **kw)
    with pytest.raises(ConfigError, match="does not divide"):
        EmbeddingIndex.build(vectors, ids, kind="ivfpq", m=5, **kw)
    with pytest.raises(ConfigError, match="at least 256 training vectors"):
        EmbeddingIndex.build(vectors[:100], {k: v[:100] for k, v in ids.items()}, kind="ivfpq", **kw)
    bad = vectors.copy()
    bad[3, 0] = np.nan
    with pytest.raises(MrantoolError, match="NaN"):
        EmbeddingIndex.build(bad, ids, kind="flat", **kw)
    with pytest.raises(MrantoolError, match="Slide codes"):
        EmbeddingIndex.build(vectors, {**ids, "slide": ids["slide"] + 1}, kind="flat", **kw)
    with pytest.raises(MrantoolError, match="Id column 'bag'"):
        EmbeddingIndex.build(vectors, {**ids, "bag": ids["bag"][:-1]}, kind="flat", **kw)
    with pytest.raises(MrantoolError, match="encoder"):
        EmbeddingIndex.build(vectors, ids, kind="flat", provenance={}, slide_names=names)
    index = EmbeddingIndex.build(vectors.astype(np.float16), ids, kind="flat", **kw)
    with pytest.raises(MrantoolError, match="dimensions"):
        index.search(np.ones((1, DIM + 1), dtype=np.float32), 5)
    with pytest.raises(MrantoolError, match="one slide code per query"):
        index.search(vectors[:3], 5, exclude_slides=[0, 0])
    with pytest.raises(MrantoolError, match="Rows must lie"):
        index.lookup(np.array([-1]))


def test_save_killed_between_its_two_renames_keeps_an_index(tmp_path: Path, monkeypatch) -> None:
    """`index add` saves by renaming the old folder aside, then the new one in; killed in between, the old index
    used to be gone. Now `load` finds the old one, and the next save cleans up."""
    grown = build("flat", n_slides=4)[0]
    grown.save(tmp_path / "idx")
    grown.add(*cohort(2, seed=1))
    real_rename = Path.rename
    calls = []

    def killed_on_second(self: Path, target):
        calls.append(self)
        if len(calls) == 2:
            raise KeyboardInterrupt  # SIGINT between the renames
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        grown.save(tmp_path / "idx")
    monkeypatch.undo()
    assert not (tmp_path / "idx").exists()
    assert EmbeddingIndex.load(tmp_path / "idx").count == 4 * PER_SLIDE  # the index before the add
    grown.save(tmp_path / "idx")
    assert EmbeddingIndex.load(tmp_path / "idx").count == 6 * PER_SLIDE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
