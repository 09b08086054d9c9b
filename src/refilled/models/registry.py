"""Model registry, the `create_model` factory and the base class of the classifier contract.

Every model in the zoo is a `ClassifierModel`:

* ``forward_features(x) -> (B, num_features)``: the embedding (globally pooled last feature map);
* ``forward_maps(x) -> list of (B, C, H, W)``: the outputs of the network's stages in order, the
  last being the map that ``forward_features`` pools (for feature-map distillation: AT, FitNet, SP);
* ``forward_head(z) -> (B, num_classes)``: a single ``nn.Linear`` held in ``self.head``;
* ``forward(x) = forward_head(forward_features(x))``;
* ``reset_classifier(num_classes)`` swaps in a fresh head.

Models are registered by name with `register_model`; parametric families (``wrn_{d}_{k}``,
``resnet{6n+2}``) additionally register a name pattern with `register_pattern`, so that any
member of the family can be built by name without being listed.
"""

from __future__ import annotations

import inspect
import re
from typing import Callable

import torch.nn as nn

from refilled.errors import ConfigError

# name -> builder(num_classes, in_chans, **kwargs)
_MODELS: dict[str, Callable[..., nn.Module]] = {}
# (compiled regex, human-readable form, builder(*groups as ints, num_classes, in_chans, **kwargs))
_PATTERNS: list[tuple[re.Pattern[str], str, Callable[..., nn.Module]]] = []

# Arguments every builder takes; they are not model-specific kwargs.
_COMMON_ARGS = ("num_classes", "in_chans")


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs, BN weight 1 / bias 0, Linear bias 0 (Linear weight keeps torch's default)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SequentialStages(nn.Module):
    """For models whose trunk is one ``nn.Sequential`` (``self.features``) ending in the map
    that is pooled: ``self._stage_ends`` lists, as 1-based layer counts, where stages end."""

    features: nn.Sequential
    _stage_ends: list[int]

    def forward_features(self, x):
        return self.features(x).mean(dim=(2, 3))

    def forward_maps(self, x):
        """Each stage's (B, C, H, W) output, in order; the last is the map that is pooled."""
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i + 1 in self._stage_ends:
                maps.append(x)
        return maps


def check_positive_int(name: str, value: object) -> int:
    """Validate a size-like argument (num_classes, in_chans, ...) and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


class ClassifierModel(nn.Module):
    """Base class: subclasses build their trunk, set ``num_features``, then call `_init_head`."""

    num_features: int
    num_classes: int
    default_input_size: int

    def _init_head(self, num_classes: int) -> None:
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_maps(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, z):
        return self.head(z)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised Linear(num_features, num_classes)."""
        check_positive_int("num_classes", num_classes)
        ref = self.head.weight  # new head lives on the model's device / dtype
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        init_weights(self.head)
        self.num_classes = num_classes


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn(num_classes, in_chans, **kwargs)`` under ``fn.__name__``."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def register_pattern(pattern: str, display: str) -> Callable:
    """Decorator: models whose name fully matches ``pattern`` are built by the decorated function.

    The regex groups are converted to ints and passed positionally before ``num_classes`` and
    ``in_chans``. ``display`` (e.g. ``"wrn_{depth}_{widen}"``) is shown in error messages.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _PATTERNS.append((re.compile(pattern), display, fn))
        return fn

    return deco


def list_models() -> list[str]:
    """Sorted names of the registered models (pattern families are not enumerated)."""
    return sorted(_MODELS)


def _available() -> str:
    families = ", ".join(display for _, display, _ in _PATTERNS)
    return f"available: {', '.join(list_models())}" + (f" (and any {families})" if families else "")


def _check_kwargs(name: str, fn: Callable, skip: tuple[str, ...], kwargs: dict) -> None:
    """Raise ConfigError for any kwarg the builder does not take as a model option."""
    params = inspect.signature(fn).parameters
    allowed = [p for p in params if p not in skip and p not in _COMMON_ARGS]
    for key in kwargs:
        if key not in allowed:
            opts = ", ".join(allowed) if allowed else "none"
            raise ConfigError(f"model {name!r} got an unknown argument {key!r} (accepted: {opts})")


def is_registered(name: str) -> bool:
    """Whether ``name`` is a zoo model (listed, or a member of a registered family)."""
    return name in _MODELS or any(regex.fullmatch(name) for regex, _, _ in _PATTERNS)


def check_name(name: str) -> None:
    """ConfigError naming the zoo's models when ``name`` is none of them."""
    if not is_registered(name):
        raise ConfigError(f"unknown model {name!r}; {_available()}")


def create_model(name: str, num_classes: int, in_chans: int = 3, input_size: int | None = None,
                 **kwargs) -> nn.Module:
    """Build the model called ``name``; raises ConfigError for unknown names or kwargs.

    ``input_size`` (the side of the square input images) is passed to models that need it
    (``mlp``) unless ``kwargs`` set it; the others ignore it.
    """
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_chans", in_chans)
    if name in _MODELS:
        fn = _MODELS[name]
        _check_kwargs(name, fn, (), kwargs)
        if input_size is not None and "input_size" not in kwargs and (
                "input_size" in inspect.signature(fn).parameters):
            kwargs["input_size"] = input_size
        return fn(num_classes=num_classes, in_chans=in_chans, **kwargs)
    for regex, _, fn in _PATTERNS:
        match = regex.fullmatch(name)
        if match:
            # the first len(groups) parameters of the builder are filled from the name
            group_params = tuple(inspect.signature(fn).parameters)[: len(match.groups())]
            _check_kwargs(name, fn, group_params, kwargs)
            ints = (int(g) for g in match.groups())
            return fn(*ints, num_classes=num_classes, in_chans=in_chans, **kwargs)
    raise ConfigError(f"unknown model {name!r}; {_available()}")
