"""Experiments: config -> class windows and splits -> teacher -> stages -> one test evaluation.

Data flows one way. The test split is touched once, after training, for the reported figures;
everything selected during training (nothing, by default: the last epoch is reported) may only
look at the validation split carved from the training data.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from refilled.config import Config, ConfigError, dump_yaml, make_config, to_dict
from refilled.data import (
    DATASET_INFO,
    Augment,
    ClassBalancedSampler,
    TensorLoader,
    cap_per_class,
    class_order,
    class_window,
    load_dataset,
    select_classes,
    stratified_split,
)
from refilled.engine import (
    accuracy,
    atomic_torch_save,
    atomic_write_text,
    load_checkpoint,
    ncm_eval,
    Dist,
    init_distributed,
    predict,
    seed_everything,
    train_stage,
)
from refilled.errors import UserError
from refilled.methods import Context, FrozenTeacher, build_stages, needs_teacher
from refilled.models import create_model
from refilled.ncm import class_centers

# ------------------------------------------------------------------ data


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 N x C x H x W
    labels: torch.Tensor  # int64 N, remapped to 0..num_classes-1


@dataclass(frozen=True)
class Task:
    """One side's view of the data: its class window and its train / val / test splits."""

    train: Split
    val: Split
    test: Split
    classes: tuple[int, ...]  # original class ids, in label order
    class_names: tuple[str, ...]
    info: dict  # mean, std, pad, flip, in_chans

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@functools.lru_cache(maxsize=4)
def _load(name: str, root: str | None, split: str, image_size: int | None):
    kwargs = {"image_size": image_size} if image_size and name in ("cub200", "image_folder") else {}
    return load_dataset(name, root=root, split=split, **kwargs)


def build_task(cfg: Config, role: str) -> Task:
    """The teacher's (order[0:n]) or the student's (order[s:s+n_s]) classes and splits."""
    d = cfg.data
    train_set = _load(d.name, d.root, "train", d.image_size)
    test_set = _load(d.name, d.root, "test", d.image_size)
    order = class_order(train_set.num_classes, d.class_order_seed)
    if role == "teacher":
        classes, cap = class_window(order, d.teacher_classes, 0), d.teacher_train_per_class
    else:
        n = d.student_classes or d.teacher_classes
        classes, cap = class_window(order, n, d.student_offset), d.train_per_class
    x, y = select_classes(train_set.images, train_set.labels, classes)
    test = Split(*select_classes(test_set.images, test_set.labels, classes))
    if d.val_per_class:
        train_idx, val_idx = stratified_split(y, val_per_class=d.val_per_class, seed=d.split_seed)
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
    info = DATASET_INFO.get(d.name, DATASET_INFO["image_folder"])
    return Task(
        train=Split(x[train_idx], y[train_idx]),
        val=Split(x[val_idx], y[val_idx]),
        test=test,
        classes=tuple(classes),
        class_names=tuple(train_set.class_names[c] for c in classes),
        info={**info, "in_chans": int(x.shape[1]), "train_augment": d.augment},
    )


def protocol_name(cfg: Config) -> str:
    n_t = cfg.data.teacher_classes
    n_s = cfg.data.student_classes or n_t
    s = cfg.data.student_offset
    if s == 0 and n_s == n_t:
        return "standard"
    return "cross_task" if s >= n_t else "partial_overlap"


def make_loader(task: Task, split: Split, optim, *, seed: int, device, train: bool = True,
                dist: Dist = Dist(), channels_last: bool = False):
    info = task.info
    sampler = None
    if train and optim.m_per_class:
        sampler = ClassBalancedSampler(split.labels, optim.m_per_class, optim.batch_size, seed=seed)
    batch = min(optim.batch_size, len(split.labels)) if sampler is None else optim.batch_size
    return TensorLoader(
        split.images, split.labels, batch, shuffle=train, drop_last=train,
        augment=Augment(info["pad"], info["flip"], **info.get("augment", {}))
        if train and info.get("train_augment", True) else None,
        mean=info["mean"], std=info["std"], device=device, seed=seed, sampler=sampler,
        rank=dist.rank, world=dist.world, channels_last=channels_last,
    )


