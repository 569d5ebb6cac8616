"""Early-stopping monitor smoothing and the lr schedule of the fold loop."""

from __future__ import annotations

import numpy as np
import pytest

from mrantool.config import FitConfig
from mrantool.errors import ConfigError
from mrantool.models.registry import create_head
from mrantool.training import loop
from mrantool.training.api import check_config
from mrantool.training.data import ArrayData
from mrantool.training.loop import Evaluation, scheduled_lr, train_fold

# A validation loss with a one-epoch dip at epoch 2 and a sustained lower plateau from epoch 7 on.
SCRIPTED_LOSS = [1.0, 0.3, 1.5, 1.5, 0.6, 0.5, 0.45, 0.45]


def kept_epoch(monkeypatch, smoothing: float) -> int:
    losses = iter(SCRIPTED_LOSS)
    monkeypatch.setattr(loop, "evaluate", lambda head, data, ids, y, **kw: Evaluation(
        np.full((len(ids), 2), 0.5), next(losses)))
    rng = np.random.default_rng(0)
    data = ArrayData({f"s{i}": rng.normal(size=(1, 3, 4)).astype(np.float32) for i in range(6)})
    ids, y = data.slide_ids, np.array([0, 1] * 3)
    cfg = FitConfig(store="-", labels="-", out="-", epochs=len(SCRIPTED_LOSS), patience=100, min_epochs=0,
                    smoothing=smoothing, device="cpu")
    result = train_fold(create_head("mean", 4, 2), data, ids[:4], y[:4], ids[4:], y[4:], cfg, seed=0)
    return result.best_epoch


def test_smoothing_lets_a_sustained_low_loss_win_over_a_one_epoch_dip(monkeypatch):
    assert kept_epoch(monkeypatch, 0.0) == 2
    # EMA with weight 0.5 on the past: 1.0, 0.65, 1.075, 1.29, 0.94, 0.72, 0.585, 0.5175 -> epoch 8.
    assert kept_epoch(monkeypatch, 0.5) == 8


def test_cosine_schedule_halves_the_lr_midway_and_ends_at_zero():
    cfg = FitConfig(store="-", labels="-", out="-", epochs=4, lr=1.0, lr_schedule="cosine")
    lrs = [scheduled_lr(cfg, step, total_steps=40) for step in range(1, 41)]  # after each of 40 steps
    assert lrs[19] == pytest.approx(0.5) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr(FitConfig(store="-", labels="-", out="-", lr=0.1), 7, 10) == 0.1


def test_bad_schedule_and_smoothing_are_named():
    with pytest.raises(ConfigError, match=r"smoothing 1\.0 .*lr_schedule 'step'"):
        check_config(FitConfig(store="-", labels="-", out="-", smoothing=1.0, lr_schedule="step"))
