"""Plain cross-entropy: teacher pre-training and the student-alone baseline."""

from __future__ import annotations

import torch.nn.functional as F

from refilled.methods.base import Method, Resolved, Stage, register_method


class CrossEntropy(Method):
    def __init__(self, student, label_smoothing: float = 0.0):
        super().__init__(student)
        self.label_smoothing = label_smoothing

    def step(self, x, y, epoch):
        return {"ce": F.cross_entropy(self.student(x), y, label_smoothing=self.label_smoothing)}


@register_method("ce", needs_teacher=False)
def build_ce(r: Resolved) -> list[Stage]:
    """The student alone: cross-entropy on its own classes."""
    return [Stage("train", CrossEntropy(r.student), r.cfg.train)]
