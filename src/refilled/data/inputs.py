"""What a caller passes as data, checked into a :class:`~refilled.data.common.Split` before
anything trains.

Accepted: an ``(images, labels)`` pair of tensors (images uint8 0-255 or float, N x C x H x W
or N x H x W; labels N integers) or a map-style torch ``Dataset`` of ``(image, label)`` items
(images as tensors C x H x W, NumPy arrays H x W x C or PIL images). A Dataset is read into
memory once when its decoded images fit the memory budget and it has no per-item random
transforms (``in_memory="auto"``); otherwise it is streamed, read at every use through worker
processes (:mod:`refilled.data.streaming`); :func:`choose_path` says which and why.
Labels are class indices 0..K-1 with every class present, unless ``num_classes`` allows
empty classes on purpose. Every refusal is one :class:`~refilled.errors.DataError` line
naming the argument, what was found and what is accepted.
"""

from __future__ import annotations

import hashlib
import numbers
import os

import numpy as np
import torch

from refilled.config import say
from refilled.data.common import Split
from refilled.data.streaming import (
    StreamedImages,
    StreamSettings,
    has_random_transforms,
    labels_of,
    read_item,
)
from refilled.errors import DataError

__all__ = ["as_split", "check_data", "memory_budget", "MEMORY_FRACTION"]

MEMORY_FRACTION = 0.25  # of the host's available memory (and of a GPU's free memory) for data


