"""Loss functions: REFILLED's two stages  and the baselines' losses, in one place.

All are plain tensor-in, tensor-out functions: device and dtype follow the inputs, the teacher's
tensors are treated as constants (no gradient flows into them), and an empty case (no tuple
mined) gives an exact zero that stays connected to the graph instead of a NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from refilled import checks
from refilled.mining import candidate_tuples, normalized_distances

RELATION_MODES = ("tuple", "triplet")


def _check_positive(name: str, value: float, fn: str = "refilled") -> None:
    checks.number(fn, name, value, positive=True)


def _masked_kl(target_logits: torch.Tensor, input_logits: torch.Tensor, mask: torch.Tensor):
    """Row-wise KL(softmax(target) || softmax(input)) over the entries where ``mask`` is True.

    Masked-out entries take no probability mass and contribute exactly 0 (never 0 * inf).
    """
    neg_inf = torch.finfo(input_logits.dtype).min
    log_q = torch.log_softmax(input_logits.masked_fill(~mask, neg_inf), dim=1)
    log_p = torch.log_softmax(target_logits.masked_fill(~mask, neg_inf), dim=1)
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(mask, terms, torch.zeros_like(terms)).sum(dim=1)


# ---------------------------------------------------------------- stage 1 
#
# Training path (relation_matching_terms): no tuple is ever listed. Each anchor's row of student
# distances is sorted once (refilled.mining.sorted_semihard_ranges); in that order the semi-hard
# negatives of a pair (a, p) are the negatives of one contiguous range of positions. The tuple
# KL needs only three sums over that range (float64 prefix sums from the far end), so the tuple
# mode costs O(B^2 log B) time and O(B^2) memory. The triplet mode is not separable that way:
# it runs blockwise in a custom op (forward and backward). All shapes in the graph depend on the
# batch size only: no nonzero, no .item(), no host sync.
#
# Reference path (relation_matching_from_tuples, _relation_terms_dense): the dense (T x B)
# formulation on explicit tuples, kept as the implementation the fast path is tested against.

from refilled.mining import (  # noqa: E402  (stage 1's training path)
    normalized_distances_fast,
    row_block,
    sorted_rows,
)


def _tuple_kl(d_s, d_t, anchor, positive, neg_mask, tau):
    """KL(P_T || P_S) of every tuple, on dense (T, B) rows; masked entries weigh exactly 0.

    With logits x_j = (d(a,p) - d(a,j)) / tau shifted so that the positive's is 0, and
    Z = 1 + sum_n exp(x_n): KL = sum_n pT_n xT_n - log ZT - sum_n pT_n xS_n + log ZS. For the
    student no further shift is needed: semi-hard negatives lie farther than the positive, so
    xS_n < 0 on every unmasked entry.
    Masks are applied by multiplying with a float mask (cheaper on CPU than boolean indexing).
    """
    w = neg_mask.to(d_s.dtype)
    with torch.no_grad():
        r_t = d_t / tau
        x_t = (r_t[anchor, positive][:, None] - r_t.index_select(0, anchor)) * w
        top = x_t.amax(dim=1).clamp_min(0)  # the teacher's largest logit, positive included
        e_t = torch.exp(x_t - top[:, None]) * w
        z_t = torch.exp(-top) + e_t.sum(dim=1)
        p_t = e_t / z_t[:, None]  # the negatives' probabilities (the positive's logit is 0)
        neg_entropy = (p_t * x_t).sum(dim=1) - (torch.log(z_t) + top)
    r_s = d_s / tau
    x_s = (r_s[anchor, positive][:, None] - r_s.index_select(0, anchor)) * w
    log_z_s = torch.log1p((torch.exp(x_s) * w).sum(dim=1))
    return neg_entropy - (p_t * x_s).sum(dim=1) + log_z_s


def _graph_zero(tensor: torch.Tensor) -> torch.Tensor:
    """An exact zero that keeps ``tensor``'s graph (so backward() and DDP still work)."""
    return tensor.sum() * 0.0


def _tuple_kl_rows(d_t, ranges, valid, tau):
    """Tuple KLs of a block of anchors, in sorted coordinates: the sum over tuples, and what
    the backward needs: (negatives as a float64 mask, [eT, eS], [1/ZT, 1/ZS] on tuples).

    In a's row sorted by decreasing distance (:class:`~refilled.mining.SortedRanges`), the
    tuple of the positive at position i is {i} + the negatives among positions start_i .. i-1.
    With e_j = exp(-d(a, j) / tau) and c_j = eT_j (dS_j - dT_j):
        KL_i = W_i / (tau ZT_i) + log(ZS_i / ZT_i),  Z_i = e_i + sum_range e,  W_i = c_i + sum_range c.
    Each range sum is a difference of two exclusive prefix sums over the row's negatives,
    accumulated from the far end (small terms first), so its rounding error stays within about
    B ulps of its own value. Distances of normalised vectors lie in [0, 2]: exp(-d / tau) needs
    no shift (for tau above ~0.003). The three sums run stacked, (3, R, B), and in place: at
    small B every op's fixed cost counts, at large B every fresh buffer's page faults do.
    """
    order, start = ranges.order, ranges.start
    v = torch.stack([d_t.gather(1, order), ranges.distance]).to(torch.float64)  # [dT, dS]
    e = v.mul(-1.0 / tau).exp_()  # [eT, eS]
    terms = torch.cat([e, v[1].sub_(v[0]).mul_(e[0])[None]])  # [eT, eS, eT (dS - dT)]
    # Masks as float factors: on CPU, masked_fill / where with a scattered mask cost several
    # times a multiplication. (Entries off the mask are finite, so 0 * x is 0.)
    neg = ranges.negative.to(torch.float64)
    on_tuple = valid.to(torch.float64)
    masked = terms * neg
    prefix = masked.cumsum(2).sub_(masked)  # exclusive; start_i <= i < B is a valid index
    z = prefix.sub_(prefix.gather(2, start.expand_as(prefix))).add_(terms)  # [ZT, ZS, W]
    kl = z[2].div_(z[0]).mul_(1.0 / tau).add_(z[1].div(z[0]).log_())
    inv = z[:2].reciprocal_().mul_(on_tuple)
    return kl.mul_(on_tuple).sum(), (neg, e, inv)


def _tuple_grad_rows(start, neg, e, inv, tau):
    """d (sum of tuple KLs) / d d_s for a block of anchors, in sorted coordinates (float64).

    dKL_i / d dS_j = (eT_j / ZT_i - eS_j / ZS_i) / tau for j = i and for each negative j in
    i's range; a negative's gradient sums 1/Z over the pairs whose range covers it, which is a
    difference array (+ at start_i, - at i) and one prefix sum ([T, S] stacked).
    """
    batch = start.shape[1]
    diff = inv.new_zeros(2, start.shape[0], batch + 1).scatter_add_(2, start.expand_as(inv), inv)
    diff[:, :, :batch].sub_(inv)
    # covered_j = inv_j + [j negative] * sum of inv_i over the pairs with start_i <= j < i
    covered = diff.cumsum_(2)[:, :, :batch].mul_(neg).add_(inv).mul_(e)
    return covered[0].sub_(covered[1]).mul_(1.0 / tau)


