"""Training methods: one small class per stage/method on the shared loop (:mod:`refilled.engine`).

Each method holds the student (and, where it needs one, the frozen teacher) and implements
``step(x, y, epoch) -> dict of named losses``. Keys starting with ``_`` are logged but not
added to the objective (diagnostics such as the number of mined tuples).
"""

from refilled.methods.base import FrozenTeacher, Method
from refilled.methods.ce import CrossEntropy
from refilled.methods.refilled import LocalClassifierDistillation, RelationMatching

__all__ = [
    "CrossEntropy",
    "FrozenTeacher",
    "LocalClassifierDistillation",
    "Method",
    "RelationMatching",
]
