"""Plain cross-entropy: teacher pre-training and the student-alone baseline."""

from __future__ import annotations

import torch.nn.functional as F

from refilled.methods.base import Context, Method, Stage, register_method


class CrossEntropy(Method):
    def __init__(self, student, label_smoothing: float = 0.0):
        super().__init__(student)
        self.label_smoothing = label_smoothing

    def step(self, x, y, epoch):
        return {"ce": F.cross_entropy(self.student(x), y, label_smoothing=self.label_smoothing)}


@register_method("ce", needs_teacher=False)
def build_ce(ctx: Context) -> list[Stage]:
    return [Stage("train", CrossEntropy(ctx.student), ctx.cfg.train)]
