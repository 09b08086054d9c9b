"""The student out of refilled: ``refilled export``, :func:`load_student`, ``refilled predict``.

An export folder (:func:`export_run`, from a finished run directory) holds

* ``model.safetensors``: the student's own state dict, nothing else (no teacher, no wrapper
  prefix, no regressor, no optimiser state);
* ``config.json``: how to rebuild it (architecture and keyword arguments), its classes in order,
  its input (channels, size, statistics: the normalisation is inside the model), where its
  embedding and classifier are, the teacher it learned from (architecture, digest of its weights,
  how the label spaces relate), the method and the settings that differ from the defaults, the
  run's figures and refilled's version;
* ``README.md``: a model card;
* with ``onnx=True``, ``model.onnx``: float images in [0, 1], N x C x H x W (any N), to logits,
  the normalisation inside the graph; checked with ONNX's checker and with ONNX Runtime against
  PyTorch on the run's validation images before it is kept.

Everything is written into a temporary folder beside the target and renamed into place, so a
failed export leaves nothing behind.

:func:`load_student` (an export folder or a run directory) rebuilds the student from
safetensors and JSON only: nothing is unpickled. (An architecture given as an import path runs
that module's code to build the network, as training did.) :func:`predict_images` classifies
image files, read and resized exactly as the run's evaluation read its images.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from refilled.config import Config, ConfigError, make_config, to_dict
from refilled.errors import UserError
from refilled.files import atomic_write_text, read_json, safe_load_yaml, tensors_digest
from refilled.models.checkpoints import (
    META_FILE,
    WEIGHTS_FILE,
    fit_classifier,
    read_model_file,
    read_weights,
    safetensors_module,
    write_weights,
)
from refilled.models.external import build_module, is_import_path
from refilled.networks import _first_tensor, has_zoo_contract, last_linear
from refilled.runs import NOT_SETTINGS, RunDir, changed_keys

__all__ = ["Student", "export_run", "load_student", "predict_images", "EXPORT_FORMAT"]

EXPORT_FORMAT = "refilled-student/1"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
ONNX_FILE = "model.onnx"
INSTALL = "pip install 'refilled[export]'"

# ONNX Runtime against PyTorch: the largest logit difference allowed, relative to the largest
# logit (at least 1): float32 arithmetic in another order differs by ~1e-6 of it.
PARITY_RTOL = 1e-4


def require(module: str, package: str, what: str):
    """Import ``module`` or say, in one line, which package ``what`` needs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the '{package}' package, which is not installed: "
                        f"pip install {package} (or {INSTALL})") from None


# ------------------------------------------------------------------ the student as a plain module


class Student(nn.Module):
    """The student alone: float images in [0, 1] (N x C x H x W) -> logits (N x classes).

    The input statistics are applied inside (``(x - mean) / std``, as in training); the logits
    are computed as refilled's evaluation computed them. ``classes`` are the class names in
    logit order, ``input_size`` the side of the square images it takes, ``in_chans`` their
    channels, ``eval_resize`` how an image file is brought to that size (``"square"``: resized;
    ``"centre_crop"``: shorter side to input_size / 0.875, then the centre crop).
    """

    def __init__(self, model: nn.Module, *, classes: Sequence[str], input_size: int, in_chans: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 through_features: bool = False, eval_resize: str = "square"):
        super().__init__()
        self.model = model
        stats = [None, None]
        if mean is not None and std is not None:
            stats = [torch.tensor([float(v) for v in s], dtype=torch.float32).reshape(1, -1, 1, 1)
                     for s in (mean, std)]
        self.register_buffer("mean", stats[0], persistent=False)
        self.register_buffer("std", stats[1], persistent=False)
        self.classes = [str(c) for c in classes]
        self.input_size = int(input_size)
        self.in_chans = int(in_chans)
        self.eval_resize = eval_resize  # how image files are resized for it (predict)
        self.through_features = through_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images if self.mean is None else (images - self.mean) / self.std
        if self.through_features:  # the zoo contract (and embedding=forward_features)
            return _first_tensor(self.model.forward_head(self.model.forward_features(x)))
        return _first_tensor(self.model(x))


def _resolve_arch(arch: str, folders: Sequence[Path], copy: str | None = None) -> str:
    """A ``file.py:factory`` arch: the export's own copy of the file (``copy``, in one of
    ``folders``) first, then the path as written relative to ``folders``, then as it is."""
    if not is_import_path(arch):
        return arch
    module, _, attr = arch.rpartition(":")
    if not module.endswith(".py"):
        return arch
    names = [copy] if copy else []
    if not Path(module).expanduser().is_absolute():
        names.append(module)
    for folder in folders:
        for name in names:
            candidate = Path(folder) / name
            if candidate.is_file():
                return f"{candidate.resolve()}:{attr}"
    return arch


