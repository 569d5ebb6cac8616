"""Parameter-light baselines: a linear classifier on mean-pooled instances, and max-pooled instance logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mrantool.errors import ConfigError
from mrantool.models.attention import masked_argmax, masked_max, pool, uniform_weights
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

    def pool(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        weights = uniform_weights(valid)
        return self.classifier(self.dropout(pool(weights, x))), weights, {}


class MaxPool(_LinearHead):
    """logits[k] = max over instances of Linear(x)[k]; attention is 1 on the instance that sets the
    predicted class's logit."""

    def pool(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        instance_logits = self.classifier(self.dropout(x))
        valid = valid.unsqueeze(-1)
        logits = masked_max(instance_logits, valid, -2)
        argmax = masked_argmax(instance_logits, valid, -2)  # (S, K)
        winner = argmax.gather(-1, logits.detach().argmax(-1, keepdim=True))  # (S, 1)
        weights = (torch.arange(x.shape[-2], device=x.device) == winner).to(x.dtype)
        return logits, weights, {"instance_logits": instance_logits}
