"""Every batched head on a padded batch of slides gives what it gives for each slide alone (the contract in
docs/architecture.md), and runs under torch.func.vmap over stacked members."""

from __future__ import annotations

import pytest
import torch

from mrantool.models.registry import create_head, list_heads
from mrantool.training.batched.stack import MemberStack

D, C, K = 12, 4, 3
SHAPES = [(3, 5), (1, 7), (2, 2)]  # (n_bags, P) per slide: the batch pads both
OPTIONS = {"transmil": {"hidden": 32, "heads": 4}, "clam-sb": {"k_sample": 2}}
BATCHED = [name for name in list_heads() if create_head(name, D, K, **OPTIONS.get(name, {})).batched]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _slides(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    slides = []
    for n_bags, p in SHAPES:
        cells = torch.randn(n_bags, p, C, D, generator=g)
        mask = torch.rand(n_bags, p, generator=g) > 0.3
        mask[:, 0] = True
        slides.append((cells.mean(2), cells, mask))
    return slides


def _pad(slides: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    n_bags, p = max(s[0].shape[0] for s in slides), max(s[0].shape[1] for s in slides)
    patches = torch.zeros(len(slides), n_bags, p, D)
    cells = torch.zeros(len(slides), n_bags, p, C, D)
    mask = torch.zeros(len(slides), n_bags, p, dtype=torch.bool)
    for i, (x, c, m) in enumerate(slides):
        patches[i, :x.shape[0], :x.shape[1]], cells[i, :x.shape[0], :x.shape[1]] = x, c
        mask[i, :x.shape[0], :x.shape[1]] = m
    return patches, cells, mask


def test_the_linear_heads_and_attention_heads_are_batched():
    assert {"abmil", "gated-abmil", "clam-sb", "transmil", "dsmil", "mean", "max"} <= set(BATCHED)


@pytest.mark.parametrize("name", BATCHED)
@torch.no_grad()
def test_padded_batch_equals_each_slide_alone(name):
    torch.manual_seed(0)
    head = create_head(name, D, K, **OPTIONS.get(name, {})).eval()
    slides = _slides()
    labels = torch.tensor([2, 0, 1])
    weights = torch.tensor([1.0, 2.0, 0.5])
    patches, cells, mask = _pad(slides)
    batch = head(patches, cells if head.needs_cells else None, mask)
    losses, _ = head.compute_loss(batch, labels, epoch=1, n_epochs=3, class_weights=weights)
    assert batch.logits.shape == (3, K) and losses.shape == (3,)
    for i, (x, c, m) in enumerate(slides):
        alone = head(x, c if head.needs_cells else None, m)
        loss, _ = head.compute_loss(alone, labels[i], epoch=1, n_epochs=3, class_weights=weights)
        torch.testing.assert_close(batch.logits[i], alone.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(losses[i], loss, atol=1e-5, rtol=1e-5)
        for level, value in alone.attention.items():
            padded = batch.attention[level][i]
            torch.testing.assert_close(padded[tuple(slice(0, n) for n in value.shape)], value, atol=1e-5, rtol=1e-5)
            assert padded.sum() == pytest.approx(1.0, abs=1e-5)  # nothing leaks onto padding


@pytest.mark.parametrize("name", BATCHED)
def test_members_stacked_under_vmap_equal_each_member(name):
    torch.manual_seed(0)
    heads = [create_head(name, D, K, **OPTIONS.get(name, {})) for _ in range(3)]
    stack = MemberStack(heads)
    stack.train(False)
    patches, cells, mask = _pad(_slides())
    labels = torch.tensor([2, 0, 1])
    batches = [(patches, cells, mask, labels), (patches.flip(0), cells.flip(0), mask.flip(0), labels.flip(0))]
    stacked = [torch.stack(parts) for parts in zip(*batches, strict=True)]
    weights = torch.ones(2, K)
    loss, logits, bag = stack([2, 0], stacked[0], stacked[1], stacked[2], stacked[3], weights, None, 0, 2)
    loss.sum().backward()
    for g, member in enumerate([2, 0]):
        x, c, m, y = batches[g]
        out = heads[member](x, c if heads[member].needs_cells else None, m)
        alone, _ = heads[member].compute_loss(out, y, epoch=0, n_epochs=2, class_weights=weights[0])
        torch.testing.assert_close(logits[g], out.logits.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss[g], alone.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bag[g], out.attention["bag"].detach(), atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in heads[1].parameters())  # a member outside the step gets no gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in heads[2].parameters())
