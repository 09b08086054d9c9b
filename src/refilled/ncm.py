"""Nearest class mean (NCM): class centres, cosine logits and accuracy.

Used twice: as the stage-1 quality measure (class means of the student's *normalised*
embeddings on the training split, nearest mean by cosine on an evaluation split) and to build
stage 2's teacher class centres (normalised means of the *raw* teacher embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refilled import checks


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
    fn = "class_centers"
    checks.count(fn, "num_classes", num_classes)
    checks.features(fn, "embeddings", embeddings)
    checks.labels(fn, labels, embeddings.shape[0], num_classes)
    checks.same_device(fn, embeddings=embeddings, labels=labels)
    emb = F.normalize(embeddings, dim=1) if normalize_inputs else embeddings
    counts = torch.bincount(labels, minlength=num_classes)
    missing = [] if allow_missing else (counts == 0).nonzero().flatten().tolist()
    if missing:
        checks.fail(fn, f"class(es) {missing} have no instance, so they have no class centre; give "
                        "every class at least one example (or allow_missing=True)")
    sums = emb.new_zeros(num_classes, emb.shape[1]).index_add_(0, labels, emb)
    return F.normalize(sums, dim=1)


def ncm_logits(embeddings: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each normalised embedding to each normalised centre: (N, C)."""
    checks.features("ncm_logits", "embeddings", embeddings)
    checks.features("ncm_logits", "centers", centers, width=embeddings.shape[1], what="(classes, features)")
    return F.normalize(embeddings, dim=1) @ F.normalize(centers, dim=1).T


def ncm_accuracy(
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    eval_emb: torch.Tensor,
    eval_labels: torch.Tensor,
    num_classes: int,
) -> float:
    """NCM accuracy in [0, 1]: centres from the training split, predictions on another split.
    A class without training instances has no centre and is never predicted."""
    checks.features("ncm_accuracy", "eval_emb", eval_emb)
    checks.labels("ncm_accuracy", eval_labels, eval_emb.shape[0], num_classes, name="eval_labels")
    centers = class_centers(train_emb, train_labels, num_classes, normalize_inputs=True,
                            allow_missing=True)
    logits = ncm_logits(eval_emb, centers)
    absent = torch.bincount(train_labels.reshape(-1), minlength=num_classes) == 0
    pred = logits.masked_fill(absent.to(logits.device), float("-inf")).argmax(dim=1)
    return (pred == eval_labels.reshape(-1)).double().mean().item()
