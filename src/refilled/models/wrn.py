"""Wide ResNet WRN-d-k for 32x32 inputs (Zagoruyko & Komodakis, 2016), pre-activation blocks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from refilled.errors import ConfigError
from refilled.models.registry import (
    ClassifierModel,
    check_positive_int,
    init_weights,
    register_model,
    register_pattern,
)


class _WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 with identity or 1x1-conv shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.equal = in_ch == out_ch and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(self.drop(F.relu(self.bn2(self.conv1(o)))))
        # as in the reference code, the projection shortcut takes the pre-activated input
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(ClassifierModel):
    default_input_size = 32

    def __init__(
        self,
        depth: int = 40,
        widen_factor: int = 2,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.3,
    ):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}")
        check_positive_int("widen_factor", widen_factor)
        check_positive_int("in_chans", in_chans)
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        self.depth, self.widen_factor = depth, widen_factor
        n = (depth - 4) // 6  # blocks per stage
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [
                _WideBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1, drop_rate)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(widths[3])  # final pre-activation BN+ReLU
        self.num_features = widths[3]
        self._init_head(num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.conv1(x))
        x = F.relu(self.bn(x))
        return x.mean(dim=(2, 3))

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The (B, C, H, W) outputs of the three groups; the last one after the final BN-ReLU,
        i.e. the map that :meth:`forward_features` pools (the others are pre-activation sums)."""
        maps, x = [], self.conv1(x)
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        maps[-1] = F.relu(self.bn(maps[-1]))
        return maps


@register_pattern(r"wrn_(\d+)_(\d+)", "wrn_{depth}_{widen}")
def wrn(depth: int, widen_factor: int, num_classes: int, in_chans: int = 3, drop_rate: float = 0.3) -> WideResNet:
    return WideResNet(depth, widen_factor, num_classes, in_chans, drop_rate)


@register_model
def wrn_40_2(num_classes: int, in_chans: int = 3, drop_rate: float = 0.3) -> WideResNet:
    return WideResNet(40, 2, num_classes, in_chans, drop_rate)


@register_model
def wrn_40_1(num_classes: int, in_chans: int = 3, drop_rate: float = 0.3) -> WideResNet:
    return WideResNet(40, 1, num_classes, in_chans, drop_rate)


@register_model
def wrn_16_2(num_classes: int, in_chans: int = 3, drop_rate: float = 0.3) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_chans, drop_rate)


@register_model
def wrn_16_1(num_classes: int, in_chans: int = 3, drop_rate: float = 0.3) -> WideResNet:
    return WideResNet(16, 1, num_classes, in_chans, drop_rate)
