"""Algorithmic unit tests for the MIL heads (after Raff & Holt, NeurIPS 2023; see docs/mil-unit-tests.md).

Each test generates bags where the training set can be fitted by a valid (standard or threshold) MIL rule
and by an invalid shortcut; the test set breaks the shortcut. A head that learned the MIL rule scores test
AUC near 1, one that learned the shortcut near 0. The measured outcome of every head is pinned in
EXPECTED so that a change in behaviour is noticed. Hand-written rules check that the MIL rule and the shortcut
both fit the training bags and only the rule survives the test bags, and a reference model that respects
standard MIL by construction must pass the presence test, which shows the tests are passable by training.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn

from mrantool.models.base import InstanceHead, MILHead
from mrantool.models.registry import create_head, list_heads

DIM, BAG, N_TRAIN, N_TEST = 8, 12, 48, 48
EPOCHS = 2
LR = {"mean": 0.05, "max": 0.05}  # Adam learning rate per head; 5e-3 otherwise
# concept -> (feature dims it shifts, shift); "P" is the poison, an easy signal that is not a MIL concept.
CONCEPTS = {"A": ((0, 1), 3.5), "B": ((2, 3), 3.5), "P": ((4, 5), 4.5)}
EITHER = "A|B"  # one of A or B, drawn per bag

# test -> (split, label) -> {concept: (min count, max count)} of planted instances; the rest is N(0, I).
SPECS: dict[str, dict[tuple[str, int], dict[str, tuple[int, int]]]] = {
    # Single-concept standard MIL: positive iff A is present. Training negatives carry the poison, so
    # "no poison => positive" also fits; at test time the poison moves into the positive bags.
    "presence": {
        ("train", 1): {"A": (1, 2)},
        ("train", 0): {"P": (2, 3)},
        ("test", 1): {"A": (1, 2), "P": (2, 3)},
        ("test", 0): {},
    },
    # Threshold MIL, poisoned: positive iff A and B are both present; negatives hold one of them. Training
    # negatives carry the poison; at test time it moves into the positive bags.
    "threshold": {
        ("train", 1): {"A": (1, 2), "B": (1, 2)},
        ("train", 0): {EITHER: (1, 2), "P": (2, 3)},
        ("test", 1): {"A": (1, 2), "B": (1, 2), "P": (2, 3)},
        ("test", 0): {EITHER: (1, 2)},
    },
    # False-frequency reliance: positive iff A and B are both present. In training, positives hold many
    # concept instances and negatives one, so "many concept instances => positive" also fits; at test time
    # positives hold one A and one B and negatives many copies of one concept.
    "frequency": {
        ("train", 1): {"A": (4, 5), "B": (4, 5)},
        ("train", 0): {EITHER: (1, 1)},
        ("test", 1): {"A": (1, 1), "B": (1, 1)},
        ("test", 0): {EITHER: (8, 10)},
    },
}

# Measured outcome per head (see `outcome`); docs/mil-unit-tests.md has the AUCs.
EXPECTED: dict[str, dict[str, str]] = {
    "mran": {"presence": "fail", "threshold": "fail", "frequency": "fail"},
    "abmil": {"presence": "fail", "threshold": "fail", "frequency": "fail"},
    "gated-abmil": {"presence": "fail", "threshold": "fail", "frequency": "fail"},
    "clam-sb": {"presence": "fail", "threshold": "fail", "frequency": "fail"},
    "transmil": {"presence": "fail", "threshold": "fail", "frequency": "fail"},
    "dsmil": {"presence": "fail", "threshold": "fail", "frequency": "fail"},
    "mean": {"presence": "fail", "threshold": "fail", "frequency": "fail"},
    "max": {"presence": "fail", "threshold": "fail", "frequency": "fail"},
}
# Head options used here: MRAN on flat bags has no cells; a narrower TransMIL keeps the file fast.
OPTIONS = {"mran": {"cells": False}, "transmil": {"hidden": 64, "heads": 4}}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MaxInstanceMIL(InstanceHead):
    """Reference that respects standard MIL by construction: one linear instance score, max-pooled, as the
    positive logit; the negative logit is fixed at 0, so no instance can be evidence for the negative class."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__(in_dim, n_classes)
        self.score = nn.Linear(in_dim, 1)

    def pool(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        best = self.score(x).squeeze(-1).max(0)
        weights = torch.zeros(x.shape[0])
        weights[best.indices] = 1.0
        return torch.stack([torch.zeros(()), best.values]), weights, {}


def _draw(g: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=g))


