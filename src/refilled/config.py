"""One typed configuration: dataclasses with every default, a YAML diff, dotted overrides.

Order of precedence: defaults < preset (``stage2.preset``) < YAML file < ablation (``ablation``)
< ``key=value`` overrides. An ablation is a named variant of REFILLED (see ``ABLATIONS``); it sits
above the YAML file so that it takes effect on any experiment file (e.g. ``stage2_only`` on a file
that sets stage-1 epochs); an override that contradicts one of its keys is an error.
A key that does not exist, or a value of the wrong type, is a :class:`ConfigError` naming the
key. The resolved config is frozen, saved in each run directory, and never mutated.

Python keywords (``refilled.distill(lr=0.05, stage2={"lam": 3})``) and command-line overrides
(``train.lr=0.05``) set keys through one setter (:func:`set_key`) and are typed alike. Messages
name a key in the caller's words (:func:`name`, :func:`subject`): the dotted key for the command
line and YAML files, the keyword (``lr=``) for a Python caller (:func:`speaking`).

This module sits at the bottom of the package: it imports no registry (the method's name is
checked where the method registry is, :func:`refilled.protocols.check_config`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from refilled.errors import ConfigError, UserError
from refilled.files import parse_yaml, safe_load_yaml

SCHEDULES = ("cosine", "multistep", "constant")
PROTOCOLS = ("distill", "incremental", "fewshot")


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | digits | glyphs | cifar100 | cub200 | image_folder
    root: str | None = None  # None: the dataset's default location
    image_size: int | None = None  # cub200 / image_folder only
    class_order_seed: int | None = None  # None: natural class order
    teacher_classes: int = 5  # n: the teacher learns order[0:n]
    student_classes: int | None = None  # student window size (None: same n)
    student_offset: int = 5  # s: the student learns order[s:s+n]; overlap = n - s
    train_per_class: int | None = None  # cap on the student's training images per class
    teacher_train_per_class: int | None = None  # cap on the teacher's training images per class
    val_per_class: int = 100  # validation images per class, carved from the training split
    split_seed: int = 0  # seeds the caps and the validation split (not the run seed)
    augment: bool = True  # training-time augmentation with the dataset's defaults (DATASET_INFO)
    # How images are read: in memory (one tensor on the training device) or streamed (read at
    # every use by DataLoader worker processes, per-item transforms applied each time). auto:
    # in memory when the decoded images fit a quarter of the available memory and a Dataset has
    # no per-item random transforms, streamed otherwise.
    in_memory: bool | str = "auto"  # auto | true | false
    workers: int | None = None  # streamed: worker processes (None: the cores less one, at most 8)
    pin_memory: bool | None = None  # streamed: pinned host memory (None: on CUDA)
    prefetch: int = 2  # streamed: batches each worker prepares ahead
    persistent_workers: bool = True  # streamed: workers kept alive between epochs
    # image_folder without train/ and test/ folders: the test split carved from each class
    test_fraction: float = 0.2  # round(test_fraction * class size) test images per class
    test_split_seed: int = 0  # seeds that carving (fixed: the test split never moves)


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 10
    batch_size: int = 128
    m_per_class: int = 0  # >0: class-balanced batches of m images per class
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | multistep | constant
    final_lr_ratio: float = 0.1  # cosine anneals to final_lr_ratio * lr (the papers: 0.1)
    milestones: tuple[int, ...] = (50, 100, 150)  # multistep
    gamma: float = 0.2  # multistep


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen teacher: a zoo name, ``package.module:factory``, ``file.py:factory`` or
    ``timm:NAME`` (see :mod:`refilled.models.external`), trained here unless ``checkpoint`` or
    ``weights`` is given."""

    arch: str = "cnn_medium"
    kwargs: dict = field(default_factory=dict)
    checkpoint: str | None = None  # reuse a trained teacher (a checkpoint or its run directory)
    weights: str | None = None  # a plain state_dict file (torch.save(model.state_dict())) for arch
    init: str = "trained"  # trained | random (control: untrained, BN statistics calibrated)
    seed: int = 0  # the teacher is trained once per seed here, shared by student runs
    embedding: str | None = None  # None: zoo contract / input of the last nn.Linear; or a submodule
    head: str | None = None  # its classifier (None: zoo head / last nn.Linear)
    mean: tuple[float, ...] | None = None  # the input statistics it expects (None: the data's)
    std: tuple[float, ...] | None = None
    maps: tuple[str, ...] | None = None  # submodules whose outputs are its feature maps (AT, FitNet, SP)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=5, batch_size=128, lr=0.05))


