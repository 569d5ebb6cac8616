"""Input standardisation: patch statistics, cell statistics per cell position, tissue slopes and spreads, checkpoints
old and new."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrantool.errors import ConfigError
from mrantool.models.registry import create_head
from mrantool.models.standardize import Standardized, spread_at
from mrantool.training.api import feature_stats
from mrantool.training.data import ArrayData


def _data() -> ArrayData:
    rng = np.random.default_rng(0)
    cells = rng.normal(size=(4, 2, 3, 4, 8)).astype(np.float32)  # 4 slides x 2 bags x 3 patches x 4 cells x 8-d
    cells[..., 0, :] += 5.0  # cell position 0 (a corner, say) is offset in every patch, as zero padding does
    cells[..., 1, 3] = 0.0  # a dead unit at position 1
    ids = [f"s{i}" for i in range(4)]
    return ArrayData({k: c.mean(-2) for k, c in zip(ids, cells, strict=True)},
                     {k: c for k, c in zip(ids, cells, strict=True)})


def test_cell_statistics_are_per_position_and_remove_the_offset():
    data = _data()
    stats = feature_stats(data, data.slide_ids)
    assert stats["mean"].shape == (8,) and stats["cell_mean"].shape == (4, 8)
    assert torch.all(stats["cell_mean"][0] > 4.0) and torch.all(stats["cell_mean"][1:, :3].abs() < 1.0)
    head = Standardized(create_head("mran", 8, 2), 8)
    head.set_stats(**stats)
    assert head.cell_sd[1, 3] == 1.0  # no spread: left unscaled instead of divided by ~0
    bags = data.bags("s0")
    seen = {}

    def keep(module, args):
        seen["cells"] = args[1]

    head.head.register_forward_pre_hook(keep)
    head(bags.patches, bags.cells, bags.mask)
    per_position = seen["cells"].mean(dim=(0, 1))  # (C, D) after scaling
    assert per_position[0].abs().mean() < 1.0  # the corner offset is gone


def test_checkpoints_load_with_either_cell_statistics():
    head = Standardized(create_head("mran", 8, 2), 8)
    head.set_stats(torch.zeros(8), torch.ones(8), torch.full((4, 8), 2.0), torch.full((4, 8), 3.0))
    fresh = Standardized(create_head("mran", 8, 2), 8)
    fresh.load_state_dict(head.state_dict())
    assert fresh.cell_mean.shape == (4, 8) and torch.all(fresh.cell_sd == 3.0)
    old = {k: v for k, v in head.state_dict().items() if not k.startswith("cell_")}  # before cells had their own
    old["mean"], old["sd"] = torch.full((8,), 1.5), torch.full((8,), 2.5)
    legacy = Standardized(create_head("mran", 8, 2), 8)
    legacy.load_state_dict(old)
    assert torch.all(legacy.cell_mean == 1.5) and torch.all(legacy.cell_sd == 2.5)


class _TissueData(ArrayData):
    """ArrayData whose cells come with tissue fractions, as StoreData gives them under fit's tissue_weights."""

    def __init__(self, cells: dict[str, np.ndarray], tissue: dict[str, np.ndarray]) -> None:
        super().__init__({k: c.mean(-2) for k, c in cells.items()}, cells)
        self.tissue = tissue

    def cell_mask(self, slide_id: str) -> np.ndarray:
        return self.tissue[slide_id]


def test_tissue_slopes_match_a_hand_computed_position():
    # One patch of 3 cell positions seen three times, position 0 at tissue 0, 0.5 and 1 with feature 0, 2, 2:
    # by hand, mean tissue 0.5, mean feature 4/3, slope cov/var = (1/3)/(1/6) = 2, and the residuals
    # -1/3, 2/3, -1/3 leave sd sqrt(2)/3 (against sqrt(8)/3 around the plain mean).
    x = np.array([0.0, 2.0, 2.0], np.float32)
    t = np.array([0.0, 0.5, 1.0], np.float32)
    cells = np.zeros((3, 1, 3, 1), np.float32)
    cells[:, 0, 0, 0] = x
    cells[:, 0, 1, 0] = x  # position 1: the same features, all at full tissue: no slope to fit
    tissue = np.ones((3, 1, 3), np.float32)
    tissue[:, 0, 0] = t
    data = _TissueData({"s": cells[None].reshape(1, 3, 3, 1)}, {"s": tissue.reshape(1, 3, 3)})
    stats = feature_stats(data, ["s"], tissue_slopes=True)
    assert stats["cell_tissue_mean"][0].item() == pytest.approx(0.5)
    assert stats["cell_slope"][0, 0].item() == pytest.approx(2.0, rel=1e-5)
    assert stats["cell_sd"][0, 0].item() == pytest.approx(2 ** 0.5 / 3, rel=1e-5)
    assert stats["cell_slope"][1, 0].item() == 0.0 and stats["cell_sd"][1, 0].item() == pytest.approx(8 ** 0.5 / 3)


