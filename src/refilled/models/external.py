"""Models that are not in refilled's zoo: import paths, timm, and plain state_dict files.

``arch`` in a config is one of

* a zoo name (``wrn_16_2``, ``cnn_small``, ...): :func:`refilled.models.create_model`;
* ``package.module:factory`` or ``path/to/file.py:factory`` — any callable returning an
  ``nn.Module`` (a class or a function); a dotted module is also looked for in the current
  folder; the factory is called with ``num_classes=`` when it accepts that argument, plus the
  config's ``kwargs``;
* ``timm:NAME`` — ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)``
  where timm is installed (it needs torchvision, a large install).

Weights come as a plain state_dict file (what ``torch.save(model.state_dict(), path)`` writes,
or a ``.safetensors`` file where that package is installed), read with ``weights_only=True``
and loaded strictly: missing, unexpected or mis-shaped keys are one error that names them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from refilled.errors import ConfigError
from refilled.files import safe_load
from refilled.models.registry import create_model

__all__ = ["build_module", "is_import_path", "load_weights", "read_state_dict"]


def is_import_path(arch: str) -> bool:
    return ":" in arch


def _import_module(module_name: str, arch: str, role: str):
    """The module of an import path: a dotted module name (the current folder is also searched)
    or a ``.py`` file path."""
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            spec = importlib.util.spec_from_file_location(f"refilled_user_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                raise
            sys.path.insert(0, os.getcwd())  # `refilled` as a console script does not search it
            return importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's path
        raise ConfigError(f"{role}.arch '{arch}': cannot import '{module_name}' "
                          f"({type(err).__name__}: {err}); check the path and that it is installed, "
                          "on PYTHONPATH or in the current folder") from None


def _import_factory(arch: str, role: str):
    module_name, _, attr = arch.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"{role}.arch '{arch}' is not of the form package.module:factory "
                          "(or path/to/file.py:factory)")
    factory = _import_module(module_name, arch, role)
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ConfigError(f"{role}.arch '{arch}': '{module_name}' has no attribute '{attr}'")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"{role}.arch '{arch}': '{attr}' is not callable")
    return factory


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _timm(arch: str, role: str):
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{role}.arch '{arch}' needs timm, which is not installed "
                          "(`pip install timm`; it pulls torchvision)") from None
    return timm


def check_arch(arch: str, role: str) -> None:
    """That ``arch`` names something buildable, without building it: a zoo name, an importable
    factory, or a timm model where timm is installed (``refilled config`` and every run check
    this before any data is read)."""
    from refilled.models.registry import check_name

    if arch.startswith("timm:"):
        timm = _timm(arch, role)
        name = arch.removeprefix("timm:")
        if not timm.list_models(name) and not timm.is_model(name):
            raise ConfigError(f"{role}.arch '{arch}': timm has no model '{name}'")
    elif is_import_path(arch):
        _import_factory(arch, role)
    else:
        try:
            check_name(arch)
        except ConfigError as err:
            raise ConfigError(f"{role}.arch: {err}") from None


def build_module(arch: str, num_classes: int, in_chans: int, *, input_size: int | None = None,
                 kwargs: Mapping | None = None, role: str = "student") -> nn.Module:
    """The ``nn.Module`` that ``arch`` names (zoo, import path or ``timm:``), freshly initialised."""
    kwargs = dict(kwargs or {})
    if arch.startswith("timm:"):
        timm = _timm(arch, role)
        name = arch.removeprefix("timm:")
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes,
                                     in_chans=in_chans, **kwargs)
        except Exception as err:  # noqa: BLE001 - timm reports unknown names and bad kwargs
            raise ConfigError(f"{role}.arch '{arch}': timm cannot build it ({type(err).__name__}: "
                              f"{err})") from None
    if is_import_path(arch):
        factory = _import_factory(arch, role)
        call = dict(kwargs)
        if "num_classes" not in call and _accepts(factory, "num_classes"):
            call["num_classes"] = num_classes
        try:
            module = factory(**call)
        except Exception as err:  # noqa: BLE001 - the user's factory failed on these arguments
            raise ConfigError(f"{role}.arch '{arch}' failed when called with {call} "
                              f"({type(err).__name__}: {err}); check {role}.kwargs") from None
        if not isinstance(module, nn.Module):
            raise ConfigError(f"{role}.arch '{arch}' returned a {type(module).__name__}, not a "
                              "torch.nn.Module")
        return module
    try:
        return create_model(arch, num_classes, in_chans, input_size=input_size, **kwargs)
    except ConfigError as err:
        raise ConfigError(f"{role}.arch / {role}.kwargs: {err}") from None


def read_state_dict(path: str | Path, role: str = "teacher") -> dict[str, torch.Tensor]:
    """A state dict from a plain ``torch.save(model.state_dict())`` file or a ``.safetensors``
    file; also accepted: a dict holding one under ``state_dict`` (e.g. refilled's model.pt), and
    keys prefixed ``module.`` (saved from DistributedDataParallel)."""
    path = Path(path)
    what = f"{role}.weights file"
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"{what} '{path}' is a safetensors file, but the safetensors "
                              "package is not installed (`pip install safetensors`)") from None
        try:
            state = load_file(str(path))
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"{what} '{path}' cannot be read ({type(err).__name__}: {err})") from None
    else:
        state = safe_load(path, what=what)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"{what} '{path}' does not hold a state dict (a mapping of parameter "
                          "names to tensors, as torch.save(model.state_dict(), path) writes)")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_weights(module: nn.Module, path: str | Path, role: str = "teacher", arch: str = "") -> None:
    """Load a state dict file into ``module`` strictly; one error names what does not fit."""
    state = read_state_dict(path, role)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} in the model"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            parts.append(f"other shapes: {_few(shapes, 2)}")
        built = f" ({arch})" if arch else ""
        raise ConfigError(f"{role}.weights '{path}' does not fit the {role}{built}: "
                          + "; ".join(parts) + f"; check {role}.arch / {role}.kwargs")
    module.load_state_dict(state)