@dataclass(frozen=True)
class StudentConfig:
    """The student: like the teacher's ``arch``; its classifier is replaced where needed."""

    arch: str = "cnn_small"
    kwargs: dict = field(default_factory=dict)
    embedding: str | None = None
    head: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    maps: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Stage1Config:
    """Relationship matching on the embedding (REFILLED stage 1); ``optim.epochs = 0`` skips stage 1 (the
    ``stage2_only`` ablation). By default stage 1 gets the same schedule as stage 2 (``train``:
    10 epochs), as in the papers' recipe (equal budgets)."""

    tau: float = 4.0
    margin: float = 0.2
    mode: str = "tuple"  # tuple | triplet
    scale: float = 1000.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=10))
    # method=refilled: None keeps the epochs as given; a fraction f in (0, 1) splits the total
    # budget (stage1.optim.epochs + train.epochs) instead: stage 1 gets round(f * total) epochs,
    # stage 2 the rest (issue 23's hand-off candidate "a longer stage 1 at equal budget").
    budget_share: float | None = None


@dataclass(frozen=True)
class Stage2Config:
    """Embedding-induced local classifier distillation (REFILLED stage 2)."""

    preset: str | None = None  # tpami | cvpr_recon | cvpr: fills what the user leaves unset
    tau_teacher: float = 1.0
    tau_student: float = 1.0
    lam: float = 1.0
    lam_decay: float = 0.0  # lambda * exp(-lam_decay * epoch); CVPR uses 0.05
    weighting: bool = True  # TPAMI adaptive per-instance emphasis
    centers: str = "global"  # global (once, whole training split) | local (per batch)
    normalize_teacher: bool = False
    reduction: str = "batch"  # batch: KL summed over C_B, mean over B | element: / (B x |C_B|) (CVPR)
    # The hand-off from stage 1 (methods/refilled.py). Stage 1's loss ignores the embedding's
    # scale; "rescale" scales the student's last normalisation layer so that the embedding's mean
    # norm on the training images is embed_norm (None: sqrt(embedding size)) before the fresh
    # classifier starts; "none" is the papers' plain fresh classifier.
    handoff: str = "rescale"
    embed_norm: float | None = None
    # Where the student's classes overlap the teacher's (the class windows, or shared_classes= in
    # Python): Hinton KD on the shared classes only (losses.shared_kd_loss), beside the local
    # classifier: the teacher's own logits for those classes, renormalised over them at
    # shared_kd_temperature, against the student's logits for the same classes, times T^2, with
    # weight shared_kd. Nothing is computed (results bit-identical) when the weight is 0, when no
    # class is shared, or when the teacher gives no logits (a feature extractor). 0.5 and T = 2
    # were chosen on validation (glyphs overlap and same regimes; benchmarks/glyphs_study.md).
    shared_kd: float = 0.5
    shared_kd_temperature: float = 2.0
    # How stage 2's fresh classifier starts: "random" (nn.Linear's initialisation) or "imprint"
    # (weight imprinting: row k = the normalised class centre of the student's own embedding of
    # the training images after the rescale, times imprint_scale / its mean norm, bias 0; it
    # predicts what the stage-1 NCM classifier predicts, with logits imprint_scale x cosine).
    head_init: str = "random"
    imprint_scale: float = 10.0
    # Stage 1's relationship-matching loss kept during stage 2 (on stage 2's batches), with
    # weight relation_weight at its first epoch decaying to 0 over stage 2 (cosine or linear).
    # Off by default: on validation (benchmarks/glyphs_study.md) no hand-off candidate beat issue
    # 14's hand-off beyond noise across alphabets, and this one (0.1) cost ~1 point where
    # classes are shared.
    relation_weight: float = 0.0
    relation_decay: str = "cosine"


