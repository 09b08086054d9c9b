"""The frozen teacher, the method base class, stages and the method registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from refilled.errors import ConfigError


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
    """Base: ``self.student`` is the model being trained; subclasses implement :meth:`step`.

    Extra trainable modules (e.g. a FitNet regressor) are ordinary submodules: they are trained,
    checkpointed and resumed with the student.
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def parameters_to_train(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """The step, so that DistributedDataParallel(method) sees every forward it must sync."""
        return self.step(x, y, epoch)


@dataclass
class Context:
    """What a method builder may use: the config, the models, the data and the run's helpers."""

    cfg: Any  # refilled.config.Config
    student: nn.Module
    teacher: FrozenTeacher | None
    task: Any  # refilled.protocols.Task
    teacher_centers: Callable[[], torch.Tensor]  # global teacher centres (computed once, cached)
    class_map: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # (student ids, teacher ids) shared
    dist: Any = None  # refilled.engine.Dist under torchrun (None: one process)


@dataclass
class Stage:
    """One call of the training loop.

    ``name`` names the checkpoint (``<name>.ckpt``); ``validate`` is ``"accuracy"`` (the
    student's classifier on the validation split) or ``"ncm"`` (nearest class mean on the
    embedding, for stages that do not train the classifier). ``prepare`` runs right before
    the stage trains or resumes (e.g. a fresh classifier for REFILLED's stage 2).
    """

    name: str
    method: Method
    optim: Any  # refilled.config.OptimConfig
    validate: str = "accuracy"
    prepare: Callable[[], None] | None = None


METHOD_BUILDERS: dict[str, Callable[[Context], list[Stage]]] = {}
_NEEDS_TEACHER: dict[str, bool] = {}


def register_method(name: str, needs_teacher: bool = True):
    def deco(builder: Callable[[Context], list[Stage]]):
        METHOD_BUILDERS[name] = builder
        _NEEDS_TEACHER[name] = needs_teacher
        return builder

    return deco


def needs_teacher(name: str) -> bool:
    return _NEEDS_TEACHER[name]


def build_stages(name: str, ctx: Context) -> list[Stage]:
    if name not in METHOD_BUILDERS:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHOD_BUILDERS))}")
    return METHOD_BUILDERS[name](ctx)
