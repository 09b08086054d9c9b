"""``refilled run``: config -> run directory -> tasks -> teacher -> student -> test -> results.

Read top to bottom, :func:`run` does:

1. check the config's names (dataset, method, architectures) and open the run directory (its
   config checked, its lock held); a finished run returns its results (after its inputs are
   checked against the ones it recorded);
2. build the protocol's tasks: the student's classes and splits, and the teacher's;
3. the teacher: loaded (``teacher.checkpoint``, ``teacher.weights``, or the finished run that
   trained it), random (the control), or built to be trained here, in its own run directory
   that every student run shares;
4. the student, built from its seed; then :func:`refilled.distillation.prepare` for the
   teacher's fit (when it trains here) and for the student's: every check and one rehearsal
   per network pair, before any step;
5. fit the teacher (then test it once and save it), then the student
   (:func:`refilled.distillation.fit`, the same function ``refilled.distill`` calls);
6. one evaluation on the test split (the protocol's figures, and the NCM figures of every
   embedding stage's snapshot) and one results file.

The test split is read once, in step 6; everything selected during training (nothing, by
default: the last epoch is reported) may only look at the validation split carved from the
training data.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from refilled.config import Config
from refilled.data import Augment
from refilled.distillation import Plan, fit, prepare, weights_of
from refilled.errors import ConfigError, UserError
from refilled.evaluation import (
    as_input,
    classifier_predictor,
    embedding_norm,
    ncm_predictor,
    predict,
    split_accuracy,
)
from refilled.methods import MethodSpec, method_spec
from refilled.models.checkpoints import network_from_model_file, read_model_file, save_model
from refilled.models.external import build_module, load_weights
from refilled.networks import Network
from refilled.protocols import PROTOCOLS, Task, Tasks, check_config, protocol_name, shared_classes
from refilled.runs import RESULTS, RunDir, config_digest, module_digest, run_dir_of, teacher_config, tensors_digest
from refilled.runtime import Dist, init_distributed, seed_everything

# ------------------------------------------------------------------ networks


def build_network(section, role: str, task: Task, device, seed: int | None = None) -> Network:
    """The ``teacher`` / ``student`` section's module, freshly initialised from ``seed`` (the one
    seeding of that network), as a Network with its input statistics (the data's unless the
    section gives its own)."""
    if seed is not None:
        seed_everything(seed)
    images = task.train.images
    module = build_module(section.arch, task.num_classes, int(images.shape[1]),
                          input_size=int(images.shape[-1]), kwargs=section.kwargs, role=role)
    mean = section.mean if section.mean is not None else task.info["mean"]
    std = section.std if section.std is not None else task.info["std"]
    net = Network(module, embedding=section.embedding, head=section.head, mean=mean, std=std,
                  maps=section.maps, role=role)
    return net.to(device)


def load_model_file(path, cfg: Config, task: Task, device) -> Network:
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
    return net.to(device)


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


def augment_of(task: Task):
    """The batch-level training augmentation of a task's data (none for image files streamed
    from disk: their transforms run per item, in the workers)."""
    info = task.info
    if not info.get("train_augment", True) or info.get("item_augment"):
        return None
    return Augment(info["pad"], info["flip"], **info.get("augment", {}))


# ------------------------------------------------------------------ the teacher


@dataclass
class Teacher:
    """The frozen teacher of a run: its network and where it came from; when it is trained in
    this call, its own config, run directory and (once prepared) plan."""

    network: Network
    source: str
    init: str
    cfg: Config | None = None
    run: RunDir | None = None
    plan: Plan | None = field(default=None, repr=False)

    @property
    def ready(self) -> bool:
        return self.run is None

    def close(self) -> None:
        if self.plan is not None:
            self.plan.close(failed=True)
        if self.run is not None:
            self.run.close()


def make_teacher(cfg: Config, tasks: Tasks, device, dist: Dist) -> Teacher:
    """The teacher network: loaded, random (the control), or built to be trained here."""
    t, task = cfg.teacher, tasks.teacher
    if t.init == "random":
        net = build_network(t, "teacher", task, device, seed=t.seed)
        calibrate_batchnorm(net, task.train.images, device)
        return Teacher(net, "random", t.init)
    if t.checkpoint is not None:
        return Teacher(load_model_file(t.checkpoint, cfg, task, device), t.checkpoint, t.init)
    if t.weights is not None:
        net = build_network(t, "teacher", task, device)
        load_weights(net.module, t.weights, "teacher", t.arch)
        return Teacher(net, t.weights, t.init)
    tcfg = teacher_config(cfg)
    run = RunDir.open(run_dir_of(tcfg), tcfg, rank=dist.rank)
    if run.finished() is not None:
        run.close()
        return Teacher(load_model_file(run.path, cfg, task, device), str(run.path), t.init)
    net = build_network(tcfg.student, "teacher", task, device, seed=tcfg.seed)
    return Teacher(net, str(run.path), t.init, cfg=tcfg, run=run)


def class_map(spec: MethodSpec, teacher: Network | None, tasks: Tasks, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the classes both windows hold, as indices of the student's
    labels and of the teacher's outputs. A teacher whose outputs are not its class window (e.g.
    an external teacher of another label space) gives no map: a method that needs it (``kd``)
    is refused, and the others (REFILLED's shared-class term) get none."""
    ids = shared_classes(tasks.student, tasks.teacher)
    if teacher is None or not len(ids[0]):
        return ids
    teacher.probe(as_input(tasks.teacher.train.images[:4], device))  # once: prepare reuses it
    if teacher.num_classes == tasks.teacher.num_classes:
        return ids
    if spec.shared_classes:
        raise ConfigError(
            f"method '{spec.name}' maps the student's classes onto the teacher's outputs for "
            f"its data.teacher_classes={tasks.teacher.num_classes} classes, but the teacher "
            f"has {teacher.num_classes} outputs (teacher.kwargs); use refilled, rkd, pkt, sp, "
            "at or fitnet, which need no shared label space")
    return (torch.zeros(0, dtype=torch.long),) * 2