def memory_budget(device=None) -> int:
    """Bytes of decoded images the in-memory path may hold: a quarter of the host's available
    memory, and of the GPU's free memory when the data lives there."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 8 << 30
    budget = MEMORY_FRACTION * available
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        budget = min(budget, MEMORY_FRACTION * torch.cuda.mem_get_info(torch.device(device))[0])
    return int(budget)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"

ACCEPTED = ("an (images, labels) pair of tensors (images N x C x H x W, labels N class indices) "
            "or a torch Dataset of (image, label) items")


def _arg(what: str) -> str:
    """How the caller names the data: ``train=`` from Python, the training split on the CLI."""
    return say(f"the {'training' if what == 'train' else 'validation'} split", f"{what}=")


def _describe(obj) -> str:
    kind = type(obj).__name__
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(type(x).__name__ for x in obj[:4]) + (", ..." if len(obj) > 4 else "")
        return f"a {kind} of {len(obj)} ({inner})"
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:4])
        return f"a dict (keys {keys})"
    return f"a {kind}"


def as_split(data, what: str = "train", *, in_memory="auto", settings: StreamSettings = StreamSettings(),
             device=None) -> Split:
    """``data`` as a Split of checked images and labels (see the module docstring); its
    ``note`` says how it is read."""
    if isinstance(data, Split) and data.streamed:
        return Split(data.images, _label_tensor(data.labels, what), note=data.note)
    if isinstance(data, Split):
        images, labels = data.images, data.labels
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(x, torch.Tensor) for x in data):
        images, labels = data
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(x, np.ndarray) for x in data):
        raise DataError(f"{_arg(what)} is a pair of NumPy arrays; pass torch tensors: "
                        "(torch.from_numpy(images), torch.from_numpy(labels))")
    elif isinstance(data, (tuple, list, dict, str, bytes, torch.Tensor, np.ndarray)) or data is None:
        raise DataError(f"{_arg(what)} must be {ACCEPTED}; got {_describe(data)}")
    elif isinstance(data, torch.utils.data.IterableDataset) or not (
            hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise DataError(f"{_arg(what)} must be {ACCEPTED} (a map-style Dataset, with __len__ and "
                        f"__getitem__); got {_describe(data)}")
    else:
        return _dataset_split(data, what, in_memory, settings, device)
    return _tensor_split(images, labels, what, note=data.note if isinstance(data, Split) else "in memory")


def _tensor_split(images, labels, what: str, note: str = "") -> Split:
    labels = _label_tensor(labels, what)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise DataError(f"{_arg(what)}: the images must be N x C x H x W (or N x H x W), got shape "
                        f"{tuple(images.shape)}")
    if len(labels) != len(images):
        raise DataError(f"{_arg(what)}: {len(images)} images but {len(labels)} labels; give one label "
                        "per image")
    if not len(labels):
        raise DataError(f"{_arg(what)} holds no image")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise DataError(f"{_arg(what)}: the images must be uint8 (0-255) or float, got {images.dtype}")
    if images.is_floating_point():
        bad = ~torch.isfinite(images.reshape(len(images), -1)).all(dim=1)
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise DataError(f"{_arg(what)}: {int(bad.sum())} image(s) hold NaN or infinite values "
                            f"(the first is image {first}); clean them (e.g. torch.nan_to_num) or "
                            "drop them")
    return Split(images, labels, note=note)


def _dataset_split(dataset, what: str, in_memory, settings: StreamSettings, device) -> Split:
    """A Dataset in memory (read once) or streamed (read at every use), chosen by
    :func:`choose_path`."""
    try:
        n = len(dataset)
    except Exception as err:  # noqa: BLE001 - the user's Dataset cannot say its size
        raise DataError(f"{_arg(what)}: the Dataset's len() fails ({type(err).__name__}: {err})") from None
    if n == 0:
        raise DataError(f"{_arg(what)} is an empty Dataset")
    stream, why = choose_path(dataset, what, in_memory, device)
    if not stream:
        images, labels = _read_dataset(dataset, what)
        return _tensor_split(images, labels, what, note=f"in memory: {why}")
    first, _ = read_item(dataset, 0, seed=0)
    labels, how = labels_of(dataset, _arg(what))
    labels = _label_tensor(labels, what)
    if len(labels) != n:
        raise DataError(f"{_arg(what)}: {n} items but {len(labels)} labels")
    fingerprint = hashlib.sha256(f"{type(dataset).__module__}.{type(dataset).__qualname__}|{n}".encode())
    fingerprint.update(labels.numpy().tobytes())
    for i in sorted({0, n - 1}):
        fingerprint.update(read_item(dataset, i, seed=0)[0].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    images = StreamedImages(dataset, item_shape=first.shape, dtype=first.dtype, settings=settings,
                            fingerprint=fingerprint.hexdigest(), what=_arg(what))
    workers = settings.resolved_workers()
    return Split(images, labels, note=f"streamed: {why}; {workers} worker process"
                                      f"{'es' if workers != 1 else ''}; labels from {how}")


def _first_item(dataset, what: str) -> torch.Tensor:
    """Item 0's image, checked as every item of an in-memory read is (one line otherwise)."""
    try:
        item = dataset[0]
    except Exception as err:  # noqa: BLE001 - the user's Dataset failed on its first item
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{_arg(what)}: the Dataset fails on item 0 ({type(err).__name__}: "
                        f"{first_line})") from None
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        got = f"{len(item)} entries" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
        raise DataError(f"{_arg(what)}: a Dataset must give (image, label) pairs; item 0 is {got}")
    _item_label(item[1], 0, what)
    return _item_image(item[0], 0, what)


def choose_path(dataset, what: str, in_memory="auto", device=None) -> tuple[bool, str]:
    """(stream?, why): ``in_memory=True`` / ``False`` as asked; ``"auto"`` keeps a Dataset in
    memory when its decoded images fit :func:`memory_budget` and reading an item twice gives
    the same image (no per-item random transforms), and streams it otherwise."""
    if in_memory not in ("auto", True, False):
        raise DataError(f"{say('data.in_memory', 'in_memory=')} must be 'auto', true or false, got "
                        f"{in_memory!r}")
    first = _first_item(dataset, what)
    try:
        random_items = has_random_transforms(dataset)
    except Exception as err:  # noqa: BLE001 - the user's Dataset failed on one of its first items
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{_arg(what)}: the Dataset fails on one of its first items "
                        f"({type(err).__name__}: {first_line})") from None
    if in_memory is False:
        return True, "asked for (in_memory false)"
    if in_memory is True:
        why = "asked for (in_memory true)"
        if random_items:
            why += "; its per-item random transforms run once, when it is read"
        return False, why
    if random_items:
        return True, "the Dataset has per-item random transforms, applied at every read"
    size = len(dataset) * first.numel() * first.element_size()
    budget = memory_budget(device)
    if size > budget:
        return True, f"its decoded images ({_size(size)}) exceed the memory budget ({_size(budget)})"
    return False, f"{_size(size)} of decoded images, within the memory budget ({_size(budget)})"


