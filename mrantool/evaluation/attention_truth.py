"""Does attention fall on annotated objects? Top-k attended cells against point annotations (e.g. nucleus centres)
or annotated regions given as discs (e.g. a generated slide's tumour foci).

For one slide: the share of its k most attended cells whose centre lies within `radius` of an annotated point of the
target class, against the share expected by chance (the share of the slide's valid cells that lie that close, i.e.
the area such cells cover). A head with attention only at patch level spreads each patch's weight evenly over its
cells, and its expected hit share is taken over its tied cells, so heads with and without a cell level compare on
the same cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class AttentionHits:
    """One slide: top-k hit share, chance share, and their ratio (NaN when chance is 0)."""

    k: int
    hit_share: float
    chance_share: float

    @property
    def ratio(self) -> float:
        return self.hit_share / self.chance_share if self.chance_share > 0 else float("nan")


def near_points(centres: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """Bool array of centres' shape without the last axis: a point lies within `radius` (same units)."""
    flat = centres.reshape(-1, 2)
    if len(points) == 0:
        return np.zeros(flat.shape[0], bool).reshape(centres.shape[:-1])
    dist, _ = cKDTree(np.asarray(points, np.float64)).query(flat, k=1, distance_upper_bound=radius)
    return np.isfinite(dist).reshape(centres.shape[:-1])


def in_discs(centres: np.ndarray, discs: np.ndarray) -> np.ndarray:
    """Bool array of centres' shape without the last axis: the centre lies inside a disc (x, y, radius) of `discs`."""
    flat = centres.reshape(-1, 2)
    inside = np.zeros(flat.shape[0], bool)
    for x, y, r in np.asarray(discs, np.float64).reshape(-1, 3):
        inside |= (flat[:, 0] - x) ** 2 + (flat[:, 1] - y) ** 2 < r**2
    return inside.reshape(centres.shape[:-1])


def top_k_hits(attention: np.ndarray, hits: np.ndarray, valid: np.ndarray, k: int) -> AttentionHits:
    """Expected share of hits among the k most attended valid cells (ties share the remaining places evenly).

    `attention`, `hits`, `valid`: arrays of one shape (cells of a slide; a patch-level attention broadcast to its
    cells gives ties). Chance is the hit share of all valid cells.
    """
    a = np.asarray(attention, np.float64)[valid]
    h = np.asarray(hits, bool)[valid].astype(np.float64)
    if a.size == 0:
        return AttentionHits(k, float("nan"), float("nan"))
    k = min(k, a.size)
    order = np.argsort(-a, kind="stable")
    threshold = a[order[k - 1]]
    above = a > threshold
    tied = a == threshold
    places = k - int(above.sum())
    expected = h[above].sum() + places * h[tied].mean()
    return AttentionHits(k, float(expected / k), float(h.mean()))
