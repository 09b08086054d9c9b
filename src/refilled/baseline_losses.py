"""Baseline knowledge-distillation losses as pure tensor-in/tensor-out functions.

Every function is written from the formulas in the cited paper. Device and dtype follow the
inputs; nothing loops over samples. Loss weights (beta for AT, gamma for SP, ...) belong to the
method using the loss; the paper defaults are noted in each docstring.

Except for RKD (whose paper fixes the teacher side as a constant target, so it is detached here),
gradients flow into both arguments: callers detach the teacher when they want to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "at_loss",
    "fitnet_loss",
    "kd_loss",
    "label_smoothing_ce",
    "pkt_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "sp_loss",
]


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