@functools.cache
def make_bags(test: str, split: str, n: int, seed: int) -> tuple[tuple[Tensor, Tensor], ...]:
    """Bags (1, BAG, DIM) with alternating labels; planted concepts follow SPECS[test][(split, label)]."""
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n):
        label = i % 2
        x = torch.randn(BAG, DIM, generator=g)
        row = 0
        for concept, (low, high) in SPECS[test][(split, label)].items():
            if concept == EITHER:
                concept = "AB"[_draw(g, 0, 1)]
            dims, shift = CONCEPTS[concept]
            for _ in range(_draw(g, low, high)):
                x[row, list(dims)] += shift
                row += 1
        bags.append((x[torch.randperm(BAG, generator=g)].unsqueeze(0), torch.tensor(label)))
    return tuple(bags)


def auc(scores: Tensor, labels: Tensor) -> float:
    """Probability that a positive outscores a negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def train_and_score(head: MILHead, test: str, epochs: int, lr: float) -> tuple[float, float]:
    """Train on the test's training bags (Adam, one slide per step, lr decaying linearly to 0); return
    (train accuracy, test AUC)."""
    train, held_out = make_bags(test, "train", N_TRAIN, 1), make_bags(test, "test", N_TEST, 2)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    steps = epochs * len(train)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / steps)
    order = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        for i in torch.randperm(len(train), generator=order).tolist():
            x, y = train[i]
            loss, _ = head.compute_loss(head(x), y, epoch=epoch, n_epochs=epochs)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    head.eval()
    with torch.no_grad():
        accuracy = sum(int(head(x).logits.argmax() == y) for x, y in train) / len(train)
        scores = torch.stack([head(x).logits.softmax(-1)[1] for x, _ in held_out])
    return accuracy, auc(scores, torch.stack([y for _, y in held_out]))


def outcome(accuracy: float, test_auc: float) -> str:
    """no-fit: training accuracy < 0.8; else pass (test AUC >= 0.5) or fail (the shortcut won)."""
    if accuracy < 0.8:
        return "no-fit"
    return "pass" if test_auc >= 0.5 else "fail"


def test_bags_follow_the_specs():
    for test, spec in SPECS.items():
        for (split, label), planted in spec.items():
            bags = [x for x, y in make_bags(test, split, 8, 0) if int(y) == label]
            poisoned = [bool((x[0, :, 4:6] > 2.0).all(-1).any()) for x in bags]
            assert all(poisoned) == ("P" in planted), (test, split, label)
    assert make_bags("presence", "train", 4, 0)[0][0].shape == (1, BAG, DIM)


def _projection(x: Tensor, concept: str) -> Tensor:
    """Each instance's mean coordinate on a concept's dims, scaled so a planted instance scores about 1."""
    dims, shift = CONCEPTS[concept]
    return x[0, :, list(dims)].mean(-1) / shift


RULES = {  # test -> (valid MIL rule, shortcut) as bag scores
    "presence": (lambda x: _projection(x, "A").max(), lambda x: -_projection(x, "P").max()),
    "threshold": (
        lambda x: torch.minimum(_projection(x, "A").max(), _projection(x, "B").max()),
        lambda x: -_projection(x, "P").max(),
    ),
    "frequency": (
        lambda x: torch.minimum(_projection(x, "A").max(), _projection(x, "B").max()),
        lambda x: ((_projection(x, "A") > 0.5).sum() + (_projection(x, "B") > 0.5).sum()).float(),
    ),
}


@pytest.mark.parametrize("test", list(SPECS))
def test_mil_rule_and_shortcut_both_fit_but_only_the_rule_survives(test):
    valid, shortcut = RULES[test]
    for split, n, seed in (("train", N_TRAIN, 1), ("test", N_TEST, 2)):
        bags = make_bags(test, split, n, seed)
        labels = torch.stack([y for _, y in bags])
        rule_auc = auc(torch.stack([valid(x) for x, _ in bags]), labels)
        shortcut_auc = auc(torch.stack([shortcut(x) for x, _ in bags]), labels)
        assert rule_auc >= 0.99, (split, rule_auc)
        assert shortcut_auc >= 0.99 if split == "train" else shortcut_auc <= 0.01, (split, shortcut_auc)


def test_standard_mil_reference_passes_presence():
    torch.manual_seed(0)
    accuracy, test_auc = train_and_score(MaxInstanceMIL(DIM, 2), "presence", epochs=4, lr=0.2)
    assert accuracy >= 0.9 and test_auc >= 0.9, (accuracy, test_auc)


@pytest.mark.parametrize("head", list_heads())
@pytest.mark.parametrize("test", list(SPECS))
def test_head_outcome_is_pinned(test, head):
    torch.manual_seed(0)
    accuracy, test_auc = train_and_score(
        create_head(head, DIM, 2, **OPTIONS.get(head, {})), test, EPOCHS, LR.get(head, 5e-3)
    )
    print(f"{test} {head} train_acc={accuracy:.2f} test_auc={test_auc:.3f}")
    measured = outcome(accuracy, test_auc)
    assert measured == EXPECTED[head][test], (
        f"{head} on {test}: {measured} (train acc {accuracy:.2f}, AUC {test_auc:.3f})"
    )