# What the papers do not have (issue 23), switched off in each paper's preset: no shared-class
# logits, a randomly initialised stage-2 classifier, no stage-1 loss in stage 2, the epochs as given.
PAPERS: dict[str, Any] = {"stage2.shared_kd": 0.0, "stage2.head_init": "random",
                          "stage2.relation_weight": 0.0, "stage1.budget_share": None}

PRESETS: dict[str, dict[str, Any]] = {
    "tpami": {"stage2.tau_teacher": 1.0, "stage2.tau_student": 1.0, "stage2.lam": 1.0,
              "stage2.lam_decay": 0.0, "stage2.weighting": True, "stage2.centers": "global",
              "stage2.reduction": "batch", "stage2.handoff": "none", **PAPERS},
    "cvpr_recon": {"stage2.tau_teacher": 2.0, "stage2.tau_student": 2.0, "stage2.lam": 100.0,
                   "stage2.lam_decay": 0.0, "stage2.weighting": False, "stage2.centers": "global",
                   "stage2.reduction": "batch", "stage2.handoff": "none", **PAPERS},
    # The CVPR code's KL is nn.KLDivLoss()'s element mean (B x |C_B|): lambda acts per class.
    "cvpr": {"stage2.tau_teacher": 2.0, "stage2.tau_student": 2.0, "stage2.lam": 1000.0,
             "stage2.lam_decay": 0.05, "stage2.weighting": False, "stage2.centers": "local",
             "stage2.reduction": "element", "stage2.handoff": "none", "stage1.mode": "triplet",
             **PAPERS},
}


# Named REFILLED ablations: overrides applied above the YAML file and below command-line keys.
# Every ablation is a REFILLED variant, so each sets the method too.
ABLATIONS: dict[str, dict[str, Any]] = {
    "stage1_only": {"method": "refilled_stage1"},  # stage 1, then the NCM classifier
    "stage2_only": {"method": "refilled", "stage1.optim.epochs": 0},
    "triplet": {"method": "refilled", "stage1.mode": "triplet"},
    "local_centers": {"method": "refilled", "stage2.centers": "local"},
    "no_weighting": {"method": "refilled", "stage2.weighting": False},
    # Issue 23's new default piece removed: REFILLED without the shared-class KD term.
    "no_shared_kd": {"method": "refilled", "stage2.shared_kd": 0.0},
    # Control: the same pipeline with an untrained teacher (BN statistics calibrated).
    "random_teacher": {"method": "refilled", "teacher.init": "random"},
    **{name: {"method": "refilled", "stage2.preset": name, **PRESETS[name]}
       for name in ("cvpr", "cvpr_recon", "tpami")},
}


@dataclass(frozen=True)
class BaselineConfig:
    """Hyperparameters of the baseline methods (``methods/baselines.py``); paper defaults.

    KD: T = 4, alpha = 0.9 (the usual CIFAR setting; Hinton et al. fix neither). RKD: 25 / 50
    (Park et al. 2019). FitNet: 100, AT: beta = 1000 (used as beta / 2), SP: gamma = 3000 (the
    weights of the CRD benchmark, Tian et al. 2020, for joint CE + hint training; AT and SP are
    their papers' values). PKT: 500, i.e. the CRD benchmark's 30000 rescaled from its mean over
    B^2 kernel entries to ``pkt_loss``'s per-row sum at batch 64 (30000 / 64, rounded).
    Label smoothing: 0.1 (Szegedy et al. 2016).
    """

    kd_temperature: float = 4.0
    kd_alpha: float = 0.9  # loss = (1 - alpha) * CE + alpha * KD
    rkd_distance_weight: float = 25.0
    rkd_angle_weight: float = 50.0
    fitnet_weight: float = 100.0
    at_beta: float = 1000.0
    sp_gamma: float = 3000.0
    pkt_weight: float = 500.0
    label_smoothing: float = 0.1


