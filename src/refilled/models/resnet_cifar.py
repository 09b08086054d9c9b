"""CIFAR ResNet-(6n+2) (He et al., 2016, section 4.2): basic blocks, stage widths 16/32/64.

Downsampling shortcuts are 1x1 conv + BN projections (the paper's option B), so parameter counts
are slightly above the option-A figures in the paper (resnet20: ~0.28M vs 0.27M).
"""

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


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU (post-activation)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride == 1 and in_ch == out_ch:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class CifarResNet(ClassifierModel):
    default_input_size = 32

    def __init__(self, depth: int = 20, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth!r}")
        check_positive_int("in_chans", in_chans)
        self.depth = depth
        n = (depth - 2) // 6  # blocks per stage
        widths = (16, 32, 64)

        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        stages, in_ch = [], 16
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(in_ch, width, stride if j == 0 else 1))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = widths[-1]
        self._init_head(num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # every block ends with a ReLU, so the last feature map is already activated
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The (B, C, H, W) outputs of the three stages (widths 16/32/64); the last is pooled."""
        maps, x = [], self.stem(x)
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


@register_pattern(r"resnet(\d+)", "resnet{6n+2}")
def resnet(depth: int, num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(depth, num_classes, in_chans)


@register_model
def resnet20(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_chans)


@register_model
def resnet32(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(32, num_classes, in_chans)


@register_model
def resnet44(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(44, num_classes, in_chans)


@register_model
def resnet56(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(56, num_classes, in_chans)


@register_model
def resnet110(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(110, num_classes, in_chans)
