"""A generated H&E-like cohort (pyramidal TIFFs that OpenSlide opens, plus labels.csv) for demos and tests.

Each slide is pink eosin stroma with wavy fibres, in irregular blobs on glass with a few lumens, holding
haematoxylin-stained nuclei. Tumour slides also contain one or two tumour foci whose nuclei are larger (12-18 um
across instead of 6-9 um), irregular and hyperchromatic, each in a pale perinuclear halo. The foci keep the nuclear
stained-area fraction of normal tissue (fewer, bigger nuclei) and, through the halos, its mean colour, so patch-level
colour statistics do not give the class away: the signal lives at the cell scale. Pixels are rendered by
Beer-Lambert mixing of two stain colours through a lookup table. Everything is drawn from one seed, so the same seed
gives byte-identical pixels.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from mrantool.errors import ConfigError
from mrantool.files import atomic_path, output_folder
from mrantool.slides.writer import write_pyramid_tiff

GLASS = np.array([242.0, 240.0, 244.0])
#: Optical density (log10) of one unit of stain: haematoxylin (a normal nucleus) and eosin (typical stroma).
H_OD = -np.log10(np.array([110.0, 80.0, 160.0]) / 255.0)
E_OD = -np.log10(np.array([236.0, 150.0, 196.0]) / 255.0)
LEVELS = 128  # stain-density levels in the lookup table
UNIT = 64  # lookup index of one unit of stain density
Q = 8  # slowly varying maps (tissue, stroma, foci) are drawn at 1/Q resolution
N_STAMPS = 48  # precomputed nucleus shapes per kind and slide
NUCLEAR_COVER = 0.18  # nuclei per px x mean nuclear area: the same in normal tissue and in tumour foci
STROMA_TINT = 0.15  # haematoxylin density of stroma
NUCLEUS_EOSIN = 0.25  # eosin density inside nuclei
HALO = 1.7  # radius of a tumour nucleus's halo (stroma without haematoxylin tint) / its radius
DEFAULT_SIZE = (6144, 6144)
FOCUS_UM = (170.0, 260.0)  # radius range of a tumour focus (three overlapping lobes of 0.5-0.8 x that radius)


@dataclass(frozen=True)
class _NucleusKind:
    radius_um: tuple[float, float]  # half the diameter
    density: tuple[float, float]  # haematoxylin density
    irregularity: float  # amplitude of each boundary harmonic (pleomorphism)
    elongation: tuple[float, float]
    clumping: float  # chromatin texture amplitude (density units)


NORMAL = _NucleusKind(radius_um=(3.0, 4.5), density=(0.9, 1.1), irregularity=0.03, elongation=(1.0, 1.5), clumping=0.08)
TUMOUR = _NucleusKind(radius_um=(6.0, 9.0), density=(1.5, 1.8), irregularity=0.12, elongation=(1.0, 1.4), clumping=0.25)


def _lut() -> np.ndarray:
    """RGB lookup table (3-byte void items) indexed by h * LEVELS + e, the stain density indices."""
    dens = np.arange(LEVELS) / UNIT
    od = dens[:, None, None] * H_OD + dens[None, :, None] * E_OD
    rgb = np.clip(np.rint(GLASS * 10.0 ** (-od)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb.reshape(-1, 3)).view("V3").ravel()


def _stamps(rng: np.random.Generator, kind: _NucleusKind, mpp: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Nucleus stamps: (uint8 haematoxylin index, 0 outside the nucleus; bool halo of radius HALO x the nucleus)."""
    stamps = []
    for _ in range(N_STAMPS):
        r0 = rng.uniform(*kind.radius_um) / mpp
        elong = rng.uniform(*kind.elongation)
        size = 2 * int(np.ceil(HALO * r0 * (1 + 4 * kind.irregularity) * elong)) + 3
        yy, xx = np.mgrid[:size, :size] - size // 2
        angle = rng.uniform(0, np.pi)
        u = (xx * np.cos(angle) + yy * np.sin(angle)) / elong
        v = -xx * np.sin(angle) + yy * np.cos(angle)
        theta = np.arctan2(v, u)
        boundary = np.ones_like(theta)
        for k in range(2, 6):
            boundary += rng.uniform(0, kind.irregularity) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        dist = np.hypot(u, v)
        depth = r0 * boundary - dist  # px inside the boundary
        alpha = np.clip(depth + 0.5, 0.0, 1.0)
        chromatin = ndi.gaussian_filter(rng.standard_normal((size, size)), 0.6 + 0.15 * r0 * kind.clumping)
        chromatin *= kind.clumping / max(float(chromatin.std()), 1e-6)
        rim = 0.15 * np.exp(-np.clip(depth, 0, None) / 1.5)
        dens = rng.uniform(*kind.density) + chromatin + rim
        nucleus = np.clip(np.rint(alpha * dens * UNIT), 0, LEVELS - 1).astype(np.uint8)
        stamps.append((nucleus, dist < HALO * r0 * boundary))
    return stamps


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-smoothed white noise with zero mean and unit variance (float32)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _resize(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to `shape` (rows, cols)."""
    img = Image.fromarray(field.astype(np.float32), mode="F")
    return np.array(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


@dataclass
class _Layout:
    inside: np.ndarray  # uint8, >= 128 inside tissue, 1/Q resolution
    tissue: np.ndarray  # bool, 1/Q
    eosin: np.ndarray  # float density, 1/Q
    cellularity: np.ndarray  # float in [0, 1], 1/Q
    focus: np.ndarray  # bool, 1/Q
    foci: list[tuple[int, int, int]]  # discs (x, y, radius) in level-0 px whose union is the foci


def _layout(rng: np.random.Generator, width: int, height: int, mpp: float, tumour: bool,
            n_foci: int | None = None, focus_um: tuple[float, float] = FOCUS_UM) -> _Layout:
    """Tissue blobs, lumens, stroma texture and (for tumour slides) foci, at 1/Q resolution."""
    qh, qw = -(-height // Q), -(-width // Q)
    coarse = (max(8, qh // 6), max(8, qw // 6))
    yy, xx = np.mgrid[: coarse[0], : coarse[1]].astype(np.float32)
    cy, cx = coarse[0] * rng.uniform(0.4, 0.6), coarse[1] * rng.uniform(0.4, 0.6)
    envelope = ((yy - cy) / (0.55 * coarse[0])) ** 2 + ((xx - cx) / (0.55 * coarse[1])) ** 2
    field = _resize(_noise(rng, coarse, min(coarse) / 7) - 1.6 * envelope, (qh, qw))
    field += 0.04 * _noise(rng, (qh, qw), 1.0)
    field -= np.quantile(field, 1 - rng.uniform(0.5, 0.65))
    lumens = _noise(rng, (qh, qw), 10 / (Q * mpp)) - 2.4
    # Signed "inside tissue" map, 128 at the edge: thresholding its upsampling gives smooth outlines.
    inside = np.clip(128 + 400 * np.minimum(field, -0.4 * lumens), 0, 255).astype(np.uint8)
    tissue = inside >= 128

    # Wavy collagen fibres: level lines of a ramp warped by smooth noise, with patchy contrast.
    yq, xq = np.mgrid[:qh, :qw].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    fine = (max(8, qh // 2), max(8, qw // 2))
    phase = (xq * np.cos(angle) + yq * np.sin(angle)) * (Q * mpp / 4.0)
    phase += 8 * _resize(_noise(rng, coarse, 2.0), (qh, qw)) + 0.3 * _resize(_noise(rng, fine, 2.0), (qh, qw))
    contrast = 0.5 + 0.5 * _resize(_noise(rng, fine, 1.5), (qh, qw))
    eosin = 0.72 + 0.2 * np.cos(phase) * contrast + 0.08 * _resize(_noise(rng, coarse, 2.0), (qh, qw))
    eosin = np.clip(eosin, 0.3, 1.2)
    cellularity = np.clip(0.8 + 0.2 * _resize(_noise(rng, coarse, 3.0), (qh, qw)), 0.4, 1.0)

    focus = np.zeros((qh, qw), bool)
    foci: list[tuple[int, int, int]] = []
    if tumour:
        inner = ndi.binary_erosion(tissue, iterations=max(1, int(60 / (Q * mpp))))
        candidates = np.argwhere(inner if inner.any() else tissue)
        drawn = int(rng.integers(1, 3))
        if n_foci is None:
            n_foci = max(1, round(drawn * width * height / (DEFAULT_SIZE[0] * DEFAULT_SIZE[1])))
        for _ in range(n_foci):
            y, x = candidates[rng.integers(len(candidates))]
            radius = min(rng.uniform(*focus_um) / mpp, 0.2 * min(width, height))
            for _lobe in range(3):
                ly = Q * y + rng.uniform(-0.5, 0.5) * radius
                lx = Q * x + rng.uniform(-0.5, 0.5) * radius
                lr = radius * rng.uniform(0.5, 0.8)
                foci.append((round(lx), round(ly), round(lr)))
                focus |= (yq * Q - ly) ** 2 + (xq * Q - lx) ** 2 < lr**2
        focus &= tissue
    return _Layout(inside, tissue, eosin, cellularity, focus, foci)


def _nuclei(rng: np.random.Generator, lay: _Layout, width: int, height: int, mpp: float) -> tuple[np.ndarray, ...]:
    """Canvases (height, width): uint8 haematoxylin of every nucleus (max-blended) and bool tumour halos."""
    normal, tumour = _stamps(rng, NORMAL, mpp), _stamps(rng, TUMOUR, mpp)
    pad = max(nucleus.shape[0] for nucleus, _ in normal + tumour) // 2 + 1  # stamps never need clipping
    canvas = np.zeros((height + 2 * pad, width + 2 * pad), np.uint8)
    halo = np.zeros(canvas.shape, bool)
    area_n, area_t = (np.mean([np.count_nonzero(nucleus) for nucleus, _ in kind]) for kind in (normal, tumour))
    n = rng.poisson(NUCLEAR_COVER / area_n * width * height)
    ys, xs = rng.integers(0, height, n), rng.integers(0, width, n)
    u, pick = rng.random(n), rng.integers(0, N_STAMPS, n)
    qy, qx = ys // Q, xs // Q
    in_focus = lay.focus[qy, qx]
    # Thinning keeps the nuclear area per px equal: in foci, area_n / area_t as many (bigger) nuclei.
    keep = lay.tissue[qy, qx] & (u < lay.cellularity[qy, qx] * np.where(in_focus, area_n / area_t, 1.0))
    for y, x, k, f in zip(ys[keep], xs[keep], pick[keep], in_focus[keep], strict=True):
        nucleus, ring = tumour[k] if f else normal[k]
        s = nucleus.shape[0]
        y0, x0 = pad + y - s // 2, pad + x - s // 2
        view = canvas[y0 : y0 + s, x0 : x0 + s]
        np.maximum(view, nucleus, out=view)
        if f:
            halo[y0 : y0 + s, x0 : x0 + s] |= ring
    return canvas[pad:-pad, pad:-pad], halo[pad:-pad, pad:-pad]


def _upsample_rows(small: np.ndarray, rows: slice, width: int) -> np.ndarray:
    """Rows `rows` of the bilinear Q-times upsampling of a uint8 map, computed from a band of it (with a margin,
    so the result equals that of upsampling the whole map)."""
    s0, s1 = max(0, rows.start // Q - 1), min(small.shape[0], -(-rows.stop // Q) + 1)
    band = Image.fromarray(np.ascontiguousarray(small[s0:s1]))
    up = np.array(band.resize((small.shape[1] * Q, (s1 - s0) * Q), Image.Resampling.BILINEAR))
    return up[rows.start - s0 * Q : rows.stop - s0 * Q, :width]


def render_slide(
    seed: int | np.random.SeedSequence, size: tuple[int, int] = DEFAULT_SIZE, *, tumour: bool, mpp: float = 0.5,
    n_foci: int | None = None, focus_um: tuple[float, float] = FOCUS_UM,
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Level-0 RGB (height, width, 3) uint8 of one synthetic slide, and its tumour foci as discs (x, y, radius) in
    level-0 px (empty for a normal slide)."""
    width, height = size
    rng = np.random.default_rng(seed)
    lay = _layout(rng, width, height, mpp, tumour, n_foci, focus_um)
    nuclei, halo = _nuclei(rng, lay, width, height, mpp)
    eosin = np.clip(np.rint(lay.eosin * UNIT), 0, LEVELS - 1).astype(np.uint8)
    band = 256
    grain = rng.integers(-3, 4, (2, band, width), dtype=np.int8)
    tint, nuc_eosin = round(STROMA_TINT * UNIT), round(NUCLEUS_EOSIN * UNIT)
    lut = _lut()
    out = np.empty((height, width, 3), np.uint8)
    for y0 in range(0, height, band):
        rows = slice(y0, min(height, y0 + band))
        n = rows.stop - rows.start
        tissue = _upsample_rows(lay.inside, rows, width) >= 128
        nuc = nuclei[rows] * tissue
        e = _upsample_rows(eosin, rows, width) * tissue
        stroma = tissue & (nuc == 0) & ~halo[rows]
        np.minimum(e, np.where(nuc > 0, np.uint8(nuc_eosin), np.uint8(255)), out=e)
        h = np.maximum(nuc, stroma.view(np.uint8) * np.uint8(tint)).astype(np.intp)
        h += grain[0, :n] * tissue
        e_idx = e.astype(np.intp) + grain[1, :n] * tissue
        idx = np.clip(h, 0, LEVELS - 1, out=h) * LEVELS + np.clip(e_idx, 0, LEVELS - 1, out=e_idx)
        np.take(lut, idx, out=out[rows].view("V3")[..., 0])
    return out, lay.foci


def _write_slide(path: Path, seed: np.random.SeedSequence, size: tuple[int, int], tumour: bool,
                 mpp: float, n_foci: int | None, focus_um: tuple[float, float]) -> list[tuple[int, int, int]]:
    rgb, foci = render_slide(seed, size, tumour=tumour, mpp=mpp, n_foci=n_foci, focus_um=focus_um)
    write_pyramid_tiff(path, rgb, mpp=mpp)
    return foci


def _write_csv(path: Path, header: Sequence[str], rows: list[Sequence[object]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def cohort_design(n_slides: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(slide_id, label, patient_id) for a cohort: labels balanced, about a third of each class in 2-slide patients."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    labels = ["tumor"] * (n_slides // 2) + ["normal"] * (n_slides - n_slides // 2)
    labels = [labels[i] for i in rng.permutation(n_slides)]
    ids = [f"synth-{i:03d}" for i in range(n_slides)]
    patient: dict[str, str] = {}
    n_patients = 0
    for label in ("tumor", "normal"):
        members = [s for s, lab in zip(ids, labels, strict=True) if lab == label]
        n_pairs = len(members) // 3
        groups = [members[2 * i : 2 * i + 2] for i in range(n_pairs)] + [[s] for s in members[2 * n_pairs :]]
        for group in groups:
            for s in group:
                patient[s] = f"patient-{n_patients:03d}"
            n_patients += 1
    return [(s, lab, patient[s]) for s, lab in zip(ids, labels, strict=True)]


def make_cohort(
    out_dir: str | Path,
    n_slides: int = 12,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    mpp: float = 0.5,
    workers: int | None = None,
    n_foci: int | None = None,
    focus_um: tuple[float, float] = FOCUS_UM,
) -> Path:
    """Write `n_slides` synthetic pyramidal TIFFs (`<slide_id>.tiff`), `foci.csv` (tumour foci as level-0 discs
    slide_id,x,y,radius) and, last, `labels.csv` (slide_id,label,patient_id) into `out_dir`; return the labels path.

    `size` is the level-0 (width, height) at `mpp` microns/px. `workers` processes render slides in parallel
    (default: the CPUs available, at most 4; about 0.4 GB each at the default size); the output does not depend
    on it. `n_foci` fixes the number of tumour foci per tumour slide (default: 1-2 per default-size area), which
    sets the witness rate of the MIL problem; `focus_um` is the (low, high) range of a focus's radius in microns
    (the default foci span several patches of any preset; e.g. (25, 40) makes foci of a few tumour nuclei, which a
    patch embedding dilutes and a cell embedding does not). Existing files of the same names are replaced.
    """
    if n_slides < 2:
        raise ConfigError(f"n_slides={n_slides}: a cohort needs at least 2 slides (one per class).")
    if seed < 0:
        raise ConfigError(f"seed={seed}: the seed must be 0 or more; pass e.g. --seed 0.")
    if len(size) != 2 or min(size) < 256:
        raise ConfigError(f"size={size}: give the level-0 (width, height), each at least 256 px.")
    if mpp <= 0:
        raise ConfigError(f"mpp={mpp}: microns per pixel must be positive.")
    if len(focus_um) != 2 or not 0 < focus_um[0] <= focus_um[1]:
        raise ConfigError(f"focus_um={focus_um}: give the (low, high) focus radius in microns, 0 < low <= high.")
    out = output_folder(out_dir, "The cohort folder")
    design = cohort_design(n_slides, seed)
    seeds = np.random.SeedSequence(seed).spawn(n_slides)
    jobs = [(out / f"{sid}.tiff", seeds[i], tuple(size), label == "tumor", mpp, n_foci, tuple(focus_um))
            for i, (sid, label, _) in enumerate(design)]
    workers = min(n_slides, workers or min(4, os.cpu_count() or 1))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            foci = list(pool.map(_write_slide, *zip(*jobs, strict=True)))
    else:
        foci = [_write_slide(*job) for job in jobs]
    rows = [(sid, *disc) for (sid, _, _), discs in zip(design, foci, strict=True) for disc in discs]
    _write_csv(out / "foci.csv", ("slide_id", "x", "y", "radius"), rows)
    labels = out / "labels.csv"
    _write_csv(labels, ("slide_id", "label", "patient_id"), design)
    return labels


def read_foci(folder: str | Path) -> dict[str, np.ndarray]:
    """The tumour foci `make_cohort` wrote to `folder`/foci.csv: slide id -> (n, 3) int64 discs (x, y, radius) in
    level-0 px (slides without foci are absent)."""
    path = Path(folder) / "foci.csv"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; pass the folder `mrantool demo-data` wrote (it holds foci.csv).")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    foci: dict[str, list[tuple[int, int, int]]] = {}
    for row in rows:
        foci.setdefault(row["slide_id"], []).append((int(row["x"]), int(row["y"]), int(row["radius"])))
    return {slide: np.array(discs, np.int64) for slide, discs in foci.items()}
