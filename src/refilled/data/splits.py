"""Class selection and seeded splits on label tensors.

Pure functions: randomness comes from a ``torch.Generator`` seeded explicitly, never the global RNG.
Per-class selection is vectorised: each sample gets a random key, samples are sorted by
(label, key), and a sample's rank within its class decides whether it is kept.
"""

from __future__ import annotations

import torch

from refilled.errors import ConfigError

__all__ = ["class_order", "class_window", "select_classes", "cap_per_class", "stratified_split"]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _random_rank_within_class(labels: torch.Tensor, generator: torch.Generator):
    """Random rank of every sample among the samples of its class, and the per-class counts."""
    labels = labels.long().cpu()
    keys_order = torch.randperm(len(labels), generator=generator)
    # Stable sort by label of a random permutation = sort by (label, random key).
    order = keys_order[torch.sort(labels[keys_order], stable=True).indices]
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - starts[labels[order]]
    return rank, counts


def class_order(num_classes: int, seed: int | None) -> list[int]:
    """A fixed permutation of 0..num_classes-1 from ``seed``; ``None`` gives the identity order."""
    if seed is None:
        return list(range(num_classes))
    return torch.randperm(num_classes, generator=_generator(seed)).tolist()


def class_window(order: list[int], n: int, s: int) -> list[int]:
    """The ``n`` classes ``order[s:s+n]``; ConfigError if the window leaves the class list."""
    c = len(order)
    if n < 2 or s < 0 or s + n > c:
        raise ConfigError(
            f"class window n={n}, s={s} is invalid for a dataset with {c} classes: "
            f"need n >= 2, s >= 0 and s + n <= {c}"
        )
    return list(order[s : s + n])


def select_classes(images: torch.Tensor, labels: torch.Tensor, classes: list[int]):
    """Keep the samples of ``classes``; relabel class ``classes[i]`` as ``i``."""
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise ConfigError(f"class ids {classes} hold duplicates; give each class once")
    if min(classes, default=0) < 0:
        raise ConfigError(f"class ids {classes} include a negative id; class ids start at 0")
    present = torch.bincount(labels.long().cpu(), minlength=max(classes, default=0) + 1)
    missing = [c for c in classes if present[c] == 0]
    if missing:
        raise ConfigError(f"classes {missing} have no images in this split")
    # Lookup table: old label -> new label, or -1 for dropped classes.
    lut = torch.full((len(present),), -1, dtype=torch.long)
    lut[torch.tensor(classes, dtype=torch.long)] = torch.arange(len(classes))
    new = lut.to(labels.device)[labels.long()]
    keep = new >= 0
    return images[keep.to(images.device)], new[keep]


def cap_per_class(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Sorted indices of at most ``k`` random samples per class (classes 0..max label)."""
    if k < 1:
        raise ConfigError(f"a cap of {k} images per class keeps nothing; it must be at least 1")
    rank, counts = _random_rank_within_class(labels, _generator(seed))
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ConfigError(f"classes {empty} have no examples to keep (every label up to the largest "
                          "needs images)")
    return torch.nonzero(rank < k).flatten()


def stratified_split(
    labels: torch.Tensor,
    val_per_class: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
):
    """Seeded disjoint ``(train_idx, val_idx)`` with every class in both parts.

    Give exactly one of ``val_per_class`` (that many validation samples per class) or
    ``val_fraction`` (round(fraction * class size) per class, at least 1).
    """
    if (val_per_class is None) == (val_fraction is None):
        raise ConfigError("give exactly one of val_per_class and val_fraction")
    rank, counts = _random_rank_within_class(labels, _generator(seed))
    if val_per_class is not None:
        if val_per_class < 1:
            raise ConfigError(f"{val_per_class} validation images per class is too few; give at least 1")
        n_val = torch.full_like(counts, int(val_per_class))
        request = f"{val_per_class} images per class"
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"a validation fraction of {val_fraction} is outside (0, 1)")
        n_val = torch.round(counts.double() * val_fraction).long().clamp(min=1)
        request = f"a fraction {val_fraction:g} of each class"
    # Every class must keep at least one training sample after giving n_val to validation.
    short = torch.nonzero(counts <= n_val).flatten().tolist()
    if short:
        detail = ", ".join(f"class {c} has {int(counts[c])}" for c in short[:10])
        raise ConfigError(
            f"taking {request} for validation leaves no training example for {len(short)} "
            f"class(es) ({detail}{', ...' if len(short) > 10 else ''}); each class needs more "
            "images than its validation share"
        )
    is_val = rank < n_val[labels.long().cpu()]
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()