def test_cells_are_centred_at_their_tissue_fraction():
    """Features that drift with the tissue fraction (glass in the receptive field) reach the head without that
    drift, so a glassy cell no longer has a large standardised norm; a model with slopes refuses calls without
    the fractions, and data without fractions cannot give slopes."""
    rng = np.random.default_rng(1)
    drift = rng.normal(size=(4, 8)) * 5.0  # per position and dimension
    cells, tissue = {}, {}
    for i in range(6):
        glassy = rng.random(size=(4, 20, 4)) < 0.2  # most cells are whole tissue, a few lie at a border
        t = np.where(glassy, rng.uniform(0.2, 1.0, size=glassy.shape), 1.0).astype(np.float32)
        cells[f"s{i}"] = (rng.normal(size=(4, 20, 4, 8)) + t[..., None] * drift).astype(np.float32)
        tissue[f"s{i}"] = t
    data = _TissueData(cells, tissue)
    assert "cell_slope" not in feature_stats(data, ["s0"])  # only when asked for (fit's tissue_centring)
    stats = feature_stats(data, ["s0", "s1", "s2", "s3", "s4"], tissue_slopes=True)
    assert torch.allclose(stats["cell_slope"], torch.from_numpy(drift).float(), atol=1.0)
    assert torch.allclose(stats["cell_sd"], torch.ones(4, 8), atol=0.35)  # the noise, not noise + drift
    head = Standardized(create_head("mran", 8, 2), 8)
    head.set_stats(**stats)
    seen = {}
    head.head.register_forward_pre_hook(lambda module, args: seen.update(cells=args[1]))
    bags = data.bags("s5")  # held out from the statistics
    head(bags.patches, bags.cells, bags.mask, cell_mask=torch.from_numpy(tissue["s5"]))
    norms, t = seen["cells"].norm(dim=-1).flatten(), torch.from_numpy(tissue["s5"]).flatten()
    assert abs(np.corrcoef(norms, t)[0, 1]) < 0.3
    plain = Standardized(create_head("mran", 8, 2), 8)
    plain.set_stats(**feature_stats(ArrayData({k: c.mean(-2) for k, c in cells.items()}, cells),
                                    ["s0", "s1", "s2", "s3", "s4"]))
    plain.head.register_forward_pre_hook(lambda module, args: seen.update(cells=args[1]))
    plain(bags.patches, bags.cells, bags.mask)
    assert np.corrcoef(seen["cells"].norm(dim=-1).flatten(), t)[0, 1] < -0.5  # glassy cells: large norms
    with pytest.raises(ConfigError, match="centres cells at their tissue fraction"):
        head(bags.patches, bags.cells, bags.mask)
    with pytest.raises(ConfigError, match="tissue_centring needs the cells' tissue fractions"):
        feature_stats(ArrayData({k: c.mean(-2) for k, c in cells.items()}, cells), ["s0"], tissue_slopes=True)


def test_checkpoints_load_with_or_without_tissue_slopes():
    head = Standardized(create_head("mran", 8, 2), 8)
    head.set_stats(torch.zeros(8), torch.ones(8), torch.zeros(4, 8), torch.ones(4, 8), torch.full((4,), 0.7),
                   torch.full((4, 8), 2.0))
    fresh = Standardized(create_head("mran", 8, 2), 8)
    fresh.load_state_dict(head.state_dict())
    assert fresh.cell_tissue_mean.shape == (4,) and torch.all(fresh.cell_slope == 2.0)
    before = {k: v for k, v in head.state_dict().items() if k not in ("cell_tissue_mean", "cell_slope")}
    legacy = Standardized(create_head("mran", 8, 2), 8)
    legacy.load_state_dict(before)  # a checkpoint from before the slopes: plain centring, no fractions needed
    assert legacy.cell_slope.numel() == 0
    legacy(torch.zeros(2, 3, 8), torch.zeros(2, 3, 4, 8), torch.ones(2, 3, dtype=torch.bool))


def test_spread_is_interpolated_between_bin_centres():
    spread = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # knots at tissue 0.125, 0.375, 0.625, 0.875
    at = spread_at(spread, torch.tensor([[0.0], [0.125], [0.25], [0.5], [1.0]])).flatten()
    assert torch.allclose(at, torch.tensor([1.0, 1.0, 1.5, 2.5, 4.0]))