class _TupleKL(torch.autograd.Function):
    """(sum over tuples of KL(P_T || P_S), number of tuples) from the distance matrices.

    Mining (:func:`refilled.mining.sorted_rows`) and the range-sum KL run in blocks of anchor
    rows; what the backward needs is kept for all rows (sort order, ranges, masked 1/Z), and
    the gradient is written by hand (autograd would keep every intermediate). O(B^2 log B)
    time, O(B^2) memory, a block loop whose length depends on B only.
    """

    @staticmethod
    def forward(ctx, d_s, d_t, labels, tau, margin):
        batch = d_s.shape[0]
        d_s, d_t = d_s.detach(), d_t.detach()
        total = torch.zeros((), dtype=torch.float64, device=d_s.device)
        count = torch.zeros((), dtype=torch.int64, device=d_s.device)
        kept = []
        step = row_block(batch)
        for first in range(0, batch, step):
            rows = slice(first, first + step)
            ranges = sorted_rows(d_s[rows], labels, first, margin)
            valid = ranges.count > 0
            kl, for_backward = _tuple_kl_rows(d_t[rows], ranges, valid, tau)
            total, count = total + kl, count + valid.sum()
            kept += [ranges.order, ranges.start, *for_backward]
        # Kept block by block (a fixed number of blocks): no copy into (B, B) buffers.
        ctx.save_for_backward(*kept)
        ctx.tau, ctx.dtype = tau, d_s.dtype
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    def backward(ctx, grad_total, grad_count):
        kept, out = ctx.saved_tensors, []
        for block in range(0, len(kept), 5):
            order, start, *for_backward = kept[block:block + 5]
            g = _tuple_grad_rows(start, *for_backward, ctx.tau)
            out.append(torch.zeros_like(g).scatter_(1, order, g).to(ctx.dtype))
        return torch.cat(out) * grad_total.to(ctx.dtype), None, None, None, None


# Triplet mode. Each (a, p, n) is its own binary distribution, so the loss is a sum over
# triplets, not separable into range sums. Two blockwise strategies, one custom op each way:
# - "grid" (any device, no data-dependent shape): blocks of anchors x all (p, n), O(B^3) work,
#   about _TRIPLET_BLOCK_BYTES of temporaries at a time (see _triplet_rows);
# - "band" (CPU, where no host sync exists to avoid): in each anchor's sorted row the
#   triplets of pair i are the negatives among positions start_i .. i-1, so only those bands
#   are visited, in chunks of about _TRIPLET_BAND_ELEMENTS entries: O(#triplets) work.
_TRIPLET_BLOCK_BYTES = 64 << 20
_TRIPLET_TEMPORARIES = 8  # (rows, B, B) tensors alive at once in a _triplet_grid block, at most
_TRIPLET_BAND_ELEMENTS = 1 << 20
_TRIPLET_BAND = None  # None: "band" on CPU, "grid" elsewhere; True / False force one (tests)


