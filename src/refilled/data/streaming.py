"""The streaming path: images read from a Dataset (or from image files) every time they are
used, through ``torch.utils.data.DataLoader`` worker processes.

* :class:`StreamedImages` is a lazy ``N x C x H x W`` view of a Dataset's images: it indexes
  like a tensor (a slice, an index tensor or a mask gives a smaller view), knows its shape and
  dtype, and reads its images only when asked — :meth:`StreamedImages.batches` for a pass in
  order (evaluation, through workers), :meth:`StreamedImages.materialise` for a few.
* :class:`StreamLoader` gives the training batches of a view, with the in-memory
  :class:`~refilled.data.loader.TensorLoader`'s semantics: the same batches of indices from
  ``(seed, epoch)`` (shuffled, or class-balanced with a sampler), each torchrun rank reading only
  its slice of every global batch, the same batch-level augmentation draws. An item's own random
  transforms (the user's ``RandomResizedCrop``, colour jitter...) run in the workers, seeded by
  ``(seed, epoch, index)``: every epoch sees fresh views, the same ones for the same seed,
  whatever the number of workers or ranks, and after a resume.
* A failing item, or one with NaN or infinite pixels, stops the run with one line naming the
  item's index and the Dataset's own error.
"""

from __future__ import annotations

import hashlib
import os
import random
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from refilled.data.loader import EpochBatches
from refilled.errors import DataError

__all__ = ["StreamedImages", "StreamLoader", "StreamSettings", "default_workers", "item_tensor",
           "labels_of", "has_random_transforms"]


def default_workers() -> int:
    """Worker processes by default: the cores less one for the training process, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class StreamSettings:
    """How a stream is read: worker processes, pinned memory, batches prefetched per worker,
    workers kept alive between epochs."""

    workers: int | None = None  # None: default_workers()
    pin_memory: bool | None = None  # None: on CUDA
    prefetch: int = 2
    persistent: bool = True

    @classmethod
    def of(cls, data) -> "StreamSettings":
        """The settings of a config's ``data`` section."""
        return cls(workers=data.workers, pin_memory=data.pin_memory, prefetch=data.prefetch,
                   persistent=data.persistent_workers)

    def resolved_workers(self) -> int:
        return default_workers() if self.workers is None else int(self.workers)


# ------------------------------------------------------------------ items


def item_tensor(x) -> torch.Tensor:
    """An item's image as a C x H x W tensor: tensors as they are (H x W gets a channel),
    NumPy arrays and PIL images (H x W x C) transposed."""
    if not isinstance(x, torch.Tensor):
        arr = np.asarray(x)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError(f"an image must be a tensor, a NumPy array or a PIL image, got "
                            f"{type(x).__name__}")
        x = torch.from_numpy(arr.copy())
        if x.dim() == 3:
            x = x.permute(2, 0, 1)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"an image must be C x H x W (or H x W), got shape {tuple(x.shape)}")
    return x


def _label(y) -> int:
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not (y.is_floating_point() or y.dtype == torch.bool):
        return int(y)
    if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
        return int(y)
    if isinstance(y, np.ndarray) and y.size == 1 and np.issubdtype(y.dtype, np.integer):
        return int(y)
    raise TypeError(f"a label must be an integer class index, got {y!r}")


def _seed_of(seed: int, epoch: int, index: int) -> int:
    return zlib.crc32(f"{seed}/{epoch}/{index}".encode())


class _Failure:
    """A batch that could not be made (an item failed, or shapes differ), passed to the main
    process as a value, never as a pickled exception."""

    def __init__(self, index: int, message: str):
        self.index, self.message = index, message


def read_item(dataset, index: int, seed: int | None = None) -> tuple[torch.Tensor, int]:
    """Item ``index`` of ``dataset`` as (C x H x W image, label), its random transforms seeded
    from ``seed`` (the process's global random states are left as they were)."""
    with torch.random.fork_rng(devices=[]):
        py, npy = random.getstate(), np.random.get_state()
        try:
            if seed is not None:
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
            item = dataset[index]
        finally:
            random.setstate(py)
            np.random.set_state(npy)
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        got = f"{len(item)} entries" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
        raise TypeError(f"a Dataset must give (image, label) pairs; this item is {got}")
    x = item_tensor(item[0])
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("the image holds NaN or infinite values")
    return x, _label(item[1])


