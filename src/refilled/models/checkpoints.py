"""refilled's model files (``model.pt``): a network that describes itself.

A model file holds the architecture (zoo name, import path or ``timm:`` name) and its keyword
arguments, the number of classes and their names, the input channels and size, the input
statistics, where the embedding and the classifier are, and the weights: enough to rebuild the
network without the config that trained it. It holds tensors and plain data only and is read
with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from refilled.errors import UserError
from refilled.files import atomic_torch_save, safe_load
from refilled.models.external import build_module
from refilled.networks import Network

MODEL_KEYS = ("arch", "state_dict", "num_classes", "in_chans")


def _stat(t):
    return None if t is None else [float(v) for v in t.flatten()]


def save_model(path: Path, network: Network, *, arch: str, kwargs: dict, num_classes: int,
               in_chans: int, input_size: int, class_names: Sequence[str] | None = None,
               embedding: str | None = None, head: str | None = None, extra: dict | None = None) -> None:
    """Write ``network``'s module and what rebuilds it to ``path`` (atomically)."""
    atomic_torch_save(
        {"arch": arch, "kwargs": dict(kwargs), "num_classes": num_classes,
         "in_chans": in_chans, "input_size": input_size,
         "class_names": None if class_names is None else [str(c) for c in class_names],
         "num_features": network.num_features, "embedding": embedding,
         "head": head, "mean": _stat(network.mean), "std": _stat(network.std),
         "state_dict": network.module_state_dict(), **(extra or {})},
        path,
    )


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


def network_from_model_file(ckpt: dict, path: Path, *, role: str, embedding=None, head=None,
                            mean=None, std=None, maps=None, default_stats=None) -> Network:
    """The network a model file describes, its weights loaded; ``embedding``/``head``/``mean``/
    ``std`` given here take precedence over the file's (then ``default_stats``)."""
    module = build_module(ckpt["arch"], ckpt["num_classes"], ckpt["in_chans"],
                          input_size=ckpt.get("input_size"), kwargs=ckpt.get("kwargs", {}), role=role)
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