@dataclass(frozen=True)
class SpeedConfig:
    """Accelerator settings; each falls back cleanly on a CPU (where they are no-ops)."""

    amp: bool = False  # bf16 autocast on CUDA; mining, distances and the KL terms stay fp32
    compile: bool = False  # torch.compile the student's training step (CUDA)
    channels_last: bool = True  # NHWC images and weights on CUDA
    global_mining: bool = False  # under torchrun: mine stage-1 tuples over the global batch


@dataclass(frozen=True)
class IncrementalConfig:
    """One-step incremental learning (``protocol: incremental``, :mod:`refilled.protocols`).

    The old model (the teacher) knows order[0:data.teacher_classes]; the student learns those
    plus the next ``new_classes`` classes of the order.
    """

    new_classes: int | None = None  # None: every class after the old ones (at least 2)
    old_per_class: int | None = 20  # old training images per old class kept (None: all; 0: none)


@dataclass(frozen=True)
class FewShotConfig:
    """Few- / middle-shot learning (``protocol: fewshot``, :mod:`refilled.protocols`).

    The teacher knows the base classes order[0:data.teacher_classes]; the student learns the
    novel classes order[s:s+novel_classes], s = data.student_offset (>= data.teacher_classes).
    """

    novel_classes: int | None = None  # None: every class from data.student_offset on
    shots: int = 5  # K training images per novel class (1, 5: few-shot; 20, 50: middle-shot)
    eval: str = "classifier"  # classifier (student's classifier) | episodes (N-way K-shot, NCM)
    episodes: int = 600  # eval=episodes: number of episodes (mean and 95% CI over them)
    ways: int = 5  # eval=episodes: classes per episode
    queries: int = 15  # eval=episodes: query images per class and episode


@dataclass(frozen=True)
class LogConfig:
    """What a run logs besides ``metrics.csv`` (always written). Not part of a run's identity:
    turning it on for a resumed run is allowed."""

    tensorboard: bool = False  # per-epoch scalars under <run dir>/tensorboard (needs tensorboard)


@dataclass(frozen=True)
class Config:
    protocol: str = "distill"  # distill (class windows) | incremental | fewshot (tasks.py)
    method: str = "refilled"  # ce (student alone) | refilled | refilled_stage1 | kd | rkd | ...
    ablation: str | None = None  # a named REFILLED variant (see ABLATIONS), e.g. stage2_only
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "runs"
    name: str | None = None  # run directory name inside out_dir (None: derived from the config)
    arm: str | None = None  # label of this run's arm in reports (None: the method's name)
    eval_every: int = 1  # epochs between validation evaluations
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: OptimConfig = field(default_factory=OptimConfig)  # student CE / stage 2
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ------------------------------------------------------------------ the caller's words

# Python keywords of refilled.distill() -> the dotted config keys each sets (one setter for both
# entries: :func:`set_key`). A keyword that sets two keys sets both stages alike.
SHORTCUTS: dict[str, tuple[str, ...]] = {
    "method": ("method",),
    "seed": ("seed",),
    "ablation": ("ablation",),
    "eval_every": ("eval_every",),
    "progress": ("progress",),
    "stage1_epochs": ("stage1.optim.epochs",),
    "stage2_epochs": ("train.epochs",),
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
    "teacher_head": ("teacher.head",),
    "teacher_mean": ("teacher.mean",),
    "teacher_std": ("teacher.std",),
    "teacher_maps": ("teacher.maps",),
    "amp": ("speed.amp",),
    "compile": ("speed.compile",),
    "device": ("device",),
    "workers": ("data.workers",),
    "in_memory": ("data.in_memory",),
}
# The keyword that names a dotted key for a Python caller (the first keyword that sets it).
_KEYWORD_OF: dict[str, str] = {}
for _word, _keys in SHORTCUTS.items():
    for _key in _keys:
        _KEYWORD_OF.setdefault(_key, _word)

_SPEAKER: contextvars.ContextVar[str] = contextvars.ContextVar("refilled_speaker", default="cli")


@contextlib.contextmanager
def speaking(caller: str):
    """Within this block, messages name keys as ``caller`` writes them: ``"python"`` (keywords
    of :func:`refilled.distill`) or ``"cli"`` (dotted config keys, the default)."""
    if caller not in ("python", "cli"):
        raise ValueError(f"caller must be 'python' or 'cli', got {caller!r}")
    token = _SPEAKER.set(caller)
    try:
        yield
    finally:
        _SPEAKER.reset(token)