def train_teacher(teacher: Teacher, task: Task, device, dist: Dist) -> None:
    """Fit the prepared teacher, test it once on its classes, save it and its results."""
    tic = time.perf_counter()
    fit(teacher.plan)
    ce = method_spec("ce")
    figures = evaluate(teacher.cfg, ce, task, teacher.network, None, device, dist)
    finish(teacher.run, teacher.cfg, ce, task, teacher.network, figures, role="teacher",
           info=NO_TEACHER, overlap=None, tic=tic, history=teacher.plan.history)
    dist.barrier()  # the other ranks read what rank 0 wrote
    teacher.run.close()
    teacher.run, teacher.plan = None, None


# ------------------------------------------------------------------ evaluation


def evaluate(cfg: Config, spec: MethodSpec, task: Task, student: Network, teacher: Network | None,
             device, dist: Dist) -> dict:
    """The one look at the test split, with the method's predictor (its classifier, or the NCM
    classifier of the student's or the teacher's embedding), plus the NCM figures of every
    embedding stage (the student's weights right after it)."""
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
    history = getattr(student, "refilled_history", None)
    for stage, state in (history.snapshots if history is not None else {}).items():
        with weights_of(student, state):
            ncm = ncm_predictor(student, train.images, train.labels, task.num_classes, device, dist=dist)
            out[f"{stage}_ncm_accuracy"] = split_accuracy(ncm, task.test.images, task.test.labels)
            out[f"{stage}_ncm_val_accuracy"] = split_accuracy(ncm, task.val.images, task.val.labels)
            out[f"{stage}_embedding_norm"] = embedding_norm(student, train.images, device, dist=dist)
    return out


NO_TEACHER = {"teacher": None, "teacher_test_accuracy": None, "teacher_init": None, "teacher_arch": None,
              "teacher_digest": None, "teacher_class_names": None}


def finish(run: RunDir, cfg: Config, spec: MethodSpec, task: Task, student: Network, figures: dict,
           *, role: str, info: dict, overlap, tic: float, history) -> dict:
    """``model.pt`` (when the method has a student of its own) and ``results.json``."""
    saves_model = spec.predictor != "teacher_ncm"
    if saves_model and run.rank == 0:
        images = task.train.images
        section = cfg.student
        save_model(run.model_file, student, arch=section.arch, kwargs=section.kwargs,
                   num_classes=task.num_classes, in_chans=int(images.shape[1]),
                   input_size=int(images.shape[-1]), class_names=task.class_names,
                   embedding=section.embedding, head=section.head,
                   extra={"eval_resize": task.info.get("eval_resize", "square")})
    results = {
        "method": cfg.method,
        "arm": cfg.arm,
        "role": role,
        "dataset": cfg.data.name,
        "protocol": protocol_name(cfg),
        "seed": cfg.seed,
        "test_accuracy": figures.pop("test_accuracy"),
        "val_accuracy": figures.pop("val_accuracy"),
        **figures,
        **info,
        "student_arch": cfg.student.arch if saves_model else None,
        "num_classes": task.num_classes,
        "class_names": list(task.class_names),
        "overlap": overlap,
        "train_images": len(task.train.labels),
        "empty_mining_batches": getattr(history, "empty_batches", 0),
        **getattr(history, "notes", {}),
        "wall_seconds": round(time.perf_counter() - tic, 2),
        "config_digest": config_digest(cfg),
        "run_dir": str(run.path),
    }
    results = {**{key: None for key in RESULTS}, **results}  # every key of the format, null where not made
    run.write_results(results)
    return results


