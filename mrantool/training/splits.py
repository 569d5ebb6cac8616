"""Cross-validation splits by patient, stratified by label, with a validation split inside each fold.

Either repeated k-fold (sklearn StratifiedGroupKFold, one shuffle seed per repeat) or the fixed folds of a
`fold` column (fold value k = test fold k). Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from mrantool.errors import LabelsError
from mrantool.training.labels import Labels


@dataclass(frozen=True)
class Split:
    """Indices into `Labels` rows for one fold of one repeat."""

    repeat: int
    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def name(self, repeats: int) -> str:
        """Folder name of this fold in a run: fold_<k>, or repeat_<r>/fold_<k> with several repeats."""
        return f"fold_{self.fold}" if repeats == 1 else f"repeat_{self.repeat}/fold_{self.fold}"


def derive_seed(*parts: int) -> int:
    """A 31-bit seed derived deterministically from integers (seed, repeat, fold, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def make_splits(labels: Labels, folds: int = 5, repeats: int = 1, val_fraction: float = 0.2,
                seed: int = 0) -> list[Split]:
    """All (repeat, fold) splits; the `fold` column of `labels` wins over `folds`/`repeats` when present."""
    if labels.folds is not None:
        outer = _fixed_folds(labels, labels.folds)
    else:
        _check_enough(labels, folds)
        outer = []
        for repeat in range(repeats):
            seed_r = derive_seed(seed, repeat)
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed_r)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                parts = list(splitter.split(np.zeros(len(labels)), labels.y, labels.patients))
            outer += [(repeat, k, np.sort(train), np.sort(test)) for k, (train, test) in enumerate(parts)]
    splits = []
    for repeat, fold, train, test in outer:
        fit, val = validation_split(labels, train, val_fraction, derive_seed(seed, repeat, fold, 1))
        splits.append(Split(repeat, fold, fit, val, test))
    return splits


def validation_split(labels: Labels, train: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `train` rows into (fit, val) by patient, stratified, with about `fraction` in val.

    The first candidate split that keeps every class of `train` in the fit part is used; with fraction 0
    (or too few patients to split) val is empty. Small cohorts get a larger share (at least 1 / largest
    class size).
    """
    empty = np.zeros(0, dtype=np.int64)
    if fraction <= 0:
        return train, empty
    groups = np.asarray(labels.patients, dtype=object)[train]
    y = labels.y[train]
    # sklearn needs n_splits <= number of groups and <= the size of the largest class
    n_splits = min(len(set(groups.tolist())), int(np.bincount(y).max()), max(2, round(1 / fraction)))
    if n_splits < 2:
        return train, empty
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    needed = set(y.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for fit, val in splitter.split(np.zeros(len(train)), y, groups):
            if set(y[fit].tolist()) == needed:
                return np.sort(train[fit]), np.sort(train[val])
    return train, empty


def _check_enough(labels: Labels, folds: int) -> None:
    """Every class needs slides from at least `folds` patients, or a test fold would miss it."""
    patients = np.asarray(labels.patients, dtype=object)
    per_class = []
    short = False
    for k, name in enumerate(labels.classes):
        rows = labels.y == k
        n_patients = len(set(patients[rows].tolist()))
        short |= n_patients < folds
        per_class.append(f"'{name}' has {int(rows.sum())} slides from {n_patients} patients")
    if short:
        raise LabelsError(f"Labels file {labels.source} has too few slides for {folds}-fold cross-validation "
                          f"({'; '.join(per_class)}); every class needs slides from at least {folds} "
                          "patients, so lower --folds or add slides.")


def _fixed_folds(labels: Labels, folds: np.ndarray) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Outer splits from the fold column; a patient in two folds would leak, so it is refused."""
    values = sorted(set(folds.tolist()))
    if len(values) < 2:
        raise LabelsError(f"Labels file {labels.source} puts every slide in fold {values[0]}; give at least "
                          "two fold values (fold k is the test fold k) or drop the fold column.")
    fold_of: dict[str, int] = {}
    for patient, fold in zip(labels.patients, folds.tolist(), strict=True):
        if fold_of.setdefault(patient, fold) != fold:
            raise LabelsError(f"Labels file {labels.source} puts patient {patient!r} in folds "
                              f"{fold_of[patient]} and {fold}; give all slides of a patient the same fold.")
    rows = np.arange(len(labels))
    for k in values:
        train_classes = set(labels.y[folds != k].tolist())
        if len(train_classes) < labels.n_classes:
            absent = [labels.classes[c] for c in range(labels.n_classes) if c not in train_classes]
            raise LabelsError(f"Labels file {labels.source} puts every slide of class(es) "
                              f"{', '.join(map(repr, absent))} in fold {k}, so fold {k} would train without them; "
                              "spread each class over several fold values or drop the fold column.")
    return [(0, k, rows[folds != k], rows[folds == k]) for k in values]