class _Items(torch.utils.data.Dataset):
    """``(seed, epoch, index) -> (image, label, index)`` of a Dataset, or a failure."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        seed, epoch, index = key
        try:
            x, y = read_item(self.dataset, index, None if seed is None else _seed_of(seed, epoch, index))
        except Exception as err:  # noqa: BLE001 - the Dataset's own error, reported by index
            first = (str(err).strip().splitlines() or [""])[0][:200]
            return _Failure(index, f"{type(err).__name__}: {first}")
        return x, y, index


def _collate(items):
    for item in items:
        if isinstance(item, _Failure):
            return item
    shapes = {tuple(x.shape) for x, _, _ in items}
    if len(shapes) > 1:
        (a, _, i), (b, _, j) = items[0], next(it for it in items if tuple(it[0].shape) != tuple(items[0][0].shape))
        return _Failure(j, f"its image is {'x'.join(map(str, b.shape))} but item {i}'s is "
                           f"{'x'.join(map(str, a.shape))}; give every image one size (e.g. with a "
                           "resize transform)")
    dtypes = {x.dtype for x, _, _ in items}
    images = torch.stack([x if len(dtypes) == 1 else x.float() for x, _, _ in items])
    return images, torch.tensor([y for _, y, _ in items], dtype=torch.long)


def _worker_init(_worker_id: int) -> None:
    """Return freed image buffers to the system in a worker: glibc raises its mmap threshold as
    buffers of a few hundred KB are freed, and a long-lived worker then keeps hundreds of MB of
    freed heap; a fixed threshold keeps its memory flat (no-op without glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class _Batches:
    """The batch sampler of a DataLoader: the keys of the batches its owner set last."""

    def __init__(self):
        self.keys: list[list[tuple]] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _raise(failure: _Failure, what: str) -> None:
    raise DataError(f"{what}: item {failure.index} of the Dataset fails ({failure.message}); fix "
                    "that item or leave it out")


# ------------------------------------------------------------------ the lazy view


class StreamedImages:
    """A lazy N x C x H x W view of a Dataset's images; see the module docstring.

    ``train_items`` is read for training (its random transforms applied per access),
    ``eval_items`` (default: the same) for evaluation passes; ``indices`` select the view's
    items, in order. ``fingerprint`` identifies the underlying data for a run directory's
    digest (e.g. the files' names, sizes and times).
    """

    def __init__(self, train_items, eval_items=None, *, indices: torch.Tensor | None = None,
                 item_shape: Sequence[int], dtype: torch.dtype, settings: StreamSettings = StreamSettings(),
                 fingerprint: str = "", what: str = "the data"):
        self.train_items = train_items
        self.eval_items = train_items if eval_items is None else eval_items
        n = len(train_items)
        self.indices = torch.arange(n) if indices is None else torch.as_tensor(indices).long().reshape(-1)
        self.item_shape = tuple(int(s) for s in item_shape)
        self.dtype = dtype
        self.settings = settings
        self.fingerprint = fingerprint
        self.what = what
        self._loaders: dict = {}

    # -------------------------------------------------------------- like a tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.indices), *self.item_shape))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __len__(self) -> int:
        return len(self.indices)

    def dim(self) -> int:
        return 1 + len(self.item_shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def _view(self, indices: torch.Tensor) -> "StreamedImages":
        return StreamedImages(self.train_items, self.eval_items, indices=indices, item_shape=self.item_shape,
                              dtype=self.dtype, settings=self.settings, fingerprint=self.fingerprint,
                              what=self.what)

    def __getitem__(self, key) -> "StreamedImages":
        if isinstance(key, int):
            key = slice(key, key + 1)
        if isinstance(key, torch.Tensor) and key.dtype == torch.bool:
            key = key.cpu().nonzero().flatten()
        elif isinstance(key, (list, np.ndarray)):
            key = torch.as_tensor(key).long()
        return self._view(self.indices[key.cpu() if isinstance(key, torch.Tensor) else key])

    def __repr__(self) -> str:
        return f"StreamedImages({len(self)} x {'x'.join(map(str, self.item_shape))}, {self.dtype})"

    @staticmethod
    def cat(parts: Sequence["StreamedImages"]) -> "StreamedImages":
        """Views of one Dataset, concatenated."""
        first = parts[0]
        if any(p.train_items is not first.train_items or p.eval_items is not first.eval_items for p in parts):
            raise ValueError("only views of one Dataset can be concatenated")
        return first._view(torch.cat([p.indices for p in parts]))

    # -------------------------------------------------------------- reading

    def materialise(self) -> torch.Tensor:
        """The view's evaluation images, read in this process (for a few images)."""
        if not len(self):
            return torch.zeros(0, *self.item_shape, dtype=self.dtype)
        batch = _collate([_Items(self.eval_items)[(-1, -1, int(i))] for i in self.indices])
        if isinstance(batch, _Failure):
            _raise(batch, self.what)
        return batch[0]

    def digest(self) -> str:
        """What identifies the view's images for a run directory's inputs (no image read)."""
        h = hashlib.sha256(f"{self.fingerprint}|{type(self.train_items).__qualname__}|{len(self.train_items)}|"
                           f"{self.item_shape}|{self.dtype}".encode())
        h.update(self.indices.numpy().tobytes())
        return h.hexdigest()[:16]

    def _loader(self, items, batches: _Batches, pin: bool) -> torch.utils.data.DataLoader:
        workers = self.settings.resolved_workers()
        extra = ({"persistent_workers": self.settings.persistent, "prefetch_factor": self.settings.prefetch,
                  "worker_init_fn": _worker_init} if workers > 0 else {})
        return torch.utils.data.DataLoader(_Items(items), batch_sampler=batches, num_workers=workers,
                                           collate_fn=_collate, pin_memory=pin, **extra)

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None, *,
                pin: bool = False) -> Iterator[torch.Tensor]:
        """The view's evaluation images ``start:stop`` in order, ``batch_size`` at a time, read
        through the worker processes (their DataLoader is kept for the next pass)."""
        stop = len(self) if stop is None else stop
        key = (batch_size, pin)
        if key not in self._loaders:
            sampler = _Batches()
            self._loaders[key] = (sampler, self._loader(self.eval_items, sampler, pin))
        sampler, loader = self._loaders[key]
        ids = self.indices[start:stop].tolist()
        sampler.keys = [[(-1, -1, i) for i in ids[lo:lo + batch_size]] for lo in range(0, len(ids), batch_size)]
        for batch in loader:
            if isinstance(batch, _Failure):
                _raise(batch, self.what)
            yield batch[0]


# ------------------------------------------------------------------ training batches


class StreamLoader(EpochBatches):
    """Training batches ``(float images, int64 labels)`` on ``device`` from a
    :class:`StreamedImages` view, with :class:`~refilled.data.loader.TensorLoader`'s semantics
    (see the module docstring); ``set_epoch(e)`` before iterating reproduces epoch ``e``."""

    def __init__(self, images: StreamedImages, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = True, drop_last: bool = True, augment=None, device="cpu",
                 seed: int = 0, sampler=None, rank: int = 0, world: int = 1,
                 channels_last: bool = False):
        self._plan(labels, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, sampler=sampler,
                   rank=rank, world=world, what="StreamLoader")
        self.images, self.labels = images, torch.as_tensor(labels).long().cpu()
        self.augment, self.channels_last = augment, channels_last
        self.device = torch.device(device)
        pin = images.settings.pin_memory
        self.pin = self.device.type == "cuda" if pin is None else bool(pin) and torch.cuda.is_available()
        self._keys = _Batches()
        self._dataloader = images._loader(images.train_items, self._keys, self.pin)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, gen = self._next_epoch()  # the batches and the batch-level augmentation
        parts, labels, keys = [], [], []
        for idx, part in self._batches(gen, epoch):  # each rank reads its slice of a global batch
            parts.append(part)
            labels.append(self.labels[idx])  # the split's labels (e.g. a class window's), not the items'
            keys.append([(self.seed, epoch, int(i)) for i in self.images.indices[idx]])
        self._keys.keys = keys
        for part, y, batch in zip(parts, labels, self._dataloader):
            if isinstance(batch, _Failure):
                _raise(batch, self.images.what)
            x = batch[0].to(self.device, non_blocking=self.pin)
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            if self.augment is not None:
                x = self.augment(x, gen) if part is None else self.augment(x, gen, part)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device)