def _label_tensor(labels, what: str) -> torch.Tensor:
    """N integer labels >= 0 as int64; one line for anything else (float, one-hot, bool)."""
    labels = torch.as_tensor(labels)
    if labels.dim() == 2 and labels.shape[1] > 1:
        raise DataError(f"{_arg(what)}: the labels are {labels.shape[0]} x {labels.shape[1]} (one-hot "
                        "or scores?); pass one class index per image, e.g. labels.argmax(1)")
    if labels.dim() != 1:
        raise DataError(f"{_arg(what)}: the labels must be N class indices (a 1-D tensor), got shape "
                        f"{tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise DataError(f"{_arg(what)}: the labels must be integer class indices, got {labels.dtype}; "
                        "convert them, e.g. labels.long() if they hold whole numbers")
    if len(labels) and int(labels.min()) < 0:
        raise DataError(f"{_arg(what)}: the labels must be class indices >= 0, got {int(labels.min())}")
    return labels.long()


def _item_label(y, i: int, what: str) -> int:
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not (y.is_floating_point() or y.dtype == torch.bool):
        return int(y)
    if isinstance(y, np.ndarray) and y.size == 1 and np.issubdtype(y.dtype, np.integer):
        return int(y)
    if isinstance(y, numbers.Integral) and not isinstance(y, bool):
        return int(y)
    if isinstance(y, str):
        raise DataError(f"{_arg(what)}: item {i}'s label is the string {y!r}; labels must be class "
                        "indices 0..K-1: map the names to indices (e.g. with a dict built from "
                        "sorted(set(names)))")
    shape = tuple(y.shape) if hasattr(y, "shape") else None
    if shape and len(shape) >= 1 and max(shape) > 1:
        raise DataError(f"{_arg(what)}: item {i}'s label has shape {shape} (one-hot?); labels must be "
                        "one class index per image, e.g. label.argmax()")
    raise DataError(f"{_arg(what)}: item {i}'s label is {y!r} ({type(y).__name__}); labels must be "
                    "integer class indices 0..K-1")