def python_caller() -> bool:
    return _SPEAKER.get() == "python"


def spell(dotted: str) -> str:
    """How the caller spells a key: ``train.lr`` on the command line, ``lr=`` from Python (a
    key without a keyword as the section mapping that sets it: ``stage2={"tau_teacher": ...}``)."""
    if not python_caller():
        return dotted
    if dotted in _KEYWORD_OF:
        return f"{_KEYWORD_OF[dotted]}="
    section, _, rest = dotted.partition(".")
    if not rest:
        return f"{section}="
    inner = "".join('{"' + part + '": ' for part in rest.split("."))
    return f"{section}={inner}...{'}' * len(rest.split('.'))}"


def setting(dotted: str, value: Any) -> str:
    """A key set to a value, as the caller writes it: ``train.lr=0.1`` or ``lr=0.1``."""
    return f"{spell(dotted)}{value!r}" if python_caller() else f"{dotted}={value}"


def subject(dotted: str) -> str:
    """A key as the subject of a sentence: ``config key 'train.lr'`` or ``lr=``."""
    return spell(dotted) if python_caller() else f"config key '{dotted}'"


def say(cli: str, python: str) -> str:
    """The same advice in the caller's words (e.g. "run the command again" / "call it again")."""
    return python if python_caller() else cli


# ------------------------------------------------------------------ building and checking


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(key: str, value: Any, tp) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{subject(key)} expects a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(key, v, item) for v in value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{subject(key)} expects a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{subject(key)} must be a finite number, got {value}")
        return number
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise ConfigError(f"{subject(key)} expects {_TYPE_WORDS.get(tp, _type_name(tp))}, got {value!r} "
                      f"({_TYPE_WORDS.get(type(value), type(value).__name__)})")


def _build(cls, values: dict, prefix: str = ""):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{dotted}'{hint} (known keys here: {', '.join(names)})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{subject(dotted)} is a section; give it a mapping")
            kwargs[key] = _build(tp, value, dotted + ".")
        else:
            kwargs[key] = _coerce(dotted, value, tp)
    # Nested sections the user did not mention keep their own (possibly non-trivial) defaults.
    return cls(**kwargs)


def set_key(tree: dict, dotted: str, value: Any) -> None:
    """The one setter of a dotted key in a nested dict (overrides and keywords alike)."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{subject(dotted)}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("kwargs",):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=1e-3"`` -> ``("a.b", 0.001)``; values are read as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw, f"override '{text}'", advice="quote the value or fix it") if raw != "" else None
    except UserError as err:
        raise ConfigError(str(err)) from None
    if isinstance(value, str) and raw.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        value = float(value)  # a non-finite number, refused by name where a number is due
    return key.strip(), value


def load_yaml(path: str | Path) -> dict:
    """A config file as a nested dict; one :class:`ConfigError` line for a missing file, a
    directory, a file that is not UTF-8, a YAML syntax error (with line and column), a key given
    twice, or a file that does not hold a mapping."""
    try:
        return safe_load_yaml(path, "config file")
    except ConfigError:
        raise
    except UserError as err:
        raise ConfigError(str(err)) from None


def reject_repeated_keys(overrides, where: str = "on the command line") -> None:
    """A key given twice in ``key=value`` overrides is an error (which one would win?)."""
    first: dict[str, str] = {}
    for text in overrides:
        key = str(text).partition("=")[0].strip()
        if key in first:
            raise ConfigError(f"{subject(key)} is given twice {where} ('{first[key]}' and "
                              f"'{text}'); keep one")
        first[key] = str(text)


def make_config(tree: dict | None = None, overrides: list[str] | tuple[str, ...] = (),
                settings: dict[str, Any] | None = None) -> Config:
    """Build a checked, frozen :class:`Config` from a nested dict plus dotted ``key=value``
    overrides (text, as on the command line) and ``settings`` (dotted key -> value, as from
    Python keywords); overrides and settings share one level of precedence."""
    from_file = _flatten(tree or {})
    from_args: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        from_args[key] = value
    from_args.update(settings or {})
    ablation = _ablation(from_file, from_args)
    preset = {**from_file, **ablation, **from_args}.get("stage2.preset")
    flat: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(
                f"{subject('stage2.preset')} must be one of {sorted(PRESETS)}, got {preset!r}"
            )
        flat.update(PRESETS[preset])
    flat.update(from_file)
    flat.update(ablation)
    flat.update(from_args)
    nested: dict = {}
    for key, value in flat.items():
        set_key(nested, key, value)
    cfg = _build(Config, nested)
    validate(cfg)
    return cfg


class _DefaultInt(int):
    """A keyword's default that the caller did not pass (shown as the plain number)."""

    def __repr__(self) -> str:
        return int.__repr__(self)


