"""MRAN (Multi-scale Representation Attention Network, Med Image Anal 2023;89:102890) on cached features.

Per bag (DESIGN.md section 2), with a classifier W, b shared by the cell, patch and bag levels:

    s[p,c] = ||x[p,c]||          beta[p] = renorm(relu(s[p] / sum_c s[p] - t/C))     h[p] = sum_c beta[p,c] x[p,c]
    a[p] = ||W h[p] + b||        alpha   = renorm(relu(a / sum_p a - t/P))           z = sum_p alpha[p] h[p]
    y_bag = W z + b

and per slide: u_b = Linear(D->d)(z_b), y_b = Linear(d->K)(u_b), g_b = ||y_b||,
alpha_b = renorm(relu(g / sum g - t/n_bags)), y_slide = Linear(d->K)(sum_b alpha_b u_b).

Loss: L = L_slide + L_bag + lam r(e) L_patch + lam^2 r(e) L_cell with r(e) = exp(-(1 - e/(E-1))^2), where
L_patch and L_cell are cross-entropies of every patch's and cell's logits against the slide label weighted
by alpha and alpha*beta, L_bag is weighted per bag (bag mining), all class-weighted.

Relation to the reference: the reference code trains the bag network first and then fits the slide head
separately on detached bag embeddings. Here both train jointly in one loss; with `detach_slide=True`
(default) z enters the slide head detached, so bag features are shaped only by the bag/patch/cell losses as
in the reference, while the slide head learns on the same embeddings. The reference also detaches alpha
(`detach_attention=True`, applied to every norm level; learnable gated scores are never detached, or they
would not train). Loss weights alpha and alpha*beta are always detached, so attention cannot lower the
loss by moving onto easy instances.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mrantool.errors import ConfigError
from mrantool.models.attention import AttentionScore, masked_softmax, norm_threshold, uniform_weights
from mrantool.models.base import MILHead, MILOutput, weighted_ce

LEVELS = ("cell", "patch", "bag")
ATTENTION_KINDS = ("norm", "gated")


def ramp(epoch: int, n_epochs: int) -> float:
    """Deep-supervision ramp r(e) = exp(-(1 - e/(E-1))^2) for a 0-based epoch e of E (1.0 when E == 1)."""
    if n_epochs <= 1:
        return 1.0
    return math.exp(-((1.0 - epoch / (n_epochs - 1)) ** 2))


class MRAN(MILHead):
    """MRAN head: thresholded norm (or gated) attention over cells, patches and bags; deep supervision.

    Options: `attention` "norm" | "gated" for every level, or a mapping such as {patch = "gated"} (missing
    levels stay "norm"); `cells`/`patches` False turns that level off (cells off: h is the encoder's
    patch embedding, i.e. the uniformly pooled token map, and no cell input is needed; patches off: alpha is
    uniform over valid patches); `t` threshold; `lam` deep-supervision weight; `hidden` slide-head width d;
    `dropout` on u; `detach_attention`; `detach_slide` (see the module docstring).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        attention: str | Mapping[str, str] = "norm",
        cells: bool = True,
        patches: bool = True,
        t: float = 0.1,
        lam: float = 5.0,
        hidden: int = 128,
        dropout: float = 0.0,
        detach_attention: bool = True,
        detach_slide: bool = True,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if not 0.0 <= t < 1.0:
            raise ConfigError(f"mran option t={t} must be in [0, 1); set t in the model options (default 0.1).")
        if lam < 0 or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ConfigError(
                f"mran options need lam >= 0, hidden >= 1 and 0 <= dropout < 1, got lam={lam}, hidden={hidden}, "
                f"dropout={dropout}; fix them in the model options."
            )
        self.kinds = _attention_kinds(attention)
        self.cells, self.patches = cells, patches
        self.t, self.lam = t, lam
        self.detach_attention, self.detach_slide = detach_attention, detach_slide
        self.classifier = nn.Linear(in_dim, n_classes)
        self.slide_proj = nn.Linear(in_dim, hidden)
        self.slide_cls = nn.Linear(hidden, n_classes)
        self.dropout = nn.Dropout(dropout)
        dims = {"cell": in_dim, "patch": in_dim, "bag": hidden}
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
    ) -> MILOutput:
        mask = self.check_inputs(patches, cells, mask)
        attention: dict[str, Tensor] = {}
        aux: dict[str, Tensor] = {}
        if self.cells:
            x = cells.float()
            beta = self._weights("cell", x, x.norm(dim=-1), mask.unsqueeze(-1).expand(x.shape[:3]))
            h = torch.einsum("bpc,bpcd->bpd", beta, x)
            aux["cell_logits"], aux["beta"] = self.classifier(x), beta
        else:
            h = patches.float()
        patch_logits = self.classifier(h)
        norms = patch_logits.norm(dim=-1)
        alpha = self._weights("patch", h, norms, mask) if self.patches else uniform_weights(mask)
        z = torch.einsum("bp,bpd->bd", alpha, h)
        u = self.dropout(self.slide_proj(z.detach() if self.detach_slide else z))
        bag_valid = mask.any(-1)
        alpha_b = self._weights("bag", u, self.slide_cls(u).norm(dim=-1), bag_valid)
        logits = self.slide_cls((alpha_b.unsqueeze(-1) * u).sum(0))
        attention["bag"] = alpha_b
        attention["patch"] = alpha_b.unsqueeze(-1) * alpha
        if self.cells:
            attention["cell"] = attention["patch"].unsqueeze(-1) * aux["beta"]
        aux.update(bag_logits=self.classifier(z), patch_logits=patch_logits, alpha=alpha, bag_valid=bag_valid)
        if bag_weights is not None:
            aux["bag_weights"] = bag_weights
        return MILOutput(logits, attention, aux)

    def compute_loss(
        self,
        out: MILOutput,
        label: Tensor,
        *,
        epoch: int,
        n_epochs: int,
        class_weights: Tensor | None = None,
        bag_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """L_slide + L_bag + lam r(e) L_patch + lam^2 r(e) L_cell; `bag_weights` here override forward's."""
        aux = out.aux
        valid = aux["bag_valid"].float()
        n_valid = valid.sum().clamp_min(1.0)
        if bag_weights is None:
            bag_weights = aux.get("bag_weights", torch.ones_like(valid))
        slide = weighted_ce(out.logits, label, class_weights)
        per_bag = weighted_ce(aux["bag_logits"], label, class_weights, reduction="none")
        bag = (bag_weights.to(valid) * valid * per_bag).sum() / n_valid
        alpha = aux["alpha"].detach()
        patch = (alpha * weighted_ce(aux["patch_logits"], label, class_weights, reduction="none")).sum() / n_valid
        r = ramp(epoch, n_epochs)
        loss = slide + bag + self.lam * r * patch
        parts = {"slide": slide, "bag": bag, "patch": patch}
        if self.cells:
            ab = alpha.unsqueeze(-1) * aux["beta"].detach()
            cell = (ab * weighted_ce(aux["cell_logits"], label, class_weights, reduction="none")).sum() / n_valid
            loss = loss + self.lam**2 * r * cell
            parts["cell"] = cell
        return loss, {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}


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
