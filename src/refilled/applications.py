"""Applications of REFILLED (SPEC §4): one-step incremental learning and few-/middle-shot learning.

Both are ``protocol:`` values of the one config and run through :func:`refilled.protocols.run`
(so ``refilled run`` / ``refilled sweep`` work unchanged); the flow is the one of a distillation
run: splits -> frozen teacher -> the method's stages on :func:`refilled.engine.train_stage`
(checkpointed, resumable; a finished run returns its ``results.json``) -> one test evaluation.

**incremental** — the teacher is the old model, trained (and cached) on the old classes
order[0:n_old], n_old = ``data.teacher_classes``, with the teacher's own splits. The student
learns the old classes plus the next ``incremental.new_classes`` classes of the order (labels
0..n_old-1 are the old classes in the teacher's label order, then the new ones). Its training
data: the new classes' training split (capped by ``data.train_per_class``) plus
``incremental.old_per_class`` images per old class drawn from the old model's training split
(None: all, 0: none). Validation: the old classes' validation split (never seen by the old model)
and the new classes' one, both carved from training as in :func:`build_task`. Test accuracy is
reported on all classes and separately on the old and the new classes' test images, always
predicting over all student classes. ``data.student_offset`` / ``data.student_classes`` are
not used.

**fewshot** — the teacher is trained on the base classes order[0:data.teacher_classes]; the
student learns the novel classes order[s:s+fewshot.novel_classes], s = ``data.student_offset``
(must be >= ``data.teacher_classes``: base and novel classes are disjoint), from K =
``fewshot.shots`` training images per class, drawn with the run seed (so seeds vary the support
set as well as the initialisation) after carving ``data.val_per_class`` validation images per
class. ``data.train_per_class`` is not used. Evaluation (``fewshot.eval``):

- ``classifier``: the student's classifier on the novel classes' test images;
- ``episodes``: ``fewshot.episodes`` N-way K-shot episodes (N = ``fewshot.ways``, K = shots,
  ``fewshot.queries`` queries per class) drawn from the novel classes' *test* images with their
  own generator seeded by the run seed (the same episodes for every method of a seed), support
  and query disjoint; a nearest-prototype classifier (cosine, normalised prototypes,
  :func:`refilled.ncm.ncm_accuracy`) on the student's embedding. ``test_accuracy`` is the mean
  over episodes and ``test_ci95`` the t-based 95% half-width (:func:`refilled.report.ci95`).

Methods are chosen by ``method:`` as usual: ``ce`` (student from scratch), ``finetune`` and
``linear_probe`` (from the old model, :mod:`refilled.methods.applications`), ``refilled`` (stage
2 alone with ``stage1.optim.epochs=0``; its teacher centres cover every student class and are the
teacher's embedding of the student's training data; a class without training images, e.g. old
classes with ``old_per_class: 0``, gets a zero centre, never used since the local classifier only
looks at the classes of the batch). ``teacher_prototypes`` (few-shot reference) trains nothing:
the teacher's own embedding is evaluated with prototypes — of the K shots for ``classifier``, of
each episode's support for ``episodes``.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from refilled.config import Config
from refilled.data import cap_per_class
from refilled.engine import (
    atomic_torch_save,
    atomic_write_text,
    load_checkpoint,
    predict,
    seed_everything,
)
from refilled.errors import UserError
from refilled.methods import needs_teacher
from refilled.models import create_model
from refilled.ncm import class_centers, ncm_accuracy, ncm_logits
from refilled.protocols import (
    Split,
    Task,
    _load,
    open_run,
    build_task,
    check_batches,
    config_digest,
    get_teacher,
    save_model,
    train_student,
)
from refilled.report import ci95

# ------------------------------------------------------------------ tasks


def _cat(a: Split, b: Split, shift: int) -> Split:
    return Split(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels + shift]))


def _total_classes(cfg: Config) -> int:
    d = cfg.data
    return _load(d.name, d.root, "train", d.image_size).num_classes


def incremental_task(cfg: Config) -> Task:
    """Old classes (the teacher's window and splits) followed by the new ones."""
    d, inc = cfg.data, cfg.incremental
    old = build_task(cfg, "teacher")
    n_old = old.num_classes
    n_new = inc.new_classes or _total_classes(cfg) - n_old
    new_data = dataclasses.replace(d, student_offset=n_old, student_classes=n_new)
    new = build_task(dataclasses.replace(cfg, data=new_data), "student")
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
    return Task(
        train=_cat(memory, new.train, n_old), val=_cat(old.val, new.val, n_old),
        test=_cat(old.test, new.test, n_old), classes=old.classes + new.classes,
        class_names=old.class_names + new.class_names, info=new.info,
    )


def fewshot_task(cfg: Config) -> Task:
    """The novel classes, with K training images per class (drawn with the run seed)."""
    d, fs = cfg.data, cfg.fewshot
    if d.student_offset < d.teacher_classes:
        raise UserError(
            f"few-shot novel classes start at data.student_offset={d.student_offset}, inside the "
            f"base classes order[0:{d.teacher_classes}]; set data.student_offset >= "
            "data.teacher_classes"
        )
    n = fs.novel_classes or _total_classes(cfg) - d.student_offset
    data = dataclasses.replace(d, student_classes=n, train_per_class=None)
    novel = build_task(dataclasses.replace(cfg, data=data), "student")
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
    return dataclasses.replace(novel, train=Split(novel.train.images[keep], novel.train.labels[keep]))


# ------------------------------------------------------------------ episodes


def sample_episodes(labels: torch.Tensor, *, ways: int, shots: int, queries: int, episodes: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N-way K-shot episodes over the labelled pool ``labels`` (classes 0..C-1).

    Returns ``(classes (E, N), support (E, N, K), query (E, N, Q))``: each episode's classes and
    the pool indices of its support and query images (row ``j`` belongs to ``classes[e, j]``).
    Within an episode and class, support and query come from one random permutation of that
    class's images, so they never share an image. All randomness comes from ``generator``.
    """
    labels = labels.long().cpu()
    counts = torch.bincount(labels)
    need = shots + queries
    if ways > len(counts):
        raise UserError(f"fewshot.ways={ways} is more than the {len(counts)} novel classes")
    short = (counts < need).nonzero().flatten().tolist()
    if short:
        raise UserError(
            f"episodes need {shots} support + {queries} query images per class, but class "
            f"{short[0]} has {int(counts[short[0]])} test images; lower fewshot.queries or shots"
        )
    grouped = torch.sort(labels, stable=True).indices  # pool indices, grouped by class
    starts = torch.cumsum(counts, 0) - counts
    classes = torch.rand(episodes, len(counts), generator=generator).argsort(dim=1)[:, :ways]
    keys = torch.rand(episodes, ways, int(counts.max()), generator=generator)
    beyond = torch.arange(keys.shape[2]) >= counts[classes].unsqueeze(2)
    positions = keys.masked_fill(beyond, float("inf")).argsort(dim=2)[:, :, :need]
    picked = grouped[starts[classes].unsqueeze(2) + positions]
    return classes, picked[:, :, :shots], picked[:, :, shots:]


def episode_accuracies(embeddings: torch.Tensor, support: torch.Tensor, query: torch.Tensor) -> list[float]:
    """Nearest-prototype (cosine) accuracy of every episode, from the pool's embeddings."""
    _, ways, shots = support.shape
    queries = query.shape[2]
    dev = embeddings.device
    y_support = torch.arange(ways, device=dev).repeat_interleave(shots)
    y_query = torch.arange(ways, device=dev).repeat_interleave(queries)
    return [ncm_accuracy(embeddings[s.flatten().to(dev)], y_support,
                         embeddings[q.flatten().to(dev)], y_query, ways)
            for s, q in zip(support, query)]


# ------------------------------------------------------------------ helpers


def _student_centers(teacher, task: Task, run_dir, device) -> torch.Tensor:
    """Teacher centres of every student class from its training data; zero rows for a class
    without training images. Computed once (no augmentation) and saved."""
    path = run_dir / "teacher_centers.pt"
    if path.exists():
        return load_checkpoint(path).to(device)
    emb, _ = predict(teacher.model, task.train.images, task.info["mean"], task.info["std"], device)
    labels = task.train.labels.to(device)
    present = torch.bincount(labels, minlength=task.num_classes).nonzero().flatten()
    remap = torch.full((task.num_classes,), -1, dtype=torch.long, device=device)
    remap[present] = torch.arange(len(present), device=device)
    centers = torch.zeros(task.num_classes, teacher.num_features, device=device)
    centers[present] = class_centers(emb, remap[labels], len(present))
    atomic_torch_save(centers.cpu(), path)
    return centers


def _ncm_predictor(model, task: Task, device):
    """Predicted labels from cosine NCM on ``model``'s embedding, centres from the training split."""
    mean, std = task.info["mean"], task.info["std"]
    emb, _ = predict(model, task.train.images, mean, std, device)
    try:
        centers = class_centers(emb, task.train.labels.to(device), task.num_classes,
                                normalize_inputs=True)
    except ValueError as err:
        raise UserError(f"an NCM classifier needs training images of every class: {err}") from None
    return lambda images: ncm_logits(predict(model, images, mean, std, device)[0], centers).argmax(1)


def _classifier_predictor(model, task: Task, device):
    mean, std = task.info["mean"], task.info["std"]
    return lambda images: predict(model, images, mean, std, device)[1].argmax(1)


def _acc(pred: torch.Tensor, labels: torch.Tensor) -> float | None:
    if not len(labels):
        return None
    return (pred.cpu() == labels).double().mean().item()


# ------------------------------------------------------------------ one run


def run_application(cfg: Config) -> dict:
    """Run one incremental or few-shot experiment (or resume it); return its results."""
    dist, device, run_dir, finished = open_run(cfg)
    if dist.world > 1:
        raise UserError(f"protocol '{cfg.protocol}' runs in one process; start it without torchrun")
    if finished is not None:
        return finished
    tic = time.perf_counter()
    seed_everything(cfg.seed)
    task = incremental_task(cfg) if cfg.protocol == "incremental" else fewshot_task(cfg)
    trains = cfg.method != "teacher_prototypes"
    if trains:
        check_batches(cfg, task, dist)
    teacher, teacher_info = None, {"teacher": None, "teacher_test_accuracy": None}
    if needs_teacher(cfg.method):
        teacher, teacher_info = get_teacher(cfg, device)

    seed_everything(cfg.seed)
    arch, kwargs = cfg.student.arch, cfg.student.kwargs
    student = create_model(arch, task.num_classes, task.info["in_chans"], **kwargs).to(device)
    mean, std = task.info["mean"], task.info["std"]
    has_val = len(task.val.labels) > 0

    centers = lambda: _student_centers(teacher, task, run_dir, device)  # noqa: E731
    stages, history, _ = train_student(cfg, task, student, teacher, run_dir, device, dist, centers)

    # What is evaluated: the student's classifier; the NCM classifier of its embedding after
    # stage 1 alone; the teacher's embedding with prototypes for the reference.
    model = student if trains else teacher.model
    if trains and stages[-1].validate == "accuracy":
        classify = _classifier_predictor(student, task, device)
    else:
        classify = _ncm_predictor(model, task, device)
    val = _acc(classify(task.val.images), task.val.labels) if has_val else None

    # The one look at the test split.
    extra: dict = {}
    if cfg.protocol == "incremental":
        n_old = cfg.data.teacher_classes
        pred, labels = classify(task.test.images).cpu(), task.test.labels
        old = labels < n_old
        test = _acc(pred, labels)
        extra = {"test_accuracy_old": _acc(pred[old], labels[old]),
                 "test_accuracy_new": _acc(pred[~old], labels[~old]),
                 "old_classes": n_old, "new_classes": task.num_classes - n_old,
                 "old_per_class": cfg.incremental.old_per_class, "test_ci95": None}
    else:
        fs = cfg.fewshot
        extra = {"shots": fs.shots, "novel_classes": task.num_classes, "fewshot_eval": fs.eval}
        if fs.eval == "classifier":
            test, extra["test_ci95"] = _acc(classify(task.test.images), task.test.labels), None
        else:
            generator = torch.Generator().manual_seed(cfg.seed)
            _, support, query = sample_episodes(task.test.labels, ways=fs.ways, shots=fs.shots,
                                                queries=fs.queries, episodes=fs.episodes,
                                                generator=generator)
            emb, _ = predict(model, task.test.images, mean, std, device)
            accs = episode_accuracies(emb, support, query)
            half = ci95(accs) if len(accs) > 1 else None
            test = sum(accs) / len(accs)
            extra.update(test_ci95=half, episodes=fs.episodes, ways=fs.ways, queries=fs.queries)
    if trains:
        save_model(run_dir / "model.pt", student, arch, kwargs, {"in_chans": task.info["in_chans"]})
    results = {
        "method": cfg.method,
        "arm": cfg.arm,
        "role": "student",
        "dataset": cfg.data.name,
        "protocol": cfg.protocol,
        "seed": cfg.seed,
        "test_accuracy": test,
        **extra,
        "val_accuracy": val,
        "stage1_ncm_accuracy": None,
        **teacher_info,
        "teacher_init": cfg.teacher.init if teacher is not None else None,
        "student_arch": arch if trains else None,
        "num_classes": task.num_classes,
        "train_images": len(task.train.labels),
        "wall_seconds": round(time.perf_counter() - tic, 2),
        "config_digest": config_digest(cfg),
        "run_dir": str(run_dir),
    }
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    return results