class _DefaultFloat(float):
    def __repr__(self) -> str:
        return float.__repr__(self)


class _DefaultStr(str):
    def __repr__(self) -> str:
        return str.__repr__(self)


_MARKERS = {int: _DefaultInt, float: _DefaultFloat, str: _DefaultStr}


def default(dotted: str):
    """The config's default of ``dotted``, marked as "not passed" when used as a keyword's
    default: a signature shows the real value, and a preset or an ablation may still set it."""
    value = _get(Config(), dotted)
    marker = _MARKERS.get(type(value))
    return marker(value) if marker is not None else value


def is_default(value) -> bool:
    return isinstance(value, (_DefaultInt, _DefaultFloat, _DefaultStr))


SECTIONS = tuple(key for key, tp in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(tp))


def keyword_settings(keywords: dict[str, Any], sections: tuple[str, ...] = SECTIONS,
                     who: str = "distill()") -> dict[str, Any]:
    """Python keywords -> dotted settings: the :data:`SHORTCUTS` (a keyword left at its default
    marker, or None, sets nothing) and ``sections`` as dicts (``stage2={"lam": 3}``)."""
    settings: dict[str, Any] = {}
    for word, value in keywords.items():
        if word in SHORTCUTS:
            if value is None or is_default(value):
                continue
            for dotted in SHORTCUTS[word]:
                settings[dotted] = list(value) if isinstance(value, tuple) else value
        elif word in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{word}= is a section of settings: give a dict, e.g. "
                                  f"{word}={{...}}, got {type(value).__name__}")
            settings.update({f"{word}.{k}": v for k, v in _flatten(value).items()})
        else:
            close = difflib.get_close_matches(word, [*SHORTCUTS, *sections], n=1)
            hint = f"; did you mean {close[0]}=?" if close else ""
            raise ConfigError(f"{who} got an unknown keyword {word}={hint} (its settings: "
                              f"{', '.join(SHORTCUTS)}, and the sections {', '.join(sections)} as "
                              "dicts)")
    return settings


def _ablation(from_file: dict[str, Any], from_args: dict[str, Any]) -> dict[str, Any]:
    """The overrides of the named ablation (empty for none); refuses contradicting keys."""
    ablation = {**from_file, **from_args}.get("ablation")
    if ablation is None:
        return {}
    if ablation not in ABLATIONS:
        raise ConfigError(f"{subject('ablation')} must be one of {sorted(ABLATIONS)}, got {ablation!r}")
    bundle = ABLATIONS[ablation]
    # An ablation is a fixed bundle: a command-line value that contradicts it is refused (the
    # saved config must rebuild to the same values when the run is resumed).
    for key, value in bundle.items():
        if key in from_args and from_args[key] != value:
            raise ConfigError(
                f"ablation '{ablation}' sets {setting(key, value)}, but "
                f"{setting(key, from_args[key])} was given; drop the ablation and set the keys "
                "yourself, or drop that setting"
            )
    return bundle


def load_config(path: str | Path | None = None, overrides=()) -> Config:
    """Defaults + the YAML file at ``path`` + ``key=value`` overrides (each key at most once)."""
    reject_repeated_keys(overrides)
    return make_config(load_yaml(path) if path else {}, overrides)


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{subject(key)} must be one of {list(choices)}, got {value!r}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{subject(key)} must be {bound}, got {value}")


