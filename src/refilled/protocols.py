"""The protocols: what each side learns (class windows, splits) and what the test reports.

Each protocol is one entry of :data:`PROTOCOLS`: its ``tasks(cfg)``, called once per run, gives
the student's :class:`Task` and the teacher's (the classes the teacher learns, with its own
splits), and its ``test(...)`` the figures of the one look at the test split:

* **distill** — class windows: the teacher learns ``order[0:n]``, the student
  ``order[s:s+n_s]`` (same, disjoint or partly overlapping classes);
* **incremental** — the teacher is the old model on the old classes ``order[0:n_old]``; the
  student learns the old classes (a memory of ``incremental.old_per_class`` images each) and
  ``incremental.new_classes`` new ones (labels: the old classes first, in the teacher's order);
* **fewshot** — the teacher learns the base classes; the student the novel classes
  ``order[s:s+novel]`` from ``fewshot.shots`` images per class (drawn with the run seed).

Validation is always carved from training data (``data.val_per_class``, ``data.split_seed``);
the test split is only read by the final evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from refilled.config import Config
from refilled.data import (
    DATASET_NAMES,
    FORMATS,
    Split,
    cap_per_class,
    class_order,
    class_window,
    load_images,
    select_classes,
    stratified_split,
)
from refilled.data.folders import FileItems, resize_mode
from refilled.data.streaming import StreamedImages, StreamSettings
from refilled.errors import ConfigError, UserError
from refilled.evaluation import episode_accuracies, sample_episodes, split_accuracy
from refilled.methods import method_spec
from refilled.models.external import check_arch
from refilled.stats import ci95


@dataclass(frozen=True)
class Task:
    """One side's view of the data: its classes and its train / val / test splits."""

    train: Split
    val: Split
    test: Split
    classes: tuple[int, ...]  # original class ids, in label order
    class_names: tuple[str, ...]
    info: dict  # mean, std, pad, flip, in_chans, (augment), train_augment

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Tasks:
    student: Task
    teacher: Task


