"""Loss functions: REFILLED's two stages (SPEC §2-3) and the baselines' losses, in one place.

All are plain tensor-in, tensor-out functions: device and dtype follow the inputs, the teacher's
tensors are treated as constants (no gradient flows into them), and an empty case (no tuple
mined) gives an exact zero that stays connected to the graph instead of a NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from refilled.mining import candidate_tuples, normalized_distances

RELATION_MODES = ("tuple", "triplet")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _masked_kl(target_logits: torch.Tensor, input_logits: torch.Tensor, mask: torch.Tensor):
    """Row-wise KL(softmax(target) || softmax(input)) over the entries where ``mask`` is True.

    Masked-out entries take no probability mass and contribute exactly 0 (never 0 * inf).
    """
    neg_inf = torch.finfo(input_logits.dtype).min
    log_q = torch.log_softmax(input_logits.masked_fill(~mask, neg_inf), dim=1)
    log_p = torch.log_softmax(target_logits.masked_fill(~mask, neg_inf), dim=1)
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(mask, terms, torch.zeros_like(terms)).sum(dim=1)


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

    Args:
        student_emb: (B, D) raw student embeddings (gradient flows through them).
        teacher_emb: (B, D_T) raw teacher embeddings of the same batch (treated as constant).
        labels: (B,) labels in the student's label space.

    Returns:
        ``(loss, num_tuples)``: the scalar loss and the number of mined tuples (``"tuple"``)
        or triplets (``"triplet"``) as a 0-d tensor on the input's device.
    """
    if mode not in RELATION_MODES:
        raise ValueError(f"mode must be one of {RELATION_MODES}, got {mode!r}")
    _check_positive("tau", tau)
    if student_emb.shape[0] != teacher_emb.shape[0] or student_emb.shape[0] != labels.numel():
        raise ValueError(
            f"batch sizes differ: student {student_emb.shape[0]}, teacher {teacher_emb.shape[0]}, "
            f"labels {labels.numel()}"
        )
    d_s = normalized_distances(student_emb)
    with torch.no_grad():
        d_t = normalized_distances(teacher_emb.detach(), exact=False).to(d_s.dtype)
    anchor, positive, neg_mask = candidate_tuples(d_s, labels, margin)
    if mode == "tuple":
        # Rows without a negative contribute exactly 0 and are left out of the count; with no
        # tuple at all the sum is an exact, graph-connected 0 (and the host never syncs).
        num_tuples = neg_mask.amax(dim=1).sum()
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
    """Stage 1 of REFILLED (SPEC §2); the loss of :func:`relation_matching_terms`."""
    return relation_matching_terms(
        student_emb, teacher_emb, labels, tau=tau, margin=margin, mode=mode, scale=scale
    )[0]


def present_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean mask (num_classes,) of the classes that occur in ``labels`` (no host sync)."""
    mask = torch.zeros(num_classes, dtype=torch.bool, device=labels.device)
    return mask.index_fill_(0, labels.reshape(-1), True)


def local_centers(teacher_emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """CVPR's per-batch teacher centres: normalised mean teacher embedding of each class.

    Rows of classes absent from the batch are zero (the local classifier masks them anyway).
    """
    emb = teacher_emb.detach()
    sums = emb.new_zeros(num_classes, emb.shape[1]).index_add_(0, labels.reshape(-1), emb)
    return F.normalize(sums, dim=1)


def teacher_instance_weights(teacher_logits: torch.Tensor) -> torch.Tensor:
    """TPAMI's adaptive emphasis from the teacher's own classifier (SPEC §3).

    u_i = -log max_k softmax(g(x_i))_k; u^ = min-max normalised u over the batch;
    w_i = 2 * sigmoid(-u^_i), in [0.54, 1]. A batch whose uncertainties are all equal gets
    w = 1 everywhere (no division by zero).
    """
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
) -> torch.Tensor:
    """Stage 2's distillation term: the embedding-induced local classifier (SPEC §3).

    Teacher logits t_ik = phi_T(x_i) . c_k over the classes present in the batch (C_B), with
    ``centers`` (C, D_T) the normalised teacher class centres of the student's classes; the
    student's logits are restricted to the same classes. Returns
    (1/B) sum_i w_i KL(softmax(t_i / tau_teacher) || softmax(f(x_i)[C_B] / tau_student)),
    without the cross-entropy and without lambda.
    """
    _check_positive("tau_teacher", tau_teacher)
    _check_positive("tau_student", tau_student)
    num_classes = student_logits.shape[1]
    if centers.shape[0] != num_classes:
        raise ValueError(
            f"{centers.shape[0]} teacher centres for a student with {num_classes} classes"
        )
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
    return kl.mean()


# ====================================================================== baseline losses
#
# Written from the formulas in the cited papers. Loss weights (beta for AT, gamma for SP, ...)
# belong to the method using the loss; the paper defaults are noted in each docstring. Except
# for RKD (whose paper fixes the teacher side as a constant target, so it is detached here),
# gradients flow into both arguments: callers detach the teacher when they want to.


def _same_shape(name: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name}: student and teacher shapes must match, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _same_batch(name: str, a: Tensor, b: Tensor) -> None:
    if a.dim() < 1 or b.dim() < 1 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name}: student and teacher need the same batch size (dim 0), "
            f"got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )


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
        raise ValueError(f"kd_loss: logits must be (B, C), got shape {tuple(student_logits.shape)}")
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
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
        raise ValueError(
            f"at_loss: need the same non-zero number of student and teacher maps, "
            f"got {len(student_feats)} and {len(teacher_feats)}"
        )
    total = None
    for idx, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        if fs.dim() != 4 or ft.dim() != 4:
            raise ValueError(
                f"at_loss: pair {idx} must be (B, C, H, W) maps, got {tuple(fs.shape)} and {tuple(ft.shape)}"
            )
        if fs.shape[0] != ft.shape[0] or fs.shape[2:] != ft.shape[2:]:
            raise ValueError(
                f"at_loss: pair {idx} needs equal batch and spatial sizes, "
                f"got {tuple(fs.shape)} and {tuple(ft.shape)}"
            )
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
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


# ====================================================================== loss modules
#
# nn.Module forms of REFILLED's two losses, for a training loop of the user's own; they hold
# only hyperparameters and call the functions above.


def _tuples_from(indices_tuple, batch: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(anchor, positive, negative mask) from our tuple form or from pytorch-metric-learning's
    triplet form ``(anchors, positives, negatives)`` (one index per triplet)."""
    if len(indices_tuple) != 3:
        raise ValueError("indices_tuple must be (anchor, positive, negative_mask) or "
                         "(anchors, positives, negatives) triplet indices")
    a, p, third = (torch.as_tensor(t, device=device) for t in indices_tuple)
    if third.dtype == torch.bool:
        if third.shape != (a.numel(), batch):
            raise ValueError(f"negative_mask must be (tuples, batch) = ({a.numel()}, {batch}), "
                             f"got {tuple(third.shape)}")
        return a.long(), p.long(), third
    if not (a.shape == p.shape == third.shape) or a.dim() != 1:
        raise ValueError("triplet indices (anchors, positives, negatives) must be 1-D and of one length")
    pairs, inverse = torch.unique(torch.stack([a, p]).long(), dim=1, return_inverse=True)
    mask = torch.zeros(pairs.shape[1], batch, dtype=torch.bool, device=device)
    mask[inverse, third.long()] = True
    return pairs[0], pairs[1], mask