def build_student(meta: dict, state: dict, where: str, folders: Sequence[Path] = (),
                  digest: str | None = None) -> Student:
    """The :class:`Student` that ``meta`` (model.json / config.json) describes, ``state`` loaded
    strictly and checked against ``digest`` (of the tensors in the module's own key order:
    safetensors files keep no order); one line when they do not fit."""
    try:
        arch, num_classes, in_chans = meta["arch"], int(meta["num_classes"]), int(meta["in_chans"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"'{where}' does not describe a model (arch, num_classes and in_chans are "
                        "needed); export the run again") from None
    input_size = meta.get("input_size")
    module = build_module(_resolve_arch(arch, folders, meta.get("arch_file")), num_classes, in_chans,
                          input_size=input_size,
                          kwargs=meta.get("kwargs") or {}, role="student")
    fit_classifier(module, meta.get("head_module") or meta.get("head"), state)
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise UserError(f"the weights of '{where}' do not fit {arch} ({first}); export the run "
                        "again or check that the architecture's code has not changed") from None
    if digest and tensors_digest(ordered(state, module)) != digest:
        raise UserError(f"the weights of '{where}' are not those it records (their digest differs: "
                        "files from two different exports or runs?); export the run again")
    embedding, head = meta.get("embedding"), meta.get("head")
    through = embedding == "forward_features" or (
        embedding is None and head is None and has_zoo_contract(module))
    classes = meta.get("class_names") or [str(i) for i in range(num_classes)]
    student = Student(module, classes=classes, input_size=int(input_size or 0), in_chans=in_chans,
                      mean=meta.get("mean"), std=meta.get("std"), through_features=through,
                      eval_resize=meta.get("eval_resize") or "square")
    return student.eval()


def ordered(state: dict, module: nn.Module) -> dict:
    """``state`` in ``module``'s own key order (the order its state_dict() gives)."""
    return {key: state[key] for key in module.state_dict() if key in state}


def load_student(path: str | Path) -> Student:
    """The student of an export folder (``refilled export``) or of a run directory, as a plain
    ``nn.Module`` in eval mode: float images in [0, 1], N x C x H x W -> logits, with
    ``.classes`` (names, in logit order), ``.input_size`` (side in pixels) and ``.in_chans``.

    Reads ``model.safetensors`` and JSON only (never a pickle)::

        model = refilled.load_student("export/")
        probs = model(images).softmax(1)
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        raise UserError(f"'{path}' is an ONNX model; run it with onnxruntime (or `refilled predict "
                        f"{path} IMAGES`), or give load_student its export folder")
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise UserError(f"'{path}' does not exist; give an export folder (refilled export) or a "
                        "run directory")
    weights = folder / WEIGHTS_FILE
    for name, kind in ((CONFIG_FILE, "export"), (META_FILE, "run")):
        described = folder / name
        if described.is_file() and weights.is_file():
            meta = read_json(described, what=f"{kind} description")
            if kind == "export" and meta.get("format") != EXPORT_FORMAT:
                continue  # someone else's config.json: maybe the folder is also a run directory
            state = read_weights(weights, what="student weights")
            recorded = meta.get("weights")  # config.json: {"digest": ...}; model.json: a file name
            digest = recorded.get("digest") if isinstance(recorded, dict) else meta.get("weights_digest")
            return build_student(meta, state, str(described), folders=(folder,), digest=digest)
    if (folder / "model.pt").is_file():
        raise UserError(f"'{folder}' holds only model.pt, which load_student does not unpickle; run "
                        f"`refilled export {folder} --out DIR` and load DIR, or re-run the run to "
                        "write model.safetensors beside it")
    if (folder / "results.json").is_file() or (folder / "config.yaml").is_file():
        raise UserError(f"run directory '{folder}' has no student model (no {WEIGHTS_FILE}); "
                        "finish it with the same `refilled run` command, or export another run")
    raise UserError(f"'{folder}' is neither an export folder ({CONFIG_FILE} + {WEIGHTS_FILE}) nor "
                    "a refilled run directory; give the folder `refilled export` wrote")


# ------------------------------------------------------------------ reading a run directory


def _student_of_run(run_dir: Path) -> tuple[dict, dict]:
    """(description, state dict) of a run's student: model.json + model.safetensors, or, for
    runs written before those, model.pt (read with weights_only)."""
    meta_path, weights = run_dir / META_FILE, run_dir / WEIGHTS_FILE
    if meta_path.is_file() and weights.is_file():
        meta = read_json(meta_path, what="model description")
        return meta, read_weights(weights, what="student weights")
    if (run_dir / "model.pt").is_file():
        ckpt, _ = read_model_file(run_dir, what="student model")
        state = ckpt.pop("state_dict")
        return ckpt, state
    raise UserError(f"run '{run_dir}' has no student model (no model.pt); run the same `refilled "
                    "run` command again to write it, then export")


def _read_run(run_dir: Path) -> tuple[dict, dict, Config | None]:
    """(results, config tree, Config or None) of a finished run that has a student."""
    from refilled.methods import METHODS

    if not run_dir.is_dir():
        state = "is not a folder" if run_dir.exists() else "does not exist"
        raise UserError(f"run directory '{run_dir}' {state}; give the folder of a finished "
                        "`refilled run` (it holds config.yaml and results.json)")
    if not (run_dir / "results.json").is_file():
        if (run_dir / "config.yaml").is_file():
            raise UserError(f"run '{run_dir}' has not finished (no results.json yet); run the same "
                            "`refilled run` command again to finish it, then export")
        raise UserError(f"'{run_dir}' is not a refilled run directory (no config.yaml or "
                        "results.json); give the folder of a finished `refilled run`")
    results = RunDir(run_dir).finished(needs_model=False)
    tree = {}
    if (run_dir / "config.yaml").is_file():
        tree = safe_load_yaml(run_dir / "config.yaml", what="run config")
    method = str(results.get("method", tree.get("method", "unknown")))
    predictor = METHODS[method].predictor if method in METHODS else "classifier"
    if predictor == "teacher_ncm" or ("student_arch" in results and results["student_arch"] is None):
        raise UserError(f"run '{run_dir}' has no student to export: method '{method}' classifies "
                        "with the teacher's embedding and trains no student; export a run whose "
                        "method trains one (e.g. refilled, ce, kd)")
    if predictor == "student_ncm":
        raise UserError(f"run '{run_dir}' (method '{method}') classifies by the nearest class mean "
                        "of the student's embedding, which its never-trained classifier does not "
                        "reproduce; export a run whose method trains the classifier (e.g. refilled)")
    try:
        cfg = make_config(tree) if tree else None
    except ConfigError:  # a config from another version of refilled: described, not rebuilt
        cfg = None
    return results, tree, cfg


def _label_spaces(results: dict, tree: dict) -> tuple[str, int | None]:
    """How the student's classes relate to the teacher's: same, disjoint or overlapping (with
    the number of shared classes); "unknown" where an older run did not record it."""
    overlap = results.get("overlap")
    protocol = results.get("protocol")
    n_student = results.get("num_classes")
    teacher_names = results.get("teacher_class_names")
    n_teacher = len(teacher_names) if teacher_names else None
    if n_teacher is None and tree.get("protocol", "distill") == "distill":
        n_teacher = (tree.get("data") or {}).get("teacher_classes")
    if overlap is None:
        if protocol == "standard":
            return "same", n_student
        if protocol in ("cross_task", "fewshot"):
            return "disjoint", 0
        return "unknown", None
    if overlap == 0:
        return "disjoint", 0
    if overlap == n_student and (n_teacher == overlap or protocol == "standard"):
        return "same", overlap
    return "overlapping", overlap


def _settings(tree: dict) -> dict:
    """What the run set beyond refilled's defaults (its data location left out)."""
    changed = changed_keys(tree, to_dict(Config()))
    for key in NOT_SETTINGS:
        changed.pop(key, None)
    if isinstance(changed.get("data"), dict):
        changed["data"].pop("root", None)
        if not changed["data"]:
            changed.pop("data")
    return changed


def _stages(run_dir: Path) -> list[dict]:
    """Epochs and steps of each stage, from metrics.csv (empty when it cannot be read)."""
    out: dict[str, dict] = {}
    try:
        with open(run_dir / "metrics.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                stage = out.setdefault(row.get("stage") or "train", {"epochs": 0, "steps": 0})
                stage["epochs"] += 1
                stage["steps"] += int(float(row.get("steps") or 0))
    except (OSError, ValueError, csv.Error):
        return []
    return [{"stage": name, **counts} for name, counts in out.items()]


_FIGURES = ("test_accuracy", "val_accuracy", "stage1_ncm_accuracy", "stage1_ncm_val_accuracy",
            "test_accuracy_old", "test_accuracy_new", "test_ci95", "fewshot_eval", "episodes",
            "ways", "shots", "queries", "train_images", "wall_seconds")


def _describe(run_dir: Path, results: dict, tree: dict, meta: dict, state: dict,
              head_module: str | None) -> dict:
    """config.json's contents (without the ONNX part)."""
    from refilled.version import __version__

    teacher = None
    if results.get("teacher") is not None or results.get("teacher_arch") is not None:
        t = tree.get("teacher") or {}
        relation, shared = _label_spaces(results, tree)
        teacher = {
            "arch": results.get("teacher_arch") or t.get("arch") or "unknown",
            "kwargs": t.get("kwargs") or {},
            "init": results.get("teacher_init") or t.get("init") or "unknown",
            "source": results.get("teacher"),
            "weights_digest": results.get("teacher_digest") or "unknown",
            "classes": results.get("teacher_class_names"),
            "label_spaces": relation,
            "shared_classes": shared,
            "test_accuracy": results.get("teacher_test_accuracy"),
        }
    embedding = meta.get("embedding")
    return {
        "format": EXPORT_FORMAT,
        "refilled_version": __version__,
        "arch": meta["arch"],
        "kwargs": meta.get("kwargs") or {},
        "arch_file": meta.get("arch_file"),  # a copy of a file.py:factory's file, beside the weights
        "num_classes": int(meta["num_classes"]),
        "class_names": (meta.get("class_names") or results.get("class_names")
                        or [str(i) for i in range(int(meta["num_classes"]))]),  # unknown: indices
        "in_chans": int(meta["in_chans"]),
        "input_size": meta.get("input_size"),
        "eval_resize": meta.get("eval_resize") or "square",
        "mean": meta.get("mean"),
        "std": meta.get("std"),
        "input": {"layout": "N x C x H x W", "dtype": "float32", "range": [0.0, 1.0],
                  "normalisation": "inside the model: (x - mean) / std per channel"},
        "embedding": embedding,
        "head": meta.get("head"),
        "head_module": head_module,
        "embedding_at": {None: f"the input of the classifier ('{head_module}')",
                         "forward_features": "the model's forward_features",
                         "output": "the model's output"}.get(embedding, f"the output of '{embedding}', "
                                                                          "globally average-pooled"),
        "num_features": meta.get("num_features"),
        "weights": {"file": WEIGHTS_FILE, "digest": tensors_digest(state), "tensors": len(state),
                    "parameters": int(sum(v.numel() for v in state.values() if v.is_floating_point()))},
        "teacher": teacher,
        "training": {
            "method": results.get("method", tree.get("method")),
            "arm": results.get("arm"),
            "ablation": tree.get("ablation"),
            "role": results.get("role", "student"),
            "dataset": results.get("dataset"),
            "protocol": results.get("protocol"),
            "seed": results.get("seed"),
            "stages": _stages(run_dir),
            "settings": _settings(tree),
            "config": tree,
        },
        "results": {k: results[k] for k in _FIGURES if results.get(k) is not None},
        "teacher_test_accuracy": results.get("teacher_test_accuracy"),
        "run": {"dir": str(run_dir), "name": run_dir.name, "config_digest": results.get("config_digest")},
        "onnx": None,
    }


# ------------------------------------------------------------------ ONNX


@contextlib.contextmanager
def _quiet():
    """The exporter's warnings and progress lines are not for the user (one line on failure)."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _onnx_packages():
    require("onnx", "onnx", "ONNX export (--onnx)")
    require("onnxscript", "onnxscript", "ONNX export (--onnx)")
    require("onnxruntime", "onnxruntime", "checking the ONNX export (--onnx)")


def write_onnx(student: Student, path: Path, example: torch.Tensor, metadata: dict) -> dict:
    """``student`` as an ONNX graph at ``path`` (input ``images``, N x C x H x W with a dynamic
    N; output ``logits``), ``metadata`` stored in the model's metadata_props; checked with the
    ONNX checker. Returns what config.json records of it."""
    import onnx

    student.eval()
    errors = []
    with _quiet(), torch.no_grad():
        for dynamo in (True, False):
            try:
                if dynamo:
                    batch = torch.export.Dim("batch")
                    torch.onnx.export(student, (example,), str(path), input_names=["images"],
                                      output_names=["logits"], dynamic_shapes={"images": {0: batch}},
                                      dynamo=True, external_data=False, verbose=False)
                else:  # the TorchScript exporter, for models torch.export cannot trace
                    torch.onnx.export(student, (example,), str(path), input_names=["images"],
                                      output_names=["logits"], dynamo=False, opset_version=17,
                                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
                break
            except Exception as err:  # noqa: BLE001 - whatever the exporter says, one line
                errors.append(" ".join(f"{type(err).__name__}: {err}".split())[:200])
        else:
            raise UserError(f"the student cannot be exported to ONNX ({errors[0]}); export it "
                            "without --onnx (safetensors only)")
    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    model.doc_string = "refilled student: float images in [0, 1], N x C x H x W -> logits"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # noqa: BLE001
        first = " ".join(str(err).split())[:200]
        raise UserError(f"the ONNX export of the student fails ONNX's checker ({first}); export "
                        "it without --onnx") from None
    onnx.save(model, str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
    return {"file": ONNX_FILE, "input": "images", "output": "logits", "opset": opset,
            "dynamic_batch": bool(dims and dims[0].dim_param),
            "exporter": "dynamo" if dynamo else "torchscript"}


@torch.no_grad()
def _torch_logits(student: Student, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([student(images[i:i + batch]) for i in range(0, len(images), batch)])


def onnx_parity(student: Student, path: Path, images: torch.Tensor) -> dict:
    """ONNX Runtime against PyTorch on ``images`` (float, [0, 1]) in batches of changing sizes:
    the largest absolute logit difference, the top-1 agreement, and whether they pass: the
    difference within ``PARITY_RTOL`` of the largest logit, and every disagreement a near-tie."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    mine = _torch_logits(student, images)
    sizes, theirs, start = (1, 7, 64), [], 0
    while start < len(images):
        stop = min(len(images), start + sizes[min(len(theirs), len(sizes) - 1)])
        theirs.append(torch.from_numpy(session.run(None, {name: images[start:stop].numpy()})[0]))
        start = stop
    theirs = torch.cat(theirs).to(mine.dtype)
    diff = float((mine - theirs).abs().max()) if len(mine) else 0.0
    agree = mine.argmax(1) == theirs.argmax(1)
    top2 = mine.topk(min(2, mine.shape[1]), dim=1).values
    margin = top2[:, 0] - top2[:, -1]
    tolerance = PARITY_RTOL * max(1.0, float(mine.abs().max()) if len(mine) else 1.0)
    passed = math.isfinite(diff) and diff <= tolerance and bool((agree | (margin <= 2 * diff)).all())
    return {"images": len(images), "max_abs_logit_diff": diff,
            "top1_agreement": float(agree.double().mean()) if len(agree) else 1.0,
            "tolerance": tolerance, "passed": passed}


def _parity_images(cfg: Config | None, meta: dict, count: int) -> tuple[torch.Tensor, str]:
    """Up to ``count`` images of the run's validation split (its training split when it has no
    validation images) as floats in [0, 1]; random images when the run's data cannot be read."""
    reason = "the run's config cannot be rebuilt by this version of refilled"
    if cfg is not None:
        try:
            from refilled.protocols import PROTOCOLS  # the protocols' task builders

            task = PROTOCOLS[cfg.protocol].tasks(cfg).student
            split, which = (task.val, "validation") if len(task.val) else (task.train, "training")
            images = split.images[:count]
            if not isinstance(images, torch.Tensor):  # streamed from disk: read as evaluation reads
                images = images.materialise()
            x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
            return x, f"{len(x)} images of the run's {which} split"
        except (UserError, OSError) as err:  # the data moved or is gone: still checked, on noise
            reason = " ".join(str(err).split(";")[0].split())[:160]
    size = int(meta.get("input_size") or 32)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(count, int(meta["in_chans"]), size, size, generator=generator)
    return x, f"{count} random images (the run's data could not be read: {reason})"


# ------------------------------------------------------------------ the model card


def _stats(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _controls(run_dir: Path, results: dict, tree: dict) -> list[dict]:
    """Finished runs beside this one (same out_dir, data, protocol and seed) with another method,
    arm or teacher: the controls a sweep ran with it."""
    rows = []
    try:
        siblings = sorted(p for p in run_dir.parent.iterdir() if p.is_dir() and p != run_dir)
    except OSError:
        return rows
    mine = (results.get("method"), results.get("arm"), results.get("teacher_init"))
    for other in siblings:
        if not (other / "results.json").is_file() or not (other / "config.yaml").is_file():
            continue
        try:
            r = read_json(other / "results.json")
            t = safe_load_yaml(other / "config.yaml")
        except UserError:
            continue
        if (r.get("role", "student") != "student" or r.get("seed") != results.get("seed")
                or r.get("protocol") != results.get("protocol") or t.get("data") != tree.get("data")
                or r.get("student_arch") not in (None, results.get("student_arch"))
                or (r.get("method"), r.get("arm"), r.get("teacher_init")) == mine):
            continue
        rows.append(r)
    return rows


def _arm(r: dict) -> str:
    label = r.get("arm") or r.get("method") or "?"
    if r.get("teacher_init") == "random" and "random" not in label:
        label += ", random teacher"
    return str(label)


def _card(config: dict, results: dict, controls: list[dict]) -> str:
    import yaml

    t, train, figs = config["teacher"], config["training"], config["results"]
    header = {"library_name": "refilled", "pipeline_tag": "image-classification",
              "tags": ["image-classification", "knowledge-distillation", "refilled"],
              "datasets": [train["dataset"]] if train.get("dataset") else [],
              "metrics": ["accuracy"]}
    names = config.get("class_names") or []
    size, chans = config.get("input_size"), config["in_chans"]
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {config['run']['name']}", "",
             "## What it is", "",
             f"An image classifier (`{config['arch']}`"
             + (f", {config['kwargs']}" if config["kwargs"] else "")
             + f", {config['weights']['parameters']:,} parameters) for {config['num_classes']} classes"
             + (f" of `{train['dataset']}`" if train.get("dataset") else "") + ": "
             + ", ".join(f"`{n}`" for n in names[:20]) + (" ..." if len(names) > 20 else "") + ".",
             f"Input: float images in [0, 1], N x {chans} x {size} x {size}"
             + (" (grey)" if chans == 1 else " (RGB)" if chans == 3 else "") + "; "
             + (f"the normalisation (mean {_stats(config['mean'])}, std {_stats(config['std'])}) is "
                "inside the model" if config["mean"] else "no normalisation") + ". Output: logits.", "",
             "## How it was trained", "",
             f"With refilled {config['refilled_version']} (REFILLED and its baselines), method "
             f"`{train['method']}`" + (f" (arm '{train['arm']}')" if train.get("arm") else "")
             + f", protocol `{train['protocol']}`, seed {train['seed']}."]
    if t is not None:
        shared = {"same": "the same classes as the student",
                  "disjoint": "none of the student's classes (cross-task)",
                  "overlapping": f"{t['shared_classes']} of the student's classes"}.get(
                      t["label_spaces"], "classes of unknown relation to the student's")
        kind = "untrained: the random-teacher control" if t["init"] == "random" else "trained"
        lines.append(f"Teacher: `{t['arch']}` ({kind}), "
                     f"which knows {shared}; test accuracy on its own classes {_pct(t['test_accuracy'])}%; "
                     f"weights sha256 `{t['weights_digest']}`. The teacher is not part of this export.")
    else:
        lines.append("No teacher: the student was trained alone.")
    if train["stages"]:
        lines.append("Stages: " + "; ".join(f"{s['stage']} {s['epochs']} epochs ({s['steps']} steps)"
                                            for s in train["stages"]) + ".")
    if train["settings"]:
        lines += ["", "Settings that differ from refilled's defaults (all of them: `config.json`, "
                  "`training.config`):", "", "```yaml",
                  yaml.safe_dump(train["settings"], sort_keys=False).rstrip(), "```"]
    lines += ["", "## Results", "",
              "Accuracy (%) of this model, measured by refilled after training: the test split "
              "read once, the last epoch's model (nothing selected on it).", "",
              "| split | accuracy (%) |", "|---|---|",
              f"| test | {_pct(figs.get('test_accuracy'))} |",
              f"| validation (carved from training) | {_pct(figs.get('val_accuracy'))} |"]
    if figs.get("stage1_ncm_accuracy") is not None:
        lines.append("| stage-1 NCM on the embedding: test / validation | "
                     f"{_pct(figs.get('stage1_ncm_accuracy'))} "
                     f"/ {_pct(figs.get('stage1_ncm_val_accuracy'))} |")
    if figs.get("fewshot_eval") == "episodes":
        lines += ["", "The test figure is the mean over few-shot episodes of a nearest-class-mean "
                  "classifier on the embedding, not of this classifier."]
    if controls:
        lines += ["", "### Controls run beside it", "",
                  "Same data, protocol and seed, in the same output folder:", "",
                  "| arm | method | teacher | test (%) | validation (%) |", "|---|---|---|---|---|",
                  f"| **{_arm(results)} (this model)** | {results.get('method')} | "
                  f"{results.get('teacher_init') or '—'} | {_pct(results.get('test_accuracy'))} | "
                  f"{_pct(results.get('val_accuracy'))} |"]
        for r in controls:
            lines.append(f"| {_arm(r)} | {r.get('method')} | {r.get('teacher_init') or '—'} | "
                         f"{_pct(r.get('test_accuracy'))} | {_pct(r.get('val_accuracy'))} |")
    lines += ["", "## How to use", "", "```python", "import refilled",
              'model = refilled.load_student("path/to/this/folder")  # nn.Module, eval mode',
              f"probs = model(images).softmax(1)  # images: float N x {chans} x {size} x {size} in [0, 1]",
              "```", "", "`model.classes` names the columns. From the command line: "
              "`refilled predict path/to/this/folder IMAGES... --out predictions.csv` (images are "
              "resized as in training)."]
    if config.get("onnx"):
        p = config["onnx"]["parity"]
        lines += ["", "Without refilled or PyTorch (`model.onnx`, batch size free):", "", "```python",
                  "import onnxruntime", 'session = onnxruntime.InferenceSession("model.onnx")',
                  'logits = session.run(None, {"images": images})[0]  '
                  f"# images: float32 numpy, N x {chans} x {size} x {size} in [0, 1]",
                  "```", "", f"Checked against PyTorch on {p['images']} images: largest logit "
                  f"difference {p['max_abs_logit_diff']:.2g}, top-1 agreement "
                  f"{100 * p['top1_agreement']:.1f}%."]
    if config.get("arch_file"):
        lines += ["", f"The architecture is the user's code `{config['arch']}`; the file travels "
                  f"with the weights (`{config['arch_file']}`, which `load_student` uses)."]
    elif is_import_path(config["arch"]):
        lines += ["", f"The architecture is the user's code `{config['arch']}`: it must be importable "
                  "to rebuild the model."]
    lines += ["", "## Intended use and limits", "",
              "A research artefact: a small classifier for exactly the classes above, from images "
              "like those it was trained on (same kind, size and channels; other images are resized "
              "to "
              f"{size} x {size}). It always answers with one of its {config['num_classes']} classes, "
              "also for images of none of them. Its figures come from one run on one split; with "
              "few training images, expect them to vary by several points from seed to seed. It is "
              "not meant for decisions about people or for safety-critical use.", "",
              "## Citation", "", "REFILLED:", "", "```bibtex",
              "@article{ye2022generalized,",
              "  title   = {Generalized Knowledge Distillation via Relationship Matching},",
              "  author  = {Ye, Han-Jia and Lu, Su and Zhan, De-Chuan},",
              "  journal = {IEEE Transactions on Pattern Analysis and Machine Intelligence},",
              "  year    = {2022}",
              "}",
              "@inproceedings{ye2020distilling,",
              "  title     = {Distilling Cross-Task Knowledge via Relationship Matching},",
              "  author    = {Ye, Han-Jia and Lu, Su and Zhan, De-Chuan},",
              "  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},",
              "  year      = {2020}",
              "}", "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ export


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' is a file; give a new or empty folder for the export")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output folder '{out}' already holds files; give a new or empty folder "
                        "(or delete that one)")


def _copy_arch_file(arch: str, run_dir: Path, tmp: Path) -> str | None:
    """A ``file.py:factory`` architecture travels with the export: the file is copied beside
    the weights (:func:`load_student` uses the copy). Returns its name, or None."""
    if not is_import_path(arch) or not arch.rpartition(":")[0].endswith(".py"):
        return None
    found = _resolve_arch(arch, (Path.cwd(), *run_dir.resolve().parents))
    source = Path(found.rpartition(":")[0]).expanduser()
    if not source.is_file():
        return None
    shutil.copy2(source, tmp / source.name)
    return source.name


def export_run(run_dir: str | Path, out: str | Path, *, onnx: bool = False,
               parity_images: int = 512) -> dict:
    """Export the student of the finished run in ``run_dir`` to the folder ``out`` (new or
    empty): ``model.safetensors``, ``config.json``, ``README.md`` and, with ``onnx``,
    ``model.onnx`` checked against PyTorch on ``parity_images`` validation images. Returns what
    ``config.json`` holds. Nothing is left behind when it fails."""
    run_dir, out = Path(run_dir), Path(out)
    safetensors_module()
    if onnx:
        _onnx_packages()
    results, tree, cfg = _read_run(run_dir)
    meta, state = _student_of_run(run_dir)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the export is an ordinary one
        copy = _copy_arch_file(meta["arch"], run_dir, tmp)
        if copy is not None:
            meta = {**meta, "arch_file": copy}
        student = build_student(meta, state, str(run_dir), folders=(tmp,),
                                digest=meta.get("weights_digest"))
        state = ordered(state, student.model)  # every key: the load above was strict
        head_module = meta.get("head_module")
        if head_module is None:
            found = last_linear(student.model)
            head_module = "head" if student.through_features else (found[0] if found else None)
        config = _describe(run_dir, results, tree, meta, state, head_module)
        write_weights(tmp / WEIGHTS_FILE, state, metadata={"refilled_format": EXPORT_FORMAT})
        if onnx:
            images, where = _parity_images(cfg, meta, parity_images)
            example = torch.rand(2, *images.shape[1:], generator=torch.Generator().manual_seed(0))
            info = write_onnx(student, tmp / ONNX_FILE, example,
                              {"refilled.format": EXPORT_FORMAT,
                               "refilled.version": config["refilled_version"],
                               "refilled.classes": config["class_names"],
                               "refilled.input_size": config["input_size"],
                               "refilled.eval_resize": config["eval_resize"],
                               "refilled.in_chans": config["in_chans"],
                               "refilled.mean": config["mean"], "refilled.std": config["std"]})
            parity = onnx_parity(student, tmp / ONNX_FILE, images)
            parity["on"] = where
            if not parity["passed"]:
                raise UserError(
                    f"ONNX export refused: ONNX Runtime's logits differ from PyTorch's on {where} "
                    f"(max abs difference {parity['max_abs_logit_diff']:.3g} > "
                    f"{parity['tolerance']:.3g}, or top-1 agreement {100 * parity['top1_agreement']:.2f}% "
                    "beyond near-ties); export without --onnx")
            config["onnx"] = {**info, "parity": parity}
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2, default=str) + "\n")
        atomic_write_text(tmp / CARD_FILE, _card(config, results, _controls(run_dir, results, tree)))
        _check_out(out)  # again: nothing appeared there meanwhile
        os.replace(tmp, out)  # an empty folder is replaced; never a filled one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


