"""Training methods: one small class per stage/method on the shared loop (:mod:`refilled.engine`).

Each method holds the student (and, where it needs one, the frozen teacher) and implements
``step(x, y, epoch) -> dict of named losses``. Keys starting with ``_`` are logged but not
added to the objective (diagnostics such as the number of mined tuples).

``build_stages(name, ctx)`` turns a config's ``method`` into the list of :class:`Stage` s the
protocol runs in order; a new method registers a builder with :func:`register_method`.
"""

from refilled.methods.base import (
    METHOD_BUILDERS,
    Context,
    FrozenTeacher,
    Method,
    Stage,
    build_stages,
    needs_teacher,
    register_method,
)
from refilled.methods.ce import CrossEntropy
from refilled.methods.refilled import LocalClassifierDistillation, RelationMatching
from refilled.methods import baselines  # noqa: E402,F401  registers kd, rkd, ... and refilled_stage1
from refilled.methods import applications  # noqa: E402,F401  finetune, linear_probe, teacher_prototypes

__all__ = [
    "METHOD_BUILDERS",
    "Context",
    "CrossEntropy",
    "FrozenTeacher",
    "LocalClassifierDistillation",
    "Method",
    "RelationMatching",
    "Stage",
    "build_stages",
    "needs_teacher",
    "register_method",
]
