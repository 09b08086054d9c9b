"""Nearest class mean (NCM): class centres, cosine logits and accuracy.

Used twice: as the stage-1 quality measure (class means of the student's *normalised*
embeddings on the training split, nearest mean by cosine on an evaluation split) and to build
stage 2's teacher class centres (normalised means of the *raw* teacher embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_centers(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    normalize_inputs: bool = False,
    allow_missing: bool = False,
) -> torch.Tensor:
    """Normalised class means (num_classes, D), accumulated with ``index_add_``.

    Args:
        normalize_inputs: L2-normalise each embedding before averaging (the NCM protocol);
            False averages raw embeddings (the teacher centres of stage 2).
        allow_missing: a class without instances gets a zero row instead of an error.

    Raises:
        ValueError: naming every class in ``range(num_classes)`` that has no instance
            (unless ``allow_missing``).
    """
    labels = labels.reshape(-1)
    if embeddings.shape[0] != labels.numel():
        raise ValueError(f"{embeddings.shape[0]} embeddings but {labels.numel()} labels")
    emb = F.normalize(embeddings, dim=1) if normalize_inputs else embeddings
    counts = torch.bincount(labels, minlength=num_classes)
    if counts.numel() > num_classes:
        raise ValueError(f"labels go up to {int(labels.max())} but num_classes is {num_classes}")
    missing = [] if allow_missing else (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"class(es) {missing} have no instance, so they have no class centre; "
            "give every class at least one example"
        )
    sums = emb.new_zeros(num_classes, emb.shape[1]).index_add_(0, labels, emb)
    return F.normalize(sums, dim=1)


def ncm_logits(embeddings: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each normalised embedding to each normalised centre: (N, C)."""
    return F.normalize(embeddings, dim=1) @ F.normalize(centers, dim=1).T


def ncm_accuracy(
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    eval_emb: torch.Tensor,
    eval_labels: torch.Tensor,
    num_classes: int,
) -> float:
    """NCM accuracy in [0, 1]: centres from the training split, predictions on another split."""
    centers = class_centers(train_emb, train_labels, num_classes, normalize_inputs=True)
    pred = ncm_logits(eval_emb, centers).argmax(dim=1)
    return (pred == eval_labels.reshape(-1)).double().mean().item()
