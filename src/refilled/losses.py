"""Loss functions: REFILLED's two stages (SPEC §2-3), plus the baselines' losses.

All are plain tensor-in, tensor-out functions: device and dtype follow the inputs, the teacher's
tensors are treated as constants (no gradient flows into them), and an empty case (no tuple
mined) gives an exact zero that stays connected to the graph instead of a NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refilled.baseline_losses import (  # noqa: F401  (re-exported: one place for every loss)
    at_loss,
    fitnet_loss,
    kd_loss,
    label_smoothing_ce,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    sp_loss,
)
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
