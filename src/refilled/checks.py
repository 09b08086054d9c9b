"""Argument checks of the pure functions (losses, mining, NCM).

Each failure is one :class:`~refilled.errors.RefilledError` line (a ``ValueError``) naming the
function and the argument. Shape, dtype and device checks read only a tensor's metadata. Value
checks (a label range) read the tensor, which on an accelerator waits for it: they are skipped
while ``torch.compile`` traces, and refilled's training loop calls the functions' unchecked
inner forms, so that no check adds a host sync to a training step.
"""

from __future__ import annotations

import math
import numbers
from typing import NoReturn

import torch

from refilled.errors import RefilledError


def fail(fn: str, message: str) -> NoReturn:
    raise RefilledError(f"{fn}: {message}")


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


def is_tensor(fn: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(fn, f"{name} must be a tensor, got {type(t).__name__}")
    return t


def features(fn: str, name: str, t, rows: int | None = None, width: int | None = None,
             what: str = "(batch, features)") -> torch.Tensor:
    """A 2-D floating-point tensor, with ``rows`` rows and ``width`` columns when given."""
    is_tensor(fn, name, t)
    if t.dim() != 2:
        fail(fn, f"{name} must be 2-D {what}, got shape {_shape(t)}")
    if not t.is_floating_point():
        fail(fn, f"{name} must be floating point, got {t.dtype}")
    if rows is not None and t.shape[0] != rows:
        fail(fn, f"{name} has {t.shape[0]} rows, but the batch has {rows}")
    if width is not None and t.shape[1] != width:
        fail(fn, f"{name} has {t.shape[1]} columns, expected {width}")
    return t


def labels(fn: str, t, rows: int, num_classes: int | None = None, name: str = "labels") -> torch.Tensor:
    """A 1-D integer tensor of ``rows`` class indices (in 0..num_classes-1 when given)."""
    is_tensor(fn, name, t)
    if t.dim() != 1:
        hint = " (one-hot? pass labels.argmax(1))" if t.dim() == 2 and t.shape[1] > 1 else ""
        fail(fn, f"{name} must be 1-D, one class index per row, got shape {_shape(t)}{hint}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        fail(fn, f"{name} must be integer class indices, got {t.dtype} (e.g. labels.long())")
    if t.shape[0] != rows:
        fail(fn, f"{name} has {t.shape[0]} entries for {rows} rows")
    if values_checked() and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0:
            fail(fn, f"{name} must be class indices >= 0, got {lo}")
        if num_classes is not None and hi >= num_classes:
            fail(fn, f"{name} go up to {hi}, but there are {num_classes} classes (0..{num_classes - 1})")
    return t


def weights(fn: str, t, rows: int, name: str = "weights") -> torch.Tensor | None:
    """None or a 1-D floating-point tensor of one weight per row."""
    if t is None:
        return None
    is_tensor(fn, name, t)
    if t.dim() != 1 or t.shape[0] != rows or not t.is_floating_point():
        fail(fn, f"{name} must be a 1-D float tensor of one weight per row ({rows}), got shape "
                 f"{_shape(t)} and dtype {t.dtype}")
    return t


def same_device(fn: str, **tensors) -> None:
    present = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        fail(fn, f"the tensors are on different devices ({where}); move them to one device")


def count(fn: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        fail(fn, f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def number(fn: str, name: str, value, *, positive: bool = False, below: float | None = None) -> float:
    """A finite real number >= 0 (> 0 with ``positive``; < ``below`` when given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        fail(fn, f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        fail(fn, f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    if below is not None and value >= below:
        fail(fn, f"{name} must be below {below}, got {value}")
    return float(value)


def values_checked() -> bool:
    """Whether value checks run here (not while torch.compile traces)."""
    return not torch.compiler.is_compiling()
