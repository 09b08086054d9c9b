"""``refilled.distill = fit(prepare(...))``: every check before the first step, then the one loop.

:func:`prepare` takes the teacher, the student and the data, checks everything that can be
checked without training — the data (containers, labels, shapes, non-finite values), the
networks (probed once each on real inputs: embedding, classifier, logits), what the method
needs, the batch settings and the budget, the run directory (its config and the digests of its
inputs) — and rehearses one batch of every stage on a copy of the student, so that a failure in
stage 2 shows before stage 1 trains. It returns a :class:`Plan`; no optimizer step is taken and
the user's modules are left as they were. :func:`fit` trains the plan's stages in order with the
one training loop (:mod:`refilled.engine`), and on every exit path (success, error,
KeyboardInterrupt) puts back what it borrowed: hooks removed, training modes and
``requires_grad`` restored, the teacher on its device and bit-identical.

``refilled run`` prepares the teacher's fit (when it trains one) and the student's, and only
then fits them, through these same two functions.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from refilled.config import (
    Config,
    default,
    is_default,
    keyword_settings,
    make_config,
    spell,
    say,
    setting,
    speaking,
    to_dict,
)
from refilled.data import Augment, ClassBalancedSampler, Split, TensorLoader, as_split, check_data
from refilled.data.streaming import StreamLoader, StreamSettings
from refilled.engine import train_stage
from refilled.errors import ConfigError, RefilledError, UserError
from refilled.evaluation import accuracy, as_input, ncm_eval, predict
from refilled.files import atomic_torch_save, rng_state, safe_load, set_rng_state
from refilled.methods import MethodSpec, Resolved, Stage, check_needs, method_spec
from refilled.ncm import class_centers
from refilled.networks import FrozenTeacher, Network
from refilled.runs import RunDir, module_digest, tensors_digest
from refilled.runtime import Dist, init_distributed
from refilled.tracking import tensorboard_log

__all__ = ["History", "Plan", "distill", "fit", "prepare"]

DISTILL_SECTIONS = ("train", "stage1", "stage2", "baselines", "speed", "log")  # distill(**sections)


class History(list):
    """The epoch rows of a fit (one dict per epoch and stage), plus ``snapshots`` (the
    student's weights right after each stage that trains only the embedding), ``notes`` (what a
    stage's preparation did, e.g. ``handoff``) and ``empty_batches`` (batches of an embedding
    stage where mining found no tuple)."""

    def __init__(self, rows=()):
        super().__init__(rows)
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}
        self.notes: dict = {}

    @property
    def empty_batches(self) -> int:
        return round(sum(r.get("empty_batches", 0) * r["steps"] for r in self))


# ------------------------------------------------------------------ what is borrowed


class _Borrowed:
    """The state of the user's modules that a plan may change, to put back on exit."""

    def __init__(self):
        self._modules: list[tuple[nn.Module, list, list, torch.device | None, bool]] = []
        self._wrappers: list[Network] = []

    def keep(self, module: nn.Module, *, always_home: bool) -> None:
        params = list(module.parameters()) + list(module.buffers())
        home = params[0].device if params else None
        self._modules.append((module, [(m, m.training) for m in module.modules()],
                              [(p, p.requires_grad) for p in module.parameters()], home, always_home))

    def wrapper(self, network: Network) -> None:
        self._wrappers.append(network)

    def give_back(self, failed: bool) -> None:
        for network in self._wrappers:
            network.close()  # the module is the user's again: no hook left
        self._wrappers = []
        for module, modes, grads, home, always_home in self._modules:
            for m in module.modules():  # a classifier refilled made takes the module's mode
                m.training = modes[0][1]
            for m, mode in modes:
                m.training = mode
            known = {id(p) for p, _ in grads}
            for p, flag in grads:
                p.requires_grad_(flag)
            for p in module.parameters():
                if id(p) not in known:  # a classifier refilled made: trainable, as made
                    p.requires_grad_(True)
            if home is not None and (always_home or failed):
                params = next(iter(module.parameters()), None)
                if params is not None and (params.device != home or not params.is_contiguous()):
                    module.to(device=home, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------ the plan


@dataclass
class Plan:
    """What :func:`prepare` checked and :func:`fit` trains: the resolved config, the method,
    the networks (``student`` and ``teacher`` as :class:`~refilled.networks.Network`), the data,
    the class map, the device and the run directory."""

    cfg: Config
    spec: MethodSpec
    student: Network
    teacher: Network | None
    train: Split
    val: Split | None
    num_classes: int
    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    device: torch.device
    dist: Dist
    run: RunDir | None
    augment: Callable | None
    example: torch.Tensor
    user_student: nn.Module | None = None
    history: History | None = None
    log: Any = None  # per-epoch logger (TensorBoard), called with (row, step)
    _borrowed: _Borrowed = field(default_factory=_Borrowed, repr=False)
    _owns_run: bool = False
    _rng: dict | None = field(default=None, repr=False)
    _state: str = "prepared"  # prepared | fitting | fitted | closed

    @property
    def stages(self) -> list[tuple[str, Any]]:
        """``(config key, OptimConfig)`` of the stages :func:`fit` will train, in order."""
        return [(key, optim) for key, optim, _ in self.spec.schedules(self.cfg)]

    def check_teacher(self) -> None:
        """Record (or compare) the teacher's digest in the run directory: called by
        :func:`prepare`, or by ``refilled run`` once a teacher trained in the same call is ready."""
        if self.run is not None and self.teacher is not None:
            self.run.check_inputs({"teacher": module_digest(self.teacher.module)})

    def close(self, failed: bool = False) -> None:
        """Put back what the plan borrowed (hooks, modes, ``requires_grad``, devices) and release
        a run directory it opened. :func:`fit` calls it; call it yourself for a plan you do not fit."""
        if self._state in ("closed", "fitted"):
            return
        self._state = "closed" if failed or self._state == "prepared" else "fitted"
        try:
            self._borrowed.give_back(failed)
        finally:
            if self.log is not None:
                self.log.close()
            if self._owns_run and self.run is not None:
                self.run.close()

    def __enter__(self) -> "Plan":
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(failed=kind is not None)


def _wrap(module, section, role: str, default_stats, borrowed: _Borrowed) -> Network:
    """``module`` as a :class:`Network` with the config section's embedding/head/statistics."""
    if isinstance(module, Network):
        return module
    if not isinstance(module, nn.Module):
        raise ConfigError(f"the {role} must be a torch.nn.Module, got {type(module).__name__}")
    mean = section.mean if section.mean is not None else (default_stats[0] if default_stats else None)
    std = section.std if section.std is not None else (default_stats[1] if default_stats else None)
    net = Network(module, embedding=section.embedding, head=section.head, mean=mean, std=std,
                  maps=section.maps, role=role)
    borrowed.wrapper(net)
    return net


@contextlib.contextmanager
def _user_code(what: str, hint: str):
    """Run a first pass of a user's model or method: an exception from inside it becomes one
    line naming ``what`` (``REFILLED_DEBUG=1`` keeps the traceback)."""
    try:
        yield
    except RefilledError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's module failed on real input
        if os.environ.get("REFILLED_DEBUG"):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise UserError(f"{what} fails ({type(err).__name__}: {first}); {hint}") from None


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    mine = {id(p) for p in a.parameters()}
    return a is b or any(id(p) in mine for p in b.parameters())


def check_batches(cfg: Config, spec: MethodSpec, labels: torch.Tensor, num_classes: int,
                  dist: Dist = Dist()) -> None:
    """Refuse budgets and batch settings that can never train, before anything trains."""
    counts = torch.bincount(labels, minlength=num_classes)
    for key, optim, pairs in spec.schedules(cfg):
        batch, m = setting(key + ".batch_size", optim.batch_size), setting(key + ".m_per_class", optim.m_per_class)
        if optim.epochs < 1:
            raise ConfigError(f"{setting(key + '.epochs', optim.epochs)} trains nothing in a stage of "
                              f"method '{spec.name}'; give it at least 1 epoch")
        if optim.batch_size % dist.world:
            raise UserError(f"{batch} must be divisible by the {dist.world} processes of this "
                            "torchrun job")
        if pairs and (optim.batch_size < 2 or optim.m_per_class == 1 or int(counts.max()) < 2):
            raise UserError(
                f"stage 1 can never see a positive pair (two images of one class in a batch) with "
                f"{batch}, {m} and at most {int(counts.max())} training images per class; use the "
                f"class-balanced sampler, e.g. {setting(key + '.m_per_class', 4)} with a batch size "
                "that is a multiple of 4"
            )
        present = int((counts > 0).sum())
        if optim.m_per_class and optim.batch_size // optim.m_per_class > present:
            raise UserError(
                f"batches of {optim.batch_size // optim.m_per_class} classes x {optim.m_per_class} "
                f"images ({batch}, {m}) need {optim.batch_size // optim.m_per_class} classes, but "
                f"the training data has {present}; lower {spell(key + '.batch_size')} or raise "
                f"{spell(key + '.m_per_class')}"
            )


def _outside_refilled() -> int:
    """The ``stacklevel`` of the first caller outside the package (a warning points at the
    user's line, whether they called :func:`distill`, :func:`prepare` or the CLI did)."""
    here = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(here):
        frame, level = frame.f_back, level + 1
    return level


FEW_STEPS = 50  # fewer SGD steps than this in a stage trains a network from scratch hardly at all


def few_steps(cfg: Config, spec: MethodSpec, num_images: int) -> list[str]:
    """A line for each stage whose schedule takes fewer than :data:`FEW_STEPS` SGD steps on
    ``num_images`` training images (``max(1, N // batch_size)`` steps an epoch on either path):
    what it is and what to change. Not an error: a short run can be meant (a smoke test)."""
    lines = []
    schedules = list(spec.schedules(cfg))
    for i, (key, optim, _) in enumerate(schedules):
        per_epoch = max(1, num_images // optim.batch_size)
        steps = optim.epochs * per_epoch
        if steps < FEW_STEPS:
            what = f"stage {i + 1}" if len(schedules) > 1 else "training"
            lines.append(
                f"{what} takes only {steps} SGD step{'s' * (steps > 1)} ({num_images} training "
                f"images, {setting(key + '.batch_size', optim.batch_size)}: {per_epoch} step"
                f"{'s' * (per_epoch > 1)} an epoch, {setting(key + '.epochs', optim.epochs)}); a "
                "network trained from scratch needs hundreds: give it a smaller batch size or more "
                "epochs")
    return lines


def _loader(split: Split, optim, *, seed: int, device, dist: Dist, augment, channels_last: bool):
    """The training batches of a split: in memory (one tensor on the device) or streamed
    (read at every use by worker processes); the same batches either way."""
    sampler = None
    if optim.m_per_class:
        sampler = ClassBalancedSampler(split.labels, optim.m_per_class, optim.batch_size, seed=seed)
    batch = min(optim.batch_size, len(split.labels)) if sampler is None else optim.batch_size
    loader = StreamLoader if split.streamed else TensorLoader
    return loader(split.images, split.labels, batch, shuffle=True, drop_last=True,
                  augment=augment, device=device, seed=seed, sampler=sampler,
                  rank=dist.rank, world=dist.world, channels_last=channels_last)


def _size_classifier(plan: Plan, student: Network) -> None:
    """A fresh classifier of the right size where the student's does not fit its classes."""
    if plan.spec.predictor == "classifier" and student.num_classes != plan.num_classes:
        student.reset_classifier(plan.num_classes)


def prepare(teacher: nn.Module | None, student: nn.Module, train, *, config: Config, val=None,
            num_classes: int | None = None, shared_classes=None, run_dir: str | Path | None = None,
            run: RunDir | None = None, augment=None, dist: Dist | None = None,
            device: torch.device | None = None, teacher_ready: bool = True,
            tensorboard: str | Path | None = None) -> Plan:
    """Every check of a fit, without a step; see the module docstring. ``config`` is a
    :class:`~refilled.config.Config`; ``run_dir`` a folder to open (or ``run``, a
    :class:`~refilled.runs.RunDir` the caller opened and closes); ``teacher_ready=False`` leaves
    the teacher's digest to :meth:`Plan.check_teacher` (a teacher trained after this call);
    ``tensorboard`` a folder for TensorBoard's per-epoch scalars (with ``log.tensorboard``:
    the run directory's ``tensorboard/``)."""
    cfg = config
    spec = method_spec(cfg.method)
    if spec.needs_teacher and teacher is None:
        raise ConfigError(f"method '{cfg.method}' needs a teacher; "
                          + say("set teacher.arch", "pass one (or method='ce' for the student alone)"))
    if not isinstance(student, nn.Module):
        raise ConfigError(f"the student must be a torch.nn.Module, got {type(student).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ConfigError(f"the teacher must be a torch.nn.Module (or None), got {type(teacher).__name__}")
    if teacher is not None and spec.needs_teacher and _shares_parameters(
            getattr(teacher, "module", teacher), getattr(student, "module", student)):
        raise ConfigError("the teacher and the student are the same module (or share parameters); "
                          "the teacher stays frozen while the student trains: pass a separate "
                          "student, e.g. a fresh instance or copy.deepcopy(teacher)")
    if dist is None:
        dist, device = init_distributed(cfg.device if device is None else device)
    reading = dict(in_memory=cfg.data.in_memory, settings=StreamSettings.of(cfg.data), device=device)
    train = as_split(train, "train", **reading)
    val = as_split(val, "val", **reading) if val is not None else None
    num_classes = check_data(train, val, num_classes)
    if cfg.progress and dist.is_main:
        for what, split in (("training", train), ("validation", val)):
            if split is not None and split.note:
                print(f"refilled: {what} data {split.note}", file=sys.stderr, flush=True)
    if shared_classes is not None:
        student_ids, teacher_ids = _shared(shared_classes, num_classes)
    else:
        student_ids = teacher_ids = torch.zeros(0, dtype=torch.long)
    if isinstance(augment, Mapping):
        try:
            augment = Augment(**augment)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"augment= {dict(augment)!r} is not a set of Augment arguments ({err}); "
                              "give e.g. {'pad': 4, 'flip': True}") from None
    if augment is not None and not callable(augment):
        raise ConfigError(f"augment= must be None, a dict of Augment arguments or a callable "
                          f"(batch, generator) -> batch, got {type(augment).__name__}")
    borrowed = _Borrowed()
    plan = None
    try:
        student_net = _wrap(student, cfg.student, "student", None, borrowed)
        borrowed.keep(student_net.module, always_home=False)
        teacher_net = None
        if teacher is not None and spec.needs_teacher:
            own = student_net.mean is not None
            stats = (student_net.mean.flatten().tolist(), student_net.std.flatten().tolist()) if own else None
            teacher_net = _wrap(teacher, cfg.teacher, "teacher", stats, borrowed)
            borrowed.keep(teacher_net.module, always_home=True)
        plan = Plan(cfg=cfg, spec=spec, student=student_net, teacher=teacher_net, train=train, val=val,
                    num_classes=num_classes, student_ids=student_ids.to(device),
                    teacher_ids=teacher_ids.to(device), device=device, dist=dist, run=run,
                    augment=augment, example=as_input(train.images[:4], device),
                    user_student=None if isinstance(student, Network) else student,
                    _borrowed=borrowed)
        _set_up(plan)
        check_needs(spec, student_net, teacher_net, plan.student_ids, plan.teacher_ids)
        check_batches(cfg, spec, train.labels, num_classes, dist)
        if dist.is_main:
            for line in few_steps(cfg, spec, len(train.labels)):
                warnings.warn(f"refilled: {line}", stacklevel=_outside_refilled())
        if run is None and run_dir is not None:
            plan.run, plan._owns_run = RunDir.open(run_dir, cfg, rank=dist.rank), True
        if plan.run is not None:
            plan.run.check_inputs(_input_digests(plan))
            if teacher_ready:
                plan.check_teacher()
        if dist.is_main:  # the package is checked here, before anything trains
            plan.log = tensorboard_log(tensorboard, cfg.log.tensorboard,
                                       plan.run.path if plan.run is not None else None)
        rehearse(plan)
        plan._rng = rng_state()
        return plan
    except BaseException:
        if plan is not None:
            plan.close(failed=True)
        else:
            borrowed.give_back(failed=True)
        raise


def _shared(shared_classes, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(student ids, teacher ids)`` of the classes both sides know, checked."""
    if not (isinstance(shared_classes, (tuple, list)) and len(shared_classes) == 2):
        raise ConfigError("shared_classes= must be a pair (student class ids, teacher class ids), "
                          f"got {type(shared_classes).__name__}")
    ids = []
    for side, values in zip(("student", "teacher"), shared_classes):
        t = torch.as_tensor(values)
        if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise ConfigError(f"shared_classes=: the {side} ids must be a 1-D sequence of class "
                              f"indices, got shape {tuple(t.shape)} and dtype {t.dtype}")
        if len(t) and int(t.min()) < 0:
            raise ConfigError(f"shared_classes=: the {side} ids must be >= 0, got {int(t.min())}")
        ids.append(t.long())
    if len(ids[0]) != len(ids[1]):
        raise ConfigError(f"shared_classes=: {len(ids[0])} student ids but {len(ids[1])} teacher ids; "
                          "give one teacher id per shared student class")
    if len(ids[0]) and int(ids[0].max()) >= num_classes:
        raise ConfigError(f"shared_classes=: student class {int(ids[0].max())} is beyond the student's "
                          f"{num_classes} classes")
    if len(set(ids[0].tolist())) != len(ids[0]) or len(set(ids[1].tolist())) != len(ids[1]):
        raise ConfigError("shared_classes=: a class is listed twice; list each shared class once")
    return ids[0], ids[1]


def _set_up(plan: Plan) -> None:
    """Both networks on the device and probed (once each) on real inputs."""
    device, cfg = plan.device, plan.cfg
    nets = [n for n in (plan.student, plan.teacher) if n is not None]
    for net in nets:
        net.to(device)
        if cfg.speed.channels_last and device.type == "cuda":
            net.to(memory_format=torch.channels_last)
            net.channels_last = True
    shape = "x".join(map(str, plan.example.shape[1:]))
    channels = int(plan.example.shape[1])
    for net in nets:
        if net.mean is not None and net.mean.numel() not in (1, channels):
            raise ConfigError(f"{spell(net.role + '.mean')} and {spell(net.role + '.std')} give "
                              f"{net.mean.numel()} values, but the images have {channels} channel(s); "
                              f"give one value per channel (or one for all)")
    for net in nets:
        with _user_code(f"the {net.role} on a batch of the training images ({shape})",
                        say(f"check {net.role}.arch / {net.role}.kwargs against the data",
                            f"check that the {net.role} takes {shape} images")):
            net.probe(plan.example)


def _input_digests(plan: Plan) -> dict[str, str]:
    """What the run directory records of this plan's inputs (the teacher's: check_teacher)."""
    out = {"train": tensors_digest([("images", plan.train.images), ("labels", plan.train.labels)]),
           "student": module_digest(plan.student.module, architecture=True)}
    if plan.val is not None:
        out["val"] = tensors_digest([("images", plan.val.images), ("labels", plan.val.labels)])
    return out


def _resolved(plan: Plan, student: Network, centers) -> Resolved:
    frozen = FrozenTeacher(plan.teacher) if plan.teacher is not None else None
    return Resolved(cfg=plan.cfg, student=student, teacher=frozen, num_classes=plan.num_classes,
                    example=plan.example, train=plan.train, centers=centers,
                    student_ids=plan.student_ids, teacher_ids=plan.teacher_ids, dist=plan.dist)


def _autocast(plan: Plan):
    on = plan.cfg.speed.amp and plan.device.type == "cuda"
    return torch.autocast(plan.device.type, dtype=torch.bfloat16, enabled=on)


def rehearse(plan: Plan) -> None:
    """One batch of every stage of the method, forward and backward, on a copy of the student
    (the global RNG forked), so a failure in stage 2 shows before stage 1 (or the teacher)
    trains, and nothing of the real fit changes."""
    cfg = plan.cfg
    devices = [plan.device] if plan.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        student = copy.deepcopy(plan.student)
        try:
            _size_classifier(plan, student)
            centers = (torch.zeros(plan.num_classes, plan.teacher.num_features, device=plan.device)
                       if plan.teacher is not None and plan.spec.global_centers(cfg) else None)
            hint = say("check the models and the method's settings",
                       "check the models and the method's keywords")
            with _user_code(f"method '{cfg.method}' on the models", hint):
                stages = plan.spec.build(_resolved(plan, student, centers))
            for stage in stages:
                with _user_code(f"method '{cfg.method}', {stage.name}, on a first batch (before "
                                "training)", hint):
                    if stage.prepare is not None:
                        stage.prepare()
                    loader = _loader(plan.train, stage.optim, seed=cfg.seed, device=plan.device,
                                     dist=plan.dist, augment=plan.augment, channels_last=False)
                    x, y = next(iter(loader))
                    stage.method.train()
                    with _autocast(plan):
                        losses = stage.method(x, y, 0)
                        total = sum(v for k, v in losses.items() if not k.startswith("_"))
                    if total.requires_grad:
                        total.backward()
        finally:
            student.close()


# ------------------------------------------------------------------ fitting


@torch.no_grad()
def teacher_centers(plan: Plan, frozen: FrozenTeacher) -> torch.Tensor:
    """Global teacher centres of the student's classes: normalised means of the raw teacher
    embeddings of the training split (no augmentation), zero rows for classes without training
    images (never used: the local classifier looks only at the classes in a batch). Computed
    once and saved in the run directory; under torchrun every rank embeds its share."""
    path = plan.run.centers_file if plan.run is not None else None
    if path is not None and path.exists():
        centers = safe_load(path, what="teacher centres", hint="delete it to recompute it")
        if not isinstance(centers, torch.Tensor) or centers.dim() != 2 or centers.shape[0] != plan.num_classes:
            raise UserError(f"teacher centres '{path}' do not fit this run ({plan.num_classes} "
                            "classes); delete the file to recompute it")
        return centers.to(plan.device)
    emb, _ = predict(frozen.network, plan.train.images, plan.device, dist=plan.dist)
    centers = class_centers(emb, plan.train.labels.to(plan.device), plan.num_classes, allow_missing=True)
    if path is not None and plan.dist.is_main:
        atomic_torch_save(centers.cpu(), path)
    return centers


def validation(student: Network, train: Split, val: Split | None, device, kind: str,
               dist: Dist = Dist(), num_classes: int | None = None) -> dict:
    """Validation metrics: the student's classifier (``"accuracy"``) or its NCM (``"ncm"``)."""
    if val is None or not len(val):
        return {}
    if kind == "ncm":
        return {"val_ncm_accuracy": ncm_eval(student, train.images, train.labels, val.images,
                                             val.labels, device, dist=dist, num_classes=num_classes)}
    _, logits = predict(student, val.images, device, dist=dist)
    return {"val_accuracy": accuracy(logits, val.labels)}


def fit(plan: Plan) -> History:
    """Train the plan's stages in order (resuming from its run directory); the student is
    trained in place. Returns the :class:`History` (also ``student.refilled_history``). A plan
    is fitted once; on every exit path the plan is closed (see :meth:`Plan.close`)."""
    if plan._state != "prepared":
        raise UserError(f"this plan is {plan._state}: prepare() a new one to fit again")
    plan._state = "fitting"
    failed = True
    try:
        history = _fit(plan)
        failed = False
        return history
    finally:
        plan.close(failed=failed)


def _fit(plan: Plan) -> History:
    cfg, student, device, dist = plan.cfg, plan.student, plan.device, plan.dist
    set_rng_state(plan._rng)  # the randomness prepare() left, whatever ran in between
    _size_classifier(plan, student)
    channels_last = cfg.speed.channels_last and device.type == "cuda"
    if cfg.speed.compile and device.type == "cuda":
        student.compile_passes()
        if plan.teacher is not None:
            plan.teacher.compile_passes()
    frozen = FrozenTeacher(plan.teacher) if plan.teacher is not None else None
    centers = (teacher_centers(plan, frozen)
               if frozen is not None and plan.spec.global_centers(cfg) else None)
    stages: list[Stage] = plan.spec.build(_resolved(plan, student, centers))
    history = History()
    for stage in stages:
        if stage.prepare is not None:
            notes = dict(stage.prepare() or {})
            warning = notes.pop("warning", None)  # for the user, not a note of the run
            history.notes.update(notes)
            if warning and cfg.progress and dist.is_main:
                print(f"refilled: {stage.name}: {warning}", file=sys.stderr)
        loader = _loader(plan.train, stage.optim, seed=cfg.seed, device=device, dist=dist,
                         augment=plan.augment, channels_last=channels_last)
        lr_key = next((key + ".lr" for key, optim, _ in plan.spec.schedules(cfg) if optim is stage.optim),
                      "train.lr")
        rows = train_stage(
            stage.name, stage.method, loader, stage.optim, plan.run,
            validate=lambda kind=stage.validate: validation(student, plan.train, plan.val, device,
                                                            kind, dist, plan.num_classes),
            seed=cfg.seed, eval_every=cfg.eval_every, progress=cfg.progress and dist.is_main,
            earlier_rows=list(history), extra_state={"config": to_dict(cfg)}, dist=dist,
            amp=cfg.speed.amp, lr_key=lr_key, on_epoch=plan.log,
        )
        history.extend(rows)
        if stage.validate == "ncm":  # the embedding right after this stage, before a later one moves it
            history.snapshots[stage.name] = {k: v.detach().cpu().clone()
                                             for k, v in student.module_state_dict().items()}
    student.refilled_history = history
    if plan.user_student is not None:
        plan.user_student.refilled_history = history
    plan.history = history
    return history


@contextlib.contextmanager
def weights_of(network: Network, state: dict[str, torch.Tensor]):
    """Temporarily load ``state`` into ``network``'s module (e.g. a stage-1 snapshot)."""
    current = {k: v.detach().clone() for k, v in network.module_state_dict().items()}
    network.module.load_state_dict(state)
    try:
        yield network
    finally:
        network.module.load_state_dict(current)


# ------------------------------------------------------------------ the one entry point


def distill(teacher: nn.Module | None, student: nn.Module, train, *, val=None,
            method: str = default("method"),
            stage1_epochs: int = default("stage1.optim.epochs"),
            stage2_epochs: int = default("train.epochs"),
            epochs: int | None = None,
            lr: float = default("train.lr"),
            stage1_lr: float = default("stage1.optim.lr"),
            batch_size: int = default("train.batch_size"),
            m_per_class: int = default("train.m_per_class"),
            lam: float = default("stage2.lam"),
            preset: str | None = None,
            num_classes: int | None = None,
            shared_classes=None,
            augment=None,
            embedding: str | None = None, head: str | None = None,
            mean=None, std=None, maps=None,
            teacher_embedding: str | None = None, teacher_head: str | None = None,
            teacher_mean=None, teacher_std=None, teacher_maps=None,
            seed: int = default("seed"),
            device: str = default("device"),
            in_memory: bool | str = default("data.in_memory"),
            workers: int | None = None,
            run_dir: str | Path | None = None,
            amp: bool = False, compile: bool = False,
            eval_every: int = default("eval_every"),
            progress: bool = True,
            tensorboard: str | Path | None = None,
            **sections) -> nn.Module:
    """Train ``student`` with the help of the frozen ``teacher`` (REFILLED by default) and
    return it, trained in place.

    Every check runs before the first optimizer step (:func:`prepare`); any bad input is one
    ``refilled.RefilledError`` (a ``ValueError``) naming the keyword, and the modules are left
    as they were. On every exit the modules are given back as they came: no hook left, training
    modes and ``requires_grad`` restored, the teacher bit-identical and on its device. The
    student is returned on ``device``, in the training mode it came in (call ``.eval()`` for
    inference); ``student.refilled_history`` holds one row per epoch and stage.

    Args:
        teacher: any ``nn.Module`` (``None`` for a method without one, e.g. ``method="ce"``).
            Its embedding is the input of its last ``nn.Linear`` unless ``teacher_embedding=``
            names a submodule; REFILLED needs only that (and its logits for the instance weights).
        student: any ``nn.Module`` with an ``nn.Linear`` classifier (its last one, or ``head=``),
            replaced by a fresh one where its size does not fit the classes, and before
            REFILLED's stage 2.
        train: ``(images, labels)`` tensors — images uint8 (0-255, scaled to [0, 1]) or float,
            N x C x H x W; labels N class indices 0..K-1, every class present — or a map-style
            torch ``Dataset`` of ``(image, label)`` items, read into memory once or streamed (see
            ``in_memory``).
        val: the same kind of data, for validation after every ``eval_every`` epochs (never the
            test set); its classes must be training classes.
        method: ``"refilled"`` (stage 1, then stage 2), ``"ce"`` (the student alone, no teacher),
            ``"kd"``, ``"rkd"``, ``"pkt"``, ``"sp"``, ``"at"``, ``"fitnet"``, ``"label_smoothing"``,
            ``"refilled_stage1"``.
        stage1_epochs: epochs of REFILLED's stage 1 (relationship matching; 0 skips it).
        stage2_epochs: epochs of stage 2 — or of the only stage of a single-stage method.
        epochs: the same as ``stage2_epochs``, for single-stage methods (``method="ce"``).
        lr: stage 2's (or the single stage's) SGD learning rate; cosine schedule to 0.1 x lr,
            Nesterov momentum 0.9, weight decay 5e-4.
        stage1_lr: stage 1's learning rate (same schedule).
        batch_size: the batch size of both stages.
        m_per_class: class-balanced batches of ``batch_size // m_per_class`` classes with
            ``m_per_class`` images each (0: shuffled batches); both stages.
        lam: the weight of stage 2's distillation term.
        preset: ``"tpami"``, ``"cvpr_recon"`` or ``"cvpr"``: the papers' stage-2 recipes.
        num_classes: the student's number of classes (default: the largest label + 1, every
            class present); give it to keep classes without training images on purpose.
        shared_classes: ``(student ids, teacher ids)`` of the classes both know (``kd``).
        augment: ``None``, a dict of :class:`refilled.data.Augment` arguments
            (``{"pad": 4, "flip": True}``) or a callable ``(batch, generator) -> batch``.
        embedding, head, mean, std, maps: the student's embedding submodule, classifier
            submodule, input statistics (the network normalises its own input) and feature-map
            submodules (AT, FitNet, SP).
        teacher_embedding, teacher_head, teacher_mean, teacher_std, teacher_maps: the same for
            the teacher (its statistics default to the student's).
        seed: the seed of the batches, augmentation and fresh classifiers.
        device: ``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        in_memory: ``"auto"``: a Dataset is read into memory once when its decoded images fit a
            quarter of the available memory and it has no per-item random transforms, and is
            streamed otherwise — read at every use by worker processes, its transforms applied
            each time (fresh views every epoch, seeded by seed, epoch and item); ``True`` /
            ``False`` force either path. Tensors are always in memory.
        workers: worker processes of the streamed path (None: the cores less one, at most 8).
        run_dir: a folder for checkpoints (after every epoch), ``metrics.csv`` and the teacher
            centres; calling again with the same arguments resumes there (finished stages are not
            redone). It remembers its config and digests of the teacher, the data and the
            student's starting weights, and refuses other ones.
        amp, compile: bf16 autocast and ``torch.compile`` on CUDA (no-ops on a CPU).
        eval_every: epochs between validations.
        progress: progress bars and per-epoch lines on stderr.
        tensorboard: a folder for TensorBoard's per-epoch scalars (losses, learning rate,
            validation accuracy, stage 1's NCM accuracy; needs the ``tensorboard`` package);
            ``log={"tensorboard": True}`` puts them in ``run_dir/tensorboard``. A resumed call
            continues the same log.
        **sections: any other setting by config section, as dicts: ``stage1={"tau": 4.0}``,
            ``stage2={"weighting": False}``, ``train={"schedule": "multistep"}``,
            ``baselines={"kd_temperature": 4.0}``, ``speed={...}``, ``log={"tensorboard": True}``;
            and ``ablation="..."``.
    """
    keywords = dict(method=method, stage1_epochs=stage1_epochs, stage2_epochs=stage2_epochs, lr=lr,
                    stage1_lr=stage1_lr, batch_size=batch_size, m_per_class=m_per_class, lam=lam,
                    preset=preset, embedding=embedding, head=head, mean=mean, std=std, maps=maps,
                    teacher_embedding=teacher_embedding, teacher_head=teacher_head,
                    teacher_mean=teacher_mean, teacher_std=teacher_std, teacher_maps=teacher_maps,
                    seed=seed, device=device, in_memory=in_memory, workers=workers, amp=amp, compile=compile, eval_every=eval_every,
                    progress=progress)
    if isinstance(device, torch.device):
        keywords["device"] = str(device)
    with speaking("python"):
        if epochs is not None:
            if stage2_epochs != epochs and not is_default(stage2_epochs):
                raise ConfigError(f"epochs={epochs} and stage2_epochs={stage2_epochs} set the same "
                                  "budget; give one of them")
            keywords["stage2_epochs"] = epochs
        ablation = sections.pop("ablation", None)
        settings = keyword_settings({**keywords, **sections}, sections=DISTILL_SECTIONS)
        if ablation is not None:
            settings["ablation"] = ablation
        cfg = make_config(settings=settings)
        plan = prepare(teacher, student, train, config=cfg, val=val, num_classes=num_classes,
                       shared_classes=shared_classes, run_dir=run_dir, augment=augment,
                       tensorboard=tensorboard)
        fit(plan)
    return student

