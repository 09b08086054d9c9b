"""The method base class, stages, and the method registry with each method's requirements.

A method declares what it needs when it is registered (:class:`MethodSpec`): a teacher, classes
both sides know, the teacher's logits, feature maps, the teacher's architecture, which protocols
it belongs to, how its final predictor is evaluated, and the schedules of its stages. No other
module tests method names: the pipeline reads these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn as nn

from refilled.config import spell, say
from refilled.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from refilled.config import Config, OptimConfig
    from refilled.networks import FrozenTeacher, Network
    from refilled.runtime import Dist


class Method(nn.Module):
    """Base: ``self.student`` is the network being trained; subclasses implement :meth:`step`.

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
class Resolved:
    """The values a method builder gets: everything is computed before the builder runs."""

    cfg: "Config"
    student: "Network"
    teacher: "FrozenTeacher | None"
    num_classes: int
    example: torch.Tensor  # a few raw training inputs (shape probes)
    train: Any = None  # the training split (refilled.data.Split), for hand-off statistics
    centers: torch.Tensor | None = None  # global teacher centres of the student's classes
    student_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    teacher_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    dist: "Dist | None" = None


@dataclass
class Stage:
    """One call of the training loop.

    ``name`` names the checkpoint (``<name>.ckpt``); ``validate`` is ``"accuracy"`` (the
    student's classifier on the validation split) or ``"ncm"`` (nearest class mean on the
    embedding, for stages that do not train the classifier). ``prepare`` runs right before
    the stage trains or resumes (e.g. a fresh classifier for REFILLED's stage 2); it may return
    a dict of notes for the run's results, whose ``"warning"`` entry, if any, is printed for the
    user instead of stored.
    """

    name: str
    method: Method
    optim: Any  # refilled.config.OptimConfig
    validate: str = "accuracy"
    prepare: Callable[[], dict | None] | None = None


def _train_schedule(cfg: "Config") -> list[tuple[str, "OptimConfig", bool]]:
    return [("train", cfg.train, False)]


PREDICTORS = ("classifier", "student_ncm", "teacher_ncm")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method and what it needs.

    * ``needs_teacher``: a frozen teacher is built (trained, loaded or random) for it;
    * ``shared_classes``: at least this many student classes must be teacher classes;
    * ``teacher_logits``: it reads the teacher's own logits (a feature-extractor teacher fails);
    * ``maps``: it reads feature maps of both networks (zoo ``forward_maps`` or ``maps=`` names);
    * ``same_arch``: it starts from the teacher's weights, so the architectures must match;
    * ``protocols``: the protocols it belongs to (empty: all);
    * ``predictor``: what is evaluated at the end: the student's ``classifier``, the NCM
      classifier on the student's embedding (``student_ncm``), or on the teacher's
      (``teacher_ncm``; nothing trains);
    * ``schedules(cfg)``: ``(config key, OptimConfig, needs positive pairs)`` of its stages,
      in order, for the checks made before anything trains;
    * ``global_centers(cfg)``: whether it needs the global teacher centres of the student's
      classes (computed once, saved, before the stages are built).
    """

    name: str
    build: Callable[[Resolved], list[Stage]]
    needs_teacher: bool = True
    shared_classes: int = 0
    teacher_logits: bool = False
    maps: bool = False
    same_arch: bool = False
    protocols: tuple[str, ...] = ()
    predictor: str = "classifier"
    schedules: Callable[["Config"], list] = _train_schedule
    global_centers: Callable[["Config"], bool] = lambda cfg: False


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, **requirements):
    """Decorator: register a builder ``Resolved -> list[Stage]`` with its requirements."""

    def deco(builder: Callable[[Resolved], list[Stage]]):
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        spec = MethodSpec(name=name, build=builder, **requirements)
        if spec.predictor not in PREDICTORS:
            raise ValueError(f"method {name!r}: predictor must be one of {PREDICTORS}")
        METHODS[name] = spec
        return builder

    return deco


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def needs_teacher(name: str) -> bool:
    return method_spec(name).needs_teacher


def check_needs(spec: MethodSpec, student: "Network", teacher: "Network | None",
                student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> None:
    """The method's declared needs against the (probed) networks and the class map."""
    method = spec.name
    without = "refilled, rkd, pkt, sp, at or fitnet"
    if spec.predictor == "classifier" and not student.has_logits:
        raise ConfigError(f"method '{method}' trains the student's classifier, but the student gives "
                          f"no logits ({spell('student.embedding')} is 'output': a feature "
                          "extractor); give it an nn.Linear classifier")
    if spec.teacher_logits and teacher is not None and not teacher.has_logits:
        raise ConfigError(f"method '{method}' matches the teacher's logits, but the teacher gives "
                          f"none (a feature extractor); use {without}")
    if spec.shared_classes and teacher is not None:
        if len(teacher_ids) and teacher.num_classes is not None and int(teacher_ids.max()) >= teacher.num_classes:
            raise ConfigError(f"method '{method}': shared class {int(teacher_ids.max())} is beyond the "
                              f"teacher's {teacher.num_classes} outputs")
        n = len(student_ids)
        if n < spec.shared_classes:
            which = "none" if n == 0 else "only one"
            raise ConfigError(
                f"method '{method}' needs at least {spec.shared_classes} classes the teacher knows, "
                f"but the student's classes share {which} with the teacher's; use {without}, which "
                "transfer knowledge without shared classes"
                + say(" (from Python: pass shared_classes=(student ids, teacher ids))",
                      ", or pass shared_classes=(student ids, teacher ids)")
            )
    if spec.maps:
        for net in (student, teacher):
            if net is not None and not net.has_maps:
                raise ConfigError(
                    f"method '{method}' needs feature maps, but the {net.role} has no forward_maps; "
                    f"set {spell(net.role + '.maps')} to the names of the submodules whose outputs "
                    "are its maps")