def _triplet_rows(batch: int, itemsize: int) -> int:
    """Anchors per grid block: as many as fit the byte budget, at least 1 (no more than B)."""
    per_anchor = _TRIPLET_TEMPORARIES * batch * batch * itemsize
    return max(1, min(batch, _TRIPLET_BLOCK_BYTES // per_anchor))


def _bernoulli_kl(x_s, x_t):
    """KL(Bernoulli(sigmoid(x_t)) || Bernoulli(sigmoid(x_s))), elementwise.

    q log(q/s) + (1-q) log((1-q)/(1-s)) = sp(-x_s) - sp(-x_t) - (1 - q)(x_t - x_s), with
    q = sigmoid(x_t), s = sigmoid(x_s), sp = softplus: every term stable for any x.
    """
    return F.softplus(-x_s).sub_(F.softplus(-x_t)).sub_(torch.sigmoid(-x_t).mul_(x_t - x_s))


def _triplet_grid(d_s, d_t, labels, tau, margin):
    """Yield (rows, mask, x_s, x_t) for blocks of anchors over every (p, n): (R, B, B) each.

    The same values as the dense path: x = (d(a, n) - d(a, p)) / tau for the student and the
    teacher, and the semi-hard test 0 < d(a, n) - d(a, p) <= margin on the student's.
    """
    batch = d_s.shape[0]
    step = _triplet_rows(batch, d_s.element_size())
    columns = torch.arange(batch, device=d_s.device)
    for first in range(0, batch, step):
        rows = slice(first, first + step)
        ds, dt = d_s[rows], d_t[rows]
        same = labels[rows, None] == labels[None, :]
        gap = ds[:, None, :] - ds[:, :, None]  # [a, p, n] = d(a, n) - d(a, p)
        positive = same & (columns[None, :] != columns[rows, None])
        mask = positive[:, :, None] & ~same[:, None, :] & (gap > 0) & (gap <= margin)
        x_t = (dt[:, None, :] - dt[:, :, None]) / tau
        yield rows, mask, gap.div_(tau), x_t


def _triplet_band(d_s, d_t, labels, tau, margin):
    """Yield (pairs, windows, mask, x_s, x_t) over the semi-hard bands of the sorted rows.

    First yields the sort order and the number of triplets. Then, by chunks: ``pairs`` (P,)
    are tuples' flat positions q = a * B + i in sorted coordinates; the band of q is the flat
    range [q - width, q) (same row, positions start_i .. i-1), read through windows
    [q - W, q) of W = the chunk's widest band: ``windows`` (P,) are the windows' first flat
    positions in arrays padded with B entries in front, ``mask`` (P, W) marks the semi-hard
    triplets. Windows of one padded flat array are strided views (unfold): gathering a chunk
    copies runs, not single entries. Pairs are taken by increasing width, chunks of about
    _TRIPLET_BAND_ELEMENTS entries. Data-dependent shapes: CPU only.
    """
    ranges = sorted_rows(d_s, labels, 0, margin)
    batch = d_s.shape[0]
    yield ranges.order, ranges.count.sum()

    def padded(x):
        return torch.cat([x.new_zeros(batch), x.flatten()])

    v_s = padded(ranges.distance)
    v_t = padded(d_t.gather(1, ranges.order))
    negative = padded(ranges.negative)
    pairs = (ranges.count > 0).flatten().nonzero().squeeze(1)
    width = (pairs % batch) - ranges.start.flatten()[pairs]  # band length, positives included
    width, by_width = width.sort()
    pairs = pairs[by_width]
    first, total = 0, pairs.numel()
    while first < total:
        # as many pairs as keep (pairs x widest band) within the budget, at least one
        cost = width[first:] * torch.arange(1, total - first + 1)
        last = first + max(1, int(torch.searchsorted(cost, _TRIPLET_BAND_ELEMENTS, right=True)))
        q, w = pairs[first:last], width[first:last]
        span = int(w[-1])
        windows = q + (batch - span)
        offsets = torch.arange(span)
        mask = negative.unfold(0, span, 1).index_select(0, windows)
        mask &= offsets >= (span - w)[:, None]
        mask = mask.to(d_s.dtype)  # a float factor: cheaper than masked_fill on CPU
        x_s = v_s.unfold(0, span, 1).index_select(0, windows).sub_(v_s[q + batch][:, None])
        x_t = v_t.unfold(0, span, 1).index_select(0, windows).sub_(v_t[q + batch][:, None])
        yield q, windows, mask, x_s.div_(tau), x_t.div_(tau)
        first = last


@torch.library.custom_op(
    "refilled::triplet_kl_sum",
    mutates_args=(),
    schema="(Tensor d_s, Tensor d_t, Tensor labels, float tau, float margin, bool band) "
    "-> (Tensor, Tensor)",
)
def _triplet_kl_sum(d_s, d_t, labels, tau, margin, band):
    """Sum over semi-hard triplets of the Bernoulli KL (float64) and the number of triplets
    (int64): two 0-d tensors. ``band`` picks the strategy (see above; CPU only).

    A custom op: torch.compile sees one node with static output shapes (the block loop runs
    eagerly inside it), and autograd keeps no block: the backward op recomputes them.
    """
    total = torch.zeros((), dtype=torch.float64, device=d_s.device)
    if band:
        chunks = _triplet_band(d_s, d_t, labels, tau, margin)
        _, count = next(chunks)
        for _, _, mask, x_s, x_t in chunks:
            total += _bernoulli_kl(x_s, x_t).mul_(mask).sum().to(torch.float64)
        return total, count
    count = torch.zeros((), dtype=torch.int64, device=d_s.device)
    for _, mask, x_s, x_t in _triplet_grid(d_s, d_t, labels, tau, margin):
        total += _bernoulli_kl(x_s, x_t).masked_fill_(~mask, 0.0).sum().to(torch.float64)
        count += mask.sum()
    return total, count


@_triplet_kl_sum.register_fake
def _(d_s, d_t, labels, tau, margin, band):
    return d_s.new_empty((), dtype=torch.float64), d_s.new_empty((), dtype=torch.int64)


@torch.library.custom_op(
    "refilled::triplet_kl_grad",
    mutates_args=(),
    schema="(Tensor grad, Tensor d_s, Tensor d_t, Tensor labels, float tau, float margin, "
    "bool band) -> Tensor",
)
def _triplet_kl_grad(grad, d_s, d_t, labels, tau, margin, band):
    """Gradient of :func:`_triplet_kl_sum`'s sum with respect to d_s, by the same blocks.

    d KL / d x_s = sigmoid(x_s) - sigmoid(x_t), and x_s = (d(a, n) - d(a, p)) / tau.
    """
    def slope(mask, x_s, x_t):  # mask: bool (grid) or a float factor (band)
        g = torch.sigmoid(x_s).sub_(torch.sigmoid(x_t))
        return (g.mul_(mask) if mask.is_floating_point() else g.masked_fill_(~mask, 0.0)).div_(tau)

    if band:
        chunks = _triplet_band(d_s, d_t, labels, tau, margin)
        order, _ = next(chunks)
        batch = d_s.shape[0]
        sorted_grad = d_s.new_zeros(batch + d_s.numel())  # padded like the band's arrays
        for pairs, windows, mask, x_s, x_t in chunks:
            g = slope(mask, x_s, x_t)
            index = windows[:, None] + torch.arange(g.shape[1])
            sorted_grad.index_add_(0, index.flatten(), g.flatten())  # as n
            sorted_grad.index_add_(0, pairs + batch, g.sum(dim=1).neg_())  # as p
        out = torch.zeros_like(d_s).scatter_(1, order, sorted_grad[batch:].view_as(d_s))
    else:
        out = torch.zeros_like(d_s)
        for rows, mask, x_s, x_t in _triplet_grid(d_s, d_t, labels, tau, margin):
            g = slope(mask, x_s, x_t)
            out[rows] = g.sum(dim=1) - g.sum(dim=2)  # as n, minus as p
    return out * grad.to(out.dtype)


@_triplet_kl_grad.register_fake
def _(grad, d_s, d_t, labels, tau, margin, band):
    return torch.empty_like(d_s)


def _triplet_kl_sum_setup(ctx, inputs, output):
    d_s, d_t, labels, tau, margin, band = inputs
    ctx.save_for_backward(d_s, d_t, labels)
    ctx.args = (tau, margin, band)


def _triplet_kl_sum_backward(ctx, grad_total, grad_count):
    d_s, d_t, labels = ctx.saved_tensors
    grad = _triplet_kl_grad(grad_total, d_s, d_t, labels, *ctx.args)
    return grad, None, None, None, None, None


_triplet_kl_sum.register_autograd(_triplet_kl_sum_backward, setup_context=_triplet_kl_sum_setup)


# On CPU in eager mode, batches with few positive pairs (T <= _DENSE_TUPLES_PER_ANCHOR * B, e.g.
# 128 images of 100 classes) are cheaper on the dense (T x B) path: its T x B tensors are then
# at most a few B^2 entries, so memory still grows like B^2, while a sort of every row costs
# more. Measured crossover on this project's CPU: T ~ 5 B at B = 128 .. 512. Under
# torch.compile and on accelerators the sorted path always runs (static shapes, no host
# read). 0 switches the dense dispatch off.
_DENSE_TUPLES_PER_ANCHOR = 4


def _few_tuples(d_s, labels):
    """True when the dense path is the cheaper one (CPU, eager, T <= k B); reads T on the host,
    which on CPU is no device sync."""
    if _DENSE_TUPLES_PER_ANCHOR <= 0 or d_s.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    sizes = torch.bincount(labels)
    return int((sizes * (sizes - 1)).sum()) <= _DENSE_TUPLES_PER_ANCHOR * labels.numel()


def _check_relation_args(student_emb, teacher_emb, labels, tau, mode, margin=0.0, scale=1.0,
                         fn="relation_matching_terms"):
    """The stage-1 loss's inputs: (B, D) and (B, D_T) float embeddings, B integer labels on one
    device, a known mode, tau > 0, margin and scale >= 0."""
    if mode not in RELATION_MODES:
        checks.fail(fn, f"mode must be one of {RELATION_MODES}, got {mode!r}")
    checks.number(fn, "tau", tau, positive=True)
    checks.number(fn, "margin", margin)
    checks.number(fn, "scale", scale)
    checks.features(fn, "student_emb", student_emb)
    checks.features(fn, "teacher_emb", teacher_emb, rows=student_emb.shape[0])
    checks.labels(fn, labels, student_emb.shape[0])
    checks.same_device(fn, student_emb=student_emb, teacher_emb=teacher_emb, labels=labels)


def _stage1_distances(student_emb, teacher_emb, fast=False):
    d_s = normalized_distances_fast(student_emb) if fast else normalized_distances(student_emb)
    with torch.no_grad():
        d_t = normalized_distances(teacher_emb.detach(), exact=False).to(d_s.dtype)
    return d_s, d_t


def relation_matching_terms(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    labels: torch.Tensor,
    *,
    tau: float = 4.0,
    margin: float = 0.2,
    mode: str = "tuple",
    scale: float = 1000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 of REFILLED: match the teacher's and the student's tuple distributions.

    Tuples are mined on the student's normalised embedding (:mod:`refilled.mining`). For each
    tuple (a, p, n_1..n_K), ``mode="tuple"`` compares
    P = softmax([-d(a,p), -d(a,n_1), ..., -d(a,n_K)] / tau) computed with the teacher's
    distances (target) and with the student's; ``mode="triplet"`` treats every (a, p, n) as the
    binary distribution [sigmoid((d(a,n) - d(a,p)) / tau), 1 - that]. The loss is
    ``scale * mean KL(P_T || P_S)`` over tuples (resp. triplets).

    No tuple is listed: the tuple mode works on sorted rows and range sums (O(B^2 log B) time,
    O(B^2) memory); the triplet mode is a custom op, blockwise over anchors (O(B^3) time on
    accelerators, O(#triplets) on CPU, bounded memory). Every shape in the graph depends on B
    only, so this traces with ``torch.compile(fullgraph=True)`` and never syncs with the host.
    (On CPU in eager mode, a batch with few positive pairs, T <= 4 B, takes the dense path,
    which is then cheaper and still O(B^2) in memory; see ``_DENSE_TUPLES_PER_ANCHOR``.)
    The same tuples and values as :func:`relation_matching_from_tuples` on
    :func:`refilled.mining.semihard_tuples` (to float rounding; the sums here are float64).

    Args:
        student_emb: (B, D) raw student embeddings (gradient flows through them).
        teacher_emb: (B, D_T) raw teacher embeddings of the same batch (treated as constant).
        labels: (B,) labels in the student's label space.

    Returns:
        ``(loss, num_tuples)``: the scalar loss (in the student's dtype; half precision is
        promoted to float32) and the number of mined tuples (``"tuple"``: pairs with at least
        one semi-hard negative) or triplets (``"triplet"``) as a 0-d int64 tensor on the
        input's device. With no tuple the loss is an exact zero that keeps the graph.
    """
    _check_relation_args(student_emb, teacher_emb, labels, tau, mode, margin, scale)
    return _relation_matching_terms(student_emb, teacher_emb, labels, tau=tau, margin=margin,
                                    mode=mode, scale=scale)


def _relation_matching_terms(student_emb, teacher_emb, labels, *, tau=4.0, margin=0.2, mode="tuple",
                             scale=1000.0):
    """:func:`relation_matching_terms` without the argument checks (the training loop's form)."""
    d_s, d_t = _stage1_distances(student_emb, teacher_emb, fast=True)
    labels = labels.reshape(-1)
    if mode == "tuple" and _few_tuples(d_s, labels):
        anchor, positive, neg_mask = candidate_tuples(d_s, labels, margin)
        return _relation_from_tuples(d_s, d_t, anchor, positive, neg_mask, tau, mode, scale)
    if mode == "tuple":
        total, num_tuples = _TupleKL.apply(d_s, d_t, labels, float(tau), float(margin))
    else:
        band = d_s.device.type == "cpu" if _TRIPLET_BAND is None else _TRIPLET_BAND
        total, num_tuples = _triplet_kl_sum(d_s, d_t, labels, float(tau), float(margin), band)
    loss = (total / num_tuples.clamp_min(1)).to(d_s.dtype)
    return scale * loss, num_tuples


def relation_matching_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    labels: torch.Tensor,
    *,
    tau: float = 4.0,
    margin: float = 0.2,
    mode: str = "tuple",
    scale: float = 1000.0,
) -> torch.Tensor:
    """Stage 1 of REFILLED; the loss of :func:`relation_matching_terms`."""
    _check_relation_args(student_emb, teacher_emb, labels, tau, mode, margin, scale,
                         fn="relation_matching_loss")
    return _relation_matching_terms(
        student_emb, teacher_emb, labels, tau=tau, margin=margin, mode=mode, scale=scale
    )[0]


def relation_matching_from_tuples(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative_mask: torch.Tensor,
    *,
    tau: float = 4.0,
    mode: str = "tuple",
    scale: float = 1000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage-1 loss on tuples the caller gives (e.g. from :func:`~refilled.mining.semihard_tuples`
    or another miner, like pytorch-metric-learning's ``indices_tuple``).

    Tuple t is (anchor[t], positive[t]) with the negatives marked in row t of ``negative_mask``
    (T, B). The dense formulation: memory O(T x B), data-dependent shapes in the triplet mode;
    for the training path use :func:`relation_matching_terms`. Rows without a negative count
    for nothing. Returns ``(loss, num_tuples)`` as :func:`relation_matching_terms` does.
    """
    fn = "relation_matching_from_tuples"
    if mode not in RELATION_MODES:
        checks.fail(fn, f"mode must be one of {RELATION_MODES}, got {mode!r}")
    checks.number(fn, "tau", tau, positive=True)
    checks.number(fn, "scale", scale)
    checks.features(fn, "student_emb", student_emb)
    checks.features(fn, "teacher_emb", teacher_emb)
    for arg, t in (("anchor", anchor), ("positive", positive)):
        checks.is_tensor(fn, arg, t)
        if t.is_floating_point() or t.dtype == torch.bool:
            checks.fail(fn, f"{arg} must be integer indices, got {t.dtype}")
    checks.is_tensor(fn, "negative_mask", negative_mask)
    batch = student_emb.shape[0]
    anchor, positive = anchor.reshape(-1), positive.reshape(-1)
    if checks.values_checked() and anchor.numel() and (
            int(torch.cat([anchor, positive]).min()) < 0 or int(torch.cat([anchor, positive]).max()) >= batch):
        checks.fail(fn, f"anchor and positive must be indices into the batch of {batch}")
    if teacher_emb.shape[0] != batch or negative_mask.shape != (anchor.numel(), batch) or (
        positive.numel() != anchor.numel()
    ):
        checks.fail(fn,
            f"tuples do not fit a batch of {batch}: anchor {tuple(anchor.shape)}, positive "
            f"{tuple(positive.shape)}, negative_mask {tuple(negative_mask.shape)}, teacher "
            f"{teacher_emb.shape[0]} rows"
        )
    d_s, d_t = _stage1_distances(student_emb, teacher_emb)
    return _relation_from_tuples(d_s, d_t, anchor, positive, negative_mask.bool(), tau, mode, scale)


def _relation_from_tuples(d_s, d_t, anchor, positive, neg_mask, tau, mode, scale):
    if mode == "tuple":
        # Rows without a negative contribute exactly 0 and are left out of the count; with no
        # tuple at all the sum is an exact, graph-connected 0.
        num_tuples = neg_mask.any(dim=1).sum()
        loss = _tuple_kl(d_s, d_t, anchor, positive, neg_mask, tau).sum() / num_tuples.clamp_min(1)
    else:
        t_idx, n_idx = neg_mask.nonzero(as_tuple=True)
        num_tuples = torch.tensor(t_idx.numel(), device=d_s.device)
        if t_idx.numel() == 0:
            return _graph_zero(d_s), num_tuples
        a, p = anchor[t_idx], positive[t_idx]
        x_s = (d_s[a, n_idx] - d_s[a, p]) / tau
        x_t = (d_t[a, n_idx] - d_t[a, p]) / tau
        q_t = torch.sigmoid(x_t)
        # KL between Bernoulli(q_t) and Bernoulli(q_s), in log space for stability.
        kl = q_t * (F.logsigmoid(x_t) - F.logsigmoid(x_s)) + (1 - q_t) * (
            F.logsigmoid(-x_t) - F.logsigmoid(-x_s)
        )
        loss = kl.mean()
    return scale * loss, num_tuples


def _relation_terms_dense(student_emb, teacher_emb, labels, *, tau=4.0, margin=0.2,
                          mode="tuple", scale=1000.0):
    """The dense stage-1 implementation that :func:`relation_matching_terms` replaced: every
    ordered positive pair listed with ``nonzero`` and a (T x B) negative mask. The reference
    the fast path is tested against (memory O(B^3 / C))."""
    _check_relation_args(student_emb, teacher_emb, labels, tau, mode, margin, scale)
    d_s, d_t = _stage1_distances(student_emb, teacher_emb)
    anchor, positive, neg_mask = candidate_tuples(d_s, labels, margin)
    return _relation_from_tuples(d_s, d_t, anchor, positive, neg_mask, tau, mode, scale)


def present_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean mask (num_classes,) of the classes that occur in ``labels`` (no host sync)."""
    mask = torch.zeros(num_classes, dtype=torch.bool, device=labels.device)
    return mask.index_fill_(0, labels.reshape(-1), True)


def local_centers(teacher_emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """CVPR's per-batch teacher centres: normalised mean teacher embedding of each class.

    Rows of classes absent from the batch are zero (the local classifier masks them anyway).
    """
    fn = "local_centers"
    checks.count(fn, "num_classes", num_classes)
    checks.features(fn, "teacher_emb", teacher_emb)
    checks.labels(fn, labels, teacher_emb.shape[0], num_classes)
    checks.same_device(fn, teacher_emb=teacher_emb, labels=labels)
    return _local_centers(teacher_emb, labels, num_classes)


def _local_centers(teacher_emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    emb = teacher_emb.detach()
    sums = emb.new_zeros(num_classes, emb.shape[1]).index_add_(0, labels.reshape(-1), emb)
    return F.normalize(sums, dim=1)


def teacher_instance_weights(teacher_logits: torch.Tensor) -> torch.Tensor:
    """TPAMI's adaptive emphasis from the teacher's own classifier.

    u_i = -log max_k softmax(g(x_i))_k; u^ = min-max normalised u over the batch;
    w_i = 2 * sigmoid(-u^_i), in [0.54, 1]. A batch whose uncertainties are all equal gets
    w = 1 everywhere (no division by zero).
    """
    checks.features("teacher_instance_weights", "teacher_logits", teacher_logits, what="(batch, classes)")
    logits = teacher_logits.detach().float()
    u = -torch.log_softmax(logits, dim=1).amax(dim=1)
    lo, hi = u.min(), u.max()
    span = hi - lo
    u_hat = (u - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return (2.0 * torch.sigmoid(-u_hat)).to(teacher_logits.dtype)


def local_classifier_loss(
    student_logits: torch.Tensor,
    teacher_emb: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    *,
    tau_teacher: float = 1.0,
    tau_student: float = 1.0,
    weights: torch.Tensor | None = None,
    normalize_teacher: bool = False,
    reduction: str = "batch",
) -> torch.Tensor:
    """Stage 2's distillation term: the embedding-induced local classifier.

    Teacher logits t_ik = phi_T(x_i) . c_k over the classes present in the batch (C_B), with
    ``centers`` (C, D_T) the normalised teacher class centres of the student's classes; the
    student's logits are restricted to the same classes. Returns
    (1/B) sum_i w_i KL(softmax(t_i / tau_teacher) || softmax(f(x_i)[C_B] / tau_student)),
    without the cross-entropy and without lambda. ``reduction="element"`` divides by
    B x |C_B| instead of B: the element mean of ``nn.KLDivLoss()`` that the CVPR code uses, so
    that its lambda acts per class in the batch.
    """
    fn = "local_classifier_loss"
    if reduction not in ("batch", "element"):
        checks.fail(fn, f"reduction must be 'batch' or 'element', got {reduction!r}")
    checks.number(fn, "tau_teacher", tau_teacher, positive=True)
    checks.number(fn, "tau_student", tau_student, positive=True)
    checks.features(fn, "student_logits", student_logits, what="(batch, classes)")
    batch, num_classes = student_logits.shape
    checks.features(fn, "teacher_emb", teacher_emb, rows=batch)
    checks.features(fn, "centers", centers, what="(classes, teacher features)")
    if centers.shape != (num_classes, teacher_emb.shape[1]):
        checks.fail(fn, f"centers must be (classes, teacher features) = ({num_classes}, "
                        f"{teacher_emb.shape[1]}), got {tuple(centers.shape)}: one teacher centre "
                        "per student class (refilled.class_centers of the teacher's embeddings)")
    checks.labels(fn, labels, batch, num_classes)
    checks.weights(fn, weights, batch)
    checks.same_device(fn, student_logits=student_logits, teacher_emb=teacher_emb, labels=labels,
                       centers=centers, weights=weights)
    return _local_classifier_loss(student_logits, teacher_emb, labels, centers, tau_teacher=tau_teacher,
                                  tau_student=tau_student, weights=weights,
                                  normalize_teacher=normalize_teacher, reduction=reduction)


def _local_classifier_loss(student_logits, teacher_emb, labels, centers, *, tau_teacher=1.0,
                           tau_student=1.0, weights=None, normalize_teacher=False, reduction="batch"):
    """:func:`local_classifier_loss` without the argument checks (the training loop's form)."""
    num_classes = student_logits.shape[1]
    emb = teacher_emb.detach()
    if normalize_teacher:
        emb = F.normalize(emb, dim=1)
    teacher_logits = emb @ centers.detach().to(emb.dtype).T
    present = present_classes(labels, num_classes).expand_as(student_logits)
    kl = _masked_kl(
        teacher_logits.to(student_logits.dtype) / tau_teacher,
        student_logits / tau_student,
        present,
    )
    if weights is not None:
        kl = kl * weights.detach().to(kl.dtype)
    if reduction == "element":  # |C_B| as a tensor: no host sync
        return kl.mean() / present[0].sum().to(kl.dtype)
    return kl.mean()


# ====================================================================== baseline losses
#
# Written from the formulas in the cited papers. Loss weights (beta for AT, gamma for SP, ...)
# belong to the method using the loss; the paper defaults are noted in each docstring. Except
# for RKD (whose paper fixes the teacher side as a constant target, so it is detached here),
# gradients flow into both arguments: callers detach the teacher when they want to.


def _same_shape(name: str, a: Tensor, b: Tensor) -> None:
    checks.is_tensor(name, "student input", a)
    checks.is_tensor(name, "teacher input", b)
    if a.shape != b.shape:
        checks.fail(name, f"student and teacher shapes must match, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        checks.fail(name, f"the inputs must be floating point, got {a.dtype} and {b.dtype}")
    checks.same_device(name, student=a, teacher=b)


def _same_batch(name: str, a: Tensor, b: Tensor) -> None:
    checks.is_tensor(name, "student input", a)
    checks.is_tensor(name, "teacher input", b)
    if a.dim() < 2 or b.dim() < 2 or a.shape[0] != b.shape[0]:
        checks.fail(name, f"student and teacher need (batch, ...) inputs of the same batch size, "
                          f"got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        checks.fail(name, f"the inputs must be floating point, got {a.dtype} and {b.dtype}")
    checks.same_device(name, student=a, teacher=b)


def _tiny(x: Tensor) -> float:
    """Threshold on squared lengths below which a vector counts as zero."""
    return torch.finfo(x.dtype).eps ** 2


# --------------------------------------------------------------------------------------- KD


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

    ``T^2 * (1/B) * sum_i KL(softmax(t_i / T) || softmax(s_i / T))`` for (B, C) logits.
    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures.
    """
    _same_shape("kd_loss", student_logits, teacher_logits)
    if student_logits.dim() != 2:
        checks.fail("kd_loss", f"logits must be (B, C), got shape {tuple(student_logits.shape)}")
    checks.number("kd_loss", "temperature", temperature, positive=True)
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def check_shared_ids(student_ids: Tensor, teacher_ids: Tensor, num_student: int | None = None,
                     num_teacher: int | None = None, fn: str = "check_shared_ids") -> None:
    """Refuse a class map that cannot be right: ids must be 1-D integer tensors of one length
    (at least one class), ``student_ids[k]`` and ``teacher_ids[k]`` naming the same class, each
    side without repeats and inside its logits (when the sizes are given). Reads the ids on the
    host: call it once, not on every step."""
    for name, ids in (("student_ids", student_ids), ("teacher_ids", teacher_ids)):
        checks.is_tensor(fn, name, ids)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            checks.fail(fn, f"{name} must be a 1-D tensor of class indices, got shape "
                            f"{tuple(ids.shape)} and dtype {ids.dtype}")
    if student_ids.numel() != teacher_ids.numel() or student_ids.numel() == 0:
        checks.fail(fn, f"student_ids and teacher_ids must pair at least one class, got "
                        f"{student_ids.numel()} and {teacher_ids.numel()} ids")
    for name, ids, size in (("student", student_ids, num_student), ("teacher", teacher_ids, num_teacher)):
        ids = ids.cpu()
        if int(ids.min()) < 0 or (size is not None and int(ids.max()) >= size):
            bound = f"[0, {size})" if size is not None else ">= 0"
            checks.fail(fn, f"{name} class ids must be in {bound} (the {name}'s logits), got "
                            f"{int(ids.min())}..{int(ids.max())}")
        if ids.unique().numel() != ids.numel():
            checks.fail(fn, f"{name} class ids repeat a class: {ids.tolist()}")


def shared_kd_loss(student_logits: Tensor, teacher_logits: Tensor, student_ids: Tensor,
                   teacher_ids: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD on the classes the student and the teacher share (REFILLED's stage 2 where the
    label spaces overlap).

    Column ``student_ids[k]`` of the student's (B, C_S) logits and column ``teacher_ids[k]`` of
    the teacher's (B, C_T) logits are the same class. Both sides keep only those K columns and
    are renormalised over them (softmax over the shared classes at ``temperature``):
    ``T^2 * (1/B) * sum_i KL(softmax(t_i[teacher_ids] / T) || softmax(s_i[student_ids] / T))``,
    i.e. :func:`kd_loss` on the aligned columns. The teacher's logits are a constant target
    (detached). The ids are checked against the logits' widths (:func:`check_shared_ids`), so
    the training loop calls the unchecked form once they were checked.
    """
    fn = "shared_kd_loss"
    checks.number(fn, "temperature", temperature, positive=True)
    checks.features(fn, "student_logits", student_logits, what="(batch, classes)")
    checks.features(fn, "teacher_logits", teacher_logits, rows=student_logits.shape[0],
                    what="(batch, classes)")
    checks.same_device(fn, student_logits=student_logits, teacher_logits=teacher_logits,
                       student_ids=student_ids, teacher_ids=teacher_ids)
    if checks.values_checked():
        check_shared_ids(student_ids, teacher_ids, student_logits.shape[1], teacher_logits.shape[1], fn=fn)
    return _shared_kd_loss(student_logits, teacher_logits, student_ids, teacher_ids, temperature)


def _shared_kd_loss(student_logits, teacher_logits, student_ids, teacher_ids, temperature=4.0):
    """:func:`shared_kd_loss` without the argument checks (the training loop's form)."""
    log_s = F.log_softmax(student_logits.index_select(1, student_ids) / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().index_select(1, teacher_ids) / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


# -------------------------------------------------------------------------------------- RKD


def _pairwise_differences(emb: Tensor) -> tuple[Tensor, Tensor]:
    """``diff[j, i] = e_i - e_j`` (B, B, D) and its squared length (B, B)."""
    diff = emb.unsqueeze(0) - emb.unsqueeze(1)
    return diff, diff.pow(2).sum(-1)


def _normalised_distances(emb: Tensor) -> Tensor:
    """Euclidean distance matrix divided by its mean over off-diagonal positive entries.

    Zero distances (diagonal, coinciding embeddings) stay exactly 0 with zero gradient; if no
    distance is positive (B = 1, all embeddings equal) the matrix is left unscaled (all zeros).
    """
    _, sq = _pairwise_differences(emb)
    tiny = _tiny(emb)
    positive = sq > tiny
    dist = torch.where(positive, sq.clamp_min(tiny).sqrt(), torch.zeros_like(sq))
    count = positive.sum()
    mean = dist.sum() / count.clamp_min(1).to(dist.dtype)
    return dist / torch.where(count > 0, mean, torch.ones_like(mean))


def _angle_cosines(emb: Tensor) -> Tensor:
    """``cos[j, i, k] = <u_ji, u_jk>`` with ``u_ji = (e_i - e_j) / ||e_i - e_j||`` (0 when e_i = e_j)."""
    diff, sq = _pairwise_differences(emb)
    tiny = _tiny(emb)
    unit = torch.where(
        (sq > tiny).unsqueeze(-1), diff * sq.clamp_min(tiny).rsqrt().unsqueeze(-1), torch.zeros_like(diff)
    )
    return torch.bmm(unit, unit.transpose(1, 2))


def _embeddings(name: str, student_emb: Tensor, teacher_emb: Tensor) -> tuple[Tensor, Tensor]:
    _same_batch(name, student_emb, teacher_emb)
    return student_emb.flatten(1), teacher_emb.detach().flatten(1)


def rkd_distance_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation": distance-wise term.

    ``psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu`` with ``mu`` the mean of the positive off-diagonal
    distances in the batch; loss = mean over all B*B pairs (diagonal included) of
    ``smooth_l1(psi_D(s_i, s_j), psi_D(t_i, t_j))`` (Huber, beta = 1). Embeddings are flattened to
    (B, D); student and teacher widths may differ. The teacher side is detached.
    """
    s, t = _embeddings("rkd_distance_loss", student_emb, teacher_emb)
    return F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t), beta=1.0)


def rkd_angle_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Park et al. 2019, RKD angle-wise term.

    ``psi_A(t_i, t_j, t_k) = <e_ij, e_kj>`` with ``e_ij = (t_i - t_j) / ||t_i - t_j||``; loss = mean
    over all B^3 triplets of ``smooth_l1(psi_A(s), psi_A(t))`` (Huber, beta = 1). A zero-length
    difference gives a zero unit vector (cosine 0), so coinciding embeddings never produce NaN.
    The teacher side is detached.
    """
    s, t = _embeddings("rkd_angle_loss", student_emb, teacher_emb)
    return F.smooth_l1_loss(_angle_cosines(s), _angle_cosines(t), beta=1.0)


def rkd_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    """Park et al. 2019, RKD-DA: ``distance_weight * L_dist + angle_weight * L_angle``
    (paper defaults 25 and 50)."""
    checks.number("rkd_loss", "distance_weight", distance_weight)
    checks.number("rkd_loss", "angle_weight", angle_weight)
    return distance_weight * rkd_distance_loss(student_emb, teacher_emb) + angle_weight * rkd_angle_loss(
        student_emb, teacher_emb
    )


# ----------------------------------------------------------------------------------- FitNet


def fitnet_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets": hint loss.

    ``mean((r(s) - t)^2)`` over all elements, where ``student_feat`` is already ``r(s)``: the
    regressor r is a module owned by the method. Shapes must match.
    """
    _same_shape("fitnet_loss", student_feat, teacher_feat)
    return F.mse_loss(student_feat, teacher_feat)


# --------------------------------------------------------------------------------------- AT


def _attention(feat: Tensor, p: float) -> Tensor:
    return F.normalize(feat.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(
    student_feats: Tensor | Sequence[Tensor],
    teacher_feats: Tensor | Sequence[Tensor],
    p: float = 2,
) -> Tensor:
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention": attention transfer.

    For each (B, C, H, W) pair: ``a = normalise_L2(flatten(mean_c |A_c|^p))`` (B, HW), and
    ``L_pair = mean over the B*HW entries of (a_s - a_t)^2``; the loss is the sum of ``L_pair``
    over pairs. (The paper's ``||a_s - a_t||_2`` per sample is replaced by this squared, averaged
    form, the widely used one.) Channels may differ within a pair; batch and spatial sizes may not.
    The paper's weight beta = 1000 is applied by the method, not here. Single tensors are
    accepted as one pair.
    """
    if isinstance(student_feats, Tensor):
        student_feats = [student_feats]
    if isinstance(teacher_feats, Tensor):
        teacher_feats = [teacher_feats]
    if len(student_feats) != len(teacher_feats) or len(student_feats) == 0:
        checks.fail("at_loss", f"need the same non-zero number of student and teacher maps, "
                               f"got {len(student_feats)} and {len(teacher_feats)}")
    checks.number("at_loss", "p", p, positive=True)
    total = None
    for idx, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        checks.is_tensor("at_loss", f"student map {idx}", fs)
        checks.is_tensor("at_loss", f"teacher map {idx}", ft)
        if fs.dim() != 4 or ft.dim() != 4:
            checks.fail("at_loss", f"pair {idx} must be (B, C, H, W) maps, got {tuple(fs.shape)} and "
                                   f"{tuple(ft.shape)}")
        if fs.shape[0] != ft.shape[0] or fs.shape[2:] != ft.shape[2:]:
            checks.fail("at_loss", f"pair {idx} needs equal batch and spatial sizes, got "
                                   f"{tuple(fs.shape)} and {tuple(ft.shape)}")
        if not (fs.is_floating_point() and ft.is_floating_point()):
            checks.fail("at_loss", f"pair {idx} must be floating point, got {fs.dtype} and {ft.dtype}")
        checks.same_device("at_loss", student=fs, teacher=ft)
        term = (_attention(fs, p) - _attention(ft, p)).pow(2).mean()
        total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------------------- SP


def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation".

    ``G = normalise_rows_L2(F F^T)`` with F the (B, -1) flattened features;
    ``loss = ||G_s - G_t||_F^2 / B^2``. Feature shapes may differ beyond the batch dimension.
    The paper's weight gamma = 3000 is applied by the method, not here.
    """
    _same_batch("sp_loss", student_feat, teacher_feat)
    b = student_feat.shape[0]

    def gram(x: Tensor) -> Tensor:
        x = x.flatten(1)
        return F.normalize(x @ x.t(), dim=1)

    return (gram(student_feat) - gram(teacher_feat)).pow(2).sum() / (b * b)


# -------------------------------------------------------------------------------------- PKT


def pkt_loss(student_emb: Tensor, teacher_emb: Tensor, eps: float = 1e-7) -> Tensor:
    """Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer".

    With ``x`` the L2-normalised (B, -1) embeddings, ``K = (x x^T + 1) / 2`` (cosine mapped to
    [0, 1]) and ``P = K / rowsum(K)`` (conditional probabilities p_{j|i}); diagonal included.
    ``loss = (1/B) * sum_{i,j} p^t_{j|i} * log((p^t_{j|i} + eps) / (p^s_{j|i} + eps))``, i.e. the
    batch mean of the per-row KL divergences. Embedding widths may differ.
    """
    _same_batch("pkt_loss", student_emb, teacher_emb)
    checks.number("pkt_loss", "eps", eps, positive=True)

    def conditional(x: Tensor) -> Tensor:
        x = F.normalize(x.flatten(1), dim=1)
        k = (x @ x.t() + 1) / 2
        return k / k.sum(1, keepdim=True)

    ps, pt = conditional(student_emb), conditional(teacher_emb)
    return (pt * torch.log((pt + eps) / (ps + eps))).sum() / student_emb.shape[0]


# ------------------------------------------------------------------------- label smoothing


def label_smoothing_ce(logits: Tensor, labels: Tensor, smoothing: float = 0.1) -> Tensor:
    """Cross-entropy with label smoothing (Szegedy et al. 2016): targets
    ``(1 - smoothing) * onehot + smoothing / C``; mean over the batch."""
    fn = "label_smoothing_ce"
    checks.features(fn, "logits", logits, what="(batch, classes)")
    checks.labels(fn, labels, logits.shape[0], logits.shape[1])
    checks.number(fn, "smoothing", smoothing, below=1.0)
    checks.same_device(fn, logits=logits, labels=labels)
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


# ====================================================================== loss modules
#
# nn.Module forms of REFILLED's two losses, for a training loop of the user's own; they hold
# only hyperparameters and call the functions above.


def _tuples_from(indices_tuple, batch: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(anchor, positive, negative mask) from our tuple form or from pytorch-metric-learning's
    triplet form ``(anchors, positives, negatives)`` (one index per triplet)."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) != 3:
        raise checks.RefilledError("indices_tuple must be (anchor, positive, negative_mask) or "
                         "(anchors, positives, negatives) triplet indices")
    a, p, third = (torch.as_tensor(t, device=device) for t in indices_tuple)
    if third.dtype == torch.bool:
        if third.shape != (a.numel(), batch):
            raise checks.RefilledError(f"negative_mask must be (tuples, batch) = ({a.numel()}, {batch}), "
                             f"got {tuple(third.shape)}")
        return a.long(), p.long(), third
    if not (a.shape == p.shape == third.shape) or a.dim() != 1:
        raise checks.RefilledError("triplet indices (anchors, positives, negatives) must be 1-D and of "
                                   "one length")
    pairs, inverse = torch.unique(torch.stack([a, p]).long(), dim=1, return_inverse=True)
    mask = torch.zeros(pairs.shape[1], batch, dtype=torch.bool, device=device)
    mask[inverse, third.long()] = True
    return pairs[0], pairs[1], mask


class RelationMatchingLoss(torch.nn.Module):
    """Stage 1 of REFILLED as a module .

    ``forward(student_emb, teacher_emb, labels, indices_tuple=None)`` returns the scalar
    ``scale * mean KL(P_T || P_S)`` over the semi-hard tuples mined on the student's normalised
    embedding; the teacher's embedding is a constant target (detached). Embedding widths may
    differ. ``indices_tuple`` replaces the mining with given tuples: ``(anchor, positive,
    negative_mask)`` as :func:`refilled.semihard_tuples` returns them, or the triplets
    ``(anchors, positives, negatives)`` of a pytorch-metric-learning miner. A batch without a
    tuple gives an exact, graph-connected zero.
    """

    def __init__(self, tau: float = 4.0, margin: float = 0.2, mode: str = "tuple", scale: float = 1000.0):
        super().__init__()
        fn = "RelationMatchingLoss"
        if mode not in RELATION_MODES:
            checks.fail(fn, f"mode must be one of {RELATION_MODES}, got {mode!r}")
        checks.number(fn, "tau", tau, positive=True)
        checks.number(fn, "margin", margin)
        checks.number(fn, "scale", scale)
        self.tau, self.margin, self.mode, self.scale = float(tau), float(margin), mode, float(scale)

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, labels: Tensor,
                indices_tuple=None) -> Tensor:
        if indices_tuple is None:
            _check_relation_args(student_emb, teacher_emb, labels, self.tau, self.mode, self.margin,
                                 self.scale, fn="RelationMatchingLoss")
            return _relation_matching_terms(student_emb, teacher_emb, labels, tau=self.tau,
                                            margin=self.margin, mode=self.mode, scale=self.scale)[0]
        checks.features("RelationMatchingLoss", "student_emb", student_emb)
        anchor, positive, mask = _tuples_from(indices_tuple, student_emb.shape[0], student_emb.device)
        return relation_matching_from_tuples(student_emb, teacher_emb, anchor, positive, mask,
                                             tau=self.tau, mode=self.mode, scale=self.scale)[0]

    def extra_repr(self) -> str:
        return f"tau={self.tau}, margin={self.margin}, mode={self.mode!r}, scale={self.scale}"


class LocalClassifierLoss(torch.nn.Module):
    """Stage 2's distillation term as a module : no cross-entropy, no lambda.

    ``forward(student_logits, teacher_emb, labels, centers, weights=None)`` returns
    ``(1/B) sum_i w_i KL(softmax(t_i / tau_teacher) || softmax(f(x_i)[C_B] / tau_student))`` with
    the teacher's embedding-induced logits ``t_ik = phi_T(x_i) . c_k`` over the classes present in
    the batch; ``centers`` are the teacher class centres of the student's classes
    (:func:`refilled.class_centers` of the teacher's embeddings), ``weights`` e.g.
    :func:`refilled.teacher_instance_weights` of the teacher's own logits.
    """

    def __init__(self, tau_teacher: float = 1.0, tau_student: float = 1.0, normalize_teacher: bool = False,
                 reduction: str = "batch"):
        super().__init__()
        fn = "LocalClassifierLoss"
        checks.number(fn, "tau_teacher", tau_teacher, positive=True)
        checks.number(fn, "tau_student", tau_student, positive=True)
        if reduction not in ("batch", "element"):
            checks.fail(fn, f"reduction must be 'batch' or 'element', got {reduction!r}")
        self.tau_teacher, self.tau_student = float(tau_teacher), float(tau_student)
        self.normalize_teacher, self.reduction = bool(normalize_teacher), reduction

    def forward(self, student_logits: Tensor, teacher_emb: Tensor, labels: Tensor, centers: Tensor,
                weights: Tensor | None = None) -> Tensor:
        return local_classifier_loss(student_logits, teacher_emb, labels, centers,
                                     tau_teacher=self.tau_teacher, tau_student=self.tau_student,
                                     weights=weights, normalize_teacher=self.normalize_teacher,
                                     reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"tau_teacher={self.tau_teacher}, tau_student={self.tau_student}, "
                f"normalize_teacher={self.normalize_teacher}, reduction={self.reduction!r}")