def test_tissue_spread_matches_hand_computed_bins_and_evens_the_norms():
    """60 whole-tissue cells at +-1 and 60 border cells (tissue 0.55) at +-3, in two dimensions: by hand no slope,
    mean 0, sd sqrt(5) around the line; squared residuals in sd^2 units 1/5 in bin 9 and 9/5 in bin 5, 1 in the
    empty bins. Scaled by them, both kinds of cell reach the head with norm sqrt(2), where centring alone leaves the
    border cells three times as long."""
    signs = np.tile([1.0, -1.0], 30).astype(np.float32)
    x = np.concatenate([signs, 3 * signs])[:, None].repeat(2, 1)  # (120, 2)
    t = np.concatenate([np.ones(60), np.full(60, 0.55)]).astype(np.float32)
    data = _TissueData({"s": x.reshape(120, 1, 1, 2)}, {"s": t.reshape(120, 1, 1)})
    stats = feature_stats(data, ["s"], tissue_slopes=True, tissue_spread=True)
    assert torch.allclose(stats["cell_slope"], torch.zeros(1, 2), atol=1e-6)
    assert torch.allclose(stats["cell_sd"], torch.full((1, 2), 5 ** 0.5))
    expected = torch.ones(1, 10)
    expected[0, 9], expected[0, 5] = 0.2, 1.8
    assert torch.allclose(stats["cell_spread"], expected, atol=1e-5)
    seen = {}
    for spread in (True, False):
        head = Standardized(create_head("mran", 2, 2), 2)
        head.set_stats(**{k: v for k, v in stats.items() if spread or k != "cell_spread"})
        head.head.register_forward_pre_hook(lambda module, args, key=spread: seen.update({key: args[1]}))
        bags = data.bags("s")
        head(bags.patches, bags.cells, bags.mask, cell_mask=torch.from_numpy(t.reshape(120, 1, 1)))
    assert torch.allclose(seen[True].norm(dim=-1), torch.full((120, 1, 1), 2 ** 0.5), atol=1e-4)
    plain = seen[False].norm(dim=-1).flatten()
    assert plain[60:].mean().item() == pytest.approx(3 * plain[:60].mean().item(), rel=1e-4)
    assert "cell_spread" not in feature_stats(data, ["s"], tissue_slopes=True)  # only when asked (tissue_spread)


class _CountingData(_TissueData):
    def __init__(self, *args: dict[str, np.ndarray]) -> None:
        super().__init__(*args)
        self.reads: list[str] = []

    def read(self, slide_id: str, *args, **kwargs):
        self.reads.append(slide_id)
        return super().read(slide_id, *args, **kwargs)


def test_spread_statistics_leave_the_line_alone_and_each_slide_is_read_once():
    """With tissue_spread the slide sums come from the per-bin sums: mean, slope and sd are those computed without
    it; a shared `moments` (a sweep's folds and variants) reads each slide once when `bins` asks for the per-bin
    sums on the first read, whichever variant comes first."""
    rng = np.random.default_rng(2)
    cells = {f"s{i}": rng.normal(size=(5, 6, 3, 4)).astype(np.float32) for i in range(3)}
    tissue = {k: rng.uniform(0.0, 1.0, size=(5, 6, 3)).astype(np.float32) for k in cells}
    for k in cells:
        cells[k] += 4.0 * tissue[k][..., None]
    plain = feature_stats(_TissueData(cells, tissue), list(cells), tissue_slopes=True)
    data = _CountingData(cells, tissue)
    moments: dict = {}
    first = feature_stats(data, list(cells), moments, tissue_slopes=True, bins=True)  # a variant without spread
    spread = feature_stats(data, list(cells), moments, tissue_slopes=True, tissue_spread=True)
    assert sorted(data.reads) == sorted(cells)
    for key, value in plain.items():
        assert torch.allclose(first[key], value, atol=1e-5) and torch.allclose(spread[key], value, atol=1e-5), key
    assert "cell_spread" not in first and spread["cell_spread"].shape == (3, 10)
    unshared = _CountingData(cells, tissue)
    feature_stats(unshared, list(cells), moments := {}, tissue_slopes=True)
    feature_stats(unshared, list(cells), moments, tissue_slopes=True, tissue_spread=True)
    assert len(unshared.reads) == 2 * len(cells)  # without `bins` the spread variant reads again (the reason for it)


def test_checkpoints_load_with_or_without_tissue_spread():
    head = Standardized(create_head("mran", 8, 2), 8)
    head.set_stats(torch.zeros(8), torch.ones(8), torch.zeros(4, 8), torch.ones(4, 8), torch.full((4,), 0.7),
                   torch.zeros(4, 8), torch.full((4, 10), 4.0))
    fresh = Standardized(create_head("mran", 8, 2), 8)
    fresh.load_state_dict(head.state_dict())
    assert fresh.cell_spread.shape == (4, 10)
    before = {k: v for k, v in head.state_dict().items() if k != "cell_spread"}
    legacy = Standardized(create_head("mran", 8, 2), 8)
    legacy.load_state_dict(before)  # a checkpoint from before the spreads: centred, not scaled
    assert legacy.cell_spread.numel() == 0
    cells, tissue = torch.ones(1, 3, 4, 8), torch.full((1, 3, 4), 0.7)
    seen = {}
    for model in (fresh, legacy):
        model.head.register_forward_pre_hook(lambda module, args, m=model: seen.update({id(m): args[1]}))
        model(torch.zeros(1, 3, 8), cells, torch.ones(1, 3, dtype=torch.bool), cell_mask=tissue)
    assert torch.allclose(seen[id(fresh)], seen[id(legacy)] / 2)  # divided by sqrt(4)
