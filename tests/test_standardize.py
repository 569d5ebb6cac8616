"""Input standardisation: patch statistics, cell statistics per cell position, checkpoints old and new."""

from __future__ import annotations

import numpy as np
import torch

from mrantool.models.registry import create_head
from mrantool.models.standardize import Standardized
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