# ------------------------------------------------------------------ one run


def _notice(cfg: Config, text: str) -> None:
    if cfg.progress:
        print(f"refilled: {text}", file=sys.stderr, flush=True)


def _data_digests(task: Task) -> dict[str, str]:
    return {"train": tensors_digest([("images", task.train.images), ("labels", task.train.labels)]),
            "val": tensors_digest([("images", task.val.images), ("labels", task.val.labels)])}


def run(cfg: Config) -> dict:
    """Run one experiment (or resume it); return its results. A finished run is not redone."""
    check_config(cfg)
    dist, device = init_distributed(cfg.device)
    spec = method_spec(cfg.method)
    protocol = PROTOCOLS[cfg.protocol]
    if not protocol.multi_process and dist.world > 1:
        raise UserError(f"protocol '{cfg.protocol}' runs in one process; start it without torchrun")
    with RunDir.open(run_dir_of(cfg), cfg, rank=dist.rank) as run_dir:
        tasks = protocol.tasks(cfg)
        finished = run_dir.finished(needs_model=spec.predictor != "teacher_ncm")
        teacher = make_teacher(cfg, tasks, device, dist) if spec.needs_teacher and (
            finished is None or cfg.teacher.init != "trained" or cfg.teacher.checkpoint
            or cfg.teacher.weights) else None
        try:
            if finished is not None:
                run_dir.check_inputs(_data_digests(tasks.student))
                if teacher is not None and teacher.ready:
                    run_dir.check_inputs({"teacher": module_digest(teacher.network.module)})
                finished = run_dir.finished(needs_model=spec.predictor != "teacher_ncm")
                if finished is not None:
                    _notice(cfg, f"run '{run_dir.path}' has finished already; its results follow "
                                 "(delete its results.json to evaluate it again)")
                    return finished
                if teacher is None and spec.needs_teacher:
                    teacher = make_teacher(cfg, tasks, device, dist)
            return _train_and_test(cfg, spec, tasks, teacher, run_dir, device, dist)
        finally:
            if teacher is not None:
                teacher.close()


def _train_and_test(cfg: Config, spec: MethodSpec, tasks: Tasks, teacher: Teacher | None,
                    run_dir: RunDir, device, dist: Dist) -> dict:
    tic = time.perf_counter()
    task = tasks.student
    overlap = len(shared_classes(task, tasks.teacher)[0])
    student_ids, teacher_ids = class_map(spec, teacher.network if teacher is not None else None, tasks, device)
    if teacher is not None:
        if not teacher.ready:  # its fit is prepared first: its checks come before any step
            teacher.plan = prepare(None, teacher.network, tasks.teacher.train, val=tasks.teacher.val,
                                   config=teacher.cfg, num_classes=tasks.teacher.num_classes,
                                   run=teacher.run, augment=augment_of(tasks.teacher), dist=dist,
                                   device=device)
    student = build_network(cfg.student, "student", task, device, seed=cfg.seed)
    network = teacher.network if teacher is not None else None
    with prepare(network, student, task.train, val=task.val, config=cfg, num_classes=task.num_classes,
                 shared_classes=(student_ids, teacher_ids), run=run_dir, augment=augment_of(task),
                 dist=dist, device=device, teacher_ready=teacher is None or teacher.ready) as plan:
        info = dict(NO_TEACHER)
        if teacher is not None:
            if not teacher.ready:
                train_teacher(teacher, tasks.teacher, device, dist)
                plan.check_teacher()
            info = teacher_info(cfg, teacher, tasks.teacher, device, dist)
        if plan.stages or spec.predictor != "teacher_ncm":
            fit(plan)
        figures = evaluate(cfg, spec, task, student, network, device, dist)
        results = finish(run_dir, cfg, spec, task, student, figures, role="student", info=info,
                         overlap=overlap, tic=tic, history=plan.history)
    dist.barrier()
    return results


def teacher_info(cfg: Config, teacher: Teacher, task: Task, device, dist: Dist) -> dict:
    """Where the teacher came from and its test accuracy on its own classes."""
    net = teacher.network
    net.eval()
    info = {"teacher": teacher.source, "teacher_test_accuracy": None, "teacher_init": teacher.init,
            "teacher_arch": cfg.teacher.arch, "teacher_digest": module_digest(net.module),
            "teacher_class_names": list(task.class_names)}
    if net.has_logits and net.num_classes == task.num_classes:
        _, logits = predict(net, task.test.images, device, dist=dist)
        info["teacher_test_accuracy"] = (logits.argmax(1).cpu() == task.test.labels).double().mean().item()
    return info
