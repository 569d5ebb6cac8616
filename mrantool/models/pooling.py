"""Parameter-light baselines: a linear classifier on mean-pooled instances, and max-pooled instance logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mrantool.errors import ConfigError
from mrantool.models.base import InstanceHead


class _LinearHead(InstanceHead):
    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_classes)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"option dropout={dropout} must be in [0, 1); fix it in the model options.")
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, n_classes)


class MeanPool(_LinearHead):
    """logits = Linear(mean of the valid instances); attention is uniform."""

    def pool(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        weights = torch.full((x.shape[0],), 1.0 / x.shape[0], device=x.device)
        return self.classifier(self.dropout(x.mean(0))), weights, {}


class MaxPool(_LinearHead):
    """logits[k] = max over instances of Linear(x)[k]; attention is 1 on the instance that sets the
    predicted class's logit."""

    def pool(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        instance_logits = self.classifier(self.dropout(x))
        logits, argmax = instance_logits.max(0)
        weights = torch.zeros(x.shape[0], device=x.device)
        weights[argmax[logits.detach().argmax()]] = 1.0
        return logits, weights, {"instance_logits": instance_logits}
