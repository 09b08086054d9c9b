"""Methods that start from the old model (the teacher): fine-tuning and a linear probe.

Both need the student's architecture to be the teacher's (declared ``same_arch``, checked before
anything trains). The teacher's weights are copied into the student when the stages are built;
on resume, the stage checkpoint overrides them as usual. ``teacher_prototypes`` trains nothing:
it is the few-shot reference that evaluates the teacher's own embedding with prototypes.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from refilled.methods.base import Method, Resolved, Stage, register_method


@torch.no_grad()
def copy_old_model(student, old, student_ids: torch.Tensor, old_ids: torch.Tensor) -> None:
    """Load ``old``'s backbone (weights and BN statistics) into ``student``; widen its classifier.

    Both are :class:`~refilled.networks.Network` s of one architecture. The student's classifier
    rows ``student_ids`` get the old classifier's rows ``old_ids`` (the classes both know); every
    other row keeps its fresh initialisation.
    """
    head_prefix = old.classifier_prefix()
    backbone = {k: v for k, v in old.module_state_dict().items() if not k.startswith(head_prefix)}
    missing, unexpected = student.module.load_state_dict(backbone, strict=False)
    student_prefix = student.classifier_prefix()
    if unexpected or any(not k.startswith(student_prefix) for k in missing):
        raise ValueError(f"the old model does not fit the student: missing {missing}, "
                         f"unexpected {unexpected}")
    head, old_head = student.classifier, old.classifier
    ids, oids = student_ids.to(head.weight.device), old_ids.to(old_head.weight.device)
    head.weight[ids] = old_head.weight[oids].to(head.weight)
    head.bias[ids] = old_head.bias[oids].to(head.bias)


class LinearProbe(Method):
    """Cross-entropy on the classifier alone; the backbone stays frozen, in eval mode."""

    def __init__(self, student):
        super().__init__(student)
        student.requires_grad_(False)
        student.classifier.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.eval()  # BN statistics of the old backbone must not move
        return self

    def parameters_to_train(self) -> Iterator[nn.Parameter]:
        return iter(self.student.classifier.parameters())

    def step(self, x, y, epoch):
        with torch.no_grad():
            z = self.student.forward_features(x)
        return {"ce": F.cross_entropy(self.student.forward_head(z), y)}


class FineTune(Method):
    """Plain cross-entropy on every parameter, starting from the old model."""

    def step(self, x, y, epoch):
        return {"ce": F.cross_entropy(self.student(x), y)}


@register_method("finetune", same_arch=True)
def build_finetune(r: Resolved) -> list[Stage]:
    """The old model, its classifier widened (old rows copied, new rows fresh), all trained."""
    copy_old_model(r.student, r.teacher.network, r.student_ids, r.teacher_ids)
    return [Stage("train", FineTune(r.student), r.cfg.train)]


@register_method("linear_probe", same_arch=True)
def build_linear_probe(r: Resolved) -> list[Stage]:
    """The old model frozen; a fresh linear classifier over all student classes on its features."""
    none = torch.zeros(0, dtype=torch.long)
    copy_old_model(r.student, r.teacher.network, none, none)
    return [Stage("train", LinearProbe(r.student), r.cfg.train)]


@register_method("teacher_prototypes", predictor="teacher_ncm", protocols=("fewshot",),
                 schedules=lambda cfg: [])
def build_teacher_prototypes(r: Resolved) -> list[Stage]:
    """No training: the teacher's embedding with prototypes (the few-shot reference)."""
    return []
