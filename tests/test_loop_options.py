"""Early-stopping monitor smoothing and the lr schedule of the fold loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

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


def test_parameter_groups_keep_their_own_lr_under_the_schedule():
    """End-to-end training passes the encoder as a parameter group of its own (encoder_lr): a group at lr 0
    never moves, under the cosine schedule too, while the default group trains as without `params`."""
    rng = np.random.default_rng(0)
    data = ArrayData({f"s{i}": rng.normal(size=(1, 3, 4)).astype(np.float32) for i in range(6)})
    ids, y = data.slide_ids, np.array([0, 1] * 3)
    cfg = FitConfig(store="-", labels="-", out="-", epochs=3, lr=0.05, lr_schedule="cosine", device="cpu")

    def trained(params_of) -> tuple[dict, dict]:
        torch.manual_seed(0)
        head = create_head("abmil", 4, 2, hidden=8, attn_dim=4)
        start = {k: v.clone() for k, v in head.state_dict().items()}
        result = train_fold(head, data, ids[:4], y[:4], ids[4:], y[4:], cfg, seed=0, params=params_of(head))
        return start, result.state

    start, plain = trained(lambda head: None)
    _, same = trained(lambda head: [{"params": list(head.parameters()), "lr": cfg.lr}])
    for name in plain:
        torch.testing.assert_close(same[name], plain[name], rtol=0, atol=0)
    assert not torch.equal(plain["classifier.weight"], start["classifier.weight"])
    start, frozen = trained(lambda head: [
        {"params": [p for n, p in head.named_parameters() if n.startswith("classifier")], "lr": cfg.lr},
        {"params": [p for n, p in head.named_parameters() if not n.startswith("classifier")], "lr": 0.0}])
    moved = {n for n in frozen if not torch.equal(frozen[n], start[n])}
    assert moved and all(n.startswith("classifier") for n in moved)


def test_weight_ema_keeps_the_average_of_the_trajectory_and_leaves_training_alone():
    """weight_ema validates and keeps an exponential moving average of the weights after each step, with the
    documented decay min(weight_ema, (1 + n) / (10 + n)); the live weights follow the same path as without it."""
    rng = np.random.default_rng(0)
    data = ArrayData({f"s{i}": rng.normal(size=(2, 3, 4)).astype(np.float32) for i in range(8)})
    ids, y = data.slide_ids, np.array([0, 1] * 4)

    def trained(weight_ema: float) -> tuple[dict, dict, list[dict]]:
        torch.manual_seed(0)
        head = create_head("abmil", 4, 2, hidden=8, attn_dim=4)
        path = []
        hook = register_optimizer_step_post_hook(
            lambda *_: path.append({k: v.detach().clone() for k, v in head.state_dict().items()}))
        try:  # no validation slides: the last epoch's weights (or their average) are kept
            cfg = FitConfig(store="-", labels="-", out="-", epochs=3, lr=0.05, weight_ema=weight_ema, device="cpu")
            result = train_fold(head, data, ids, y, [], np.array([]), cfg, seed=0)
        finally:
            hook.remove()
        return result.state, head.state_dict(), path

    plain, plain_live, path = trained(0.0)
    kept, live, same_path = trained(0.9)
    assert len(path) == 3 * len(ids)
    for name in plain:
        torch.testing.assert_close(live[name], plain_live[name], rtol=0, atol=0)  # training untouched
        torch.testing.assert_close(plain[name], plain_live[name], rtol=0, atol=0)
        torch.testing.assert_close(same_path[-1][name], path[-1][name], rtol=0, atol=0)
    # the average by hand: starts at the initial weights, then a <- d a + (1 - d) w after step n (d capped at 0.9)
    torch.manual_seed(0)
    average = {k: v.detach().clone() for k, v in create_head("abmil", 4, 2, hidden=8, attn_dim=4).state_dict().items()}
    for n, weights in enumerate(path):
        d = min(0.9, (1 + n) / (10 + n))
        average = {k: d * average[k] + (1 - d) * weights[k] for k in average}
    for name in kept:
        torch.testing.assert_close(kept[name], average[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kept["classifier.weight"], live["classifier.weight"])


def test_weight_ema_out_of_range_is_named():
    with pytest.raises(ConfigError, match=r"weight_ema 1\.0 \(use 0 <= weight_ema < 1"):
        check_config(FitConfig(store="-", labels="-", out="-", weight_ema=1.0))
