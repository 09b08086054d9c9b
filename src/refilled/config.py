"""One typed configuration: dataclasses with every default, a YAML diff, dotted overrides.

Order of precedence: defaults < preset (``stage2.preset``) < YAML file < ``key=value`` overrides.
A key that does not exist, or a value of the wrong type, is a :class:`ConfigError` naming the
key. The resolved config is frozen, saved in each run directory, and never mutated.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from refilled.errors import ConfigError

SCHEDULES = ("cosine", "multistep", "constant")


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | digits | cifar100 | cub200 | image_folder
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
    augment: bool = True


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
    final_lr_ratio: float = 0.1  # cosine anneals to final_lr_ratio * lr (SPEC §2)
    milestones: tuple[int, ...] = (50, 100, 150)  # multistep
    gamma: float = 0.2  # multistep


@dataclass(frozen=True)
class TeacherConfig:
    arch: str = "cnn_medium"
    kwargs: dict = field(default_factory=dict)
    checkpoint: str | None = None  # reuse a trained teacher (a checkpoint or its run directory)
    init: str = "trained"  # trained | random (control: untrained, BN statistics calibrated)
    seed: int = 0  # the teacher is trained once per seed here, shared by student runs
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=5, batch_size=128, lr=0.05))


@dataclass(frozen=True)
class StudentConfig:
    arch: str = "cnn_small"
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage1Config:
    """Relationship matching on the embedding (SPEC §2); epochs = 0 skips stage 1."""

    tau: float = 4.0
    margin: float = 0.2
    mode: str = "tuple"  # tuple | triplet
    scale: float = 1000.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=0))


@dataclass(frozen=True)
class Stage2Config:
    """Embedding-induced local classifier distillation (SPEC §3)."""

    preset: str | None = None  # tpami | cvpr_recon | cvpr: fills what the user leaves unset
    tau_teacher: float = 1.0
    tau_student: float = 1.0
    lam: float = 1.0
    lam_decay: float = 0.0  # lambda * exp(-lam_decay * epoch); CVPR uses 0.05
    weighting: bool = True  # TPAMI adaptive per-instance emphasis
    centers: str = "global"  # global (once, whole training split) | local (per batch)
    normalize_teacher: bool = False


PRESETS: dict[str, dict[str, Any]] = {
    "tpami": {"stage2.tau_teacher": 1.0, "stage2.tau_student": 1.0, "stage2.lam": 1.0,
              "stage2.lam_decay": 0.0, "stage2.weighting": True, "stage2.centers": "global"},
    "cvpr_recon": {"stage2.tau_teacher": 2.0, "stage2.tau_student": 2.0, "stage2.lam": 100.0,
                   "stage2.lam_decay": 0.0, "stage2.weighting": False, "stage2.centers": "global"},
    "cvpr": {"stage2.tau_teacher": 2.0, "stage2.tau_student": 2.0, "stage2.lam": 1000.0,
             "stage2.lam_decay": 0.05, "stage2.weighting": False, "stage2.centers": "local",
             "stage1.mode": "triplet"},
}


@dataclass(frozen=True)
class Config:
    method: str = "refilled"  # ce (student alone) | refilled
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


# ------------------------------------------------------------------ building and checking


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


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
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(key, v, item) for v in value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise ConfigError(
        f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


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
                raise ConfigError(f"config key '{dotted}' is a section; give it a mapping")
            kwargs[key] = _build(tp, value, dotted + ".")
        else:
            kwargs[key] = _coerce(dotted, value, tp)
    # Nested sections the user did not mention keep their own (possibly non-trivial) defaults.
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
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
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': cannot read the value ({err})") from None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads '1e-3' as a string
    return key.strip(), value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values")
    return data


def make_config(tree: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a checked, frozen :class:`Config` from a nested dict plus dotted overrides."""
    user = _flatten(tree or {})
    for text in overrides:
        key, value = parse_override(text)
        user[key] = value
    preset = user.get("stage2.preset")
    flat: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(
                f"config key 'stage2.preset' must be one of {sorted(PRESETS)}, got {preset!r}"
            )
        flat.update(PRESETS[preset])
    flat.update(user)
    nested: dict = {}
    for key, value in flat.items():
        _set_dotted(nested, key, value)
    cfg = _build(Config, nested)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides=()) -> Config:
    return make_config(load_yaml(path) if path else {}, overrides)


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config key '{key}' must be {bound}, got {value}")


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
            f"{prefix}.batch_size ({o.batch_size}) must be a multiple of {prefix}.m_per_class "
            f"({o.m_per_class}) holding at least 2 classes"
        )


def validate(cfg: Config) -> None:
    """Value checks that need no data (those that do are made when the data is loaded)."""
    from refilled.methods import METHOD_BUILDERS  # registered by the methods themselves

    _choice("method", cfg.method, sorted(METHOD_BUILDERS))
    _choice("teacher.init", cfg.teacher.init, ("trained", "random"))
    _choice("stage1.mode", cfg.stage1.mode, ("tuple", "triplet"))
    _choice("stage2.centers", cfg.stage2.centers, ("global", "local"))
    if not (cfg.device in ("auto", "cpu", "cuda", "mps") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    for key in ("stage1.tau", "stage2.tau_teacher", "stage2.tau_student"):
        value = _get(cfg, key)
        if not value > 0:
            raise ConfigError(f"config key '{key}' is a temperature and must be > 0, got {value}")
    for key in ("stage1.margin", "stage1.scale", "stage2.lam", "stage2.lam_decay"):
        value = _get(cfg, key)
        if value < 0:
            raise ConfigError(f"config key '{key}' is a weight and must be >= 0, got {value}")
    _positive("eval_every", cfg.eval_every)
    _positive("data.teacher_classes", cfg.data.teacher_classes)
    _positive("data.student_offset", cfg.data.student_offset, allow_zero=True)
    _positive("data.val_per_class", cfg.data.val_per_class, allow_zero=True)
    for key in ("data.train_per_class", "data.teacher_train_per_class", "data.student_classes"):
        value = _get(cfg, key)
        if value is not None:
            _positive(key, value)
    _validate_optim("train", cfg.train)
    _validate_optim("stage1.optim", cfg.stage1.optim)
    _validate_optim("teacher.optim", cfg.teacher.optim)


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
