"""MIL heads: the forward/loss contract for every head, MRAN's equations on hand-computed numbers, the
registry's validation, and a small training problem every head must learn."""

from __future__ import annotations

import math

import pytest
import torch

from mrantool.errors import ConfigError
from mrantool.models.attention import masked_softmax, norm_threshold
from mrantool.models.base import MILOutput
from mrantool.models.mran import ramp
from mrantool.models.registry import create_head, head_options, list_heads

N_BAGS, P, C, D, K = 3, 6, 4, 16, 3
SMALL = {"transmil": {"hidden": 64, "heads": 4}}  # keeps the training test fast
LR = {"mean": 0.05, "max": 0.05}  # linear baselines need a larger step; 5e-3 otherwise


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _slide(seed: int = 0, n_bags: int = N_BAGS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cells = torch.randn(n_bags, P, C, D, generator=g)
    mask = torch.rand(n_bags, P, generator=g) > 0.3
    mask[0, 0] = True
    return cells.mean(2), cells, mask


def test_registry_lists_every_head():
    assert list_heads() == ["mran", "mran-reference", "abmil", "gated-abmil", "clam-sb", "transmil", "dsmil", "mean",
                            "max"]
    assert head_options("mran")["t"] == (float, 0.1)
    assert head_options("mran")["adapter"][1] > 0 and head_options("mran-reference")["adapter"][1] == 0
    assert head_options("abmil")["hidden"] == (int, 500)


@pytest.mark.parametrize("name", list_heads())
def test_head_contract(name):
    patches, cells, mask = _slide()
    torch.manual_seed(0)
    head = create_head(name, D, K)
    out = head(patches.half(), cells.half(), mask)
    assert isinstance(out, MILOutput) and out.logits.shape == (K,)
    assert out.attention["bag"].shape == (N_BAGS,) and out.attention["patch"].shape == (N_BAGS, P)
    if name.startswith("mran"):
        assert out.attention["cell"].shape == (N_BAGS, P, C)
        assert torch.allclose(out.attention["cell"].sum(-1), out.attention["patch"])
    for weights in out.attention.values():
        assert torch.isclose(weights.sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.all(out.attention["patch"][~mask] == 0)
    assert torch.allclose(out.attention["patch"].sum(-1), out.attention["bag"])
    loss, parts = head.compute_loss(
        out, torch.tensor(2), epoch=1, n_epochs=4, class_weights=torch.tensor([1.0, 2.0, 0.5])
    )
    assert torch.isfinite(loss) and math.isclose(parts["loss"], loss.item(), rel_tol=1e-6)
    loss.backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", list_heads())
def test_head_is_deterministic_under_seed(name):
    patches, cells, mask = _slide(1)
    logits = []
    for _ in range(2):
        torch.manual_seed(7)
        head = create_head(name, D, K).eval()
        logits.append(head(patches, cells, mask).logits)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("name", list_heads())
def test_fully_masked_bag_gets_no_weight(name):
    patches, cells, mask = _slide(2)
    mask[1] = False
    out = create_head(name, D, K)(patches, cells, mask)
    assert torch.isfinite(out.logits).all()
    assert out.attention["bag"][1] == 0 and torch.all(out.attention["patch"][1] == 0)


def _make_problem(n_slides: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Slides of 2 bags x 8 patches x 4 cells; positive slides hold 3 patches whose cells are shifted."""
    g = torch.Generator().manual_seed(seed)
    slides = []
    for i in range(n_slides):
        label = i % 2
        cells = torch.randn(2, 8, 4, D, generator=g)
        mask = torch.rand(2, 8, generator=g) > 0.2
        mask[:, 0] = True
        if label:
            valid = mask.flatten().nonzero().flatten()
            for j in valid[torch.randperm(len(valid), generator=g)[:3]].tolist():
                cells[j // 8, j % 8, :, :4] += 2.0
        cells = cells * mask[..., None, None]
        slides.append((cells.mean(2), cells, mask, torch.tensor(label)))
    return slides


@pytest.mark.parametrize("name", list_heads())
def test_every_head_learns_shifted_instances(name):
    slides = _make_problem(20, 0)
    torch.manual_seed(0)
    head = create_head(name, D, 2, **SMALL.get(name, {}))
    opt = torch.optim.Adam(head.parameters(), lr=LR.get(name, 5e-3))
    for epoch in range(3):  # 60 steps
        for patches, cells, mask, label in slides:
            loss, _ = head.compute_loss(head(patches, cells, mask), label, epoch=epoch, n_epochs=3)
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():  # scored on held-out slides, never the training ones
        correct = [int(head(p, c, m).logits.argmax() == y) for p, c, m, y in _make_problem(40, 1)]
    assert sum(correct) / len(correct) >= 0.9


# --- MRAN equations ---------------------------------------------------------------------------------


def _identity_mran(**options) -> torch.nn.Module:
    """The reference MRAN (no adapter) with D = K = hidden = 2 and identity classifier / slide head, so logits equal
    embeddings."""
    head = create_head("mran-reference", 2, 2, hidden=2, **options)
    with torch.no_grad():
        for layer in (head.classifier, head.slide_proj, head.slide_cls):
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return head


def test_mran_thresholding_on_a_hand_computed_bag():
    # One bag of 3 patches x 2 cells; patch 2 is masked (huge values must not matter).
    cells = torch.tensor([[[[3.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]], [[100.0, 0.0], [0.0, 100.0]]]])
    mask = torch.tensor([[True, True, False]])
    out = _identity_mran()(cells.mean(2), cells, mask)
    # cell norms 3, 1: shares 3/4, 1/4, minus t/C = 0.05 -> 0.70, 0.20 -> beta = 7/9, 2/9; equal norms -> 1/2.
    beta = out.aux["beta"][0]
    assert torch.allclose(beta[0], torch.tensor([7 / 9, 2 / 9])) and torch.allclose(beta[1], torch.tensor([0.5, 0.5]))
    # h0 = [7/3 + 2/9, 0] = [23/9, 0], h1 = [0, 1]; a = 23/9, 1 -> shares 23/32, 9/32, minus t/N = 0.05
    # (N = 2 valid patches) -> 21.4/32, 7.4/32 -> alpha = 107/144, 37/144, 0.
    assert torch.allclose(out.aux["alpha"][0], torch.tensor([107 / 144, 37 / 144, 0.0]))
    z = torch.tensor([107 / 144 * 23 / 9, 37 / 144])
    assert torch.allclose(out.aux["bag_logits"][0], z)
    assert torch.allclose(out.logits, z)  # one bag: alpha_b = 1 and the slide head is the identity
    assert torch.allclose(out.attention["cell"][0, 0], torch.tensor([107 / 144 * 7 / 9, 107 / 144 * 2 / 9]))
    assert torch.all(out.attention["cell"][0, 2] == 0)


def test_norm_threshold_edge_cases():
    valid = torch.ones(3, dtype=torch.bool)
    # shares 3/4, 1/4, 0 minus t/N = 1/30 -> 43/60, 13/60, 0 -> renormalised 43/56, 13/56, 0.
    assert torch.allclose(norm_threshold(torch.tensor([3.0, 1.0, 0.0]), valid, 0.1), torch.tensor([43, 13, 0]) / 56)
    uniform = torch.full((3,), 1 / 3)
    assert torch.allclose(norm_threshold(torch.zeros(3), valid, 0.1), uniform)  # all scores zero
    assert torch.allclose(norm_threshold(torch.ones(3), valid, 0.1), uniform)  # all equal
    assert torch.allclose(norm_threshold(torch.tensor([2.0, 1.0, 1.0]), valid, 0.99), torch.tensor([1.0, 0, 0]))
    masked = torch.tensor([True, True, False])
    assert torch.allclose(norm_threshold(torch.tensor([1.0, 1.0, 50.0]), masked, 0.1), torch.tensor([0.5, 0.5, 0]))
    nothing = torch.zeros(3, dtype=torch.bool)
    assert torch.equal(norm_threshold(torch.ones(3), nothing, 0.1), torch.zeros(3))
    assert torch.equal(masked_softmax(torch.ones(3), nothing), torch.zeros(3))


def test_mran_bag_level_attention_is_thresholded():
    cells = torch.zeros(3, 1, 1, 2)
    cells[0, 0, 0, 0], cells[1, 0, 0, 0], cells[2, 0, 0, 0] = 3.0, 1.0, 1e-6
    out = _identity_mran()(cells.mean(2), cells)
    # g = 3, 1, ~0 -> the bag shares match norm_threshold's 43/56, 13/56, 0.
    assert torch.allclose(out.attention["bag"], torch.tensor([43, 13, 0]) / 56, atol=1e-5)


def test_ramp_values():
    assert math.isclose(ramp(0, 5), math.exp(-1))
    assert math.isclose(ramp(2, 5), math.exp(-0.25))
    assert ramp(4, 5) == 1.0 and ramp(0, 1) == 1.0


def _ce(logits: list[float], label: int) -> float:
    """Cross-entropy by hand: log-sum-exp minus the label's logit."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def test_mran_loss_on_a_hand_computed_bag():
    # One bag of 2 patches x 2 cells through the identity reference head (logits = embeddings), label 0, lam 2.
    cells = torch.tensor([[[[3.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    head = _identity_mran(lam=2.0)
    out = head(cells.mean(2), cells)
    loss, parts = head.compute_loss(out, torch.tensor(0), epoch=0, n_epochs=3)
    r = math.exp(-1)
    # beta = (7/9, 2/9) and (1/2, 1/2); h = (23/9, 0), (0, 1); a = 23/9, 1 -> alpha = (21.4, 7.4) / 28.8 (t/P = 0.05).
    a0, a1 = 21.4 / 28.8, 7.4 / 28.8
    z = [a0 * 23 / 9, a1]
    slide = _ce(z, 0)  # one bag: alpha_b = 1, the slide head is the identity, y_slide = y_bag = z
    patch = a0 * _ce([23 / 9, 0], 0) + a1 * _ce([0, 1], 0)
    cell = a0 * (7 / 9 * _ce([3, 0], 0) + 2 / 9 * _ce([1, 0], 0)) + a1 * _ce([0, 1], 0)
    # The reference (main.py) averages weighted CEs over all items: patches / P = 2, cells / (P * C) = 4, then
    # weighs them lam r(e) and lam^2 r(e); the slide head's per-bag term is lam r(e) alpha_b CE averaged over bags.
    expected = slide + 2 * r * slide + slide + 2 * r * patch / 2 + 4 * r * cell / 4
    assert math.isclose(parts["patch"], patch, rel_tol=1e-5) and math.isclose(parts["cell"], cell, rel_tol=1e-5)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_mran_loss_matches_the_reference_item_means():
    """The reference's loss (weighted CE averaged over every item, as xhangchen/MRAN main.py computes it) equals
    mrantool's per-bag weighted sums scaled by lam/P and lam^2/(P C), with bag mining weights on every term."""
    patches, cells, _ = _slide(3)
    torch.manual_seed(0)
    head = create_head("mran-reference", D, K, lam=2.0)
    bag_w = torch.tensor([0.5, 2.0, 0.5])
    out = head(patches, cells, None, bag_weights=bag_w)
    label, cw = torch.tensor(1), torch.tensor([1.0, 3.0, 1.0])
    loss, _ = head.compute_loss(out, label, epoch=1, n_epochs=3, class_weights=cw)
    ce = torch.nn.CrossEntropyLoss(weight=cw, reduction="none")  # the reference's lossfunc

    def items(logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, K)
        return (ce(flat, label.repeat(len(flat))) * w.reshape(-1)).mean()

    aux, r = out.aux, math.exp(-0.25)
    alpha, beta, alpha_b = aux["alpha"], aux["beta"], aux["alpha_b"]
    upstream = (items(aux["bag_logits"], bag_w) + 2.0 * r * items(aux["patch_logits"], bag_w[:, None] * alpha)
                + 4.0 * r * items(aux["cell_logits"], bag_w[:, None, None] * alpha[..., None] * beta))
    downstream = ce(out.logits[None], label[None])[0] + 2.0 * r * items(aux["slide_bag_logits"], alpha_b)
    assert math.isclose(loss.item(), (upstream + downstream).item(), rel_tol=1e-5)
    unweighted, _ = head.compute_loss(out, label, epoch=1, n_epochs=3, class_weights=None)
    assert math.isclose(loss.item(), 3.0 * unweighted.item(), rel_tol=1e-5)  # class weight 3 on every term


def test_mran_learned_head_scores_without_the_bias():
    cells = torch.tensor([[[[3.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    head = create_head("mran", 2, 2, adapter=0, hidden=2, attention="norm")
    with torch.no_grad():
        head.classifier.weight.copy_(torch.eye(2))
        head.classifier.bias.copy_(torch.tensor([0.0, 50.0]))  # would swamp both patch norms if it counted
    alpha = head(cells.mean(2), cells).aux["alpha"][0]
    assert torch.allclose(alpha, torch.tensor([21.4, 7.4]) / 28.8)


def test_mran_adapter_makes_cell_attention_learnable():
    """On a frozen cache the reference's cell attention is a fixed function of the inputs; with the adapter it
    learns to find the one informative cell of each patch, scored on held-out slides."""
    def slides(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for i in range(n):
            cells = torch.randn(1, 4, 8, D, generator=g) * 3.0  # loud noise cells
            cells[..., :4] = torch.randn(1, 4, 8, 4, generator=g) * 0.1  # quiet informative dimensions
            signal = (torch.arange(4) % 2 == 1) if i % 2 else torch.zeros(4, dtype=torch.bool)
            cells[0, signal, 0, :4] += 1.0  # positive slides: cell 0 of two patches carries a small shift
            out.append((cells, torch.tensor(i % 2), signal))
        return out

    def train(name: str, **options) -> torch.nn.Module:
        torch.manual_seed(0)
        head = create_head(name, D, 2, **options)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for epoch in range(15):
            for cells, label, _ in slides(40, 0):
                loss, _ = head.compute_loss(head(cells.mean(2), cells), label, epoch=epoch, n_epochs=15)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return head.eval()

    def cell0_share(head: torch.nn.Module) -> float:
        with torch.no_grad():
            betas = [head(c.mean(2), c).aux["beta"][0][s, 0] for c, y, s in slides(20, 1) if y == 1]
        return float(torch.cat(betas).mean())

    learned, fixed = cell0_share(train("mran", adapter=16)), cell0_share(train("mran-reference"))
    assert learned > 0.3 and learned > 2 * fixed  # 1/8 would be uniform


@pytest.mark.parametrize(
    "options",
    [
        {"attention": "gated"},
        {"attention": {"patch": "gated"}},
        {"cells": False},
        {"patches": False},
        {"cells": False, "patches": False, "attention": {"bag": "gated"}},
        {"detach_attention": True, "detach_slide": False, "dropout": 0.2},
        {"adapter": 0, "score_bias": True, "cell_weight": 0.5, "patch_weight": 1.0, "slide_bag_weight": 0.0},
    ],
)
def test_mran_variants_run(options):
    patches, cells, mask = _slide(4)
    head = create_head("mran", D, K, **options)
    out = head(patches, None if options.get("cells") is False else cells, mask)
    loss, _ = head.compute_loss(out, torch.tensor(0), epoch=0, n_epochs=2)
    loss.backward()
    assert torch.isfinite(loss)
    assert ("cell" in out.attention) == head.needs_cells
    if options.get("patches") is False:
        assert torch.allclose(out.attention["patch"][0][mask[0]], out.attention["bag"][0] / mask[0].sum())


def test_mran_cells_outside_the_cell_mask_get_no_attention_and_do_not_matter():
    # The hand-computed bag above, with its second cell of patch 0 masked: patch 0 is then its first cell alone.
    cells = torch.tensor([[[[3.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]], [[100.0, 0.0], [0.0, 100.0]]]])
    mask = torch.tensor([[True, True, False]])
    cell_mask = torch.tensor([[[True, False], [True, True], [True, True]]])
    out = _identity_mran()(cells.mean(2), cells, mask, cell_mask=cell_mask)
    assert torch.allclose(out.aux["beta"][0, 0], torch.tensor([1.0, 0.0]))
    # h0 = [3, 0], h1 = [0, 1]: shares 3/4, 1/4, minus 0.05 -> alpha = 0.70 / 0.90, 0.20 / 0.90.
    assert torch.allclose(out.aux["alpha"][0], torch.tensor([7 / 9, 2 / 9, 0.0]))
    cells[0, 0, 1] = torch.tensor([-50.0, 80.0])  # a masked cell's features change nothing
    again = _identity_mran()(cells.mean(2), cells, mask, cell_mask=cell_mask)
    assert torch.allclose(again.logits, out.logits) and again.attention["cell"][0, 0, 1] == 0


def test_mran_tissue_weights_on_a_hand_computed_bag():
    # The hand-computed bag above with tissue fractions (fit's tissue_weights): patch 0's cells 1.0 and 0.5 of
    # tissue, patch 1's both 0.5.
    cells = torch.tensor([[[[3.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]], [[100.0, 0.0], [0.0, 100.0]]]])
    mask = torch.tensor([[True, True, False]])
    tissue = torch.tensor([[[1.0, 0.5], [0.5, 0.5], [1.0, 1.0]]])
    out = _identity_mran()(cells.mean(2), cells, mask, cell_mask=tissue)
    # beta0 = (7/9, 2/9) x (1, 0.5), renormalised: 7/8, 1/8; beta1 = (1/2, 1/2) x 0.5, renormalised: 1/2, 1/2.
    assert torch.allclose(out.aux["beta"][0, :2], torch.tensor([[7 / 8, 1 / 8], [0.5, 0.5]]))
    # h0 = [11/4, 0], h1 = [0, 1]: shares 11/15, 4/15, minus 0.05 -> 41/54, 13/54; x patch tissue 0.75, 0.5
    # (its cells' mean), renormalised: 123/149, 26/149.
    assert torch.allclose(out.aux["alpha"][0], torch.tensor([123 / 149, 26 / 149, 0.0]))
    assert torch.allclose(out.logits, torch.tensor([123 / 149 * 11 / 4, 26 / 149]))
    assert torch.allclose(out.attention["cell"][0, 0], torch.tensor([123 / 149 * 7 / 8, 123 / 149 / 8]))


def test_mran_tissue_weights_share_bags_by_tissue_area_and_whole_tissue_changes_nothing():
    torch.manual_seed(0)
    head = create_head("mran", D, K).eval()
    patches, cells, mask = _slide(3)
    mask = torch.ones_like(mask)
    same = head(patches, cells, mask, cell_mask=torch.ones(cells.shape[:-1]))
    plain = head(patches, cells, mask)
    assert torch.allclose(same.logits, plain.logits) and torch.allclose(same.attention["cell"], plain.attention["cell"])
    two = (patches[:1].expand(2, -1, -1), cells[:1].expand(2, -1, -1, -1), mask[:2])  # two identical bags
    half = torch.ones(2, P, C)
    half[1] = 0.5  # the second bag is half glass everywhere
    out = head(*two, cell_mask=half)
    assert torch.allclose(out.attention["bag"], torch.tensor([2 / 3, 1 / 3]))
    assert torch.allclose(out.aux["beta"][0], out.aux["beta"][1]) and torch.allclose(out.aux["alpha"][0],
                                                                                       out.aux["alpha"][1])


@pytest.mark.parametrize("name", ["mran", "mran-reference"])
def test_mran_cell_mask_batched_equals_one_slide_at_a_time(name):
    torch.manual_seed(0)
    head = create_head(name, D, K).eval()
    slides = [_slide(seed) for seed in (1, 2)]
    cell_masks = [torch.rand(N_BAGS, P, C, generator=torch.Generator().manual_seed(s)) > 0.4 for s in (1, 2)]
    for m in cell_masks:
        m[..., 0] = True
    batched = head(torch.stack([s[0] for s in slides]), torch.stack([s[1] for s in slides]),
                   torch.stack([s[2] for s in slides]), cell_mask=torch.stack(cell_masks))
    for i, ((patches, cells, mask), cell_mask) in enumerate(zip(slides, cell_masks, strict=True)):
        alone = head(patches, cells, mask, cell_mask=cell_mask)
        assert torch.allclose(batched.logits[i], alone.logits, atol=1e-6)
        assert torch.all(alone.attention["cell"][~cell_mask] == 0)
    with pytest.raises(ConfigError, match="cell_mask must be"):
        head(*slides[0], cell_mask=cell_masks[0][:, :, :2])


def test_mran_needs_cells_unless_turned_off():
    patches, _, mask = _slide()
    with pytest.raises(ConfigError, match=r"no cell embeddings.*cells=false"):
        create_head("mran", D, K)(patches, None, mask)
    assert not create_head("mran", D, K, cells=False).needs_cells
    assert not create_head("abmil", D, K).needs_cells


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("resnet", {}, "valid models are"),
        ("mran", {"lambda": 3}, "valid options are"),
        ("mran", {"t": "0.1"}, "must be of type"),
        ("mran", {"cells": 1}, "must be of type"),
        ("abmil", {"hidden": 1.5}, "must be of type"),
        ("mran", {"t": 1.5}, "must be in"),
        ("mran", {"attention": "softmax"}, "not one of"),
        ("mran", {"attention": {"slide": "gated"}}, "do not exist"),
        ("transmil", {"hidden": 30, "heads": 8}, "divisible"),
    ],
)
def test_bad_configuration_is_a_config_error(name, options, message):
    with pytest.raises(ConfigError, match=message):
        create_head(name, D, K, **options)


def test_wrong_feature_size_is_a_config_error():
    patches, cells, mask = _slide()
    with pytest.raises(ConfigError, match="in_dim"):
        create_head("abmil", D + 1, K)(patches, cells, mask)
    with pytest.raises(ConfigError, match="mask"):
        create_head("abmil", D, K)(patches, cells, mask[:, :2])