def _validate_optim(prefix: str, o: OptimConfig) -> None:
    _positive(f"{prefix}.epochs", o.epochs, allow_zero=True)
    _positive(f"{prefix}.batch_size", o.batch_size)
    _positive(f"{prefix}.m_per_class", o.m_per_class, allow_zero=True)
    _positive(f"{prefix}.lr", o.lr)
    _positive(f"{prefix}.weight_decay", o.weight_decay, allow_zero=True)
    _positive(f"{prefix}.momentum", o.momentum, allow_zero=True)
    _positive(f"{prefix}.final_lr_ratio", o.final_lr_ratio, allow_zero=True)
    _choice(f"{prefix}.schedule", o.schedule, SCHEDULES)
    if o.m_per_class and (o.batch_size % o.m_per_class or o.batch_size // o.m_per_class < 2):
        raise ConfigError(
            f"{spell(prefix + '.batch_size')} ({o.batch_size}) must be a multiple of "
            f"{spell(prefix + '.m_per_class')} ({o.m_per_class}) holding at least 2 classes"
        )


def validate(cfg: Config) -> None:
    """Value checks that need no data nor registry (the method's name and the architectures are
    checked by :func:`refilled.protocols.check_config`; what needs data, by the prepare step)."""
    if not cfg.method:
        raise ConfigError(f"{subject('method')} must name a method, got {cfg.method!r}")
    _choice("protocol", cfg.protocol, PROTOCOLS)
    _choice("teacher.init", cfg.teacher.init, ("trained", "random"))
    _choice("stage1.mode", cfg.stage1.mode, ("tuple", "triplet"))
    _choice("stage2.centers", cfg.stage2.centers, ("global", "local"))
    _choice("stage2.reduction", cfg.stage2.reduction, ("batch", "element"))
    _choice("stage2.handoff", cfg.stage2.handoff, ("rescale", "none"))
    _choice("stage2.head_init", cfg.stage2.head_init, ("random", "imprint"))
    _choice("stage2.relation_decay", cfg.stage2.relation_decay, ("cosine", "linear"))
    share = cfg.stage1.budget_share
    if share is not None and not 0 < share < 1:
        raise ConfigError(f"{subject('stage1.budget_share')} is stage 1's fraction of the total "
                          f"epochs and must be in (0, 1) (or null: the epochs as given), got {share}")
    if cfg.stage2.embed_norm is not None and not cfg.stage2.embed_norm > 0:
        raise ConfigError(f"{subject('stage2.embed_norm')} must be > 0 (or null: sqrt of the "
                          f"embedding size), got {cfg.stage2.embed_norm}")
    if not re.fullmatch(r"auto|cpu|cuda|cuda:[0-9]+|mps", cfg.device):
        # only the spelling: whether the device exists is checked when the run starts
        raise ConfigError(f"{subject('device')} must be auto, cpu, cuda, cuda:N (N = 0, 1, ...) "
                          f"or mps, got {cfg.device!r}")
    _validate_ranges(cfg)
    if cfg.data.in_memory not in ("auto", True, False):
        raise ConfigError(f"{subject('data.in_memory')} must be auto, true or false, got {cfg.data.in_memory!r}")
    if cfg.data.workers is not None:
        _positive("data.workers", cfg.data.workers, allow_zero=True)
    _positive("data.prefetch", cfg.data.prefetch)
    for key in ("stage1.tau", "stage2.tau_teacher", "stage2.tau_student", "stage2.shared_kd_temperature"):
        value = _get(cfg, key)
        if not value > 0:
            raise ConfigError(f"{subject(key)} is a temperature and must be > 0, got {value}")
    for key in ("stage1.margin", "stage1.scale", "stage2.lam", "stage2.lam_decay", "stage2.shared_kd",
                "stage2.relation_weight"):
        value = _get(cfg, key)
        if value < 0:
            raise ConfigError(f"{subject(key)} is a weight and must be >= 0, got {value}")
    if not cfg.stage2.imprint_scale > 0:
        raise ConfigError(f"{subject('stage2.imprint_scale')} must be > 0, got {cfg.stage2.imprint_scale}")
    _positive("eval_every", cfg.eval_every)
    _positive("data.teacher_classes", cfg.data.teacher_classes)
    _positive("data.student_offset", cfg.data.student_offset, allow_zero=True)
    _positive("data.val_per_class", cfg.data.val_per_class, allow_zero=True)
    for key in ("data.train_per_class", "data.teacher_train_per_class", "data.student_classes"):
        value = _get(cfg, key)
        if value is not None:
            _positive(key, value)
    b = cfg.baselines
    if not b.kd_temperature > 0:
        raise ConfigError(f"{subject('baselines.kd_temperature')} is a temperature and must be > 0, "
                          f"got {b.kd_temperature}")
    for key in ("kd_alpha", "rkd_distance_weight", "rkd_angle_weight", "fitnet_weight", "at_beta",
                "sp_gamma", "pkt_weight", "label_smoothing"):
        value = getattr(b, key)
        if value < 0:
            raise ConfigError(f"{subject('baselines.' + key)} is a weight and must be >= 0, got {value}")
    if b.kd_alpha > 1:
        raise ConfigError(f"{subject('baselines.kd_alpha')} must be in [0, 1], got {b.kd_alpha}")
    if b.label_smoothing >= 1:
        raise ConfigError(f"{subject('baselines.label_smoothing')} must be in [0, 1), got {b.label_smoothing}")
    _validate_optim("train", cfg.train)
    _validate_optim("stage1.optim", cfg.stage1.optim)
    _validate_optim("teacher.optim", cfg.teacher.optim)
    _validate_applications(cfg)



SEED_KEYS = ("seed", "teacher.seed", "data.split_seed", "data.class_order_seed", "data.test_split_seed")
MAX_SEED = 2**32 - 1  # numpy's limit
MAX_INT = 2**31 - 1  # counts, sizes and epochs beyond this are typos (and overflow int32 code)
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 4096


def _int_keys(cls, prefix: str = ""):
    """Dotted names of the int-typed (also optional int and tuple-of-int) keys of ``cls``."""
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _int_keys(tp, f"{prefix}{f.name}.")
        elif int in (tp, *typing.get_args(tp)):
            yield f"{prefix}{f.name}"


def _validate_ranges(cfg: Config) -> None:
    """Seeds, sizes and fractions that no data is needed to refuse."""
    for key in SEED_KEYS:
        value = _get(cfg, key)
        if value is not None and not 0 <= value <= MAX_SEED:
            raise ConfigError(f"{subject(key)} is a seed and must be an integer in [0, {MAX_SEED}], "
                              f"got {value}")
    for key in _int_keys(Config):
        if key in SEED_KEYS:
            continue
        value = _get(cfg, key)
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None and abs(v) > MAX_INT:
                raise ConfigError(f"{subject(key)} must be at most {MAX_INT}, got {v}")
    size = cfg.data.image_size
    if size is not None and not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"{subject('data.image_size')} is a side in pixels and must be in "
                          f"[{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {size}")
    if not 0 < cfg.data.test_fraction < 1:
        raise ConfigError(f"{subject('data.test_fraction')} must be in (0, 1), got {cfg.data.test_fraction}")


def _validate_applications(cfg: Config) -> None:
    """The ``incremental`` / ``fewshot`` sections and the methods tied to them."""
    inc, fs = cfg.incremental, cfg.fewshot
    if inc.new_classes is not None and inc.new_classes < 2:
        raise ConfigError(f"{subject('incremental.new_classes')} must be >= 2, got {inc.new_classes}")
    if inc.old_per_class is not None:
        _positive("incremental.old_per_class", inc.old_per_class, allow_zero=True)
    if fs.novel_classes is not None and fs.novel_classes < 2:
        raise ConfigError(f"{subject('fewshot.novel_classes')} must be >= 2, got {fs.novel_classes}")
    _positive("fewshot.shots", fs.shots)
    _choice("fewshot.eval", fs.eval, ("classifier", "episodes"))
    _positive("fewshot.episodes", fs.episodes)
    _positive("fewshot.queries", fs.queries)
    if fs.ways < 2:
        raise ConfigError(f"{subject('fewshot.ways')} must be >= 2, got {fs.ways}")


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists), ready for YAML."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