class RelationMatchingLoss(torch.nn.Module):
    """Stage 1 of REFILLED as a module (SPEC §2).

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
        if mode not in RELATION_MODES:
            raise ValueError(f"mode must be one of {RELATION_MODES}, got {mode!r}")
        _check_positive("tau", tau)
        self.tau, self.margin, self.mode, self.scale = float(tau), float(margin), mode, float(scale)

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, labels: Tensor,
                indices_tuple=None) -> Tensor:
        if indices_tuple is None:
            return relation_matching_terms(student_emb, teacher_emb, labels, tau=self.tau,
                                           margin=self.margin, mode=self.mode, scale=self.scale)[0]
        anchor, positive, mask = _tuples_from(indices_tuple, student_emb.shape[0], student_emb.device)
        return relation_matching_from_tuples(student_emb, teacher_emb, anchor, positive, mask,
                                             tau=self.tau, mode=self.mode, scale=self.scale)[0]

    def extra_repr(self) -> str:
        return f"tau={self.tau}, margin={self.margin}, mode={self.mode!r}, scale={self.scale}"


class LocalClassifierLoss(torch.nn.Module):
    """Stage 2's distillation term as a module (SPEC §3): no cross-entropy, no lambda.

    ``forward(student_logits, teacher_emb, labels, centers, weights=None)`` returns
    ``(1/B) sum_i w_i KL(softmax(t_i / tau_teacher) || softmax(f(x_i)[C_B] / tau_student))`` with
    the teacher's embedding-induced logits ``t_ik = phi_T(x_i) . c_k`` over the classes present in
    the batch; ``centers`` are the teacher class centres of the student's classes
    (:func:`refilled.class_centers` of the teacher's embeddings), ``weights`` e.g.
    :func:`refilled.teacher_instance_weights` of the teacher's own logits.
    """

    def __init__(self, tau_teacher: float = 1.0, tau_student: float = 1.0, normalize_teacher: bool = False):
        super().__init__()
        _check_positive("tau_teacher", tau_teacher)
        _check_positive("tau_student", tau_student)
        self.tau_teacher, self.tau_student = float(tau_teacher), float(tau_student)
        self.normalize_teacher = bool(normalize_teacher)

    def forward(self, student_logits: Tensor, teacher_emb: Tensor, labels: Tensor, centers: Tensor,
                weights: Tensor | None = None) -> Tensor:
        return local_classifier_loss(student_logits, teacher_emb, labels, centers,
                                     tau_teacher=self.tau_teacher, tau_student=self.tau_student,
                                     weights=weights, normalize_teacher=self.normalize_teacher)

    def extra_repr(self) -> str:
        return (f"tau_teacher={self.tau_teacher}, tau_student={self.tau_student}, "
                f"normalize_teacher={self.normalize_teacher}")
