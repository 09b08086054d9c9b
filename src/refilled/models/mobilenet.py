"""MobileNetV1 (Howard et al., 2017) with a width multiplier, ImageNet layout.

A stride-2 3x3 conv followed by 13 depthwise-separable blocks (total stride 32); global average
pooling makes it work on any input of at least 32 px (e.g. 84 for mini-ImageNet, 224 for ImageNet).
"""

from __future__ import annotations

import torch.nn as nn

from refilled.errors import ConfigError
from refilled.models.registry import (
    ClassifierModel,
    SequentialStages,
    check_positive_int,
    init_weights,
    register_model,
)

# (output channels at width 1.0, stride) of the 13 depthwise-separable blocks
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(SequentialStages, ClassifierModel):
    default_input_size = 224

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or width_mult <= 0:
            raise ConfigError(f"width_mult must be a positive number, got {width_mult!r}")
        check_positive_int("in_chans", in_chans)
        self.width_mult = float(width_mult)

        def ch(c: int) -> int:
            return max(1, int(c * width_mult))

        layers = [_conv_bn_relu(in_chans, ch(32), 3, 2)]
        in_ch = ch(32)
        # a stage ends right before each later stride-2 block, and at the end of the network
        self._stage_ends = [i + 1 for i, (_, stride) in enumerate(_BLOCKS) if stride == 2] + [len(_BLOCKS) + 1]
        for out, stride in _BLOCKS:
            layers.append(
                nn.Sequential(
                    _conv_bn_relu(in_ch, in_ch, 3, stride, groups=in_ch),  # depthwise
                    _conv_bn_relu(in_ch, ch(out), 1, 1),  # pointwise
                )
            )
            in_ch = ch(out)
        self.features = nn.Sequential(*layers)
        self.num_features = in_ch  # int(1024 * width_mult)
        self._init_head(num_classes)
        init_weights(self)


@register_model
def mobilenet(num_classes: int, in_chans: int = 3, width_mult: float = 1.0) -> MobileNetV1:
    return MobileNetV1(width_mult, num_classes, in_chans)


@register_model
def mobilenet_1_0(num_classes: int, in_chans: int = 3) -> MobileNetV1:
    return MobileNetV1(1.0, num_classes, in_chans)


@register_model
def mobilenet_0_75(num_classes: int, in_chans: int = 3) -> MobileNetV1:
    return MobileNetV1(0.75, num_classes, in_chans)


@register_model
def mobilenet_0_5(num_classes: int, in_chans: int = 3) -> MobileNetV1:
    return MobileNetV1(0.5, num_classes, in_chans)


@register_model
def mobilenet_0_25(num_classes: int, in_chans: int = 3) -> MobileNetV1:
    return MobileNetV1(0.25, num_classes, in_chans)
