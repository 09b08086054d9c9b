"""The frozen teacher and the method base class."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn


class FrozenTeacher:
    """The one place where the teacher is frozen: eval mode, no gradients, never trained.

    Deliberately not an ``nn.Module`` attribute of a method, so that it never appears in a
    method's parameters, state dict or ``train()`` calls.
    """

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, logits) of the teacher for a batch."""
        self.model.eval()
        z = self.model.forward_features(x)
        return z, self.model.forward_head(z)

    @property
    def num_features(self) -> int:
        return self.model.num_features


class Method(nn.Module):
    """Base: ``self.student`` is the model being trained; subclasses implement :meth:`step`."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def parameters_to_train(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError
