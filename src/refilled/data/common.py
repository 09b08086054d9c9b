"""What every dataset reader shares: the :class:`ImageSet` they return and the split check.

Kept apart from the readers so that :mod:`refilled.data.datasets` and
:mod:`refilled.data.glyphs` both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refilled.errors import ConfigError

__all__ = ["ImageSet", "SPLITS"]

SPLITS = ("train", "test")


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    class_names: list[str]
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _check_split(split, allowed=SPLITS) -> str:
    if split not in allowed:
        raise ConfigError(f"unknown split {split!r}: expected one of {', '.join(allowed)}")
    return split
