"""An in-memory batch loader with vectorised augmentation and a class-balanced batch sampler.

The whole dataset lives as one uint8 tensor on the target device; batches are gathered by
index, converted to float, augmented and normalised there. All randomness of an epoch comes
from one CPU ``torch.Generator`` seeded by (seed, epoch), so resuming at epoch ``e`` (via
``set_epoch(e)``) reproduces exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from refilled.errors import ConfigError

__all__ = ["augment_batch", "crop_flip", "affine_matrices", "stroke_width", "Augment", "EpochBatches",
           "TensorLoader", "ClassBalancedSampler", "epoch_generator"]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends on both ``seed`` and ``epoch`` (no overlap for epochs < 2**20)."""
    return torch.Generator().manual_seed((int(seed) << 20) + int(epoch))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor (indices, offsets) to ``device`` without a host sync on CUDA:
    through pinned memory, asynchronously (the caching host allocator keeps it alive)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _part(draw: torch.Tensor, b: int, part: tuple[int, int] | None) -> torch.Tensor:
    """The rows of a draw made for the whole global batch that belong to this slice."""
    return draw if part is None else draw[part[0]: part[0] + b]


def crop_flip(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator,
              part: tuple[int, int] | None = None) -> torch.Tensor:
    """Random zero-pad-and-crop (per-sample offsets) and random horizontal flip of a float batch.

    Random draws, in this order, from the CPU ``generator``: if ``pad > 0``, row offsets then
    column offsets (``torch.randint(0, 2*pad+1, (B,))`` each); if ``flip``, ``torch.rand(B) < 0.5``.
    ``part = (start, total)``: ``x`` is rows ``start:start+len(x)`` of a global batch of
    ``total``; the draws are made for all ``total`` rows (the same on every rank) and this
    slice's are used, so a slice augments exactly as it would inside the whole batch.
    """
    b, _, h, w = x.shape
    if pad <= 0 and not flip:
        return x
    n = b if part is None else part[1]
    rows = torch.arange(h).expand(b, h)
    cols = torch.arange(w).expand(b, w)
    if pad > 0:
        oy = _part(torch.randint(0, 2 * pad + 1, (n,), generator=generator), b, part)
        ox = _part(torch.randint(0, 2 * pad + 1, (n,), generator=generator), b, part)
        rows = rows + oy[:, None]
        cols = cols + ox[:, None]
        x = F.pad(x, (pad, pad, pad, pad))  # pad once; crops are gathered by index below
    if flip:
        flipped = _part(torch.rand(n, generator=generator), b, part) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    rows, cols = to_device(rows, x.device), to_device(cols, x.device)
    # Gather rows, then columns: out[i, c, r, q] = x[i, c, rows[i, r], cols[i, q]].
    x = x.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))
    return x.gather(3, cols[:, None, None, :].expand(-1, x.shape[1], h, -1))


def affine_matrices(angle: torch.Tensor, mag: torch.Tensor, shear: torch.Tensor) -> torch.Tensor:
    """Per-sample 2 x 3 matrices for ``F.affine_grid`` from angles (radians), magnifications
    and x-shears (one value per sample each).

    The content is rotated by +angle counter-clockwise on screen (``torch.rot90(x, 1, (-2, -1))``
    at a right angle), magnified by ``mag`` about the centre and sheared by ``shear``. The forward
    map (content -> output) in image coordinates (x right, y down) is
    ``mag * [[cos, sin], [-sin, cos]] @ [[1, shear], [0, 1]]``; ``affine_grid`` maps output
    coordinates to input ones, so it gets the inverse.
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    fwd = torch.stack([
        torch.stack([cos, cos * shear + sin], -1),
        torch.stack([-sin, -sin * shear + cos], -1),
    ], -2) * mag[:, None, None]
    return torch.cat([torch.linalg.inv(fwd), torch.zeros(len(angle), 2, 1)], dim=2)


def stroke_width(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Thicken (``t > 0``) or thin (``t < 0``) bright strokes on a dark ground, per sample.

    ``t`` in [-1, 1] blends each image towards its 3 x 3 grey dilation (max filter, ``t = 1``)
    or erosion (min filter, ``t = -1``): about half a pixel of stroke width either way at
    ``|t| = 1`` on each side. ``t`` has one value per sample.
    """
    t = t.to(x.device, x.dtype).reshape(-1, 1, 1, 1)
    grown = F.max_pool2d(x, 3, stride=1, padding=1)
    shrunk = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return torch.where(t >= 0, x + t * (grown - x), x - t * (shrunk - x))


