"""``refilled.distill``: REFILLED (or any registered method) on any teacher and student.

The public inner part of the pipeline: ``refilled run`` builds the task, the networks and the
teacher from a config and then calls :func:`distill` too.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from refilled.config import Config, ConfigError, to_dict, make_config
from refilled.data import Augment, ClassBalancedSampler, TensorLoader
from refilled.engine import train_stage
from refilled.errors import UserError
from refilled.evaluation import as_input, ncm_eval, predict, accuracy
from refilled.files import atomic_torch_save, safe_load
from refilled.methods import MethodSpec, Resolved, method_spec
from refilled.ncm import class_centers
from refilled.networks import FrozenTeacher, Network
from refilled.runtime import Dist, init_distributed
from refilled.tasks import Split
from refilled.tracking import tensorboard_log

__all__ = ["distill", "History", "as_split", "SHORTCUTS"]

# Keyword shortcuts of distill() -> the dotted config keys they set.
SHORTCUTS: dict[str, tuple[str, ...]] = {
    "stage1_epochs": ("stage1.optim.epochs",),
    "stage2_epochs": ("train.epochs",),
    "epochs": ("train.epochs",),
    "lr": ("train.lr",),
    "stage1_lr": ("stage1.optim.lr",),
    "batch_size": ("train.batch_size", "stage1.optim.batch_size"),
    "m_per_class": ("train.m_per_class", "stage1.optim.m_per_class"),
    "lam": ("stage2.lam",),
    "preset": ("stage2.preset",),
    "embedding": ("student.embedding",),
    "head": ("student.head",),
    "mean": ("student.mean",),
    "std": ("student.std",),
    "maps": ("student.maps",),
    "teacher_embedding": ("teacher.embedding",),
    "teacher_mean": ("teacher.mean",),
    "teacher_std": ("teacher.std",),
    "teacher_maps": ("teacher.maps",),
    "amp": ("speed.amp",),
    "compile": ("speed.compile",),
}
_SECTIONS = {f for f in Config.__dataclass_fields__}


class History(list):
    """The epoch rows of a :func:`distill` call (one dict per epoch and stage), plus
    ``snapshots`` (the student's weights right after each stage that trains only the embedding,
    i.e. stage 1), ``notes`` (what a stage's preparation did, e.g. ``handoff``) and
    ``empty_batches`` (stage-1 batches where mining found no tuple)."""

    def __init__(self, rows=()):
        super().__init__(rows)
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}
        self.notes: dict = {}  # what the stages' preparations report (e.g. the hand-off)

    @property
    def empty_batches(self) -> int:
        return round(sum(r.get("empty_batches", 0) * r["steps"] for r in self))


def _set(tree: dict, dotted: str, value) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _merge(tree: dict, extra: Mapping, prefix: str = "") -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and key != "kwargs":
            _merge(tree, value, f"{prefix}{key}.")
        else:
            _set(tree, f"{prefix}{key}", value)


def settings_config(config: Config | None = None, **settings) -> Config:
    """A checked :class:`Config` from ``config`` (default: the defaults) and keyword settings:
    top-level keys (``method=``, ``seed=``, ``ablation=``), sections as mappings
    (``stage2={"lam": 3}``, ``train={"lr": 0.05}``) and the :data:`SHORTCUTS`."""
    tree: dict[str, Any] = to_dict(config) if config is not None else {}
    if config is not None:
        tree.pop("ablation", None)  # already applied to the config's values
    for key, value in settings.items():
        if value is None and key in SHORTCUTS:
            continue
        if key in SHORTCUTS:
            for dotted in SHORTCUTS[key]:
                _set(tree, dotted, list(value) if isinstance(value, tuple) else value)
        elif key in _SECTIONS:
            if isinstance(value, Mapping):
                _merge(tree, value, f"{key}.")
            else:
                _set(tree, key, value)
        else:
            import difflib

            close = difflib.get_close_matches(key, [*SHORTCUTS, *_SECTIONS], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"distill() got an unknown setting '{key}'{hint} (settings: the "
                              f"config's top-level keys and sections, and {', '.join(SHORTCUTS)})")
    return make_config(tree)


# ------------------------------------------------------------------ data


def as_split(data, what: str = "train") -> Split:
    """``(images, labels)`` tensors, a torch ``Dataset`` of ``(image, label)`` or a Split."""
    if isinstance(data, Split):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        images, labels = _materialise(data, what)
    else:
        raise UserError(f"the {what} data must be an (images, labels) pair of tensors or a torch "
                        f"Dataset of (image, label) items, got {type(data).__name__}")
    labels = torch.as_tensor(labels)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise UserError(f"the {what} images must be N x C x H x W (or N x H x W), got shape "
                        f"{tuple(images.shape)}")
    if labels.dim() != 1 or labels.is_floating_point() or len(labels) != len(images):
        raise UserError(f"the {what} labels must be N integers, one per image (got shape "
                        f"{tuple(labels.shape)}, dtype {labels.dtype}, for {len(images)} images)")
    if len(labels) and int(labels.min()) < 0:
        raise UserError(f"the {what} labels must be class indices >= 0, got {int(labels.min())}")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise UserError(f"the {what} images must be uint8 (0-255) or float, got {images.dtype}")
    return Split(images, labels.long())


def _materialise(dataset, what: str):
    """A map-style Dataset read once into memory (refilled's loader keeps data as one tensor)."""
    import numpy as np
    from tqdm.auto import tqdm

    images, labels = [], []
    for i in tqdm(range(len(dataset)), desc=f"reading the {what} dataset", leave=False,
                  disable=len(dataset) < 5000):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise UserError(f"the {what} Dataset must give (image, label) items; item {i} is "
                            f"{type(item).__name__}")
        x, y = item[0], item[1]
        if not isinstance(x, torch.Tensor):
            arr = np.asarray(x)
            x = torch.from_numpy(arr.copy())
            if x.dim() == 3:
                x = x.permute(2, 0, 1)  # PIL / numpy images are H x W x C
        images.append(x if x.dim() == 3 else x.unsqueeze(0))
        labels.append(int(y))
    if not images:
        raise UserError(f"the {what} Dataset is empty")
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise UserError(f"the {what} Dataset's images have different shapes ({sorted(shapes)[:3]}); "
                        "resize them to one size (e.g. with a transform)")
    return torch.stack(images), torch.tensor(labels)


def wrap(module, section, role: str, default_stats) -> Network:
    """``module`` as a :class:`Network` with the config section's embedding/head/statistics."""
    if isinstance(module, Network):
        return module
    mean = section.mean if section.mean is not None else (default_stats[0] if default_stats else None)
    std = section.std if section.std is not None else (default_stats[1] if default_stats else None)
    return Network(module, embedding=section.embedding, head=section.head, mean=mean, std=std,
                   maps=section.maps, role=role)


# ------------------------------------------------------------------ what a method needs


def check_requirements(spec: MethodSpec, student: Network, teacher: Network | None,
                       student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> None:
    """The method's declared needs against the networks and the class map, before training."""
    name = spec.name
    if spec.teacher_logits and not teacher.has_logits:
        raise ConfigError(f"method '{name}' matches the teacher's logits, but the teacher gives "
                          "none (a feature extractor); use refilled, rkd, pkt, sp, at or fitnet")
    if spec.shared_classes:
        if len(teacher_ids) and teacher.num_classes is not None and int(teacher_ids.max()) >= teacher.num_classes:
            raise ConfigError(f"method '{name}': shared class {int(teacher_ids.max())} is beyond the "
                              f"teacher's {teacher.num_classes} outputs")
        n = len(student_ids)
        if n < spec.shared_classes:
            which = "none" if n == 0 else "only one"
            raise ConfigError(
                f"method '{name}' needs at least {spec.shared_classes} classes the teacher knows, "
                f"but the student's classes share {which} with the teacher's; use refilled, rkd, "
                "pkt, sp, at or fitnet, which transfer knowledge without shared classes (from "
                "Python: pass shared_classes=(student ids, teacher ids))"
            )
    if spec.maps:
        for net in (student, teacher):
            if not net.has_maps:
                raise ConfigError(
                    f"method '{name}' needs feature maps, but the {net.role} has no forward_maps; "
                    f"set {net.role}.maps to the names of the submodules whose outputs are its maps")


# ------------------------------------------------------------------ centres


@torch.no_grad()
def teacher_centers(teacher: FrozenTeacher, train: Split, num_classes: int, device,
                    dist: Dist = Dist(), run_dir: Path | None = None) -> torch.Tensor:
    """Global teacher centres of the student's classes: normalised means of the raw teacher
    embeddings of the training split (no augmentation), zero rows for classes without training
    images (never used: the local classifier looks only at the classes in a batch). Computed
    once and saved as ``teacher_centers.pt``; under torchrun every rank embeds its share."""
    path = run_dir / "teacher_centers.pt" if run_dir is not None else None
    if path is not None and path.exists():
        centers = safe_load(path, what="teacher centres", hint="delete it to recompute it")
        if not isinstance(centers, torch.Tensor) or centers.dim() != 2 or centers.shape[0] != num_classes:
            raise UserError(f"teacher centres '{path}' do not fit this run ({num_classes} classes); "
                            "delete the file to recompute it")
        return centers.to(device)
    emb, _ = predict(teacher.network, train.images, device, dist=dist)
    centers = class_centers(emb, train.labels.to(device), num_classes, allow_missing=True)
    if path is not None and dist.is_main:
        atomic_torch_save(centers.cpu(), path)
    return centers


# ------------------------------------------------------------------ the one entry point


def distill(teacher: nn.Module | None, student: nn.Module, train, *, val=None,
            stage1_epochs: int | None = None, stage2_epochs: int | None = None,
            device: str | torch.device = "auto", run_dir: str | Path | None = None,
            config: Config | None = None, num_classes: int | None = None,
            shared_classes: tuple[torch.Tensor, torch.Tensor] | None = None,
            augment=None, tensorboard: str | Path | None = None, **settings) -> nn.Module:
    """Train ``student`` with the help of the frozen ``teacher``: REFILLED by default.

    Args:
        teacher: any ``nn.Module`` (its embedding: see :class:`refilled.networks.Network`);
            ``None`` for a method without a teacher (``method="ce"``). Its weights and BN
            statistics stay untouched; its training mode is restored afterwards.
        student: any ``nn.Module``; trained in place and returned. Its classifier (the last
            ``nn.Linear`` or ``head=``) is replaced by a fresh one when its size does not
            match the classes, and before REFILLED's stage 2.
        train: ``(images, labels)`` tensors (uint8 0-255 or float, N x C x H x W) or a map-style
            torch ``Dataset`` of ``(image, label)`` (read into memory once). Labels are class
            indices 0..num_classes-1 (``num_classes`` defaults to the largest label + 1).
        val: the same kind of data for per-epoch validation (``eval_every``); never the test set.
        stage1_epochs, stage2_epochs: REFILLED's budgets (``stage1.optim.epochs``, ``train.epochs``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``; both networks are moved there.
        run_dir: a folder for checkpoints (after every epoch), ``metrics.csv`` and the teacher
            centres: calling again with the same arguments resumes there, finished stages are
            not redone.
        config: a :class:`refilled.config.Config` to start from (default: the defaults).
        shared_classes: ``(student ids, teacher ids)`` of the classes both know (for ``kd``).
        augment: ``None``, a mapping of :class:`refilled.data.Augment` arguments
            (``{"pad": 4, "flip": True}``) or a callable ``(batch, generator) -> batch``.
        tensorboard: a folder for TensorBoard's per-epoch scalars (:mod:`refilled.tracking`);
            with ``log={"tensorboard": True}`` (``log.tensorboard``) it is ``run_dir/tensorboard``.
        **settings: any other setting, by the config's names: top-level keys (``method``,
            ``seed``, ``ablation``, ``eval_every``, ``progress``), sections as mappings
            (``stage2={"lam": 3}``, ``speed={"amp": True}``) and the shortcuts ``lr``,
            ``stage1_lr``, ``batch_size``, ``m_per_class`` (both stages), ``lam``, ``preset``,
            ``embedding``, ``head``, ``mean``, ``std``, ``maps`` (student), ``teacher_embedding``,
            ``teacher_mean``, ``teacher_std``, ``teacher_maps``, ``amp``, ``compile``.

    Inputs: uint8 images are scaled to [0, 1], float images are used as they are. A network
    normalises its input only when given statistics: ``mean``/``std`` for the student,
    ``teacher_mean``/``teacher_std`` for the teacher (by default the student's) — give the ones
    each model was (or will be) used with, and apply the student's at inference too.

    Returns the student; ``student.refilled_history`` holds the epoch rows (:class:`History`).
    """
    given = {k: v for k, v in dict(settings, stage1_epochs=stage1_epochs,
                                   stage2_epochs=stage2_epochs).items() if v is not None}
    cfg = config if (config is not None and not given) else settings_config(config, **given)
    spec = method_spec(cfg.method)
    train = as_split(train, "train")
    val = as_split(val, "validation") if val is not None else None
    if not len(train):
        raise UserError("the training data is empty")
    num_classes = num_classes or int(train.labels.max()) + 1
    if int(train.labels.max()) >= num_classes:
        raise UserError(f"training labels go up to {int(train.labels.max())}, but num_classes is "
                        f"{num_classes}")
    if spec.needs_teacher and teacher is None:
        raise UserError(f"method '{cfg.method}' needs a teacher; pass one (or method='ce')")
    dist, device = init_distributed(device)
    log = tensorboard_log(tensorboard, cfg.log.tensorboard, run_dir) if dist.is_main else None
    student_net = wrap(student, cfg.student, "student", None)
    own = student_net.mean is not None
    teacher_net = None
    if teacher is not None and spec.needs_teacher:
        teacher_net = wrap(teacher, cfg.teacher, "teacher",
                           (student_net.mean.flatten().tolist(), student_net.std.flatten().tolist())
                           if own else None)
    teacher_was_training = teacher_net.training if teacher_net is not None else None
    try:
        _fit(cfg, spec, student_net, teacher_net, train, val, device=device, dist=dist,
             run_dir=Path(run_dir) if run_dir is not None else None, num_classes=num_classes,
             shared_classes=shared_classes, augment=augment, on_epoch=log)
    finally:
        if log is not None:
            log.close()
        if teacher_net is not None:
            teacher_net.train(teacher_was_training)
        for mine, given in ((student_net, student), (teacher_net, teacher)):
            if mine is not None and mine is not given:
                mine.close()  # the wrappers made here leave no hook behind on the user's modules
    if student is not student_net:
        student.refilled_history = student_net.refilled_history
    return student


def _loader(split: Split, optim, *, seed: int, device, dist: Dist, augment, channels_last: bool):
    sampler = None
    if optim.m_per_class:
        sampler = ClassBalancedSampler(split.labels, optim.m_per_class, optim.batch_size, seed=seed)
    batch = min(optim.batch_size, len(split.labels)) if sampler is None else optim.batch_size
    return TensorLoader(split.images, split.labels, batch, shuffle=True, drop_last=True,
                        augment=augment, device=device, seed=seed, sampler=sampler,
                        rank=dist.rank, world=dist.world, channels_last=channels_last)


def validation(student: Network, train: Split, val: Split | None, device, kind: str,
               dist: Dist = Dist()) -> dict:
    """Validation metrics: the student's classifier (``"accuracy"``) or its NCM (``"ncm"``)."""
    if val is None or not len(val):
        return {}
    if kind == "ncm":
        return {"val_ncm_accuracy": ncm_eval(student, train.images, train.labels, val.images,
                                             val.labels, device, dist=dist)}
    _, logits = predict(student, val.images, device, dist=dist)
    return {"val_accuracy": accuracy(logits, val.labels)}


def _user_code(what: str, hint: str):
    """Run a first pass of a user's model or method: an exception from inside it becomes one
    line naming ``what`` (``REFILLED_DEBUG=1`` keeps the traceback)."""
    import os

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's module failed on real input
            if os.environ.get("REFILLED_DEBUG"):
                raise
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise UserError(f"{what} fails ({type(err).__name__}: {first}); {hint}") from None

    return guard()


def check_batches(cfg: Config, spec: MethodSpec, labels: torch.Tensor, num_classes: int,
                  dist: Dist = Dist()) -> None:
    """Refuse batch settings that can never work, before anything trains."""
    counts = torch.bincount(labels, minlength=num_classes)
    for key, optim, pairs in spec.schedules(cfg):
        if optim.batch_size % dist.world:
            raise UserError(f"{key}.batch_size={optim.batch_size} must be divisible by the "
                            f"{dist.world} processes of this torchrun job")
        if pairs and (optim.batch_size < 2 or optim.m_per_class == 1 or int(counts.max()) < 2):
            raise UserError(
                f"stage 1 can never see a positive pair (two images of one class in a batch) with "
                f"{key}.batch_size={optim.batch_size}, {key}.m_per_class={optim.m_per_class} "
                f"and at most {int(counts.max())} training images per class; use the class-balanced "
                f"sampler, e.g. {key}.m_per_class=4 with a batch size that is a multiple of 4"
            )
        present = int((counts > 0).sum())
        if optim.m_per_class and optim.batch_size // optim.m_per_class > present:
            raise UserError(
                f"{key}: batches of {optim.batch_size // optim.m_per_class} classes x "
                f"{optim.m_per_class} images need {optim.batch_size // optim.m_per_class} classes, "
                f"but the training data has {present}; lower {key}.batch_size or raise "
                f"{key}.m_per_class"
            )


def _setup(cfg: Config, spec: MethodSpec, student: Network, teacher: Network | None, train: Split, *,
           device, dist: Dist, num_classes: int, shared_classes):
    """Both networks on the device and probed on real inputs, the student's classifier sized,
    and the method's needs checked. Returns (example inputs, student ids, teacher ids)."""
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    if cfg.speed.channels_last and device.type == "cuda":
        for net in (student, teacher):
            if net is not None:
                net.to(memory_format=torch.channels_last)
                net.channels_last = True
    example = as_input(train.images[:4], device)
    shape = "x".join(map(str, example.shape[1:]))
    for net in (student, teacher):
        if net is not None:
            with _user_code(f"the {net.role} on a batch of the training images ({shape})",
                            f"check {net.role}.arch / {net.role}.kwargs against the data"):
                net.probe(example)
    if student.num_classes != num_classes and spec.predictor == "classifier":
        student.reset_classifier(num_classes)
    student_ids, teacher_ids = (shared_classes if shared_classes is not None
                                else (torch.zeros(0, dtype=torch.long),) * 2)
    check_requirements(spec, student, teacher, student_ids, teacher_ids)
    check_batches(cfg, spec, train.labels, num_classes, dist)
    return example, student_ids.to(device), teacher_ids.to(device)


def rehearse(cfg: Config, spec: MethodSpec, student: Network, teacher: Network | None, train: Split, *,
             device, dist: Dist, num_classes: int, shared_classes=None, augment=None) -> None:
    """Every check before anything trains: one batch of every stage of the method, forward and
    backward, on a copy of the student (the global RNG forked), so a failure in stage 2 shows
    before stage 1 (or the teacher) trains, and nothing of the real run changes."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        student = copy.deepcopy(student)
        example, student_ids, teacher_ids = _setup(cfg, spec, student, teacher, train, device=device,
                                                   dist=dist, num_classes=num_classes,
                                                   shared_classes=shared_classes)
        frozen = FrozenTeacher(teacher) if teacher is not None else None
        centers = (torch.zeros(num_classes, teacher.num_features, device=device)
                   if frozen is not None and spec.global_centers(cfg) else None)
        resolved = Resolved(cfg=cfg, student=student, teacher=frozen, num_classes=num_classes,
                            example=example, train=train, centers=centers, student_ids=student_ids,
                            teacher_ids=teacher_ids, dist=dist)
        stages = spec.build(resolved)
        augment = Augment(**augment) if isinstance(augment, Mapping) else augment
        autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                  enabled=cfg.speed.amp and device.type == "cuda")
        for stage in stages:
            with _user_code(f"method '{cfg.method}', {stage.name}, on a first batch (before training)",
                            "check the models and the method's settings"):
                if stage.prepare is not None:
                    stage.prepare()
                loader = _loader(train, stage.optim, seed=cfg.seed, device=device, dist=dist,
                                 augment=augment, channels_last=False)
                x, y = next(iter(loader))
                stage.method.train()
                with autocast:
                    losses = stage.method(x, y, 0)
                    total = sum(v for k, v in losses.items() if not k.startswith("_"))
                if total.requires_grad:
                    total.backward()


def _fit(cfg: Config, spec: MethodSpec, student: Network, teacher: Network | None, train: Split,
         val: Split | None, *, device, dist: Dist, run_dir: Path | None, num_classes: int,
         shared_classes, augment, on_epoch=None) -> None:
    """Everything of :func:`distill` after the inputs are checked and wrapped."""
    from refilled.rundirs import prepare_run_dir

    rehearse(cfg, spec, student, teacher, train, device=device, dist=dist, num_classes=num_classes,
             shared_classes=shared_classes, augment=augment)
    example, student_ids, teacher_ids = _setup(cfg, spec, student, teacher, train, device=device,
                                               dist=dist, num_classes=num_classes,
                                               shared_classes=shared_classes)
    channels_last = cfg.speed.channels_last and device.type == "cuda"
    if cfg.speed.compile and device.type == "cuda":
        student.compile_passes()
        if teacher is not None:
            teacher.compile_passes()
    frozen = FrozenTeacher(teacher) if teacher is not None else None
    if run_dir is not None:
        prepare_run_dir(run_dir, cfg, dist.rank)
    centers = (teacher_centers(frozen, train, num_classes, device, dist, run_dir)
               if frozen is not None and spec.global_centers(cfg) else None)
    resolved = Resolved(cfg=cfg, student=student, teacher=frozen, num_classes=num_classes,
                        example=example, train=train, centers=centers, student_ids=student_ids,
                        teacher_ids=teacher_ids, dist=dist)
    stages = spec.build(resolved)
    if isinstance(augment, Mapping):
        augment = Augment(**augment)
    history = History()
    for stage in stages:
        if stage.prepare is not None:
            notes = dict(stage.prepare() or {})
            warning = notes.pop("warning", None)  # for the user, not a note of the run
            history.notes.update(notes)
            if warning and cfg.progress and dist.is_main:
                print(f"refilled: {stage.name}: {warning}", file=sys.stderr)
        loader = _loader(train, stage.optim, seed=cfg.seed, device=device, dist=dist,
                         augment=augment, channels_last=channels_last)
        rows = train_stage(
            stage.name, stage.method, loader, stage.optim, run_dir,
            validate=lambda kind=stage.validate: validation(student, train, val, device, kind, dist),
            seed=cfg.seed, eval_every=cfg.eval_every, progress=cfg.progress and dist.is_main,
            earlier_rows=list(history), extra_state={"config": to_dict(cfg)}, dist=dist,
            amp=cfg.speed.amp, on_epoch=on_epoch,
        )
        history.extend(rows)
        if stage.validate == "ncm":  # the embedding right after this stage, before a later one moves it
            history.snapshots[stage.name] = {k: v.detach().cpu().clone()
                                             for k, v in student.module_state_dict().items()}
    student.refilled_history = history


@contextlib.contextmanager
def weights_of(network: Network, state: dict[str, torch.Tensor]):
    """Temporarily load ``state`` into ``network``'s module (e.g. a stage-1 snapshot)."""
    current = {k: v.detach().clone() for k, v in network.module_state_dict().items()}
    network.module.load_state_dict(state)
    try:
        yield network
    finally:
        network.module.load_state_dict(current)
