"""MRAN (Multi-scale Representation Attention Network, Med Image Anal 2023;89:102890) on cached features.

Per bag, with a classifier W, b shared by the cell, patch and bag levels and u = phi(x) the adapted cells:

    s[p,c] = ||u[p,c]||        beta[p] = renorm(relu(s[p] / sum_c s[p] - t/C))     h[p] = sum_c beta[p,c] u[p,c]
    a[p] = ||W h[p] (+ b)||    alpha   = renorm(relu(a / sum_p a - t/P))           z = sum_p alpha[p] h[p]
    y_bag = W z + b

and per slide: v_b = V z_b (D->d), y_b = U v_b, g_b = ||y_b||, alpha_b = renorm(relu(g / sum g - t/n_bags)),
y_slide = U (sum_b alpha_b v_b).

Loss: L = L_slide + w_s r(e) L_slide_bags + L_bag + w_p r(e) L_patch + w_c r(e) L_cell, r(e) =
exp(-(1 - e/(E-1))^2): L_bag, L_patch, L_cell are cross-entropies of each bag's, patch's and cell's logits against the
slide label, weighted per bag by the bag weight (bag mining) and inside a bag by alpha and alpha*beta; L_slide_bags
weights the slide head's per-bag logits by alpha_b. All terms are class-weighted.

The reference (xhangchen/MRAN) trains a ResNet-18 end to end, so its cell norms are learned. On a frozen cache nothing
would learn them, so `phi` is a small trainable adapter (Linear + ReLU, width `adapter`) standing in for the encoder's
last layers; `adapter=0` drops it. The reference's loss is a mean over every item (main.py's weight_cross_entropy),
which divides the alpha-weighted patch term by P and the cell term by P*C: `patch_weight`/`cell_weight` None keep that
scaling (lam/P and lam^2/(P*C)); numbers replace it. `mran-reference` is the reference's head exactly (no adapter,
bias in the patch score, a 32-unit linear slide head). docs/mran.md sets every equation next to the reference code.

Gradients: as in the reference, the pooled embeddings h and z carry gradients through beta and alpha
(`detach_attention=False`); the loss weights alpha, alpha*beta and alpha_b are detached, so attention cannot lower
the loss by moving onto easy instances; the slide head sees z detached (`detach_slide=True`), as the reference's
separately trained downstream MIL does. Learnable gated scores (`attention="gated"`) are an option at every level.

The head is batched (docs/architecture.md): it takes one slide or a padded batch of slides, mask-based with no
boolean indexing or data-dependent Python branches, so the trainer can vmap it over folds and sweep variants.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mrantool.errors import ConfigError
from mrantool.models.attention import (
    AttentionScore,
    area_weighted,
    masked_softmax,
    norm_threshold,
    uniform_weights,
)
from mrantool.models.base import MILHead, MILOutput, weighted_ce

LEVELS = ("cell", "patch", "bag")
ATTENTION_KINDS = ("norm", "gated")
#: `mran`'s attention: norm scores of the adapted cells (MRAN's own), a learnable gated score for patches (chosen on
#: validation folds: the logit norm ||W h|| is large for confident patches of either class), norm scores for bags.
#: Never mutated (`_attention_kinds` copies it).
DEFAULT_ATTENTION = {"cell": "norm", "patch": "gated", "bag": "norm"}


def ramp(epoch: int, n_epochs: int) -> float:
    """Deep-supervision ramp r(e) = exp(-(1 - e/(E-1))^2) for a 0-based epoch e of E (1.0 when E == 1)."""
    if n_epochs <= 1:
        return 1.0
    return math.exp(-((1.0 - epoch / (n_epochs - 1)) ** 2))


class MRAN(MILHead):
    """MRAN head: thresholded norm (or gated) attention over cells, patches and bags; deep supervision.

    Options: `attention` "norm" | "gated" for every level, or a mapping such as {patch = "gated"} (missing levels
    are "norm"; default DEFAULT_ATTENTION); `cells`/`patches` False turns that level off (cells off: h =
    phi(patch embedding), the encoder's uniformly pooled token map, and no cell input is needed; patches off: alpha
    is uniform over valid patches);
    `adapter` width of the trainable cell adapter (0 = none); `t` threshold; `lam` deep-supervision weight;
    `patch_weight`/`cell_weight`/`slide_bag_weight` per-term weights (None = the reference's scaling from `lam`);
    `score_bias` whether the classifiers' biases count in the patch and bag scores; `hidden` slide-head width d;
    `dropout` on the adapter output and on v (0.25: chosen on CRC validation splits, benchmarks/mran_defaults.py;
    the reference has none); `detach_attention`; `detach_slide` (see the module docstring).
    """

    batched = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        attention: str | Mapping[str, str] = DEFAULT_ATTENTION,
        cells: bool = True,
        patches: bool = True,
        adapter: int = 128,
        t: float = 0.1,
        lam: float = 5.0,
        patch_weight: float | None = None,
        cell_weight: float | None = None,
        slide_bag_weight: float | None = None,
        score_bias: bool = False,
        hidden: int = 32,
        dropout: float = 0.25,
        detach_attention: bool = False,
        detach_slide: bool = True,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if not 0.0 <= t < 1.0:
            raise ConfigError(f"mran option t={t} must be in [0, 1); set t in the model options (default 0.1).")
        weights = {"patch_weight": patch_weight, "cell_weight": cell_weight, "slide_bag_weight": slide_bag_weight}
        negative = [f"{k}={v}" for k, v in weights.items() if v is not None and not v >= 0]
        if lam < 0 or hidden < 1 or adapter < 0 or not 0.0 <= dropout < 1.0 or negative:
            raise ConfigError(
                f"mran options need lam >= 0, hidden >= 1, adapter >= 0, non-negative loss weights and "
                f"0 <= dropout < 1, got lam={lam}, hidden={hidden}, adapter={adapter}, dropout={dropout}"
                f"{', ' + ', '.join(negative) if negative else ''}; fix them in the model options."
            )
        self.kinds = _attention_kinds(attention)
        self.cells, self.patches = cells, patches
        self.t, self.lam = t, lam
        self.patch_weight, self.cell_weight, self.slide_bag_weight = patch_weight, cell_weight, slide_bag_weight
        self.score_bias = score_bias
        self.detach_attention, self.detach_slide = detach_attention, detach_slide
        dim = adapter or in_dim
        self.adapter = nn.Sequential(nn.Linear(in_dim, adapter), nn.ReLU()) if adapter else nn.Identity()
        self.classifier = nn.Linear(dim, n_classes)
        self.slide_proj = nn.Linear(dim, hidden)
        self.slide_cls = nn.Linear(hidden, n_classes)
        self.dropout = nn.Dropout(dropout)
        dims = {"cell": dim, "patch": dim, "bag": hidden}
        self.gates = nn.ModuleDict(
            {level: AttentionScore(dims[level], hidden) for level, kind in self.kinds.items() if kind == "gated"}
        )

    @property
    def needs_cells(self) -> bool:  # type: ignore[override]
        return self.cells

    def _weights(self, level: str, items: Tensor, norms: Tensor, valid: Tensor) -> Tensor:
        if self.kinds[level] == "gated":
            return masked_softmax(self.gates[level](items), valid)
        return norm_threshold(norms.detach() if self.detach_attention else norms, valid, self.t)

    def forward(
        self,
        patches: Tensor,
        cells: Tensor | None = None,
        mask: Tensor | None = None,
        bag_weights: Tensor | None = None,
        cell_mask: Tensor | None = None,
    ) -> MILOutput:
        mask = self.check_inputs(patches, cells, mask)
        if cell_mask is not None and (cells is None or cell_mask.shape != cells.shape[:-1]):
            raise ConfigError(f"cell_mask must be {tuple(cells.shape[:-1]) if cells is not None else 'None'} (one "
                              f"flag per cell), got {tuple(cell_mask.shape)}; pass the store's cell tissue mask.")
        single = patches.dim() == 3
        if single:  # one slide: add the slide dimension, drop it on the way out
            patches, mask = patches.unsqueeze(0), mask.unsqueeze(0)
            cells = None if cells is None else cells.unsqueeze(0)
            bag_weights = None if bag_weights is None else bag_weights.unsqueeze(0)
            cell_mask = None if cell_mask is None else cell_mask.unsqueeze(0)
        out = self._forward(patches, cells, mask, bag_weights, cell_mask)
        return out.slide(0) if single else out

    def _forward(self, patches: Tensor, cells: Tensor | None, mask: Tensor, bag_weights: Tensor | None,
                 cell_mask: Tensor | None) -> MILOutput:
        """Slides (S, n_bags, P, D), cells (S, n_bags, P, C, D), mask (S, n_bags, P), cell_mask (S, n_bags, P, C)
        | None -> batched MILOutput. Cells outside `cell_mask` (too little tissue) get no attention. A floating
        `cell_mask` holds the cells' tissue fractions (fit's `tissue_weights`): then each level's weights are
        multiplied by tissue area (cell fraction, patch mean, bag sum) and renormalised."""
        aux: dict[str, Tensor] = {}
        area = None
        if self.cells:
            u = self.dropout(self.adapter(cells.float()))
            valid = mask.unsqueeze(-1).expand(u.shape[:-1])
            if cell_mask is not None:
                valid = valid & cell_mask.bool()
            beta = self._weights("cell", u, u.norm(dim=-1), valid)
            if cell_mask is not None and cell_mask.is_floating_point():
                beta = area_weighted(beta, cell_mask * valid)
                area = cell_mask.mean(-1) * mask  # each patch's tissue fraction
            h = torch.einsum("sbpc,sbpcd->sbpd", beta, u)
            aux["cell_logits"], aux["beta"] = self.classifier(u), beta
        else:
            h = self.dropout(self.adapter(patches.float()))
        patch_logits = self.classifier(h)
        scores = patch_logits if self.score_bias else patch_logits - self.classifier.bias
        alpha = self._weights("patch", h, scores.norm(dim=-1), mask) if self.patches else uniform_weights(mask)
        if area is not None:
            alpha = area_weighted(alpha, area)
        z = torch.einsum("sbp,sbpd->sbd", alpha, h)
        v = self.dropout(self.slide_proj(z.detach() if self.detach_slide else z))
        bag_valid = mask.any(-1)
        slide_bag_logits = self.slide_cls(v)
        bag_scores = slide_bag_logits if self.score_bias else slide_bag_logits - self.slide_cls.bias
        alpha_b = self._weights("bag", v, bag_scores.norm(dim=-1), bag_valid)
        if area is not None:
            alpha_b = area_weighted(alpha_b, area.sum(-1))
        logits = self.slide_cls((alpha_b.unsqueeze(-1) * v).sum(-2))
        attention = {"bag": alpha_b, "patch": alpha_b.unsqueeze(-1) * alpha}
        if self.cells:
            attention["cell"] = attention["patch"].unsqueeze(-1) * aux["beta"]
        aux.update(bag_logits=self.classifier(z), patch_logits=patch_logits, alpha=alpha, bag_valid=bag_valid,
                   patch_valid=mask, slide_bag_logits=slide_bag_logits, alpha_b=alpha_b)
        if bag_weights is not None:
            aux["bag_weights"] = bag_weights
        return MILOutput(logits, attention, aux)

    def term_weights(self, n_patches: Tensor, n_cells: int) -> dict[str, Tensor | float]:
        """Weights of the patch, cell and slide-bag terms before the ramp (the reference's scaling when None);
        `n_patches` is each slide's mean number of valid patches per valid bag (P when every patch is tissue)."""
        return {
            "patch": self.lam / n_patches if self.patch_weight is None else self.patch_weight,
            "cell": self.lam**2 / (n_patches * max(n_cells, 1)) if self.cell_weight is None else self.cell_weight,
            "slide_bags": self.lam if self.slide_bag_weight is None else self.slide_bag_weight,
        }

    def compute_loss(
        self,
        out: MILOutput,
        label: Tensor,
        *,
        epoch: int,
        n_epochs: int,
        class_weights: Tensor | None = None,
        bag_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The module docstring's loss, per slide on a batch ((S,) labels -> (S,) losses), 0-d on one slide;
        `bag_weights` ((n_bags,) or (S, n_bags)) here override forward's. Parts are detached tensors."""
        single = label.dim() == 0
        if single:
            out = MILOutput(out.logits.unsqueeze(0), {}, {k: v.unsqueeze(0) for k, v in out.aux.items()})
            label = label.unsqueeze(0)
            bag_weights = None if bag_weights is None else bag_weights.unsqueeze(0)
        terms = self._loss_terms(out, label, epoch, n_epochs, class_weights, bag_weights)
        if single:
            terms = {k: v[0] for k, v in terms.items()}
        loss = terms.pop("loss")
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    def _loss_terms(self, out: MILOutput, label: Tensor, epoch: int, n_epochs: int, class_weights: Tensor | None,
                    bag_weights: Tensor | None) -> dict[str, Tensor]:
        """Each slide's loss and unweighted terms, (S,) each (vmap-safe: no Python numbers from tensors)."""
        aux = out.aux
        valid = aux["bag_valid"].float()  # (S, n_bags)
        n_valid = valid.sum(-1).clamp_min(1.0)
        if bag_weights is None:
            bag_weights = aux.get("bag_weights", torch.ones_like(valid))
        w_bag = bag_weights.to(valid) * valid
        n_patches = (aux["patch_valid"].float().sum((-2, -1)) / n_valid).clamp_min(1.0)  # valid patches per bag
        n_cells = aux["cell_logits"].shape[-2] if self.cells else 0
        w = self.term_weights(n_patches, n_cells)
        r = ramp(epoch, n_epochs)

        def per_bag(logits: Tensor, weights: Tensor) -> Tensor:
            """Sum over each bag's items of weight x CE, then the bag-weighted mean over a slide's valid bags."""
            ce = weighted_ce(logits, label, class_weights, reduction="none")  # (S, n_bags, ...)
            items = (weights * ce).flatten(2).sum(-1) if ce.dim() > 2 else weights * ce
            return (w_bag * items).sum(-1) / n_valid

        alpha_b = aux["alpha_b"].detach()
        slide_ce = weighted_ce(aux["slide_bag_logits"], label, class_weights, reduction="none")
        terms = {
            "slide": weighted_ce(out.logits, label, class_weights, reduction="none"),
            "slide_bags": (alpha_b * slide_ce).sum(-1) / n_valid,
            "bag": per_bag(aux["bag_logits"], torch.ones_like(valid)),
            "patch": per_bag(aux["patch_logits"], aux["alpha"].detach()),
        }
        loss = (terms["slide"] + w["slide_bags"] * r * terms["slide_bags"] + terms["bag"]
                + w["patch"] * r * terms["patch"])
        if self.cells:
            terms["cell"] = per_bag(aux["cell_logits"], aux["alpha"].detach().unsqueeze(-1) * aux["beta"].detach())
            loss = loss + w["cell"] * r * terms["cell"]
        return {"loss": loss, **terms}


class MRANReference(MRAN):
    """MRAN exactly as the reference code computes it (xhangchen/MRAN model/ResNet.py, main.py): no adapter,
    ||W h + b|| patch scores, a 32-unit linear slide head, gradients through the attention, loss means over items."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        attention: str | Mapping[str, str] = "norm",
        cells: bool = True,
        patches: bool = True,
        adapter: int = 0,
        t: float = 0.1,
        lam: float = 5.0,
        patch_weight: float | None = None,
        cell_weight: float | None = None,
        slide_bag_weight: float | None = None,
        score_bias: bool = True,
        hidden: int = 32,
        dropout: float = 0.0,
        detach_attention: bool = False,
        detach_slide: bool = True,
    ) -> None:
        super().__init__(in_dim, n_classes, attention=attention, cells=cells, patches=patches, adapter=adapter,
                         t=t, lam=lam, patch_weight=patch_weight, cell_weight=cell_weight,
                         slide_bag_weight=slide_bag_weight, score_bias=score_bias, hidden=hidden, dropout=dropout,
                         detach_attention=detach_attention, detach_slide=detach_slide)


def _attention_kinds(attention: str | Mapping[str, str]) -> dict[str, str]:
    """Expand the `attention` option to a kind per level, validating names and kinds."""
    if isinstance(attention, str):
        kinds = dict.fromkeys(LEVELS, attention)
    else:
        unknown = sorted(set(attention) - set(LEVELS))
        if unknown:
            raise ConfigError(
                f"mran attention levels {unknown} do not exist; use {list(LEVELS)} in the attention option."
            )
        kinds = {level: attention.get(level, "norm") for level in LEVELS}
    bad = sorted({kind for kind in kinds.values() if kind not in ATTENTION_KINDS})
    if bad:
        raise ConfigError(f"mran attention {bad} is not one of {list(ATTENTION_KINDS)}; fix the attention option.")
    return kinds
