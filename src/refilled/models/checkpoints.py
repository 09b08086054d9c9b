"""refilled's model files (``model.pt``): a network that describes itself.

A model file holds the architecture (zoo name, import path or ``timm:`` name) and its keyword
arguments, the number of classes and their names, the input channels and size, the input
statistics, where the embedding and the classifier are, and the weights: enough to rebuild the
network without the config that trained it. It holds tensors and plain data only and is read
with ``weights_only=True``.

Beside it, the same network in two files that need no unpickling at all: ``model.safetensors``
(the module's state dict, nothing else) and ``model.json`` (everything else in ``model.pt``, plus
the classifier's resolved location and the digest of the weights); :func:`refilled.load_student`
reads those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch.nn as nn

from refilled.errors import UserError
from refilled.files import atomic_torch_save, atomic_write_bytes, atomic_write_text, safe_load, tensors_digest
from refilled.models.external import build_module
from refilled.networks import Network, last_linear

MODEL_KEYS = ("arch", "state_dict", "num_classes", "in_chans")
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
META_FORMAT = "refilled-model/1"


def _stat(t):
    return None if t is None else [float(v) for v in t.flatten()]


def safetensors_module():
    """``safetensors.torch``, or one line saying how to install it."""
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("this needs the 'safetensors' package, which is not installed: "
                        "pip install safetensors (or pip install 'refilled[export]')") from None
    return safetensors.torch


def write_weights(path: Path, state_dict: Mapping, metadata: Mapping[str, str] | None = None) -> None:
    """A state dict as a safetensors file, atomically. Every tensor is written as its own copy
    (safetensors refuses tensors that share memory, e.g. tied weights)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    data = safetensors_module().save(tensors, metadata={"format": "pt", **(metadata or {})})
    atomic_write_bytes(path, data)


def read_weights(path: Path, what: str = "weights file") -> dict:
    """The tensors of a safetensors file (read without unpickling), or one line naming it."""
    st = safetensors_module()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {what} '{path}' ({err.strerror or err}); check the path") from None
    try:
        return st.load(data)
    except Exception as err:  # noqa: BLE001 - truncated, corrupt, not safetensors: one line
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
        raise UserError(f"{what} '{path}' is not a readable safetensors file ({reason}); "
                        "export or save the model again") from None


def save_model(path: Path, network: Network, *, arch: str, kwargs: dict, num_classes: int,
               in_chans: int, input_size: int, class_names: Sequence[str] | None = None,
               embedding: str | None = None, head: str | None = None, extra: dict | None = None) -> None:
    """Write ``network``'s module and what rebuilds it to ``path`` (atomically), and the same
    as ``model.safetensors`` + ``model.json`` beside it (written first: a ``model.pt`` always
    has them). Without the safetensors package only ``model.pt`` is written."""
    meta = {"arch": arch, "kwargs": dict(kwargs), "num_classes": num_classes,
            "in_chans": in_chans, "input_size": input_size,
            "class_names": None if class_names is None else [str(c) for c in class_names],
            "num_features": network.num_features, "embedding": embedding,
            "head": head, "mean": _stat(network.mean), "std": _stat(network.std), **(extra or {})}
    state = network.module_state_dict()
    path = Path(path)
    try:
        safetensors_module()
    except UserError:
        pass  # an environment from before safetensors was a dependency: model.pt alone
    else:
        write_weights(path.with_name(WEIGHTS_FILE), state)
        described = {"format": META_FORMAT, **meta, "head_module": network.head_name,
                     "weights": WEIGHTS_FILE, "weights_digest": tensors_digest(state)}
        atomic_write_text(path.with_name(META_FILE), json.dumps(described, indent=2, default=str) + "\n")
    atomic_torch_save({**meta, "state_dict": state}, path)


def read_model_file(path: str | Path, what: str = "teacher checkpoint", hint: str = "") -> tuple[dict, Path]:
    """The checked contents of a refilled model file (or of the run directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist{hint}")
    ckpt = safe_load(path, what=what)
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in MODEL_KEYS):
        raise UserError(f"'{path}' is not a refilled model checkpoint (no {'/'.join(MODEL_KEYS)} "
                        "inside); for a plain state_dict file use teacher.weights")
    return ckpt, path


def fit_classifier(module: nn.Module, head: str | None, state: Mapping) -> None:
    """Give ``module``'s classifier (``head``, else its last ``nn.Linear``) the shape it has in
    ``state`` when training replaced it (``reset_classifier``): a factory that takes no
    ``num_classes`` builds its own number of outputs."""
    if head is None:
        found = last_linear(module)
        head = found[0] if found is not None else None
    try:
        layer = module.get_submodule(head) if head is not None else None
    except AttributeError:
        return
    weight = state.get(f"{head}.weight")
    if not isinstance(layer, nn.Linear) or weight is None or weight.dim() != 2 or \
            tuple(weight.shape) == tuple(layer.weight.shape):
        return
    new = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=f"{head}.bias" in state)
    parent_name, _, leaf = head.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, leaf, new)


def network_from_model_file(ckpt: dict, path: Path, *, role: str, embedding=None, head=None,
                            mean=None, std=None, maps=None, default_stats=None) -> Network:
    """The network a model file describes, its weights loaded; ``embedding``/``head``/``mean``/
    ``std`` given here take precedence over the file's (then ``default_stats``)."""
    module = build_module(ckpt["arch"], ckpt["num_classes"], ckpt["in_chans"],
                          input_size=ckpt.get("input_size"), kwargs=ckpt.get("kwargs", {}), role=role)
    fit_classifier(module, head if head is not None else ckpt.get("head"), ckpt["state_dict"])
    try:
        module.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise UserError(f"{role} checkpoint '{path}' does not fit {ckpt['arch']}: {first}") from None
    stats = default_stats or (None, None)
    mean = mean if mean is not None else (ckpt.get("mean") or stats[0])
    std = std if std is not None else (ckpt.get("std") or stats[1])
    return Network(module, embedding=embedding if embedding is not None else ckpt.get("embedding"),
                   head=head if head is not None else ckpt.get("head"), mean=mean, std=std,
                   maps=maps, role=role)