# ------------------------------------------------------------------ predict


def _image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files of the inputs: files as given, folders searched recursively (hidden entries
    skipped), in sorted order, each file once."""
    from refilled.data.datasets import IMAGE_EXTENSIONS

    paths, seen = [], set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts)
                           and f.is_file())
        elif p.is_file():
            found = [p]
        else:
            raise UserError(f"input '{p}' does not exist; give image files or folders of images")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(f)
    return paths


class _OnnxModel:
    """A ``model.onnx`` of ``refilled export`` run by ONNX Runtime (metadata from the graph)."""

    def __init__(self, path: Path):
        ort = require("onnxruntime", "onnxruntime", "predicting with an ONNX model")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001
            first = " ".join(str(err).split())[:200]
            raise UserError(f"'{path}' cannot be loaded by ONNX Runtime ({first}); give the "
                            "model.onnx that `refilled export --onnx` wrote") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if "refilled.classes" not in props:
            raise UserError(f"'{path}' was not written by `refilled export` (no class names in its "
                            "metadata); give an export folder or a refilled model.onnx")
        self.classes = [str(c) for c in json.loads(props["refilled.classes"])]
        self.input_size = int(json.loads(props["refilled.input_size"]))
        self.in_chans = int(json.loads(props["refilled.in_chans"]))
        self.eval_resize = props.get("refilled.eval_resize", "square")  # strings are stored as they are
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.name: x.numpy()})[0])


def _model_for(path: str | Path):
    path = Path(path)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise UserError(f"ONNX model '{path}' does not exist; check the path")
        return _OnnxModel(path)
    student = load_student(path)

    @torch.no_grad()
    def run(x):
        return student(x)

    run.classes, run.input_size, run.in_chans = student.classes, student.input_size, student.in_chans
    run.eval_resize = student.eval_resize
    return run


def predict_images(model: str | Path, inputs: Sequence[str | Path], *, top_k: int = 5,
                   batch_size: int = 256, out: str | Path | None = None,
                   progress: bool = True) -> dict:
    """Classify the image files in ``inputs`` (files, or folders searched recursively) with
    ``model`` (an export folder, a run directory or a refilled ``model.onnx``).

    Images are read as the run's evaluation read its images: converted to grey or RGB (the
    model's channels), resized to its input size (bilinear; or, for a run that streamed large
    images from disk, the shorter side resized and the centre cropped), scaled to [0, 1]. A file that
    cannot be read is skipped with one line on stderr. Returns ``{"rows": [...], "skipped":
    [...], "accuracy": ..., "labelled": n}``; rows hold the file and the ``top_k`` classes with
    their probabilities; ``accuracy`` is the top-1 accuracy over the images whose folder is
    named after one of the classes (None if none is). With ``out``, the rows are written there
    as CSV.
    """
    from tqdm.auto import tqdm

    from refilled.data.folders import read_eval_image  # the run's evaluation reader of image files

    if top_k < 1 or batch_size < 1:
        raise UserError(f"--top-k and --batch-size must be at least 1 (got {top_k} and {batch_size})")
    net = _model_for(model)
    if net.in_chans not in (1, 3):
        raise UserError(f"predict reads grey (1 channel) or RGB (3 channel) images, but this model "
                        f"takes {net.in_chans} channels; feed it tensors from Python instead")
    if net.input_size < 1:
        raise UserError("the model does not record its input size; export the run again")
    paths = _image_paths(inputs)
    if not paths:
        raise UserError(f"no image files in {', '.join(str(i) for i in inputs)} (looked for "
                        "png, jpg, jpeg, bmp, gif, ppm, pgm, tif, tiff, webp)")
    k = min(top_k, len(net.classes))
    rows, skipped, correct, labelled = [], [], 0, 0
    index = {name: i for i, name in enumerate(net.classes)}
    bar = tqdm(total=len(paths), desc="predicting", unit="image", file=sys.stderr,
               disable=not progress or len(paths) <= batch_size, dynamic_ncols=True)
    for start in range(0, len(paths), batch_size):
        batch, arrays = [], []
        for p in paths[start:start + batch_size]:
            try:
                arrays.append(read_eval_image(p, net.input_size, grayscale=net.in_chans == 1,
                                              resize=net.eval_resize))
                batch.append(p)
            except OSError as err:
                skipped.append(str(p))
                tqdm.write(f"refilled: skipped: {err}", file=sys.stderr)
        bar.update(len(paths[start:start + batch_size]))
        if not batch:
            continue
        images = torch.stack(arrays)
        logits = net(images.float().div_(255.0))
        probs, top = logits.float().softmax(dim=1).topk(k, dim=1)
        for p, pr, idx in zip(batch, probs.tolist(), top.tolist()):
            row = {"file": str(p)}
            for j in range(k):
                row[f"class_{j + 1}"] = net.classes[idx[j]]
                row[f"prob_{j + 1}"] = f"{pr[j]:.6f}"
            rows.append(row)
            label = index.get(p.parent.name)
            if label is not None:
                labelled += 1
                correct += int(idx[0] == label)
    bar.close()
    if not rows:
        raise UserError(f"none of the {len(paths)} input files could be read as an image")
    if out is not None:
        from refilled.files import write_csv

        write_csv(Path(out), rows)
    return {"rows": rows, "skipped": skipped, "labelled": labelled,
            "accuracy": correct / labelled if labelled else None, "classes": net.classes}
