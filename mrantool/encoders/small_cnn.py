"""A small CNN for end-to-end training on CPUs, registered in timm's registry as `mrantool_small_cnn`.

Five 3x3 conv + BatchNorm + ReLU layers, four of them with stride 2: a 64 px patch becomes a 4 x 4 map of
128-d vectors (cell stride 16 px, receptive field 63 px). 0.25 M parameters and 12.7 MFLOPs per 64 px patch
(ResNet-18 at 128 px: 11.2 M and 1,184 MFLOPs), so it trains from scratch, end to end, on a few CPU cores.
Its stages are `stem`, `stages.0..2`, as timm's ConvNeXt-style models name them (fine-tuning picks the last
stages by that name). No pretrained weights exist: it is random init, a `--weights` file, or a run's encoder.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from mrantool.tiling.presets import IMAGENET_MEAN, IMAGENET_STD

WIDTHS = (16, 32, 64, 128)


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """stem (stride 2) -> three stages (stride 2 each; the last adds a stride-1 conv) -> global pool -> fc.

    timm's model interface: `forward_features` gives the (B, C, H/16, W/16) map, `forward_head` pools it
    (`pre_logits=True`: the pooled vector), `num_features`, `reset_classifier`.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, widths: tuple[int, ...] = WIDTHS,
                 drop_rate: float = 0.0, **_: Any) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = widths[-1]
        self.drop_rate = drop_rate
        self.stem = _conv(in_chans, widths[0], 2)
        stages = [_conv(a, b, 2) for a, b in pairwise(widths)]
        stages[-1].append(_conv(widths[-1], widths[-1], 1))
        self.stages = nn.Sequential(*stages)
        self.feature_info = [{"num_chs": w, "reduction": 2 ** (i + 1), "module": name} for i, (w, name) in
                             enumerate(zip(widths, ["stem", *[f"stages.{i}" for i in range(len(stages))]],
                                           strict=True))]
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "mrantool_small_cnn": {"input_size": (3, 64, 64), "pool_size": (4, 4), "mean": IMAGENET_MEAN,
                           "std": IMAGENET_STD, "first_conv": "stem.0", "classifier": "fc", "num_classes": 0},
})


@register_model
def mrantool_small_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """timm entry point: `timm.create_model("mrantool_small_cnn", num_classes=0)`."""
    return build_model_with_cfg(SmallCNN, "mrantool_small_cnn", pretrained, **kwargs)
