"""Training methods: one small class per stage/method on the shared loop (:mod:`refilled.engine`).

Each method holds the student (and, where it needs one, the frozen teacher) and implements
``step(x, y, epoch) -> dict of named losses``. Keys starting with ``_`` are logged but not
added to the objective (diagnostics such as the number of mined tuples).

A method is registered with :func:`register_method`, which records what it needs
(:class:`MethodSpec`); its builder turns resolved values (:class:`Resolved`) into the list of
:class:`Stage` s the pipeline trains in order.
"""

from refilled.methods.base import (
    METHODS,
    Method,
    MethodSpec,
    Resolved,
    Stage,
    check_needs,
    method_spec,
    needs_teacher,
    register_method,
)
from refilled.methods.ce import CrossEntropy
from refilled.methods.refilled import LocalClassifierDistillation, RelationMatching
from refilled.methods import baselines  # noqa: E402,F401  registers kd, rkd, pkt, sp, at, fitnet, ...
from refilled.methods import applications  # noqa: E402,F401  finetune, linear_probe, teacher_prototypes

__all__ = [
    "METHODS",
    "CrossEntropy",
    "LocalClassifierDistillation",
    "Method",
    "MethodSpec",
    "RelationMatching",
    "Resolved",
    "Stage",
    "check_needs",
    "method_spec",
    "needs_teacher",
    "register_method",
]