def shared_classes(student: Task, teacher: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """The classes both sides know: (student label ids, teacher label ids), aligned; empty
    tensors when they share none."""
    teacher_ids = {c: j for j, c in enumerate(teacher.classes)}
    pairs = [(i, teacher_ids[c]) for i, c in enumerate(student.classes) if c in teacher_ids]
    return (torch.tensor([p[0] for p in pairs], dtype=torch.long),
            torch.tensor([p[1] for p in pairs], dtype=torch.long))


# ------------------------------------------------------------------ data


@functools.lru_cache(maxsize=4)
def _load(name: str, root: str | None, split: str, image_size: int | None, test_fraction: float,
          test_seed: int, in_memory, settings: StreamSettings, augment: bool, progress: bool):
    data, note = load_images(name, root, split, in_memory=in_memory, settings=settings,
                             image_size=image_size, test_fraction=test_fraction, test_seed=test_seed,
                             augment=augment)
    if progress and split == "train":
        print(f"refilled: {name} data {note}", file=sys.stderr, flush=True)
    return data


def load_split(cfg: Config, split: str):
    d = cfg.data
    return _load(d.name, d.root, split, d.image_size, d.test_fraction, d.test_split_seed, d.in_memory,
                 StreamSettings.of(d), d.augment, cfg.progress)


def total_classes(cfg: Config) -> int:
    return load_split(cfg, "train").num_classes


def window_task(cfg: Config, role: str) -> Task:
    """The teacher's (order[0:n]) or the student's (order[s:s+n_s]) classes and splits."""
    d = cfg.data
    train_set, test_set = load_split(cfg, "train"), load_split(cfg, "test")
    order = class_order(train_set.num_classes, d.class_order_seed)
    if role == "teacher":
        key_n, key_s = "data.teacher_classes", None
        n, s, cap = d.teacher_classes, 0, d.teacher_train_per_class
    else:
        key_n, key_s = ("data.student_classes" if d.student_classes else "data.teacher_classes",
                        "data.student_offset")
        n, s, cap = d.student_classes or d.teacher_classes, d.student_offset, d.train_per_class
    try:
        classes = class_window(order, n, s)
    except ConfigError as err:
        keys = f"{key_n}={n}" + (f", {key_s}={s}" if key_s else "")
        raise ConfigError(f"{keys}: {err}") from None
    x, y = select_classes(train_set.images, train_set.labels, classes)
    test = Split(*select_classes(test_set.images, test_set.labels, classes))
    if d.val_per_class:
        try:
            train_idx, val_idx = stratified_split(y, val_per_class=d.val_per_class, seed=d.split_seed)
        except ConfigError as err:
            raise ConfigError(f"data.val_per_class={d.val_per_class} ({role} classes): {err}") from None
    else:
        train_idx, val_idx = torch.arange(len(y)), torch.zeros(0, dtype=torch.long)
    if cap is not None:
        available = int(torch.bincount(y[train_idx], minlength=len(classes)).min())
        if cap > available:
            key = "data.teacher_train_per_class" if role == "teacher" else "data.train_per_class"
            raise UserError(
                f"{key}={cap} asks for more training images per class than exist: the smallest "
                f"class has {available} after carving {d.val_per_class} per class for validation; "
                f"lower {key} (or data.val_per_class)"
            )
        train_idx = train_idx[cap_per_class(y[train_idx], cap, seed=d.split_seed)]
    info = dict(FORMATS[d.name].info, eval_resize="square")
    if isinstance(x, StreamedImages) and isinstance(x.eval_items, FileItems):
        # streamed image files: transformed per item (not per batch), evaluated as their size asks
        info.update(item_augment=True, eval_resize=resize_mode(x.eval_items.image_size))
    return Task(
        train=Split(x[train_idx], y[train_idx]),
        val=Split(x[val_idx], y[val_idx]),
        test=test,
        classes=tuple(classes),
        class_names=tuple(train_set.class_names[c] for c in classes),
        info={**info, "in_chans": int(x.shape[1]), "train_augment": d.augment},
    )


def _cat(a: Split, b: Split, shift: int) -> Split:
    images = (torch.cat([a.images, b.images]) if isinstance(a.images, torch.Tensor)
              else StreamedImages.cat([a.images, b.images]))
    return Split(images, torch.cat([a.labels, b.labels + shift]))


def incremental_tasks(cfg: Config) -> Tasks:
    """Old classes (the teacher's window and splits) followed by the new ones."""
    d, inc = cfg.data, cfg.incremental
    old = window_task(cfg, "teacher")
    n_old = old.num_classes
    n_new = inc.new_classes or total_classes(cfg) - n_old
    new_data = dataclasses.replace(d, student_offset=n_old, student_classes=n_new)
    try:
        new = window_task(dataclasses.replace(cfg, data=new_data), "student")
    except ConfigError as err:
        raise ConfigError(f"incremental.new_classes={n_new} after {n_old} old classes: {err}") from None
    memory = old.train
    if inc.old_per_class is not None:
        available = int(torch.bincount(old.train.labels, minlength=n_old).min())
        if inc.old_per_class > available:
            raise UserError(
                f"incremental.old_per_class={inc.old_per_class} asks for more old images per class "
                f"than the old model's training split holds (the smallest old class has "
                f"{available}); lower incremental.old_per_class or set it to null (all)"
            )
        keep = (cap_per_class(old.train.labels, inc.old_per_class, seed=d.split_seed)
                if inc.old_per_class else torch.zeros(0, dtype=torch.long))
        memory = Split(old.train.images[keep], old.train.labels[keep])
    student = Task(
        train=_cat(memory, new.train, n_old), val=_cat(old.val, new.val, n_old),
        test=_cat(old.test, new.test, n_old), classes=old.classes + new.classes,
        class_names=old.class_names + new.class_names, info=new.info,
    )
    return Tasks(student=student, teacher=old)


def fewshot_tasks(cfg: Config) -> Tasks:
    """The novel classes, with K training images per class (drawn with the run seed)."""
    d, fs = cfg.data, cfg.fewshot
    if d.student_offset < d.teacher_classes:
        raise UserError(
            f"few-shot novel classes start at data.student_offset={d.student_offset}, inside the "
            f"base classes order[0:{d.teacher_classes}]; set data.student_offset >= "
            "data.teacher_classes"
        )
    n = fs.novel_classes or total_classes(cfg) - d.student_offset
    data = dataclasses.replace(d, student_classes=n, train_per_class=None)
    novel = window_task(dataclasses.replace(cfg, data=data), "student")
    counts = torch.bincount(novel.train.labels, minlength=novel.num_classes)
    short = (counts < fs.shots).nonzero().flatten().tolist()
    if short:
        c = short[0]
        raise UserError(
            f"fewshot.shots={fs.shots} asks for more training images than novel class "
            f"'{novel.class_names[c]}' (class id {novel.classes[c]}) has: {int(counts[c])} after "
            f"carving data.val_per_class={d.val_per_class} for validation; lower fewshot.shots "
            "or data.val_per_class"
        )
    keep = cap_per_class(novel.train.labels, fs.shots, seed=cfg.seed)
    student = dataclasses.replace(novel, train=Split(novel.train.images[keep], novel.train.labels[keep]))
    return Tasks(student=student, teacher=window_task(cfg, "teacher"))


def distill_tasks(cfg: Config) -> Tasks:
    return Tasks(student=window_task(cfg, "student"), teacher=window_task(cfg, "teacher"))


def protocol_name(cfg: Config) -> str:
    """``standard`` / ``partial_overlap`` / ``cross_task`` for class windows; else the protocol."""
    if cfg.protocol != "distill":
        return cfg.protocol
    n_t = cfg.data.teacher_classes
    n_s = cfg.data.student_classes or n_t
    s = cfg.data.student_offset
    if s == 0 and n_s == n_t:
        return "standard"
    return "cross_task" if s >= n_t else "partial_overlap"


# ------------------------------------------------------------------ what the test reports


def _test_plain(cfg, task: Task, predict_labels, embed) -> dict:
    return {"test_accuracy": split_accuracy(predict_labels, task.test.images, task.test.labels)}


def _test_incremental(cfg, task: Task, predict_labels, embed) -> dict:
    n_old = cfg.data.teacher_classes
    pred, labels = predict_labels(task.test.images).cpu(), task.test.labels
    old = labels < n_old

    def acc(mask):
        return (pred[mask] == labels[mask]).double().mean().item() if int(mask.sum()) else None

    return {"test_accuracy": acc(torch.ones_like(old)), "test_accuracy_old": acc(old),
            "test_accuracy_new": acc(~old), "old_classes": n_old,
            "new_classes": task.num_classes - n_old, "old_per_class": cfg.incremental.old_per_class,
            "test_ci95": None}


def _test_fewshot(cfg, task: Task, predict_labels, embed) -> dict:
    fs = cfg.fewshot
    out = {"shots": fs.shots, "novel_classes": task.num_classes, "fewshot_eval": fs.eval}
    if fs.eval == "classifier":
        return {"test_accuracy": split_accuracy(predict_labels, task.test.images, task.test.labels),
                **out, "test_ci95": None}
    generator = torch.Generator().manual_seed(cfg.seed)
    _, support, query = sample_episodes(task.test.labels, ways=fs.ways, shots=fs.shots,
                                        queries=fs.queries, episodes=fs.episodes, generator=generator)
    accs = episode_accuracies(embed(task.test.images), support, query)
    return {"test_accuracy": sum(accs) / len(accs), **out,
            "test_ci95": ci95(accs) if len(accs) > 1 else None, "episodes": fs.episodes,
            "ways": fs.ways, "queries": fs.queries}


@dataclass(frozen=True)
class Protocol:
    """An entry of :data:`PROTOCOLS`: how the tasks are built and what the test reports."""

    tasks: Callable[[Config], Tasks]
    test: Callable  # (cfg, task, predict_labels, embed) -> dict of test figures
    multi_process: bool = False  # whether it may run under torchrun


PROTOCOLS: dict[str, Protocol] = {
    "distill": Protocol(distill_tasks, _test_plain, multi_process=True),
    "incremental": Protocol(incremental_tasks, _test_incremental),
    "fewshot": Protocol(fewshot_tasks, _test_fewshot),
}


def check_config(cfg: Config) -> None:
    """The names a config gives that no value check can see: the dataset, the method (and its
    protocol) and the architectures (zoo names, importable factories, timm models).
    ``refilled config`` and every run call it before any data is read."""
    if cfg.data.name not in DATASET_NAMES:
        raise ConfigError(f"config key 'data.name' must be one of {list(DATASET_NAMES)}, got "
                          f"{cfg.data.name!r}")
    spec = method_spec(cfg.method)
    if spec.protocols and cfg.protocol not in spec.protocols:
        raise ConfigError(f"method '{spec.name}' belongs to the {' / '.join(spec.protocols)} "
                          f"protocol; set protocol: {spec.protocols[0]}")
    check_arch(cfg.student.arch, "student")
    if spec.needs_teacher:
        check_arch(cfg.teacher.arch, "teacher")
    if spec.same_arch and (cfg.student.arch != cfg.teacher.arch or cfg.student.kwargs != cfg.teacher.kwargs):
        raise ConfigError(
            f"method '{spec.name}' starts from the old model, so student.arch/kwargs must equal "
            f"teacher.arch/kwargs (got student {cfg.student.arch!r} {cfg.student.kwargs}, "
            f"teacher {cfg.teacher.arch!r} {cfg.teacher.kwargs})"
        )