# ------------------------------------------------------------------ run directories


def _digest(tree) -> str:
    return hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _changed(tree: dict, default: dict) -> dict:
    """The entries of ``tree`` that differ from ``default``, recursively."""
    out = {}
    for key, value in tree.items():
        base = default.get(key)
        if isinstance(value, dict) and isinstance(base, dict) and key != "kwargs":
            sub = _changed(value, base)
            if sub:
                out[key] = sub
        elif value != base:
            out[key] = value
    return out


def config_digest(cfg: Config) -> str:
    """What defines a run's result (not where it is written, nor how it is displayed).

    Only the values that differ from the defaults enter it, so a new config key with a default
    never renames (and so never retrains) existing runs.
    """
    tree = _changed(to_dict(cfg), to_dict(Config()))
    for key in ("out_dir", "name", "arm", "progress", "device", "eval_every"):
        tree.pop(key, None)
    if not needs_teacher(cfg.method):
        tree.pop("teacher", None)  # e.g. the student alone is the same run whatever the teacher
    return _digest(tree)


def run_name(cfg: Config) -> str:
    """The one function that names run directories."""
    if cfg.name:
        return cfg.name
    init = "-randteacher" if needs_teacher(cfg.method) and cfg.teacher.init == "random" else ""
    return f"{cfg.data.name}-{cfg.method}{init}-{cfg.student.arch}-{config_digest(cfg)}-seed{cfg.seed}"


def teacher_config(cfg: Config) -> Config:
    """The config of the run that trains ``cfg``'s teacher, shared by every student run.

    Built from the defaults plus only what shapes the teacher (its data window, architecture,
    schedule and seed), so student settings never make it retrain.
    """
    t = cfg.teacher
    data = dataclasses.replace(cfg.data, student_offset=0, student_classes=None,
                               train_per_class=cfg.data.teacher_train_per_class)
    base = Config(
        method="ce", seed=t.seed, device=cfg.device, out_dir=cfg.out_dir, progress=cfg.progress,
        eval_every=cfg.eval_every, data=data, train=t.optim,
        student=dataclasses.replace(cfg.student, arch=t.arch, kwargs=t.kwargs),
    )
    name = f"teacher-{cfg.data.name}-{t.arch}-{config_digest(base)}-seed{t.seed}"
    return dataclasses.replace(base, name=name)