# ------------------------------------------------------------------ what a Dataset tells


def labels_of(dataset, what: str = "the data", progress: bool = True) -> tuple[torch.Tensor, str]:
    """A Dataset's labels, read without decoding images where it exposes them (``targets``,
    ``labels``, torchvision's ``samples`` / ``imgs``, a ``TensorDataset``'s second tensor, a
    ``Subset`` of one of those), otherwise in one pass over its items. Returns (labels, how)."""
    n = len(dataset)
    if isinstance(dataset, torch.utils.data.Subset):
        inner, how = labels_of(dataset.dataset, what, progress)
        return inner[torch.as_tensor(list(dataset.indices)).long()], how
    if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) == 2:
        return torch.as_tensor(dataset.tensors[1]), "its second tensor"
    for attr in ("targets", "labels"):
        value = getattr(dataset, attr, None)
        if value is not None and not callable(value):
            try:
                labels = torch.as_tensor(np.asarray(value))
            except (TypeError, ValueError):
                continue
            if labels.dim() >= 1 and len(labels) == n:
                return labels, f"its .{attr}"
    for attr in ("samples", "imgs"):
        value = getattr(dataset, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == n and all(
                isinstance(s, (tuple, list)) and len(s) == 2 for s in value[:8]):
            return torch.tensor([int(s[1]) for s in value]), f"its .{attr}"
    from tqdm.auto import tqdm

    labels = []
    for i in tqdm(range(n), desc=f"reading the labels of {what}", disable=not progress or n < 2000,
                  leave=False):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            got = f"{len(item)} entries" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
            raise DataError(f"{what}: a Dataset must give (image, label) pairs; item {i} is {got}")
        try:
            labels.append(_label(item[1]))
        except TypeError as err:
            raise DataError(f"{what}: item {i}'s label: {err}") from None
    return torch.tensor(labels, dtype=torch.long), "one pass over its items (it exposes no .targets)"


def has_random_transforms(dataset, probes: int = 4) -> bool:
    """Whether reading an item twice can give two images (per-item random transforms): a
    ``transform`` / ``transforms`` attribute, or items 0..probes-1 read under two seeds differ."""
    for attr in ("transform", "transforms"):
        if getattr(dataset, attr, None) is not None:
            return True
    inner = getattr(dataset, "dataset", None)  # a Subset
    if inner is not None and has_random_transforms(inner, 0):
        return True
    for i in range(min(probes, len(dataset))):
        a, _ = read_item(dataset, i, seed=1)
        b, _ = read_item(dataset, i, seed=2)
        if a.shape != b.shape or not torch.equal(a, b):
            return True
    return False
