"""Several models ("members": the folds of a CV, or sweep variants of one architecture) run as one.

Each member keeps its own module, so checkpoints, optimiser state and early stopping stay per member. For a
step, the parameters and buffers of the members that take part are stacked (`torch.stack`, differentiable, so
gradients land in each member's own tensors) and one forward runs under `torch.func.vmap` over the members
(`randomness="different"`: each member draws its own dropout). One member alone runs its module directly. The
heads must meet the batched contract of docs/architecture.md.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mrantool.models.base import MILHead, call_head


def is_batched(head: nn.Module) -> bool:
    """Whether a head (or the head inside a wrapper such as `Standardized`) meets the batched contract."""
    return bool(getattr(getattr(head, "head", head), "batched", False))


class Objective(nn.Module):
    """A head's forward and loss for one member's batch of slides, as one module call that can be stacked.

    Returns each slide's loss (S,), the logits (S, K) and the bag attention (S, n_bags) (zeros for heads without
    a bag level), the last two detached. A head without the batched contract gets its one slide (S = 1) in the
    one-slide shapes.
    """

    def __init__(self, head: MILHead) -> None:
        super().__init__()
        self.head = head
        self.batched = is_batched(head)

    def forward(self, patches: Tensor, cells: Tensor | None, mask: Tensor, labels: Tensor, class_weights: Tensor,
                bag_weights: Tensor | None, cell_mask: Tensor | None, epoch: int,
                n_epochs: int) -> tuple[Tensor, Tensor, Tensor]:
        head = self.head
        cells = cells if head.needs_cells else None
        cell_mask = cell_mask if cells is not None else None
        extra = {} if bag_weights is None else {"bag_weights": bag_weights if self.batched else bag_weights[0]}
        if self.batched:
            out = call_head(head, patches, cells, mask, cell_mask)
            loss, _ = head.compute_loss(out, labels, epoch=epoch, n_epochs=n_epochs, class_weights=class_weights,
                                        **extra)
            logits, bag = out.logits, out.attention.get("bag")
        else:
            out = call_head(head, patches[0], None if cells is None else cells[0], mask[0],
                            None if cell_mask is None else cell_mask[0])
            loss, _ = head.compute_loss(out, labels[0], epoch=epoch, n_epochs=n_epochs,
                                        class_weights=class_weights, **extra)
            loss, logits = loss.reshape(1), out.logits.unsqueeze(0)
            bag = out.attention.get("bag")
            bag = None if bag is None else bag.unsqueeze(0)
        bag = torch.zeros(mask.shape[:-1], device=mask.device) if bag is None else bag.detach().float()
        return loss, logits.detach(), bag


class MemberStack:
    """`Objective`s of members with one architecture and one set of options, callable on any subset of them."""

    def __init__(self, heads: Sequence[MILHead]) -> None:
        self.objectives = [Objective(head) for head in heads]
        first = self.objectives[0]
        self.batched = first.batched
        self.names = [name for name, _ in first.named_parameters()]
        self.buffer_names = [name for name, _ in first.named_buffers()]
        for objective in self.objectives[1:]:
            if [n for n, _ in objective.named_parameters()] != self.names:
                raise ValueError("members stacked together must share one architecture")
        self.template = copy.deepcopy(first).to("meta") if len(heads) > 1 else first
        self._tensors: list[tuple[list[Tensor], list[Tensor]]] = []

    def _member_tensors(self, member: int) -> tuple[list[Tensor], list[Tensor]]:
        """A member's parameters and buffers in template order (looked up once: they are updated in place)."""
        if not self._tensors:
            self._tensors = [(list(o.parameters()), list(o.buffers())) for o in self.objectives]
        return self._tensors[member]

    def __len__(self) -> int:
        return len(self.objectives)

    def parameters(self, member: int) -> list[nn.Parameter]:
        return list(self.objectives[member].parameters())

    def train(self, mode: bool = True) -> None:
        for objective in self.objectives:
            objective.train(mode)
        self.template.train(mode)

    def __call__(self, members: Sequence[int], patches: Tensor, cells: Tensor | None, mask: Tensor, labels: Tensor,
                 class_weights: Tensor, bag_weights: Tensor | None, epoch: int, n_epochs: int,
                 cell_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Run `members` on their batches (leading member dimension on every tensor): loss (G, S), logits
        (G, S, K), bag attention (G, S, n_bags)."""
        if len(members) == 1:
            results = self.objectives[members[0]](
                patches[0], None if cells is None else cells[0], mask[0], labels[0], class_weights[0],
                None if bag_weights is None else bag_weights[0], None if cell_mask is None else cell_mask[0],
                epoch, n_epochs)
            return tuple(r.unsqueeze(0) for r in results)  # type: ignore[return-value]
        tensors = [self._member_tensors(m) for m in members]
        params = {name: torch.stack(group) for name, group in
                  zip(self.names, zip(*(p for p, _ in tensors), strict=True), strict=True)}
        buffers = {name: torch.stack(group) for name, group in
                   zip(self.buffer_names, zip(*(b for _, b in tensors), strict=True), strict=True)}

        def one(p: dict[str, Tensor], b: dict[str, Tensor], *args: Tensor | None) -> tuple[Tensor, ...]:
            return functional_call(self.template, (p, b), (*args, epoch, n_epochs))

        args = (patches, cells, mask, labels, class_weights, bag_weights, cell_mask)
        in_dims = (0, 0, *(None if a is None else 0 for a in args))
        return vmap(one, in_dims=in_dims, randomness="different")(params, buffers, *args)