def _prepare_run_dir(cfg: Config, dist: Dist = Dist()) -> Path:
    run_dir = Path(cfg.out_dir) / run_name(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{dist.rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write the run directory '{run_dir}' ({err.strerror}); "
                        "choose another out_dir") from None
    saved = run_dir / "config.yaml"
    if saved.exists():
        old = yaml.safe_load(saved.read_text()) or {}
        try:
            same = config_digest(make_config(old)) == config_digest(cfg)
        except ConfigError:
            same = False
        if not same:
            raise UserError(
                f"run directory '{run_dir}' holds a run with a different configuration; "
                "give this run another name= or out_dir=, or delete that directory"
            )
    else:
        atomic_write_text(saved, dump_yaml(cfg))
    return run_dir


# ------------------------------------------------------------------ models and teachers


def save_model(path: Path, model, arch: str, kwargs: dict, extra: dict) -> None:
    """A checkpoint that describes itself: architecture, sizes, weights and what it scored."""
    atomic_torch_save(
        {"arch": arch, "kwargs": kwargs, "num_classes": model.num_classes,
         "in_chans": extra.pop("in_chans"), "num_features": model.num_features,
         "state_dict": model.state_dict(), **extra},
        path,
    )


def load_model(path: str | Path, device, *, expect_arch: str | None = None,
               expect_classes: int | None = None, expect_in_chans: int | None = None):
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise UserError(f"teacher checkpoint '{path}' does not exist; train one with "
                        "`refilled run` (it writes model.pt) or leave teacher.checkpoint unset")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "arch" not in ckpt:
        raise UserError(f"'{path}' is not a refilled model checkpoint (no arch/state_dict inside)")
    for what, want, have in (("architecture", expect_arch, ckpt["arch"]),
                             ("number of classes", expect_classes, ckpt["num_classes"]),
                             ("number of input channels", expect_in_chans, ckpt["in_chans"])):
        if want is not None and want != have:
            raise UserError(f"teacher checkpoint '{path}' has {what} {have!r}, but the config "
                            f"asks for {want!r}; fix teacher.* / data.* or use another checkpoint")
    model = create_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_chans"], **ckpt["kwargs"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise UserError(f"teacher checkpoint '{path}' does not fit {ckpt['arch']}: {err}") from None
    return model.to(device), ckpt


@torch.no_grad()
def calibrate_batchnorm(model, task: Task, device, max_images: int = 4096) -> None:
    """Set BN running statistics of an untrained model to its data's statistics (no training)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    info = task.info
    mean = torch.as_tensor(info["mean"], device=device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(info["std"], device=device).reshape(1, -1, 1, 1)
    images = task.train.images[:max_images]
    for start in range(0, len(images), 256):
        x = images[start : start + 256].to(device).float().div_(255.0)
        model((x - mean) / std)
    model.eval()


def get_teacher(cfg: Config, device) -> tuple[FrozenTeacher, dict]:
    """The frozen teacher: reused by path, random (control), or trained once and cached."""
    t = cfg.teacher
    teacher_task = build_task(cfg, "teacher")
    in_chans = teacher_task.info["in_chans"]
    if t.init == "random":
        torch.manual_seed(t.seed)
        model = create_model(t.arch, teacher_task.num_classes, in_chans, **t.kwargs).to(device)
        calibrate_batchnorm(model, teacher_task, device)
        source = "random"
    else:
        path = t.checkpoint
        if path is None:
            tcfg = teacher_config(cfg)
            run(tcfg, role="teacher")
            path = Path(tcfg.out_dir) / run_name(tcfg)
        model, _ = load_model(path, device, expect_arch=t.arch,
                              expect_classes=teacher_task.num_classes, expect_in_chans=in_chans)
        source = str(path)
    _, logits = predict(model, teacher_task.test.images, teacher_task.info["mean"],
                        teacher_task.info["std"], device)
    info = {"teacher": source, "teacher_test_accuracy": accuracy(logits, teacher_task.test.labels)}
    return FrozenTeacher(model), info


# ------------------------------------------------------------------ one run


def open_run(cfg: Config) -> tuple[Dist, torch.device, Path, dict | None]:
    """Join the torchrun job (if any) and prepare the run directory; the last item holds the
    results of a run that has already finished there (None otherwise)."""
    dist, device = init_distributed(cfg.device)
    run_dir = _prepare_run_dir(cfg, dist)
    results_path = run_dir / "results.json"
    finished = json.loads(results_path.read_text()) if results_path.exists() else None
    return dist, device, run_dir, finished


def run(cfg: Config, role: str = "student") -> dict:
    """Run one experiment (or resume it); return its results. A finished run is not redone."""
    if cfg.protocol != "distill" and role == "student":
        from refilled.applications import run_application  # incremental / few-shot learning

        return run_application(cfg)
    dist, device, run_dir, finished = open_run(cfg)
    if finished is not None:
        return finished
    tic = time.perf_counter()
    seed_everything(cfg.seed)
    task = build_task(cfg, role)
    check_batches(cfg, task, dist)  # before any training, the teacher's included
    teacher, teacher_info = (None, {"teacher": None, "teacher_test_accuracy": None})
    if needs_teacher(cfg.method):
        teacher, teacher_info = get_teacher(cfg, device)

    seed_everything(cfg.seed)
    arch, kwargs = cfg.student.arch, cfg.student.kwargs
    student = create_model(arch, task.num_classes, task.info["in_chans"], **kwargs).to(device)
    channels_last = cfg.speed.channels_last and device.type == "cuda"
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.model.to(memory_format=torch.channels_last)
    if cfg.speed.compile and device.type == "cuda":
        # Compile the networks' passes; mining and the losses stay eager (data-dependent shapes).
        student.forward_features = torch.compile(student.forward_features)
    mean, std = task.info["mean"], task.info["std"]
    centers = lambda: teacher_centers(teacher, task, run_dir, device, dist)  # noqa: E731
    stages, history, stage1_ncm = train_student(cfg, task, student, teacher, run_dir, device, dist,
                                                centers, channels_last=channels_last, ncm_split=task.test)

    # The one look at the test split. A method that trains no classifier (stage 1 alone) is
    # evaluated with its NCM classifier; one that trains nothing (teacher_ncm), with the
    # teacher's embedding and the class means of the student's training images.
    if not stages:
        test_accuracy = ncm_eval(teacher.model, task.train.images, task.train.labels,
                                 task.test.images, task.test.labels, mean, std, device)
        final_val = validation(teacher.model, task, device, "ncm").get("val_ncm_accuracy")
    elif stages[-1].validate == "ncm":
        test_accuracy = stage1_ncm
        final_val = validation(student, task, device, "ncm").get("val_ncm_accuracy")
    else:
        _, test_logits = predict(student, task.test.images, mean, std, device)
        test_accuracy = accuracy(test_logits, task.test.labels)
        final_val = validation(student, task, device, "accuracy").get("val_accuracy")
    if dist.is_main:
        save_model(run_dir / "model.pt", student, arch, kwargs, {"in_chans": task.info["in_chans"]})
    results = {
        "method": cfg.method,
        "arm": cfg.arm,
        "role": role,
        "dataset": cfg.data.name,
        "protocol": protocol_name(cfg),
        "seed": cfg.seed,
        "test_accuracy": test_accuracy,
        "val_accuracy": final_val,
        "stage1_ncm_accuracy": stage1_ncm,
        **teacher_info,
        "teacher_init": cfg.teacher.init if teacher is not None else None,
        "student_arch": arch,
        "num_classes": task.num_classes,
        "overlap": max(0, cfg.data.teacher_classes - cfg.data.student_offset),
        "train_images": len(task.train.labels),
        "empty_mining_batches": round(sum(r.get("empty_batches", 0) * r["steps"] for r in history)),
        "wall_seconds": round(time.perf_counter() - tic, 2),
        "config_digest": config_digest(cfg),
        "run_dir": str(run_dir),
    }
    if dist.is_main:
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    dist.barrier()  # the other ranks may read what rank 0 wrote (e.g. a teacher's model.pt)
    return results


def validation(model, task: Task, device, kind: str) -> dict:
    """Validation metrics of ``model``: its classifier (``"accuracy"``) or its NCM (``"ncm"``)."""
    if not len(task.val.labels):
        return {}
    mean, std = task.info["mean"], task.info["std"]
    if kind == "ncm":
        return {"val_ncm_accuracy": ncm_eval(model, task.train.images, task.train.labels,
                                             task.val.images, task.val.labels, mean, std, device)}
    _, logits = predict(model, task.val.images, mean, std, device)
    return {"val_accuracy": accuracy(logits, task.val.labels)}


def train_student(cfg: Config, task: Task, student, teacher, run_dir: Path, device, dist: Dist,
                  centers, channels_last: bool = False, ncm_split: Split | None = None):
    """Build the method's stages and train them in order, each resuming from its checkpoint.

    ``centers`` computes the global teacher centres of the student's classes when a stage needs
    them. Returns the stages, the per-epoch metric rows of all of them, and the NCM accuracy on
    ``ncm_split`` of the embedding right after the stage that trains only the embedding
    (stage 1; None when there is no such stage or no split).
    """
    ctx = Context(cfg=cfg, student=student, teacher=teacher, task=task, teacher_centers=centers,
                  class_map=lambda: shared_classes(cfg, task, device), dist=dist)
    stages = build_stages(cfg.method, ctx)
    history: list[dict] = []
    embedding_ncm = None
    for stage in stages:
        if stage.prepare is not None:
            stage.prepare()
        loader = make_loader(task, task.train, stage.optim, seed=cfg.seed, device=device,
                             dist=dist, channels_last=channels_last)
        history += train_stage(
            stage.name, stage.method, loader, stage.optim, run_dir,
            validate=lambda kind=stage.validate: validation(student, task, device, kind),
            seed=cfg.seed, eval_every=cfg.eval_every, progress=cfg.progress and dist.is_main,
            earlier_rows=history, extra_state={"config": to_dict(cfg)}, dist=dist,
            amp=cfg.speed.amp,
        )
        if stage.validate == "ncm" and ncm_split is not None:  # before a later stage moves it
            embedding_ncm = ncm_eval(student, task.train.images, task.train.labels, ncm_split.images,
                                     ncm_split.labels, task.info["mean"], task.info["std"], device)
    return stages, history, embedding_ncm


def teacher_centers(teacher: FrozenTeacher, task: Task, run_dir: Path, device, dist: Dist = Dist()):
    """Global teacher centres of the student's classes: computed once (no augmentation), saved.

    Under torchrun each rank embeds its share of the training split and the shares are
    gathered, so every rank holds the same centres.
    """
    path = run_dir / "teacher_centers.pt"
    if path.exists():
        return load_checkpoint(path).to(device)
    n = len(task.train.labels)
    per = -(-n // dist.world)  # contiguous shares, in rank order
    mine = task.train.images[dist.rank * per : (dist.rank + 1) * per]
    emb, _ = predict(teacher.model, mine, task.info["mean"], task.info["std"], device)
    if not len(mine):
        emb = torch.zeros(0, teacher.num_features, device=device)
    if dist.world > 1:  # pad every share to the same length for the gather, then drop the padding
        emb = dist.gather(torch.cat([emb, emb.new_zeros(per - len(emb), emb.shape[1])]))[:n]
    centers = class_centers(emb, task.train.labels.to(device), task.num_classes)
    if dist.is_main:
        atomic_torch_save(centers.cpu(), path)
    return centers


def shared_classes(cfg: Config, task: Task, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The classes both sides know: (student label ids, teacher label ids), aligned.

    Empty tensors when the windows are disjoint; methods that need shared classes (Hinton KD)
    refuse to run then.
    """
    teacher_classes = list(build_task(cfg, "teacher").classes)
    pairs = [(i, teacher_classes.index(c)) for i, c in enumerate(task.classes) if c in teacher_classes]
    student_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=device)
    teacher_ids = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=device)
    return student_ids, teacher_ids


