"""``refilled run``: config -> task -> teacher -> the method -> one test evaluation -> results.

Data flows one way, in these steps:

1. the **tasks** of the protocol (:mod:`refilled.tasks`): the student's classes and splits, and
   the teacher's;
2. the **checks** that need no training: the method's declared requirements, the batch
   settings, both networks built;
3. the **teacher** (an explicit step): loaded from ``teacher.checkpoint`` or
   ``teacher.weights``, random (the control), or trained once in its own run directory that every
   student run shares;
4. the **student** is trained by :func:`refilled.distill` (the same function a Python user calls),
   which resolves the teacher centres and the class map into values, builds the method's stages
   and runs the one training loop;
5. one **evaluation** on the test split (protocol-specific: old/new classes, few-shot episodes)
   and one **results** writer.

The test split is read once, in step 5, for the reported figures; everything selected during
training (nothing, by default: the last epoch is reported) may only look at the validation split
carved from the training data.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from refilled.api import distill, rehearse, weights_of
from refilled.config import Config
from refilled.data import Augment
from refilled.errors import ConfigError, UserError
from refilled.evaluation import (
    as_input,
    classifier_predictor,
    embedding_norm,
    episode_accuracies,
    ncm_predictor,
    predict,
    sample_episodes,
    split_accuracy,
)
from refilled.files import atomic_write_text
from refilled.methods import MethodSpec, method_spec
from refilled.models.checkpoints import network_from_model_file, read_model_file, save_model
from refilled.models.external import build_module, check_arch, load_weights
from refilled.networks import FrozenTeacher, Network
from refilled.rundirs import (
    config_digest,
    finished_results,
    hold,
    prepare_run_dir,
    run_dir_of,
    teacher_config,
)
from refilled.runtime import Dist, init_distributed, seed_everything
from refilled.stats import ci95
from refilled.tasks import (
    Task,
    Tasks,
    distill_tasks,
    fewshot_tasks,
    incremental_tasks,
    protocol_name,
    shared_classes,
)

# ------------------------------------------------------------------ networks


def build_network(section, role: str, task: Task, num_classes: int, device) -> Network:
    """The ``teacher`` / ``student`` section's module, freshly initialised, as a Network with
    its input statistics (the data's unless the section gives its own)."""
    images = task.train.images
    module = build_module(section.arch, num_classes, int(images.shape[1]),
                          input_size=int(images.shape[-1]), kwargs=section.kwargs, role=role)
    mean = section.mean if section.mean is not None else task.info["mean"]
    std = section.std if section.std is not None else task.info["std"]
    net = Network(module, embedding=section.embedding, head=section.head, mean=mean, std=std,
                  maps=section.maps, role=role)
    return net.to(device)


def load_model_file(path: str | Path, cfg: Config, task: Task, device) -> tuple[Network, Path]:
    """The teacher from a refilled ``model.pt`` (or the run directory holding one), checked
    against the config's architecture, classes and input channels."""
    ckpt, path = read_model_file(path, hint="; train one with `refilled run` (it writes model.pt), "
                                 "give a plain state_dict as teacher.weights, or leave "
                                 "teacher.checkpoint unset")
    t = cfg.teacher
    in_chans = int(task.train.images.shape[1])
    for what, want, have in (("architecture", t.arch, ckpt["arch"]),
                             ("number of classes", task.num_classes, ckpt["num_classes"]),
                             ("number of input channels", in_chans, ckpt["in_chans"])):
        if want != have:
            raise UserError(f"teacher checkpoint '{path}' has {what} {have!r}, but the config "
                            f"asks for {want!r}; fix teacher.* / data.* or use another checkpoint")
    # the statistics it was trained with (saved with it), unless the config gives others
    net = network_from_model_file(ckpt, path, role="teacher", embedding=t.embedding, head=t.head,
                                  mean=t.mean, std=t.std, maps=t.maps,
                                  default_stats=(task.info["mean"], task.info["std"]))
    return net.to(device), path


@torch.no_grad()
def calibrate_batchnorm(network: Network, images: torch.Tensor, device, max_images: int = 4096) -> None:
    """Set BN running statistics of an untrained network to its data's statistics (no training)."""
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    network.train()
    images = images[:max_images]
    for start in range(0, len(images), 256):
        network(as_input(images[start : start + 256], device))
    network.eval()


# ------------------------------------------------------------------ the teacher step


def prepare_teacher(cfg: Config, tasks: Tasks, device, dist: Dist) -> tuple[Network, dict]:
    """The frozen teacher: reused by path, loaded from a state dict, random (control), or
    trained once (in its own run directory, shared by every student run) and loaded."""
    t, task = cfg.teacher, tasks.teacher
    if t.init == "random":
        torch.manual_seed(t.seed)
        net = build_network(t, "teacher", task, task.num_classes, device)
        calibrate_batchnorm(net, task.train.images, device)
        source = "random"
    elif t.checkpoint is not None:
        net, _ = load_model_file(t.checkpoint, cfg, task, device)
        source = t.checkpoint
    elif t.weights is not None:
        net = build_network(t, "teacher", task, task.num_classes, device)
        load_weights(net.module, t.weights, "teacher", t.arch)
        source = t.weights
    else:
        tcfg = teacher_config(cfg)
        run_dir = run_dir_of(tcfg)
        train_and_evaluate(tcfg, method_spec("ce"), Tasks(student=task, teacher=task), None,
                           run_dir, device, dist, role="teacher")
        dist.barrier()  # the other ranks read what rank 0 wrote
        net, _ = load_model_file(run_dir, cfg, task, device)
        source = str(run_dir)
    net.eval()
    net.probe(as_input(task.train.images[:4], device))
    info = {"teacher": source, "teacher_test_accuracy": None, "teacher_init": t.init}
    if net.has_logits and net.num_classes == task.num_classes:
        _, logits = predict(net, task.test.images, device, dist=dist)
        info["teacher_test_accuracy"] = (logits.argmax(1).cpu() == task.test.labels).double().mean().item()
    return net, info


# ------------------------------------------------------------------ evaluation


@dataclass(frozen=True)
class Protocol:
    """An entry of :data:`PROTOCOLS`: how the tasks are built and what the test reports."""

    tasks: Callable[[Config], Tasks]
    test: Callable  # (cfg, task, predictor, embed) -> dict of test figures


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


PROTOCOLS: dict[str, Protocol] = {
    "distill": Protocol(distill_tasks, _test_plain),
    "incremental": Protocol(incremental_tasks, _test_incremental),
    "fewshot": Protocol(fewshot_tasks, _test_fewshot),
}


def evaluate(cfg: Config, spec: MethodSpec, task: Task, student: Network, teacher: Network | None,
             device, dist: Dist) -> dict:
    """The one look at the test split, with the method's predictor (its classifier, or the NCM
    classifier of the student's or the teacher's embedding), plus the stage-1 NCM figures."""
    train = task.train
    model = teacher if spec.predictor == "teacher_ncm" else student
    if spec.predictor == "classifier":
        predict_labels = classifier_predictor(student, device, dist=dist)
    else:
        try:
            predict_labels = ncm_predictor(model, train.images, train.labels, task.num_classes,
                                           device, dist=dist)
        except ValueError as err:
            raise UserError(f"an NCM classifier needs training images of every class: {err}") from None

    def embed(images):
        return predict(model, images, device, dist=dist)[0]

    out = {"val_accuracy": split_accuracy(predict_labels, task.val.images, task.val.labels)}
    out.update(PROTOCOLS[cfg.protocol].test(cfg, task, predict_labels, embed))
    out.update(stage1_ncm=None, stage1_ncm_val=None, stage1_embedding_norm=None)
    history = getattr(student, "refilled_history", None)
    snapshot = history.snapshots.get("stage1") if history is not None else None
    if snapshot is not None:
        with weights_of(student, snapshot):
            ncm = ncm_predictor(student, train.images, train.labels, task.num_classes, device, dist=dist)
            out["stage1_ncm"] = split_accuracy(ncm, task.test.images, task.test.labels)
            out["stage1_ncm_val"] = split_accuracy(ncm, task.val.images, task.val.labels)
            out["stage1_embedding_norm"] = embedding_norm(student, train.images, device, dist=dist)
    return out


# ------------------------------------------------------------------ one run


def _augment(task: Task):
    info = task.info
    if not info.get("train_augment", True):
        return None
    return Augment(info["pad"], info["flip"], **info.get("augment", {}))


NO_TEACHER = {"teacher": None, "teacher_test_accuracy": None, "teacher_init": None}


def train_and_evaluate(cfg: Config, spec: MethodSpec, tasks: Tasks, teacher: Network | None,
                       run_dir: Path, device, dist: Dist, role: str = "student",
                       teacher_info: dict = NO_TEACHER) -> dict:
    """Train the student of ``cfg`` in ``run_dir`` (or return a finished run's results), test it
    once and write ``model.pt`` and ``results.json``. Also trains the teacher (``role="teacher"``)."""
    with hold(run_dir, dist.rank):
        prepare_run_dir(run_dir, cfg, dist.rank)
        saves_model = spec.predictor != "teacher_ncm"
        finished = finished_results(run_dir, needs_model=saves_model)
        if finished is not None:
            return finished
        tic = time.perf_counter()
        task = tasks.student
        seed_everything(cfg.seed)
        student = build_network(cfg.student, "student", task, task.num_classes, device)
        student_ids, teacher_ids = shared_classes(task, tasks.teacher)
        overlap = len(student_ids)
        if teacher is not None and teacher.num_classes != tasks.teacher.num_classes:
            # An external teacher whose outputs are not its class window: no output is known to
            # be a shared class (kd is refused before this; REFILLED's shared-class KD is off).
            student_ids = teacher_ids = torch.zeros(0, dtype=torch.long)
        if spec.schedules(cfg) or saves_model:
            distill(teacher, student, task.train, val=task.val, config=cfg, run_dir=run_dir,
                    device=device, num_classes=task.num_classes,
                    shared_classes=(student_ids, teacher_ids), augment=_augment(task))
        figures = evaluate(cfg, spec, task, student, teacher, device, dist)
        history = getattr(student, "refilled_history", [])
        if dist.is_main and saves_model:
            images = task.train.images
            save_model(run_dir / "model.pt", student, arch=cfg.student.arch, kwargs=cfg.student.kwargs,
                       num_classes=task.num_classes, in_chans=int(images.shape[1]),
                       input_size=int(images.shape[-1]), class_names=task.class_names,
                       embedding=cfg.student.embedding, head=cfg.student.head)
        results = {
            "method": cfg.method,
            "arm": cfg.arm,
            "role": role,
            "dataset": cfg.data.name,
            "protocol": protocol_name(cfg),
            "seed": cfg.seed,
            "test_accuracy": figures.pop("test_accuracy"),
            "val_accuracy": figures.pop("val_accuracy"),
            "stage1_ncm_accuracy": figures.pop("stage1_ncm"),
            "stage1_ncm_val_accuracy": figures.pop("stage1_ncm_val"),
            "stage1_embedding_norm": figures.pop("stage1_embedding_norm"),
            **figures,
            **teacher_info,
            "student_arch": cfg.student.arch if saves_model else None,
            "num_classes": task.num_classes,
            "overlap": overlap if role == "student" else None,
            "train_images": len(task.train.labels),
            "empty_mining_batches": getattr(history, "empty_batches", 0),
            **getattr(history, "notes", {}),
            "wall_seconds": round(time.perf_counter() - tic, 2),
            "config_digest": config_digest(cfg),
            "run_dir": str(run_dir),
        }
        if dist.is_main:
            atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        dist.barrier()
        return results


def rehearse_run(cfg: Config, spec: MethodSpec, tasks: Tasks, device, dist: Dist) -> None:
    """Every check before anything trains, the teacher's training included: both networks are
    built (the teacher as an untrained stand-in of its architecture when it still has to be
    trained) and one batch of every stage goes through the method, with the global RNG forked,
    so that nothing of the real run changes."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        student = build_network(cfg.student, "student", tasks.student, tasks.student.num_classes, device)
        teacher = None
        if spec.needs_teacher:
            t = cfg.teacher
            teacher = build_network(t, "teacher", tasks.teacher, tasks.teacher.num_classes, device)
            if t.init == "trained" and t.checkpoint is None and t.weights is None:
                tcfg = teacher_config(cfg)
                rehearse(tcfg, method_spec("ce"), teacher, None, tasks.teacher.train, device=device,
                         dist=dist, num_classes=tasks.teacher.num_classes, augment=_augment(tasks.teacher))
        ids = shared_classes(tasks.student, tasks.teacher)
        if spec.shared_classes and teacher is not None:
            teacher.probe(as_input(tasks.teacher.train.images[:2], device))
            if teacher.num_classes != tasks.teacher.num_classes:
                raise ConfigError(
                    f"method '{spec.name}' maps the student's classes onto the teacher's outputs for "
                    f"its data.teacher_classes={tasks.teacher.num_classes} classes, but the teacher "
                    f"has {teacher.num_classes} outputs (teacher.kwargs); use refilled, rkd, pkt, sp, "
                    "at or fitnet, which need no shared label space")
        if teacher is not None and teacher.num_classes != tasks.teacher.num_classes:
            ids = (torch.zeros(0, dtype=torch.long),) * 2  # as in train_and_evaluate
        rehearse(cfg, spec, student, teacher, tasks.student.train, device=device, dist=dist,
                 num_classes=tasks.student.num_classes, shared_classes=ids,
                 augment=_augment(tasks.student))


def check_config(cfg: Config) -> None:
    """The names a config gives that no value check can see: the dataset and the architectures
    (zoo names, importable factories, timm models). ``refilled config`` and every run call it
    before any data is read."""
    from refilled.data import DATASET_NAMES

    if cfg.data.name not in DATASET_NAMES:
        raise ConfigError(f"config key 'data.name' must be one of {list(DATASET_NAMES)}, got "
                          f"{cfg.data.name!r}")
    check_arch(cfg.student.arch, "student")
    spec = method_spec(cfg.method)
    if spec.needs_teacher:
        check_arch(cfg.teacher.arch, "teacher")
    if spec.same_arch and (cfg.student.arch != cfg.teacher.arch or cfg.student.kwargs != cfg.teacher.kwargs):
        raise ConfigError(
            f"method '{spec.name}' starts from the old model, so student.arch/kwargs must equal "
            f"teacher.arch/kwargs (got student {cfg.student.arch!r} {cfg.student.kwargs}, "
            f"teacher {cfg.teacher.arch!r} {cfg.teacher.kwargs})"
        )


def _notice(cfg: Config, text: str) -> None:
    if cfg.progress:
        print(f"refilled: {text}", file=sys.stderr, flush=True)


def run(cfg: Config) -> dict:
    """Run one experiment (or resume it); return its results. A finished run is not redone."""
    check_config(cfg)
    dist, device = init_distributed(cfg.device)
    spec = method_spec(cfg.method)
    run_dir = run_dir_of(cfg)
    prepare_run_dir(run_dir, cfg, dist.rank)
    finished = finished_results(run_dir, needs_model=spec.predictor != "teacher_ncm")
    if finished is not None:
        _notice(cfg, f"run '{run_dir}' has finished already; its results follow (delete its "
                     "results.json to evaluate it again)")
        return finished
    if cfg.protocol != "distill" and dist.world > 1:
        raise UserError(f"protocol '{cfg.protocol}' runs in one process; start it without torchrun")
    seed_everything(cfg.seed)
    tasks = PROTOCOLS[cfg.protocol].tasks(cfg)
    rehearse_run(cfg, spec, tasks, device, dist)  # before any training, the teacher's included
    teacher, info = None, NO_TEACHER
    if spec.needs_teacher:
        teacher, info = prepare_teacher(cfg, tasks, device, dist)
    return train_and_evaluate(cfg, spec, tasks, teacher, run_dir, device, dist, teacher_info=info)
