"""Small networks for small images: two CNNs for 28x28 grey images and an MLP for tiny flat ones.

The CNNs max-pool after their first two stages and globally average-pool the last one, so any
input of at least 4 px works; the MLP needs exactly ``in_chans x input_size x input_size`` inputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from refilled.errors import ConfigError
from refilled.models.registry import (
    ClassifierModel,
    SequentialStages,
    check_positive_int,
    init_weights,
    register_model,
)


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class SmallCNN(SequentialStages, ClassifierModel):
    """Three stages of ``convs_per_stage`` conv-BN-ReLU; 2x2 max-pool after stages 1 and 2."""

    default_input_size = 28

    def __init__(self, widths=(16, 32, 64), convs_per_stage: int = 1, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        check_positive_int("in_chans", in_chans)
        layers, in_ch, self._stage_ends = [], in_chans, []
        for i, width in enumerate(widths):
            for _ in range(convs_per_stage):
                layers += _conv_bn_relu(in_ch, width)
                in_ch = width
            self._stage_ends.append(len(layers))  # a stage's output is taken before its pooling
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.num_features = in_ch
        self._init_head(num_classes)
        init_weights(self)


class MLP(ClassifierModel):
    """Flatten, then two hidden Linear-ReLU(-dropout) layers; the embedding is the second hidden layer."""

    def __init__(
        self,
        input_size: int = 8,
        hidden_dim: int = 128,
        num_classes: int = 10,
        in_chans: int = 1,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        check_positive_int("input_size", input_size)
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int("in_chans", in_chans)
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        self.default_input_size = input_size
        drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.features = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(in_chans * input_size * input_size, hidden_dim),
            nn.ReLU(inplace=True),
            drop,
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(inplace=True),
        )
        self.num_features = hidden_dim
        self._init_head(num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The two hidden layers' activations as (B, D, 1, 1) maps (an MLP has no spatial maps)."""
        maps = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                maps.append(x[:, :, None, None])
        return maps


@register_model
def cnn_small(num_classes: int, in_chans: int = 3) -> SmallCNN:
    """~24k parameters for 1 input channel and 10 classes; embedding 64."""
    return SmallCNN((16, 32, 64), 1, num_classes, in_chans)


@register_model
def cnn_medium(num_classes: int, in_chans: int = 3) -> SmallCNN:
    """~290k parameters for 1 input channel and 10 classes; embedding 128."""
    return SmallCNN((32, 64, 128), 2, num_classes, in_chans)


@register_model
def mlp(num_classes: int, in_chans: int = 3, input_size: int = 8, hidden_dim: int = 128, drop_rate: float = 0.0) -> MLP:
    """For flattened tiny images such as sklearn's 8x8 digits (``in_chans=1``)."""
    return MLP(input_size, hidden_dim, num_classes, in_chans, drop_rate)
