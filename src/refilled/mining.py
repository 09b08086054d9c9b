"""Semi-hard tuple mining on the student's normalised embedding.

A tuple is one positive pair (a, p) with y_a = y_p, a != p, together with *all* its semi-hard
negatives N(a, p) = {n : y_n != y_a and 0 < d(a, n) - d(a, p) <= margin}, where d is the plain
Euclidean distance between L2-normalised embeddings. Pairs with no semi-hard negative are
dropped. The set of (a, p, n) triplets equals pytorch-metric-learning's
``TripletMarginMiner(margin, type_of_triplets="semihard")``; we keep it grouped by (a, p) as a
boolean mask so the tuple loss needs no Python loop.

The training path does not list tuples at all: :func:`sorted_semihard_ranges` sorts each
anchor's row of distances once, and in that order the semi-hard negatives of every pair (a, p)
are the negatives in one contiguous range of positions, found with one ``searchsorted``. Every
shape there depends on the batch size only (no ``nonzero``, no host sync), and memory grows
like B^2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from refilled import checks


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


class _ExactDistances(torch.autograd.Function):
    """:func:`pairwise_distances` with ``exact=True``, with a faster backward.

    The same forward (from differences: close points keep their precision). The backward
    uses d d(i,j) / d x_i = (x_i - x_j) / d(i,j) (0 at d = 0, as torch.cdist does) in matrix
    form, grad_i = x_i * sum_j S_ij - (S x)_i with S = W + W^T, W = grad / d: one matrix
    product, in float64 so that the difference of the two terms loses nothing for close
    points. O(B^2 D) like cdist's own backward, but through BLAS.
    """

    @staticmethod
    def forward(ctx, x):
        dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
        ctx.save_for_backward(x, dist)
        return dist

    @staticmethod
    def backward(ctx, grad):
        x, dist = ctx.saved_tensors
        acc, batch = torch.float64, x.shape[0]
        x_acc = x.to(acc)
        step = row_block(batch)
        if step >= batch:  # one block: the plain formula, fewer ops
            w = grad.to(acc, copy=True).div_(dist).masked_fill_(dist == 0, 0.0)
            w = w + w.T
            return (x_acc * w.sum(dim=1, keepdim=True) - w @ x_acc).to(x.dtype)
        col_sums, transposed, out = x_acc.new_zeros(batch), torch.zeros_like(x_acc), []
        for first in range(0, batch, step):  # W in row blocks: no (B, B) float64 buffer
            rows = slice(first, first + step)
            w = grad[rows].to(acc, copy=True).div_(dist[rows]).masked_fill_(dist[rows] == 0, 0.0)
            col_sums = col_sums + w.sum(dim=0)
            out.append(x_acc[rows] * w.sum(dim=1, keepdim=True) - w @ x_acc)
            transposed = transposed + w.T @ x_acc[rows]
        grad_x = torch.cat(out) + x_acc * col_sums[:, None] - transposed
        return grad_x.to(x.dtype)


def normalized_distances_fast(embeddings: torch.Tensor) -> torch.Tensor:
    """``normalized_distances(embeddings, exact=True)``: the same values, and a gradient equal
    to float rounding computed by one float64 matrix product (:class:`_ExactDistances`).
    First-order gradients only (no double backward)."""
    if embeddings.dtype in (torch.float16, torch.bfloat16):
        embeddings = embeddings.float()
    return _ExactDistances.apply(F.normalize(embeddings, dim=1))


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
        raise checks.RefilledError(
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
    fn = "semihard_tuples"
    checks.features(fn, "embeddings", embeddings)
    checks.labels(fn, labels, embeddings.shape[0])
    checks.number(fn, "margin", margin)
    checks.same_device(fn, embeddings=embeddings, labels=labels)
    return semihard_from_distances(normalized_distances(embeddings), labels, margin)


# ---------------------------------------------------------------- training path: sorted ranges


class SortedRanges(NamedTuple):
    """Every ordered pair (a, j) of a batch, indexed by j's position in a's sorted row.

    Row a is sorted by *decreasing* distance (the farthest column first), and at equal distances
    a's same-class columns come before its negatives. Position i of row a stands for column
    ``order[a, i]``. All fields are (B, B).

    Attributes:
        order: int64, the column at each position; ``d(a, order[a, i])`` is non-increasing in i.
        distance: ``d(a, order[a, i])``, the sorted row itself (the input's dtype).
        negative: bool, column ``order[a, i]`` has another label than a.
        positive: bool, column ``order[a, i]`` has a's label and is not a itself.
        start: int64; for a positive at position i, its semi-hard negatives are exactly the
            negatives among positions start .. i-1 (the farther columns, down to the margin).
        count: int64, the number of those negatives (0 where ``positive`` is False).
    """

    order: torch.Tensor
    distance: torch.Tensor
    negative: torch.Tensor
    positive: torch.Tensor
    start: torch.Tensor
    count: torch.Tensor


def _sort_key(dist: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """An int64 key that orders by distance and, at equal distances, ranks same-class higher.

    Non-negative floats order like their bit patterns read as integers. The distance is taken
    to float64 (exact from float32) and scaled by 1/4 (exact: a power of two, and a distance is
    never subnormal-small unless it is 0), so its bits stay below 2^62 for d < 4 and one more
    low bit can hold the same-class flag. (In-place steps: each fresh (B, B) buffer costs a
    page-faulting allocation on CPU, more than the arithmetic.)
    """
    key = dist.to(torch.float64, copy=True).mul_(0.25).add_(0.0)  # "+ 0.0": -0.0 -> +0.0
    return key.view(torch.int64).mul_(2).add_(same)


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def _margin_bound(dist: torch.Tensor, margin: float, steps: int = 1) -> torch.Tensor:
    """The largest float t (in ``dist``'s dtype) with ``(t - d) <= margin`` for each entry d.

    The dense miner tests ``gap = d(a, n) - d(a, p)`` against the margin in the distance's own
    dtype. That rounded difference is non-decreasing in d(a, n), so the negatives it accepts
    are exactly those with d(a, n) <= t. ``d + margin`` is within an ulp of t: ``steps``
    one-ulp steps down, then up, land on it (one each way suffices; the tests check it on
    random bit patterns of every binade). For t > 0 an ulp step is +-1 on the bit pattern
    (cheaper than torch.nextafter); a margin <= 0 takes nextafter.
    """
    t = dist + margin
    bits = _BITS.get(t.dtype) if margin > 0 else None

    def step(x, sign):
        if bits is None:
            return torch.nextafter(x, x.new_full((), sign * float("inf")))
        return (x.view(bits) + sign).view(x.dtype)

    for _ in range(steps):
        t = torch.where((t - dist) <= margin, t, step(t, -1))
    for _ in range(steps):
        up = step(t, 1)
        t = torch.where((up - dist) <= margin, up, t)
    return t


def row_block(batch: int, itemsize: int = 8, budget: int = 4 << 20, max_blocks: int = 16) -> int:
    """Rows per block for row-wise (rows, B) work: about ``budget`` bytes per buffer.

    On CPU, a buffer above glibc's 32 MiB mmap ceiling (a float64 (B, B) at B = 2048) is
    mapped afresh, page fault by page fault, on every allocation; blocks of a few MiB are
    recycled from the heap and stay in cache. At most ``max_blocks`` blocks (a loop that
    torch.compile unrolls).
    """
    rows = max(1, budget // (itemsize * batch), -(-batch // max_blocks))
    return min(batch, rows)


@torch.no_grad()
def sorted_rows(
    dist_rows: torch.Tensor, labels: torch.Tensor, first: int, margin: float = 0.2
) -> SortedRanges:
    """:func:`sorted_semihard_ranges` for the anchors ``first .. first + R - 1`` only, from
    their rows (R, B) of the distance matrix; every field is (R, B)."""
    rows, batch = dist_rows.shape
    if labels.numel() != batch or first + rows > batch:
        raise checks.RefilledError(
            f"rows {first}..{first + rows - 1} of a {batch}-column distance matrix do not fit "
            f"{labels.numel()} labels"
        )
    same = labels[first:first + rows, None] == labels[None, :]
    key, order = _sort_key(dist_rows, same).sort(dim=1, descending=True)
    # the sorted keys hold the sorted distances and flags: no gather needed
    values = (key >> 1).view(torch.float64).mul_(4.0).to(dist_rows.dtype)
    negative = (key & 1) == 0
    anchors = torch.arange(first, first + rows, device=dist_rows.device)
    positive = ~negative & (order != anchors[:, None])
    # start = the number of columns farther than the bound; the negated rows are ascending,
    # and so are the queries, which keeps searchsorted cache-friendly.
    start = torch.searchsorted(values.neg(), _margin_bound(values, margin).neg())
    positions = torch.arange(batch, device=dist_rows.device)
    start = torch.minimum(start, positions)  # only a negative margin goes past i
    negatives_before = F.pad(negative.to(torch.int64).cumsum(1), (1, 0))
    count = (negatives_before[:, :batch] - negatives_before.gather(1, start)) * positive
    return SortedRanges(order, values, negative, positive, start, count)


@torch.no_grad()
def sorted_semihard_ranges(
    dist: torch.Tensor, labels: torch.Tensor, margin: float = 0.2
) -> SortedRanges:
    """Semi-hard mining for the training path: the same tuples as :func:`semihard_tuples`,
    described by ranges of each anchor's sorted row instead of a (tuples x batch) mask.

    For anchor a and positive p, a negative n is semi-hard when ``0 < d(a,n) - d(a,p) <=
    margin`` (the difference computed in ``dist``'s dtype, as in :func:`candidate_tuples`).
    In a's row sorted by decreasing distance, with same-class columns before negatives at
    ties, these are the negatives before p's position and no farther than the margin bound
    (:func:`_margin_bound`): one ``searchsorted``. The tuple sets are identical to the dense
    miner's, boundary cases and ties included.

    Cost: one sort and one ``searchsorted`` of B rows of length B, O(B^2) memory, and no
    shape that depends on the data (traceable with ``torch.compile(fullgraph=True)``).
    The training loss runs the same thing in row blocks (:func:`sorted_rows`).
    """
    labels = labels.reshape(-1)
    if dist.shape != (labels.numel(), labels.numel()):
        raise checks.RefilledError(
            f"distance matrix of shape {tuple(dist.shape)} does not match {labels.numel()} labels"
        )
    return sorted_rows(dist.detach(), labels, 0, margin)