def _item_image(x, i: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            arr = np.asarray(x)
        except Exception as err:  # noqa: BLE001 - an object NumPy cannot read
            raise DataError(f"{_arg(what)}: item {i}'s image is a {type(x).__name__}, which cannot be "
                            f"read as an array ({err}); give tensors, NumPy arrays or PIL images") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise DataError(f"{_arg(what)}: item {i}'s image is a {type(x).__name__}; give tensors "
                            "(C x H x W), NumPy arrays (H x W x C) or PIL images")
        x = torch.from_numpy(arr.copy())
        if x.dim() == 3:
            x = x.permute(2, 0, 1)  # PIL / numpy images are H x W x C
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise DataError(f"{_arg(what)}: item {i}'s image has shape {tuple(x.shape)}; give C x H x W "
                        "images (or H x W)")
    return x


def _read_dataset(dataset, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A map-style Dataset read once into memory (refilled's loader keeps data as one tensor)."""
    from tqdm.auto import tqdm

    n = len(dataset)
    if n == 0:
        raise DataError(f"{_arg(what)} is an empty Dataset")
    images, labels = [], []
    for i in tqdm(range(n), desc=f"reading the {what} dataset", leave=False, disable=n < 5000):
        try:
            item = dataset[i]
        except Exception as err:  # noqa: BLE001 - the user's Dataset failed on this item
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise DataError(f"{_arg(what)}: the Dataset fails on item {i} ({type(err).__name__}: "
                            f"{first})") from None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            got = f"{len(item)} entries" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
            raise DataError(f"{_arg(what)}: a Dataset must give (image, label) pairs; item {i} is "
                            f"{got}")
        images.append(_item_image(item[0], i, what))
        labels.append(_item_label(item[1], i, what))
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise DataError(f"{_arg(what)}: the Dataset's images have different shapes "
                        f"({', '.join('x'.join(map(str, s)) for s in sorted(shapes)[:3])}); resize "
                        "them to one size (e.g. with a transform)")
    dtypes = {x.dtype for x in images}
    if len(dtypes) > 1:
        images = [x.float() for x in images]
    return torch.stack(images), torch.tensor(labels)


def _spans(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, start = [], None
    for a, b in zip(ids, ids[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            out.append(str(a) if start == a else f"{start}-{a}")
            start = None
    return ", ".join(out[:6]) + (", ..." if len(out) > 6 else "")


def check_num_classes(num_classes) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise DataError(f"num_classes= must be an integer (or None: the largest label + 1), got "
                        f"{num_classes!r} ({type(num_classes).__name__})")
    if num_classes < 2:
        raise DataError(f"num_classes= must be at least 2, got {num_classes}")
    return int(num_classes)


def check_data(train: Split, val: Split | None, num_classes: int | None = None) -> int:
    """The label and shape checks of a training (and validation) split; returns the number of
    classes. Without ``num_classes`` the labels must be 0..K-1 with every class present; with
    it, labels must be below it and classes may be empty on purpose."""
    num_classes = check_num_classes(num_classes)
    counts = torch.bincount(train.labels)
    present = (counts > 0).nonzero().flatten().tolist()
    hint = say("", " (or num_classes=N to train an N-way classifier with empty classes on purpose)")
    if len(present) < 2:
        raise DataError(f"{_arg('train')} holds a single class ({present[0]}); a classifier needs at "
                        "least 2 classes")
    if num_classes is not None:
        if len(counts) > num_classes:
            raise DataError(f"{_arg('train')}: the labels go up to {len(counts) - 1}, but num_classes "
                            f"is {num_classes}; labels must be 0..{num_classes - 1}")
    else:
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            shift = (f"; shift them to start at 0 (labels - {present[0]})"
                     if present == list(range(present[0], present[-1] + 1)) else
                     "; renumber them 0..K-1")
            raise DataError(f"{_arg('train')}: the labels are {_spans(present)}, so class(es) "
                            f"{_spans(missing)} have no training image{shift}{hint}")
        num_classes = len(counts)
    if val is not None:
        if tuple(val.images.shape[1:]) != tuple(train.images.shape[1:]):
            shape = "x".join(map(str, val.images.shape[1:]))
            want = "x".join(map(str, train.images.shape[1:]))
            raise DataError(f"{_arg('val')}: the images are {shape} (C x H x W), but the training images "
                            f"are {want}; give validation images of the training images' shape")
        if val.images.dtype != train.images.dtype and not (
                val.images.is_floating_point() and train.images.is_floating_point()):
            raise DataError(f"{_arg('val')}: the images are {val.images.dtype} but the training images "
                            f"are {train.images.dtype}; give both as uint8 (0-255) or both as float")
        allowed = set(range(num_classes)) if len(present) < num_classes else set(present)
        extra = sorted(set(torch.unique(val.labels).tolist()) - allowed)
        if extra:
            raise DataError(f"{_arg('val')} holds class(es) {_spans(extra)} that the training data "
                            f"does not have (training classes: {_spans(present)}); validate on the "
                            "training classes only")
    return num_classes
