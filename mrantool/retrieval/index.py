"""A FAISS index of embeddings with an id map back to (slide, bag, patch[, cell]); cosine similarity.

Vectors are L2-normalised and searched with the inner-product metric, so scores are cosine similarities.
Row `i` of the FAISS index is row `i` of every id column; slide codes index `slide_names`.
On disk (`save`/`load`): `index.faiss` (faiss.write_index), `ids_<column>.npy` (int64), `slide_names.npy`
(unicode) and `index.json` (kind, params, dim, count, provenance, created time, faiss version), written last.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from mrantool.errors import ConfigError, MrantoolError

FORMAT = "mrantool-embedding-index"
FORMAT_VERSION = 1
KINDS = ("flat", "hnsw", "hnsw-sq8", "ivfpq")
REQUIRED_COLUMNS = ("slide", "bag", "patch")
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
NAMES_FILE = "slide_names.npy"
OLD_PREFIX = ".{name}.old-"  # where `save` sets the previous index aside while renaming the new one in

# Build parameters (None: derived from the data) and which of them can change after the build.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"M": 32, "ef_construction": 80, "ef_search": 128},
    "hnsw-sq8": {"M": 32, "ef_construction": 80, "ef_search": 64, "k_factor": 4, "train_size": 100_000, "seed": 0},
    "ivfpq": {"nlist": None, "m": None, "nbits": 8, "train_size": None, "seed": 0, "nprobe": 16, "k_factor": 8},
}
SEARCH_PARAMS = {"flat": (), "hnsw": ("ef_search",), "hnsw-sq8": ("ef_search", "k_factor"),
                 "ivfpq": ("nprobe", "k_factor")}
_COLUMN_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# faiss uses its matrix-multiply (BLAS) path for exact search only when n_queries * dim >= this threshold
# (128000 in faiss 1.15: 250 queries of 512-d). From ~16 queries of 512-d on, BLAS is several times faster
# (2 vs 20 ms/query over 200k vectors in a batch of 100); below that its fixed cost loses to the direct scan.
faiss.cvar.distance_compute_blas_threshold = 8192


class EmbeddingIndex:
    """Cosine-similarity search over patch/cell embeddings; use `build` or `load`, not the constructor."""

    def __init__(
        self,
        index: faiss.Index,
        kind: str,
        params: dict[str, Any],
        ids: dict[str, np.ndarray],
        slide_names: list[str],
        provenance: dict[str, Any],
        created: str,
    ) -> None:
        self._index = index
        self.kind = kind
        self._params = params
        self._ids = ids
        self._names = np.asarray(slide_names, dtype=str)
        self.provenance = provenance
        self.created = created
        self._apply_search_params()

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: Mapping[str, np.ndarray],
        *,
        kind: str = "hnsw",
        provenance: Mapping[str, Any],
        slide_names: Sequence[str],
        **params: Any,
    ) -> EmbeddingIndex:
        """Index `vectors (N, D)`; `ids` holds N-long integer columns (slide codes into `slide_names`, bag, patch...).

        `provenance` must contain "encoder" (the store's encoder identity) and is saved with the index.
        `params` override `DEFAULT_PARAMS[kind]`.
        """
        if kind not in KINDS:
            raise ConfigError(f"Unknown index kind {kind!r}; use one of {', '.join(KINDS)}.")
        recorded = _jsonable_provenance(provenance)
        x = _normalised(vectors)
        names = _check_names(slide_names, existing=())
        columns = _check_ids(ids, len(x), len(names), columns=None)
        resolved = _resolve_params(kind, len(x), x.shape[1], params)
        index = _new_faiss_index(kind, x, resolved)
        index.add(x)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(index, kind, resolved, columns, names, recorded, created)

    @classmethod
    def load(cls, directory: str | Path) -> EmbeddingIndex:
        """Open an index folder written by `save` (or, when a save was killed between its two renames, the
        previous index it had set aside)."""
        folder = _recover(Path(directory))
        meta = _read_meta(folder)
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
            columns = {c: np.load(folder / f"ids_{c}.npy", allow_pickle=False) for c in meta["columns"]}
            names = np.load(folder / NAMES_FILE, allow_pickle=False).tolist()
        except (OSError, RuntimeError, ValueError) as exc:
            raise MrantoolError(
                f"The index in {folder} is damaged or incomplete ({exc}); rebuild it with `mrantool index build`."
            ) from exc
        lengths = {len(v) for v in columns.values()} | {index.ntotal, meta["count"]}
        if len(lengths) != 1 or index.d != meta["dim"]:
            raise MrantoolError(
                f"The index in {folder} has id map and vectors of different sizes; rebuild it with "
                "`mrantool index build`."
            )
        return cls(index, meta["kind"], meta["params"], columns, names, meta["provenance"], meta["created"])

    def save(self, directory: str | Path) -> None:
        """Write the index folder (replacing an older index there) via a temporary folder and a rename."""
        out = Path(directory)
        if out.exists() and not (out / META_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
            raise MrantoolError(f"{out} exists and is not an mrantool index; choose a new or empty folder.")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        faiss.write_index(self._index, str(tmp / INDEX_FILE))
        for column, values in self._ids.items():
            np.save(tmp / f"ids_{column}.npy", values, allow_pickle=False)
        np.save(tmp / NAMES_FILE, self._names, allow_pickle=False)
        (tmp / META_FILE).write_text(json.dumps(self.metadata(), indent=2))
        if out.exists():  # killed between these two renames, `load` finds the old index set aside
            old = out.with_name(f"{OLD_PREFIX.format(name=out.name)}{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
        else:
            tmp.rename(out)
        for leftover in out.parent.glob(f"{OLD_PREFIX.format(name=out.name)}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self._ids)

    @property
    def slide_names(self) -> list[str]:
        return self._names.tolist()

    @property
    def faiss_index(self) -> faiss.Index:
        """The underlying FAISS index (for size and timing measurements)."""
        return self._index

    def metadata(self) -> dict[str, Any]:
        """What `index.json` holds."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "metric": "cosine",
            "params": self._params,
            "dim": self.dim,
            "count": self.count,
            "n_slides": len(self._names),
            "columns": list(self._ids),
            "provenance": self.provenance,
            "created": self.created,
            "faiss_version": faiss.__version__,
        }

    def slide_codes(self, names: Sequence[str]) -> np.ndarray:
        """Codes of slide names in this index (-1 for a name the index does not hold)."""
        position = {name: code for code, name in enumerate(self._names.tolist())}
        return np.array([position.get(name, -1) for name in names], dtype=np.int64)

    def set_search_params(self, **params: int) -> None:
        """Change search-time parameters: `ef_search` (hnsw); `ef_search`, `k_factor` (hnsw-sq8); `nprobe`,
        `k_factor` (ivfpq)."""
        allowed = SEARCH_PARAMS[self.kind]
        for name, value in params.items():
            if name not in allowed:
                raise ConfigError(
                    f"{name!r} is not a search parameter of a {self.kind} index; use "
                    f"{', '.join(allowed) or 'none (exact search)'}."
                )
            self._params[name] = _positive_int(name, value)
        self._apply_search_params()

    # ------------------------------------------------------------------ growth and search

    def add(self, vectors: np.ndarray, ids: Mapping[str, np.ndarray], slide_names: Sequence[str]) -> None:
        """Append newly extracted slides without rebuilding; `ids["slide"]` codes index the new `slide_names`."""
        x = _normalised(vectors, dim=self.dim)
        names = _check_names(slide_names, existing=self._names.tolist())
        columns = _check_ids(ids, len(x), len(names), columns=tuple(self._ids))
        columns["slide"] = columns["slide"] + len(self._names)
        self._index.add(x)
        self._ids = {c: np.concatenate([self._ids[c], columns[c]]) for c in self._ids}
        self._names = np.concatenate([self._names, np.asarray(names, dtype=str)])

    def search(
        self, queries: np.ndarray, k: int, *, exclude_slides: np.ndarray | Sequence[int] | int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k cosine similarities and rows, `(Q, k)` each, best first; missing hits are row -1, -inf.

        `exclude_slides` gives per query a slide code whose rows are skipped (-1: none), e.g. the query's
        own slide; the search then asks FAISS for more than k and widens until k hits remain.
        """
        q = _normalised(np.atleast_2d(queries), dim=self.dim)
        k = _positive_int("k", k)
        if exclude_slides is None:
            sims, rows = self._faiss_search(q, min(k, self.count))
            return _pad(sims, rows, k)
        try:
            excluded = np.broadcast_to(np.asarray(exclude_slides, dtype=np.int64), (len(q),))
        except ValueError as exc:
            raise MrantoolError(
                f"exclude_slides needs one slide code per query ({len(q)}); pass -1 where nothing is excluded."
            ) from exc
        out_sims = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_rows = np.full((len(q), k), -1, dtype=np.int64)
        pending = np.arange(len(q))
        fetch, widen = min(self.count, k + max(k, 16)), 1
        while pending.size:
            sims, rows = self._faiss_search(q[pending], fetch, widen)
            slide = np.where(rows >= 0, self._ids["slide"][np.maximum(rows, 0)], -1)
            keep = (rows >= 0) & (slide != excluded[pending, None])
            exhausted = fetch >= self.count and self._probes(widen) >= self._probes(widen * 4)
            done = (keep.sum(axis=1) >= k) | exhausted
            order = np.argsort(~keep[done], axis=1, kind="stable")[:, :k]
            kept = np.take_along_axis(keep[done], order, axis=1)
            width = order.shape[1]
            out_sims[pending[done], :width] = np.where(kept, np.take_along_axis(sims[done], order, axis=1), -np.inf)
            out_rows[pending[done], :width] = np.where(kept, np.take_along_axis(rows[done], order, axis=1), -1)
            pending = pending[~done]
            fetch, widen = min(self.count, fetch * 4), widen * 4
        return out_sims, out_rows

    def lookup(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Id columns and `slide_name` of index rows (any shape; every row must exist)."""
        r = np.asarray(rows, dtype=np.int64)
        if r.size and (r.min() < 0 or r.max() >= self.count):
            raise MrantoolError(
                f"Rows must lie in [0, {self.count}) for this index; drop the -1 padding of search results first."
            )
        found = {column: values[r] for column, values in self._ids.items()}
        found["slide_name"] = self._names[found["slide"]]
        return found

    def _probes(self, widen: int) -> int:
        """IVF lists an ivfpq search visits when widened `widen` times (0 for other kinds)."""
        if self.kind != "ivfpq":
            return 0
        return min(self._params["nlist"], self._params["nprobe"] * widen)

    def _faiss_search(self, q: np.ndarray, k: int, widen: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search, probing `widen` times more IVF lists (ivfpq). One query runs on one OpenMP thread
        unless exact: there is nothing to split, and the refine step's unconditional parallel region costs
        milliseconds when the cores are busy."""
        params = None
        if self.kind == "ivfpq" and widen > 1:
            ivf_params = faiss.SearchParametersIVF(nprobe=self._probes(widen))  # referenced until the search ends
            params = faiss.IndexRefineSearchParameters(
                k_factor=float(self._params["k_factor"]), base_index_params=ivf_params
            )
        if len(q) > 1 or self.kind == "flat":
            return self._index.search(q, k, params=params)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self._index.search(q, k, params=params)
        finally:
            faiss.omp_set_num_threads(threads)

    def _apply_search_params(self) -> None:
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = int(self._params["ef_search"])
        elif self.kind == "hnsw-sq8":
            self._index.k_factor = float(self._params["k_factor"])
            faiss.downcast_index(self._index.base_index).hnsw.efSearch = int(self._params["ef_search"])
        elif self.kind == "ivfpq":
            self._index.k_factor = float(self._params["k_factor"])
            faiss.extract_index_ivf(self._index).nprobe = int(self._params["nprobe"])


def check_compatible(index_provenance: Mapping[str, Any], encoder_identity: Mapping[str, Any]) -> None:
    """Raise `MrantoolError` naming both encoders unless the index was built with `encoder_identity`."""
    built = index_provenance.get("encoder")
    if built is None:
        raise MrantoolError("This index records no encoder in its provenance; rebuild it with `mrantool index build`.")
    built, used = _canonical(built), _canonical(encoder_identity)
    if built != used:
        raise MrantoolError(
            f"This index was built with {_describe(built, used)}; the query was encoded with "
            f"{_describe(used, built)}; rebuild the index or use the matching store."
        )


# ---------------------------------------------------------------------- helpers


def _normalised(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    """A float32 C-contiguous copy with unit rows (zero rows stay zero)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise MrantoolError(f"Vectors must be a non-empty (N, D) array, got shape {x.shape}; pass one row per item.")
    if dim is not None and x.shape[1] != dim:
        raise MrantoolError(
            f"Vectors have {x.shape[1]} dimensions but the index has {dim}; use embeddings from the same encoder."
        )
    faiss.normalize_L2(x)
    if not np.isfinite(x.sum(axis=1)).all():  # a NaN or inf anywhere makes its unit row NaN
        raise MrantoolError("Vectors contain NaN or infinite values; re-extract the affected slides.")
    return x


def _check_names(names: Sequence[str], existing: Sequence[str]) -> list[str]:
    new = [str(n) for n in names]
    if len(set(new)) != len(new):
        raise MrantoolError("Slide names repeat; pass each slide once.")
    present = sorted(set(new) & set(existing))
    if present:
        raise MrantoolError(
            f"Slides already in the index: {', '.join(present[:5])}; add only new slides or rebuild the index."
        )
    return new


def _check_ids(
    ids: Mapping[str, np.ndarray], n: int, n_slides: int, columns: tuple[str, ...] | None
) -> dict[str, np.ndarray]:
    """int64 copies of the id columns after checking names, lengths and slide codes."""
    missing = [c for c in (columns or REQUIRED_COLUMNS) if c not in ids]
    extra = [c for c in ids if columns is not None and c not in columns]
    if missing or extra:
        raise MrantoolError(
            f"Id columns {sorted(ids)} do not match the required {list(columns or REQUIRED_COLUMNS)}; "
            "pass exactly those columns."
        )
    out: dict[str, np.ndarray] = {}
    for name, values in ids.items():
        arr = np.asarray(values)
        if not _COLUMN_NAME.match(name) or arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
            raise MrantoolError(
                f"Id column {name!r} must be named in lower case and hold {n} integers, one per vector; "
                f"got {arr.dtype} {arr.shape}."
            )
        out[name] = arr.astype(np.int64)
    codes = out["slide"]
    if codes.min() < 0 or codes.max() >= n_slides:
        raise MrantoolError(f"Slide codes must lie in [0, {n_slides}) to index the slide names; fix ids['slide'].")
    return out


def _resolve_params(kind: str, n: int, dim: int, params: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, then overrides, then data-derived values (ivfpq: nlist ~ 4 sqrt(N), m | D, training sample)."""
    defaults = DEFAULT_PARAMS[kind]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(
            f"Unknown {kind} index parameter(s) {', '.join(unknown)}; use {', '.join(defaults) or 'none'}."
        )
    out = {**defaults, **params}
    if kind == "ivfpq":
        if out["nlist"] is None:
            out["nlist"] = max(1, round(4 * math.sqrt(n)))
        if out["m"] is None:
            out["m"] = max(m for m in range(1, min(64, max(1, dim // 4)) + 1) if dim % m == 0)  # >= 4 dims each
        if out["train_size"] is None:
            out["train_size"] = max(40 * out["nlist"], 10_000)
    out = {name: _positive_int(name, value, minimum=0 if name == "seed" else 1) for name, value in out.items()}
    if kind == "hnsw-sq8":
        out["train_size"] = min(n, out["train_size"])
    if kind == "ivfpq":
        if dim % out["m"]:
            raise ConfigError(f"ivfpq m={out['m']} does not divide the dimension {dim}; choose a divisor of {dim}.")
        out["train_size"] = min(n, out["train_size"])
        needed = max(out["nlist"], 2 ** out["nbits"])
        if out["train_size"] < needed:
            raise ConfigError(
                f"An ivfpq index needs at least {needed} training vectors but has {out['train_size']}; "
                "use kind 'flat' or 'hnsw' for small collections."
            )
    return out


def _new_faiss_index(kind: str, x: np.ndarray, params: Mapping[str, Any]) -> faiss.Index:
    """An empty (trained, for ivfpq) FAISS index for unit vectors and the inner-product metric."""
    dim = x.shape[1]
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        return index
    if kind == "hnsw-sq8":  # the graph walks 8-bit codes (a quarter of the bytes); exact re-ranking on top
        hnsw = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, params["M"], faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = params["ef_construction"]
        index = faiss.IndexRefineFlat(hnsw)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"],
                               faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexRefineFlat(ivf)
    rng = np.random.default_rng(params["seed"])
    sample = np.sort(rng.choice(len(x), size=min(len(x), params["train_size"]), replace=False))
    index.train(x[sample])
    return index


def _pad(sims: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen FAISS results to k columns (when the index holds fewer than k rows)."""
    missing = k - rows.shape[1]
    sims = np.pad(sims, ((0, 0), (0, missing)), constant_values=-np.inf)
    rows = np.pad(rows, ((0, 0), (0, missing)), constant_values=-1)
    sims[rows < 0] = -np.inf
    return sims, rows


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"Index parameter {name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _jsonable_provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    if "encoder" not in provenance:
        raise MrantoolError(
            "Index provenance must include 'encoder' (the store's encoder identity) so queries can be checked."
        )
    return json.loads(json.dumps(dict(provenance), default=_to_builtin))


def _to_builtin(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise MrantoolError(f"Index provenance holds a {type(value).__name__}, which JSON cannot store; pass plain values.")


def _canonical(identity: Any) -> Any:
    return json.loads(json.dumps(identity, sort_keys=True, default=_to_builtin))


def _describe(identity: Any, other: Any) -> str:
    """`name (key=value, ...)` with up to three fields that differ from `other`; the name is the identity's
    "name" (encoder identity) or "encoder" (store identity) field."""
    if not isinstance(identity, dict):
        return repr(identity)
    other = other if isinstance(other, dict) else {}
    name_key = next((k for k in ("name", "encoder") if isinstance(identity.get(k), str)), None)
    keys = sorted(k for k in set(identity) | set(other) if k != name_key and identity.get(k) != other.get(k))
    details = ", ".join(f"{k}={str(identity.get(k))[:24]}" for k in keys[:3])
    name = identity[name_key] if name_key else "an unnamed encoder"
    return f"{name} ({details})" if details else name


def _recover(folder: Path) -> Path:
    """`folder`, or the newest complete index that an interrupted `save` set aside beside it."""
    if (folder / META_FILE).is_file():
        return folder
    aside = sorted(folder.parent.glob(f"{OLD_PREFIX.format(name=folder.name)}*"), key=lambda p: p.stat().st_mtime)
    complete = [p for p in aside if (p / META_FILE).is_file()]
    return complete[-1] if complete else folder


def _read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise MrantoolError(
            f"{folder} is not an mrantool index (no {META_FILE}); build one with `mrantool index build`."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MrantoolError(f"{meta_path} is not valid JSON ({exc}); rebuild the index.") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MrantoolError(f"{folder} is not an mrantool index ({META_FILE} has another format); rebuild it.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MrantoolError(
            f"{folder} holds index format version {meta.get('format_version')}, this mrantool reads "
            f"{FORMAT_VERSION}; rebuild the index with this version."
        )
    missing = [key for key in ("kind", "params", "dim", "count", "columns", "provenance", "created") if key not in meta]
    columns = meta.get("columns")
    valid_columns = isinstance(columns, list) and set(REQUIRED_COLUMNS) <= set(columns)
    if missing or meta.get("kind") not in KINDS or not valid_columns or not all(map(_COLUMN_NAME.match, columns)):
        raise MrantoolError(
            f"{meta_path} lacks {', '.join(missing) or 'a known kind and valid id columns'}; rebuild the index."
        )
    return meta
