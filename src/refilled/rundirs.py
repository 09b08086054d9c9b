"""Run directories: one per run, named by one function, holding the config that made it.

A run directory holds ``config.yaml`` (the resolved config, written first), the stage
checkpoints, ``metrics.csv``, ``teacher_centers.pt``, ``model.pt`` and, once finished,
``results.json``. A directory is only ever resumed under the config that made it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path

from refilled.config import Config, ConfigError, dump_yaml, make_config, to_dict
from refilled.errors import UserError
from refilled.files import atomic_write_text
from refilled.methods import needs_teacher

RUN_FILES = ("stage1.ckpt", "stage2.ckpt", "train.ckpt", "teacher_centers.pt", "metrics.csv",
             "model.pt", "model.safetensors", "model.json", "results.json")


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


_NOT_IN_DIGEST = ("out_dir", "name", "arm", "progress", "device", "eval_every", "log")


def config_digest(cfg: Config) -> str:
    """What defines a run's result (not where it is written, nor how it is displayed).

    Only the values that differ from the defaults enter it, so a new config key with a default
    never renames (and so never retrains) existing runs.
    """
    tree = _changed(to_dict(cfg), to_dict(Config()))
    for key in _NOT_IN_DIGEST:
        tree.pop(key, None)
    if not needs_teacher(cfg.method):
        tree.pop("teacher", None)  # e.g. the student alone is the same run whatever the teacher
    return _digest(tree)


def _safe(text: str) -> str:
    """A file-name-safe form of an architecture name (import paths hold ':' and '/')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "model"


def run_name(cfg: Config) -> str:
    """The one function that names run directories."""
    if cfg.name:
        return cfg.name
    init = "-randteacher" if needs_teacher(cfg.method) and cfg.teacher.init == "random" else ""
    return (f"{cfg.data.name}-{cfg.method}{init}-{_safe(cfg.student.arch)}-{config_digest(cfg)}"
            f"-seed{cfg.seed}")


def teacher_config(cfg: Config) -> Config:
    """The config of the run that trains ``cfg``'s teacher, shared by every student run.

    Built from the defaults plus only what shapes the teacher (its data window, architecture,
    schedule and seed), so student settings never make it retrain.
    """
    t = cfg.teacher
    data = dataclasses.replace(cfg.data, student_offset=0, student_classes=None,
                               train_per_class=cfg.data.teacher_train_per_class)
    student = dataclasses.replace(cfg.student, arch=t.arch, kwargs=t.kwargs, embedding=t.embedding,
                                  head=t.head, mean=t.mean, std=t.std, maps=t.maps)
    base = Config(
        method="ce", seed=t.seed, device=cfg.device, out_dir=cfg.out_dir, progress=cfg.progress,
        eval_every=cfg.eval_every, data=data, train=t.optim, student=student, speed=cfg.speed,
        log=cfg.log,
    )
    name = f"teacher-{cfg.data.name}-{_safe(t.arch)}-{config_digest(base)}-seed{t.seed}"
    return dataclasses.replace(base, name=name)


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.out_dir) / run_name(cfg)


def check_run_dir(run_dir: Path, cfg: Config) -> None:
    """Refuse a directory that holds another run, or checkpoints whose config is missing."""
    saved = run_dir / "config.yaml"
    if saved.exists():
        from refilled.files import safe_load_yaml

        old = safe_load_yaml(saved, what="run config")
        try:
            old_cfg = make_config(old)
        except ConfigError:
            old_cfg = None
        if old_cfg is None or config_digest(old_cfg) != config_digest(cfg):
            what = "" if old_cfg is None else _differences(old_cfg, cfg)
            raise UserError(
                f"run directory '{run_dir}' holds a run with a different configuration{what}; "
                "give this run another name= or out_dir=, or delete that directory"
            )
        return
    leftovers = [n for n in RUN_FILES if (run_dir / n).exists()]
    if leftovers:
        raise UserError(
            f"run directory '{run_dir}' holds {', '.join(leftovers)} but no config.yaml, so it "
            "cannot be told which config made them; restore its config.yaml, or delete the "
            "directory (or give this run another name=/out_dir=) to start afresh"
        )


def _differences(saved: Config, cfg: Config, most: int = 3) -> str:
    """`` (a: 1 there, 2 here; ...)``: the keys in which a saved run's config differs (a config
    written before a default changed differs in that key although nobody set it)."""
    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict) and key != "kwargs":
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    changed = _changed(to_dict(saved), to_dict(cfg))
    for key in (*_NOT_IN_DIGEST, *(() if needs_teacher(cfg.method) else ("teacher",))):
        changed.pop(key, None)
    mine = dict(flat(to_dict(cfg)))
    diffs = [f"{key}: {value!r} there, {mine.get(key)!r} here" for key, value in flat(changed)]
    if not diffs:
        return ""
    more = f"; and {len(diffs) - most} more" if len(diffs) > most else ""
    return f" ({'; '.join(diffs[:most])}{more})"


def prepare_run_dir(run_dir: Path, cfg: Config, rank: int = 0) -> None:
    """Create ``run_dir`` (checking it is writable), refuse a foreign one, save the config."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write the run directory '{run_dir}' ({err.strerror}); "
                        "choose another out_dir") from None
    check_run_dir(run_dir, cfg)
    if rank == 0 and not (run_dir / "config.yaml").exists():
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))


_HELD: set[Path] = set()


@contextlib.contextmanager
def hold(run_dir: Path, rank: int = 0):
    """Hold ``run_dir`` for this process while a run trains and writes there: a second process
    (another sweep over the same out_dir, on this machine or another) waits, with a message,
    until it is free; a lock left by a killed process is taken over. Re-entrant within a
    process; under torchrun rank 0 holds it for the job."""
    from refilled.files import RunLock

    key = Path(run_dir).resolve()
    if rank != 0 or key in _HELD:
        yield
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir, wait=True, on_wait=lambda message: print(f"refilled: {message}",
                                                                    file=sys.stderr, flush=True)):
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)


def finished_results(run_dir: Path, needs_model: bool = True) -> dict | None:
    """The results of a finished run in ``run_dir`` (None if it has not finished). A run whose
    ``model.pt`` was deleted counts as unfinished: it is evaluated again from its last stage
    checkpoint (nothing retrains), or retrained when the checkpoints are gone too."""
    path = run_dir / "results.json"
    if not path.exists():
        return None
    if needs_model and not (run_dir / "model.pt").exists():
        return None
    from refilled.files import read_json

    results = read_json(path, what="results file")
    if not {"method", "test_accuracy", "seed"} <= results.keys():
        raise UserError(f"results file '{path}' is not a refilled results file; delete it to "
                        "redo the evaluation (finished stages are kept)")
    return results