def augment_batch(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator, *,
                  degrees: float = 0.0, scale: float = 0.0, shear: float = 0.0,
                  thickness: float = 0.0, noise: float = 0.0,
                  part: tuple[int, int] | None = None) -> torch.Tensor:
    """:func:`crop_flip`, then optional small affine, stroke width and pixel noise.

    All draws come from the CPU ``generator``, in this order: crop/flip (see :func:`crop_flip`);
    if any of ``degrees``, ``scale``, ``shear`` is non-zero, angles ``U(-degrees, degrees)``,
    magnifications ``U(1 - scale, 1 + scale)`` and shears ``U(-shear, shear)`` (one
    ``torch.rand(b)`` each, in that order) for :func:`affine_matrices` (bilinear resampling,
    zeros outside); if ``thickness > 0``, stroke factors ``U(-thickness, thickness)``
    (``torch.rand(b)``) for :func:`stroke_width`; if ``noise > 0``, Gaussian pixel noise of
    standard deviation ``noise`` (``torch.randn`` of the batch shape), then clamped to [0, 1].
    With all of these zero the result is exactly :func:`crop_flip`'s (same draws).
    ``part = (start, total)``: as in :func:`crop_flip`, every draw is made for the global batch
    and this slice's rows are used (each rank of a torchrun job augments only its own slice).
    """
    x = crop_flip(x, pad, flip, generator, part)
    b = x.shape[0]
    n = b if part is None else part[1]
    if degrees or scale or shear:
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
        mag = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
        sh = (torch.rand(n, generator=generator) * 2 - 1) * shear
        theta = _part(affine_matrices(angle, mag, sh), b, part)
        theta = to_device(theta, x.device).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if thickness > 0:
        x = stroke_width(x, _part((torch.rand(n, generator=generator) * 2 - 1) * thickness, b, part))
    if noise > 0:
        eps = _part(torch.randn((n, *x.shape[1:]), generator=generator), b, part)
        x = (x + noise * to_device(eps, x.device).to(x.dtype)).clamp_(0.0, 1.0)
    return x


class Augment:
    """Callable ``(batch, generator) -> batch`` applying :func:`augment_batch`."""

    def __init__(self, pad: int = 0, flip: bool = False, *, degrees: float = 0.0, scale: float = 0.0,
                 shear: float = 0.0, thickness: float = 0.0, noise: float = 0.0):
        self.pad, self.flip = int(pad), bool(flip)
        self.extra = {"degrees": float(degrees), "scale": float(scale), "shear": float(shear),
                      "thickness": float(thickness), "noise": float(noise)}

    def __call__(self, x: torch.Tensor, generator: torch.Generator,
                 part: tuple[int, int] | None = None) -> torch.Tensor:
        return augment_batch(x, self.pad, self.flip, generator, part=part, **self.extra)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v:g}" for k, v in self.extra.items() if v)
        return f"Augment(pad={self.pad}, flip={self.flip}{extra})"


