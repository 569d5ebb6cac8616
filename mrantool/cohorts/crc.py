"""CRCHistoPhenotypes (Sirinukunwattana et al., IEEE TMI 2016) as kept in ../shared/data/real/crchistophenotypes.

100 H&E colorectal images (`images/img1.png` .. `img100.png`, 500x500 px at 20x, 0.55 um/px), `labels.csv`
(image, counts per class, and `mil_label_has_epithelial`: Ilse et al. 2018's bag label, 1 when the image holds an
epithelial nucleus) and `nuclei.csv` (image, class, x, y: nucleus centres in image px, by class epithelial,
fibroblast, inflammatory, others, plus `detection` for every detected nucleus). The images are plain PNGs: extract
them with `--mpp 0.55`; fit with `--id-column image --label-column mil_label_has_epithelial`.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from mrantool.errors import ConfigError

MPP = 0.55
ID_COLUMN = "image"
LABEL_COLUMN = "mil_label_has_epithelial"
CLASSES = ("epithelial", "fibroblast", "inflammatory", "others", "detection")


def _rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; pass the crchistophenotypes folder (../shared/data/real).") from None


def images(root: str | Path) -> dict[str, Path]:
    """image id (`img1`) -> its PNG, in the labels file's order."""
    root = Path(root)
    found = {row[ID_COLUMN]: root / "images" / f"{row[ID_COLUMN]}.png" for row in _rows(root / "labels.csv")}
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} CRCHistoPhenotypes image(s) are missing ({missing[0]} first); copy the "
                          "whole images folder.")
    return found


def labels(root: str | Path) -> dict[str, int]:
    """image id -> bag label (1: the image holds an epithelial nucleus), in the file's order."""
    return {row[ID_COLUMN]: int(row[LABEL_COLUMN]) for row in _rows(Path(root) / "labels.csv")}


def nuclei(root: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """image id -> class -> (n, 2) float32 nucleus centres (x, y) in image (level-0) px; every class of `CLASSES`
    is present for every image of nuclei.csv (possibly empty)."""
    points: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: {c: [] for c in CLASSES})
    for row in _rows(Path(root) / "nuclei.csv"):
        if row["class"] not in CLASSES:
            raise ConfigError(f"nuclei.csv of {root} has the unknown class {row['class']!r}; expected one of "
                              f"{', '.join(CLASSES)}.")
        points[row["image"]][row["class"]].append((float(row["x"]), float(row["y"])))
    return {image: {c: np.asarray(xy, np.float32).reshape(-1, 2) for c, xy in by_class.items()}
            for image, by_class in points.items()}
