"""Run directories: one per run, named by one function, knowing what made them.

A run directory holds ``config.yaml`` (the resolved config, written first), ``inputs.json``
(digests of the teacher's weights and buffers, of the training and validation data, and of the
student's architecture and starting weights), the stage checkpoints, ``metrics.csv``,
``teacher_centers.pt``, ``model.pt`` and, once finished, ``results.json``. :class:`RunDir` owns
those files, the directory's lock and the results format (:data:`RESULTS`, read by ``report``
and ``sweep`` too). A directory is only ever resumed by the config and the inputs that made it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import re
import sys
from pathlib import Path
import torch

from refilled.config import Config, ConfigError, dump_yaml, make_config, spell, python_caller, say, to_dict
from refilled.errors import RunDirError, UserError
from refilled.files import RunLock, atomic_write_text, read_json, safe_load_yaml, tensors_digest, write_csv
from refilled.methods import needs_teacher

RUN_FILES = ("teacher_centers.pt", "metrics.csv", "model.pt", "model.safetensors", "model.json",
             "results.json")  # and <stage>.ckpt
INPUTS = {  # what inputs.json records, and how a message names each
    "teacher": "the teacher's weights and buffers",
    "train": "the training data (images and labels)",
    "val": "the validation data",
    "student": "the student's architecture or starting weights",
}

# ------------------------------------------------------------------ names


def _digest(tree) -> str:
    return hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:8]


def changed_keys(tree: dict, default: dict) -> dict:
    """The entries of ``tree`` that differ from ``default``, recursively."""
    out = {}
    for key, value in tree.items():
        base = default.get(key)
        if isinstance(value, dict) and isinstance(base, dict) and key != "kwargs":
            sub = changed_keys(value, base)
            if sub:
                out[key] = sub
        elif value != base:
            out[key] = value
    return out


# Where a run is written and how it is displayed: not what defines its result.
NOT_SETTINGS = ("out_dir", "name", "arm", "progress", "device", "eval_every", "log")


def config_digest(cfg: Config) -> str:
    """What defines a run's result (not where it is written, nor how it is displayed).

    Only the values that differ from the defaults enter it, so a new config key with a default
    never renames (and so never retrains) existing runs.
    """
    tree = changed_keys(to_dict(cfg), to_dict(Config()))
    for key in NOT_SETTINGS:
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


# ------------------------------------------------------------------ digests of the inputs


def module_digest(module: torch.nn.Module, architecture: bool = False) -> str:
    """The digest of a module's weights and buffers (and, with ``architecture``, of its class
    and structure as ``repr`` shows it)."""
    extra = f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}" if architecture else ""
    return tensors_digest(module.state_dict(), extra)


# ------------------------------------------------------------------ results


_NUMBER, _TEXT, _INT = "a number", "a string", "an integer"
# The results format: every key a report or a sweep reads, with its kind and whether it may be
# absent or null. ``method``, ``test_accuracy`` and ``seed`` make a file a refilled result.
RESULTS: dict[str, tuple[str, bool]] = {
    "method": (_TEXT, False), "test_accuracy": (_NUMBER, False), "seed": (_INT, False),
    "role": (_TEXT, True), "arm": (_TEXT, True), "protocol": (_TEXT, True),
    "teacher_init": (_TEXT, True), "overlap": (_INT, True),
    "val_accuracy": (_NUMBER, True), "stage1_ncm_accuracy": (_NUMBER, True),
    "stage1_ncm_val_accuracy": (_NUMBER, True), "stage1_embedding_norm": (_NUMBER, True),
}


def _is(value, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    if kind == _TEXT:
        return isinstance(value, str)
    if kind == _NUMBER:
        return isinstance(value, numbers.Real)
    return isinstance(value, int)


def check_results(record, path: Path, hint: str) -> dict:
    """``record`` if it is a refilled result (see :data:`RESULTS`), else one UserError line."""
    if not isinstance(record, dict):
        raise UserError(f"results file '{path}' is not a refilled result; {hint}")
    missing = [k for k, (_, optional) in RESULTS.items() if not optional and k not in record]
    if missing:
        raise UserError(f"results file '{path}' is not a refilled result (no "
                        f"{', '.join(repr(k) for k in missing)}); {hint}")
    for key, (kind, optional) in RESULTS.items():
        value = record.get(key)
        if (value is None and optional) or _is(value, kind):
            continue
        raise UserError(f"results file '{path}' is not a refilled result ('{key}' is {value!r}, "
                        f"not {kind}); {hint}")
    return record


def collect_results(folder: Path, role: str | None = "student") -> list[tuple[dict, Path]]:
    """(record, run directory) of every ``results.json`` below ``folder`` (optionally one role);
    a file that is not a refilled result is one line naming it."""
    hint = f"move it out of '{folder}' or delete it"
    runs = []
    for path in sorted(Path(folder).rglob("results.json")):
        record = check_results(read_json(path, "results file", hint=hint), path, hint)
        if role is None or record.get("role") == role:
            runs.append((record, path.parent))
    return runs


# ------------------------------------------------------------------ the directory


_HELD: set[Path] = set()


class RunDir:
    """One run directory: its files, its lock, its config and inputs, its results.

    ``RunDir.open(path, cfg)`` creates the directory (checking it is writable), refuses one
    made by another config, writes ``config.yaml``, and holds the directory's lock (rank 0 of a
    torchrun job; a second process waits with a message) until :meth:`close`.
    :meth:`check_inputs` then refuses one made by other inputs.
    """

    def __init__(self, path: str | Path, rank: int = 0):
        self.path = Path(path)
        self.rank = rank
        self._lock: RunLock | None = None

    # -------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: str | Path, cfg: Config, *, rank: int = 0) -> "RunDir":
        run = cls(path, rank)
        run._make()
        run._hold()
        try:
            run._check_config(cfg)
            if rank == 0 and not (run.path / "config.yaml").exists():
                atomic_write_text(run.path / "config.yaml", dump_yaml(cfg))
        except BaseException:
            run.close()
            raise
        return run

    def _make(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{self.rank}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            where = say("choose another out_dir", "pass another run_dir=")
            raise RunDirError(f"cannot write the run directory '{self.path}' ({err.strerror}); "
                              f"{where}") from None

    def _hold(self) -> None:
        key = self.path.resolve()
        if self.rank != 0 or key in _HELD:
            return
        lock = RunLock(self.path, wait=True, on_wait=lambda message: print(
            f"refilled: {message}", file=sys.stderr, flush=True))
        lock.__enter__()
        self._lock = lock
        _HELD.add(key)

    def close(self) -> None:
        """Release the directory's lock (the files stay)."""
        if self._lock is not None:
            _HELD.discard(self.path.resolve())
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _another(self) -> str:
        return say("give this run another name= or out_dir=, or delete that directory",
                   "pass another run_dir=, or delete that directory")

    def _check_config(self, cfg: Config) -> None:
        saved = self.path / "config.yaml"
        if saved.exists():
            old = safe_load_yaml(saved, what="run config")
            try:
                old_cfg = make_config(old)
            except ConfigError:
                old_cfg = None
            if old_cfg is None or config_digest(old_cfg) != config_digest(cfg):
                what = "" if old_cfg is None else _differences(old_cfg, cfg)
                raise RunDirError(f"run directory '{self.path}' holds a run with a different "
                                  f"configuration{what}; {self._another()}")
            return
        leftovers = sorted(p.name for p in self.path.glob("*.ckpt")) + [
            n for n in RUN_FILES if (self.path / n).exists()]
        if leftovers:
            raise RunDirError(
                f"run directory '{self.path}' holds {', '.join(leftovers)} but no config.yaml, so "
                "it cannot be told which config made them; restore its config.yaml, or delete the "
                f"directory ({self._another()})"
            )

    def check_inputs(self, digests: dict[str, str | None]) -> None:
        """Refuse a directory whose recorded inputs differ from ``digests`` (name -> digest,
        see :data:`INPUTS`) once a stage has trained from them; record those not recorded yet.
        Where nothing has trained yet, the new inputs replace the old, and what was derived
        from the old (teacher centres, results) is removed."""
        path = self.path / "inputs.json"
        recorded = read_json(path, "run inputs file") if path.exists() else {}
        differ = [k for k, v in digests.items() if k in recorded and recorded[k] != v]
        if differ and self.started():
            what = " and ".join(INPUTS.get(k, k) for k in differ)
            advice = self._another()
            if "student" in differ:
                advice += say("", "; to resume, build the student as before (seed it, e.g. "
                                  "torch.manual_seed(0), before creating it)")
            raise RunDirError(f"run directory '{self.path}' holds a run trained from other "
                              f"inputs: {what} differ from this call's; {advice}")
        if differ:  # nothing trained from the old inputs: start afresh from these
            recorded = {k: v for k, v in recorded.items() if k not in differ}
            if self.rank == 0:
                for derived in ("teacher_centers.pt", "metrics.csv", "model.pt", "model.safetensors",
                                "model.json", "results.json"):
                    (self.path / derived).unlink(missing_ok=True)
        merged = {**recorded, **digests}
        if merged != recorded and self.rank == 0:
            atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True) + "\n")

    # -------------------------------------------------------------- files

    def checkpoint(self, stage: str) -> Path:
        return self.path / f"{stage}.ckpt"

    @property
    def centers_file(self) -> Path:
        return self.path / "teacher_centers.pt"

    @property
    def model_file(self) -> Path:
        return self.path / "model.pt"

    def started(self) -> bool:
        """Whether any stage has written a checkpoint here."""
        return any(self.path.glob("*.ckpt"))

    def write_metrics(self, rows: list[dict]) -> None:
        if self.rank == 0:
            write_csv(self.path / "metrics.csv", rows)

    def finished(self, needs_model: bool = True) -> dict | None:
        """The results of a finished run (None if it has not finished). A run whose
        ``model.pt`` was deleted counts as unfinished: it is evaluated again from its last
        stage checkpoint (nothing retrains), or retrained when the checkpoints are gone too."""
        path = self.path / "results.json"
        if not path.exists() or (needs_model and not self.model_file.exists()):
            return None
        hint = "delete it to redo the evaluation (finished stages are kept)"
        return check_results(read_json(path, what="results file", hint=hint), path, hint)

    def write_results(self, results: dict) -> None:
        """``results.json`` (rank 0), checked against :data:`RESULTS` first."""
        check_results(results, self.path / "results.json", "this is a bug in refilled")
        if self.rank == 0:
            atomic_write_text(self.path / "results.json", json.dumps(results, indent=2) + "\n")


def _differences(saved: Config, cfg: Config, most: int = 3) -> str:
    """`` (a: 1 there, 2 here; ...)``: the keys in which a saved run's config differs (a config
    written before a default changed differs in that key although nobody set it)."""
    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict) and key != "kwargs":
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    changed = changed_keys(to_dict(saved), to_dict(cfg))
    for key in (*NOT_SETTINGS, *(() if needs_teacher(cfg.method) else ("teacher",))):
        changed.pop(key, None)
    mine = dict(flat(to_dict(cfg)))
    sep = "" if python_caller() else ": "
    diffs = [f"{spell(key)}{sep}{value!r} there, {mine.get(key)!r} here" for key, value in flat(changed)]
    if not diffs:
        return ""
    more = f"; and {len(diffs) - most} more" if len(diffs) > most else ""
    return f" ({'; '.join(diffs[:most])}{more})"
