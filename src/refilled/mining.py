"""Semi-hard tuple mining on the student's normalised embedding (SPEC §2).

A tuple is one positive pair (a, p) with y_a = y_p, a != p, together with *all* its semi-hard
negatives N(a, p) = {n : y_n != y_a and 0 < d(a, n) - d(a, p) <= margin}, where d is the plain
Euclidean distance between L2-normalised embeddings. Pairs with no semi-hard negative are
dropped. The set of (a, p, n) triplets equals pytorch-metric-learning's
``TripletMarginMiner(margin, type_of_triplets="semihard")``; we keep it grouped by (a, p) as a
boolean mask so the tuple loss needs no Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_distances(embeddings: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """Plain Euclidean distances between the rows of ``embeddings`` (B, D) -> (B, B).

    ``exact=True`` computes them from differences, so close points keep their precision and
    the gradient at zero distance (the diagonal, duplicates) is zero, not NaN; use it wherever
    a gradient flows. ``exact=False`` goes through the Gram matrix (faster; for constants).
    """
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist"
    return torch.cdist(embeddings, embeddings, compute_mode=mode)


def normalized_distances(embeddings: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """Distances between L2-normalised embeddings; half precision is promoted to float32."""
    if embeddings.dtype in (torch.float16, torch.bfloat16):
        embeddings = embeddings.float()
    return pairwise_distances(F.normalize(embeddings, dim=1), exact)


@torch.no_grad()
def candidate_tuples(
    dist: torch.Tensor, labels: torch.Tensor, margin: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ordered positive pair and the mask of its semi-hard negatives, unfiltered.

    Rows whose mask is empty are kept (the tuple loss gives them exactly zero weight); this
    saves a filtering pass on the training path. See :func:`semihard_tuples` for the meaning.
    """
    dist = dist.detach()
    labels = labels.reshape(-1)
    if dist.shape != (labels.numel(), labels.numel()):
        raise ValueError(
            f"distance matrix of shape {tuple(dist.shape)} does not match {labels.numel()} labels"
        )
    same = labels[:, None] == labels[None, :]
    positive = same.clone()
    positive.fill_diagonal_(False)
    anchor, pos = positive.nonzero(as_tuple=True)  # (T,) every ordered positive pair
    # Same-class entries become -inf so that they fail "gap > 0" without a separate mask.
    candidates = dist.masked_fill(same, float("-inf"))
    gap = candidates.index_select(0, anchor) - dist[anchor, pos][:, None]  # d(a, n) - d(a, p)
    return anchor, pos, (gap > 0) & (gap <= margin)


@torch.no_grad()
def semihard_from_distances(
    dist: torch.Tensor, labels: torch.Tensor, margin: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mine semi-hard tuples from a (B, B) distance matrix; see :func:`semihard_tuples`."""
    anchor, pos, negative_mask = candidate_tuples(dist, labels, margin)
    keep = negative_mask.any(dim=1)
    return anchor[keep], pos[keep], negative_mask[keep]


@torch.no_grad()
def semihard_tuples(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semi-hard tuples of a batch.

    Args:
        embeddings: (B, D) raw embeddings; they are L2-normalised here.
        labels: (B,) integer labels.
        margin: the semi-hard margin m.

    Returns:
        ``(anchor, positive, negative_mask)``: index tensors of shape (T,) and a bool mask of
        shape (T, B) whose row t marks the semi-hard negatives of pair (anchor[t], positive[t]).
        Every returned row has at least one negative; T may be 0.
    """
    return semihard_from_distances(normalized_distances(embeddings), labels, margin)