class ClassBalancedSampler:
    """Batches of ``batch_size // m_per_class`` distinct classes with ``m_per_class`` samples each.

    Every batch therefore holds positive pairs for metric-learning losses. We do not use
    pytorch-metric-learning's MPerClassSampler because it draws from the global numpy RNG,
    which breaks exact resume; here each epoch is a pure function of (seed, epoch).

    Classes of a batch are drawn uniformly without replacement. Within a class, samples are
    taken in turn from a per-epoch random permutation of that class, cycling through it; so
    a batch repeats a sample only when its class has fewer than ``m_per_class`` samples.
    ``len()`` is ``N // batch_size`` batches per epoch (at least one).
    """

    def __init__(self, labels: torch.Tensor, m_per_class: int, batch_size: int, seed: int = 0):
        labels = torch.as_tensor(labels).long().cpu()
        if m_per_class < 1 or batch_size % m_per_class != 0:
            raise ConfigError(
                f"ClassBalancedSampler: batch_size={batch_size} must be a multiple of m_per_class={m_per_class}"
            )
        self.classes, self.inverse = torch.unique(labels, return_inverse=True)
        self.m, self.batch_size, self.seed = int(m_per_class), int(batch_size), int(seed)
        self.classes_per_batch = batch_size // m_per_class
        if self.classes_per_batch < 2 or self.classes_per_batch > len(self.classes):
            raise ConfigError(
                f"ClassBalancedSampler: batch_size={batch_size} with m_per_class={m_per_class} holds "
                f"{self.classes_per_batch} classes per batch; need at least 2 and at most the "
                f"{len(self.classes)} classes present"
            )
        self.counts = torch.bincount(self.inverse)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.num_batches = max(1, len(labels) // batch_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by the next iteration (each iteration then advances it by one)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def batches(self, generator: torch.Generator) -> torch.Tensor:
        """All batches of one epoch as a (num_batches, batch_size) index tensor."""
        n, c, k = len(self.inverse), len(self.classes), self.classes_per_batch
        # Samples grouped by class, in random order within each class.
        perm = torch.randperm(n, generator=generator)
        grouped = perm[torch.sort(self.inverse[perm], stable=True).indices]
        # Distinct classes per batch: the first k of a random permutation of the classes.
        chosen = torch.rand(self.num_batches, c, generator=generator).argsort(1)[:, :k].reshape(-1)
        # How many times each chosen class was chosen before (in batch order) -> its turn.
        order = torch.sort(chosen, stable=True).indices
        first = torch.cumsum(torch.bincount(chosen, minlength=c), 0) - torch.bincount(chosen, minlength=c)
        turn = torch.empty_like(chosen)
        turn[order] = torch.arange(len(chosen)) - first[chosen[order]]
        # The turn-th block of m consecutive samples of the class's cyclic permutation.
        offsets = (turn[:, None] * self.m + torch.arange(self.m)) % self.counts[chosen][:, None]
        idx = grouped[self.starts[chosen][:, None] + offsets]
        return idx.reshape(self.num_batches, self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        yield from self.batches(epoch_generator(self.seed, epoch))


class EpochBatches:
    """The batches of an epoch, shared by the in-memory and the streaming loaders.

    Each iteration uses the current epoch (``set_epoch``) and then advances it by one, so
    ``set_epoch(e)`` before iterating reproduces epoch ``e`` exactly: its batches of indices
    (a random permutation from ``(seed, epoch)``, or the ``sampler``'s, e.g.
    :class:`ClassBalancedSampler`) and, under torchrun, the slice of every global batch that
    this rank reads, with its place in the global batch (for augmentation drawn for the whole
    batch). ``len()`` is the number of batches.
    """

    def _plan(self, labels, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int, sampler,
              rank: int, world: int, what: str) -> None:
        if sampler is not None and getattr(sampler, "batch_size", batch_size) != batch_size:
            raise ConfigError(f"{what}: batch_size={batch_size} differs from the sampler's {sampler.batch_size}")
        if batch_size < 1 or (sampler is None and drop_last and batch_size > len(labels)):
            raise ConfigError(f"{what}: batch_size={batch_size} with drop_last gives no batch from "
                              f"{len(labels)} samples")
        if world > 1 and batch_size % world:
            raise ConfigError(f"{what}: batch_size={batch_size} is not divisible by {world} processes")
        self.num_samples = len(labels)
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), shuffle, drop_last
        self.seed, self.sampler = int(seed), sampler
        # Under torchrun every rank draws the same global batches and keeps its own slice.
        self.rank, self.world = int(rank), int(world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.sampler is not None:
            return len(self.sampler)
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _next_epoch(self) -> tuple[int, torch.Generator]:
        """This iteration's epoch (the counter moves on) and its generator (shuffling and
        augmentation)."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        return epoch, epoch_generator(self.seed, epoch)

    def _batches(self, generator: torch.Generator, epoch: int):
        """``(indices this rank reads, (start, total) in the global batch or None)`` per batch."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            batches = iter(self.sampler)
        else:
            n = self.num_samples
            order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
            batches = (order[i: i + self.batch_size] for i in range(0, len(self) * self.batch_size,
                                                                     self.batch_size))
        for idx in batches:
            part = None
            if self.world > 1:
                total, per = len(idx), len(idx) // self.world
                idx, part = idx[self.rank * per:(self.rank + 1) * per], (self.rank * per, total)
            yield idx, part


class TensorLoader(EpochBatches):
    """Batches ``(float images, int64 labels)`` from tensors held on ``device``.

    uint8 images are scaled to [0, 1]; float images (a user's own tensors) are used as they
    are. Augmentation runs on the batch; with ``mean``/``std`` the batch is then normalised
    (without them it is left to each network, which normalises its own input).

    Each iteration uses the current epoch (``set_epoch``) and then advances it by one, so
    ``set_epoch(e)`` before iterating reproduces epoch ``e`` exactly. With ``sampler`` (e.g.
    :class:`ClassBalancedSampler`) the sampler decides the batches; ``shuffle``/``drop_last``
    are then unused.
    """

    def __init__(
        self,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        augment=None,
        mean=None,
        std=None,
        device="cpu",
        seed: int = 0,
        sampler=None,
        rank: int = 0,
        world: int = 1,
        channels_last: bool = False,
    ):
        if images_uint8.dim() != 4 or not (images_uint8.dtype == torch.uint8
                                            or images_uint8.is_floating_point()):
            raise ConfigError("the images must be a uint8 or float tensor N x C x H x W, got "
                              f"{images_uint8.dtype} of shape {tuple(images_uint8.shape)}")
        if len(images_uint8) != len(labels):
            raise ConfigError(f"TensorLoader: {len(images_uint8)} images but {len(labels)} labels")
        self._plan(labels, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, sampler=sampler,
                   rank=rank, world=world, what="TensorLoader")
        self.device = torch.device(device)
        self.images = images_uint8.to(self.device).contiguous()
        self.labels = torch.as_tensor(labels).long().to(self.device)
        c = self.images.shape[1]
        self.mean = self.std = None
        if mean is not None:
            self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).reshape(1, -1, 1, 1)
            self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).reshape(1, -1, 1, 1)
            if self.mean.shape[1] not in (1, c) or self.std.shape[1] not in (1, c):
                raise ConfigError(f"TensorLoader: mean/std need 1 or {c} values for {c}-channel images")
        self.augment, self.channels_last = augment, channels_last

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, gen = self._next_epoch()
        for idx, part in self._batches(gen, epoch):
            idx = to_device(idx, self.device)
            x = self.images[idx]
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            if self.augment is not None:  # pads with 0 = black, before normalisation
                x = self.augment(x, gen) if part is None else self.augment(x, gen, part)
            if self.mean is not None:
                x = (x - self.mean) / self.std
            y = self.labels[idx]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y