def check_batches(cfg: Config, task: Task, dist: Dist = Dist()) -> None:
    """Refuse batch settings that can never work, before anything trains."""
    counts = torch.bincount(task.train.labels, minlength=task.num_classes)
    for key, optim in (("train", cfg.train), ("stage1.optim", cfg.stage1.optim)):
        if optim.batch_size % dist.world:
            raise UserError(f"{key}.batch_size={optim.batch_size} must be divisible by the "
                            f"{dist.world} processes of this torchrun job")
    stages = [("train", cfg.train)]
    if cfg.method.startswith("refilled") and cfg.stage1.optim.epochs > 0:
        stages.append(("stage1.optim", cfg.stage1.optim))
    if len(stages) == 2:
        o = cfg.stage1.optim
        never = o.batch_size < 2 or o.m_per_class == 1 or int(counts.max()) < 2
        if never:
            raise UserError(
                "stage 1 can never see a positive pair (two images of one class in a batch) with "
                f"stage1.optim.batch_size={o.batch_size}, stage1.optim.m_per_class={o.m_per_class} "
                f"and at most {int(counts.max())} training images per class; use the class-balanced "
                "sampler, e.g. stage1.optim.m_per_class=4 with a batch size that is a multiple of 4"
            )
    for key, optim in stages:
        if optim.m_per_class and optim.batch_size // optim.m_per_class > task.num_classes:
            raise UserError(
                f"{key}: batches of {optim.batch_size // optim.m_per_class} classes x "
                f"{optim.m_per_class} images need {optim.batch_size // optim.m_per_class} classes, "
                f"but the student has {task.num_classes}; lower {key}.batch_size or raise "
                f"{key}.m_per_class"
            )
