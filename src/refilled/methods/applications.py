"""Methods that start from the old model (the teacher): fine-tuning and a linear probe.

Both need ``student.arch == teacher.arch`` (checked by the config). The teacher's weights are
copied into the student when the stages are built; on resume, the stage checkpoint overrides
them as usual. ``teacher_prototypes`` registers no stage at all: it is the few-shot reference
that evaluates the teacher's own embedding with prototypes (:mod:`refilled.applications`).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from refilled.methods.base import Context, Method, Stage, register_method


@torch.no_grad()
def copy_old_model(student: nn.Module, old: nn.Module, student_ids: torch.Tensor,
                   old_ids: torch.Tensor) -> None:
    """Load ``old``'s backbone (weights and BN statistics) into ``student``; widen its classifier.

    The student's classifier rows ``student_ids`` get the old classifier's rows ``old_ids``
    (the classes both know); every other row keeps its fresh initialisation.
    """
    backbone = {k: v for k, v in old.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = student.load_state_dict(backbone, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(f"the old model does not fit the student: missing {missing}, "
                         f"unexpected {unexpected}")
    head, old_head = student.get_classifier(), old.get_classifier()
    ids, oids = student_ids.to(head.weight.device), old_ids.to(old_head.weight.device)
    head.weight[ids] = old_head.weight[oids].to(head.weight)
    head.bias[ids] = old_head.bias[oids].to(head.bias)


class LinearProbe(Method):
    """Cross-entropy on the classifier alone; the backbone stays frozen, in eval mode."""

    def __init__(self, student):
        super().__init__(student)
        student.requires_grad_(False)
        student.get_classifier().requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.eval()  # BN statistics of the old backbone must not move
        return self

    def parameters_to_train(self) -> Iterator[nn.Parameter]:
        return iter(self.student.get_classifier().parameters())

    def step(self, x, y, epoch):
        with torch.no_grad():
            z = self.student.forward_features(x)
        return {"ce": F.cross_entropy(self.student.forward_head(z), y)}


class FineTune(Method):
    """Plain cross-entropy on every parameter, starting from the old model."""

    def step(self, x, y, epoch):
        return {"ce": F.cross_entropy(self.student(x), y)}


def _start_from_old_model(ctx: Context) -> None:
    student_ids, old_ids = ctx.class_map()
    copy_old_model(ctx.student, ctx.teacher.model, student_ids, old_ids)


@register_method("finetune")
def build_finetune(ctx: Context) -> list[Stage]:
    """The old model, its classifier widened (old rows copied, new rows fresh), all trained."""
    _start_from_old_model(ctx)
    return [Stage("train", FineTune(ctx.student), ctx.cfg.train)]


@register_method("linear_probe")
def build_linear_probe(ctx: Context) -> list[Stage]:
    """The old model frozen; a fresh linear classifier over all student classes on its features."""
    copy_old_model(ctx.student, ctx.teacher.model, torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, dtype=torch.long))
    return [Stage("train", LinearProbe(ctx.student), ctx.cfg.train)]


@register_method("teacher_prototypes")
def build_teacher_prototypes(ctx: Context) -> list[Stage]:
    """No training: the few-shot protocol evaluates the teacher's embedding with prototypes."""
    return []
