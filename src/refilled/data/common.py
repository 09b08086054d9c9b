"""What every dataset reader shares: the :class:`ImageSet` they return, the :class:`Split` a
run trains on, and the split check.

Kept apart from the readers so that :mod:`refilled.data.datasets` and
:mod:`refilled.data.glyphs` both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refilled.errors import ConfigError

__all__ = ["ImageSet", "SPLITS", "Split"]

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


@dataclass(frozen=True)
class Split:
    """One split of one side's data: images (uint8 N x C x H x W, or a user's float tensor)
    and labels (int64 N, in 0..num_classes-1)."""

    images: torch.Tensor  # or a lazy refilled.data.streaming.StreamedImages view
    labels: torch.Tensor
    note: str = ""  # how the images are read (in memory or streamed) and why

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def streamed(self) -> bool:
        return not isinstance(self.images, torch.Tensor)


def _check_split(split, allowed=SPLITS) -> str:
    if split not in allowed:
        raise ConfigError(f"unknown split {split!r}: expected one of {', '.join(allowed)}")
    return split
