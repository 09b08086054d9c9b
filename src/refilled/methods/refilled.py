"""REFILLED's two stages as methods: relationship matching, then the local classifier."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from refilled.losses import (  # the unchecked forms: no host sync in a training step
    _local_centers,
    _local_classifier_loss,
    _relation_matching_terms,
    _shared_kd_loss,
    check_shared_ids,
    teacher_instance_weights,
)
from refilled.methods.base import Method, Resolved, Stage, register_method

if TYPE_CHECKING:  # pragma: no cover
    from refilled.config import Stage1Config, Stage2Config
    from refilled.networks import FrozenTeacher


class RelationMatching(Method):
    """Stage 1: match the teacher's tuple distributions on the student's embedding.

    Only the backbone trains; the classifier is untouched (and replaced before stage 2).
    """

    def __init__(self, student, teacher: "FrozenTeacher", cfg: "Stage1Config", dist=None):
        super().__init__(student)
        self.teacher, self.cfg = teacher, cfg
        # Under torchrun with speed.global_mining, tuples are mined over the global batch.
        self.dist = dist
        # The classifier takes no part in stage 1 (and gets no gradient, which DDP requires).
        head = student.classifier
        if head is not None:
            head.requires_grad_(False)

    def parameters_to_train(self) -> Iterator[nn.Parameter]:
        head = self.student.classifier
        skip = {id(p) for p in head.parameters()} if head is not None else set()
        return (p for p in self.student.parameters() if p.requires_grad and id(p) not in skip)

    def step(self, x, y, epoch):
        t_emb, _ = self.teacher(x)
        s_emb = self.student.forward_features(x)
        if self.dist is not None and self.dist.world > 1:
            s_emb, t_emb, y = self.dist.gather(s_emb), self.dist.gather(t_emb), self.dist.gather(y)
        with torch.autocast(s_emb.device.type, enabled=False):  # mining and the KL in fp32
            loss, num_tuples = _relation_matching_terms(
                s_emb.float(), t_emb.float(), y,
                tau=self.cfg.tau, margin=self.cfg.margin, mode=self.cfg.mode, scale=self.cfg.scale,
            )
        empty = (num_tuples == 0).float()
        return {"relation": loss, "_tuples": num_tuples.float(), "_empty_batches": empty}


def relation_weight(weight: float, epoch: int, epochs: int, decay: str = "cosine") -> float:
    """The weight of stage 1's loss kept in stage 2 at ``epoch`` (0-based) of ``epochs``:
    ``weight`` at the first epoch, decaying towards 0 at the end of stage 2 (reached after its
    last epoch): ``cosine``: weight * (1 + cos(pi * epoch / epochs)) / 2; ``linear``:
    weight * (1 - epoch / epochs)."""
    if decay not in ("cosine", "linear"):
        raise ValueError(f"decay must be 'cosine' or 'linear', got {decay!r}")
    if epochs <= 0:
        return 0.0
    t = min(max(epoch / epochs, 0.0), 1.0)
    return weight * ((1 + math.cos(math.pi * t)) / 2 if decay == "cosine" else 1 - t)


class LocalClassifierDistillation(Method):
    """Stage 2: CE + lambda * w_i * KL(teacher's embedding-induced local classifier || student).

    ``centers`` are the teacher's class centres of the student's classes (global variant);
    ``None`` with ``cfg.centers == "local"`` computes them inside each batch (CVPR). A teacher
    without logits (a feature extractor) gives no instance weights (w = 1).

    Two optional terms (issue 23), each absent (not computed) unless given:
    ``shared`` = (student ids, teacher ids) of the classes both know adds
    ``cfg.shared_kd * shared_kd_loss`` (Hinton KD on those classes only, the teacher's logits
    renormalised over them); ``relation`` = (stage 1's config, stage 2's epochs) adds stage 1's
    relationship-matching loss on stage 2's batches with the decaying weight
    :func:`relation_weight` (mined on this process's batch).
    """

    def __init__(self, student, teacher: "FrozenTeacher", cfg: "Stage2Config", centers=None,
                 shared: tuple[torch.Tensor, torch.Tensor] | None = None,
                 relation: tuple["Stage1Config", int] | None = None):
        super().__init__(student)
        self.teacher, self.cfg = teacher, cfg
        if cfg.centers == "global" and centers is None:
            raise ValueError("global centres must be computed before stage 2")
        self.register_buffer("centers", centers, persistent=False)
        self.shared = shared is not None
        if shared is not None:
            self.register_buffer("student_ids", shared[0], persistent=False)
            self.register_buffer("teacher_ids", shared[1], persistent=False)
        self.relation = relation

    def lam(self, epoch: int) -> float:
        return self.cfg.lam * math.exp(-self.cfg.lam_decay * epoch)

    def step(self, x, y, epoch):
        t_emb, t_logits = self.teacher(x)
        if self.relation is None:
            logits = self.student(x)
        else:
            s_emb, logits = self.student.features_and_logits(x)
        num_classes = logits.shape[1]
        extra = {}
        with torch.autocast(logits.device.type, enabled=False):  # teacher logits and KL in fp32
            t_emb = t_emb.float()
            centers = self.centers if self.cfg.centers == "global" else _local_centers(t_emb, y, num_classes)
            weights = (teacher_instance_weights(t_logits.float())
                       if self.cfg.weighting and t_logits is not None else None)
            distill = _local_classifier_loss(
                logits.float(), t_emb, y, centers,
                tau_teacher=self.cfg.tau_teacher, tau_student=self.cfg.tau_student,
                weights=weights, normalize_teacher=self.cfg.normalize_teacher,
                reduction=self.cfg.reduction,
            )
            if self.shared:
                extra["shared_kd"] = self.cfg.shared_kd * _shared_kd_loss(
                    logits.float(), t_logits.float(), self.student_ids, self.teacher_ids,
                    self.cfg.shared_kd_temperature)
            if self.relation is not None:
                s1, epochs = self.relation
                loss, _ = _relation_matching_terms(s_emb.float(), t_emb, y, tau=s1.tau, margin=s1.margin,
                                                   mode=s1.mode, scale=s1.scale)
                extra["relation"] = relation_weight(self.cfg.relation_weight, epoch, epochs,
                                                    self.cfg.relation_decay) * loss
        return {"ce": F.cross_entropy(logits, y), "distill": self.lam(epoch) * distill, **extra}


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def last_norm_layer(student) -> nn.Module | None:
    """The last normalisation layer with an affine transform, outside the classifier."""
    head = student.classifier_prefix()
    found = None
    for name, m in student.module.named_modules():
        if isinstance(m, NORM_LAYERS) and getattr(m, "weight", None) is not None and \
                getattr(m, "bias", None) is not None and not (head and (name + ".").startswith(head)):
            found = m
    return found


def _not_rescaled(why: str) -> dict:
    return {"handoff": f"none ({why})", "handoff_scale": None,
            "warning": f"hand-off not rescaled: {why}; the classifier starts on the embedding "
                       "as stage 1 left it"}


@torch.no_grad()
def rescale_embedding(student, train, target: float | None, dist=None) -> dict:
    """The hand-off: scale the affine transform (weight and bias) of the student's last
    normalisation layer so that the mean L2 norm of its raw embedding of the training images
    (eval mode, no augmentation) becomes ``target`` (None: sqrt(D), the norm of a D-dimensional
    vector of unit-variance entries).

    Stage 1's loss only sees directions, so its embedding can end at any norm (0.3 on glyphs,
    against about 10 for a CE-trained student), and a fresh classifier on so small a feature
    learns slowly while its gradient wrecks the embedding. Scaling the last normalisation layer
    changes no direction and no dynamics before it; it is exact when only positively
    homogeneous layers follow (ReLU, pooling: the zoo's CNNs and WRNs), which is checked: where
    it is not (a residual sum after it, ReLU6, no such layer), nothing is changed and the note
    says so. Returns ``{"handoff": note, "handoff_scale": factor or None}``, plus
    ``"warning"`` (one line for the user) when it could not rescale."""
    from refilled.evaluation import embedding_norm
    from refilled.runtime import Dist

    dist = dist or Dist()
    device = next(student.parameters()).device
    layer = last_norm_layer(student)
    if layer is None:  # checked first: no pass over the training images for nothing
        return _not_rescaled("no normalisation layer to rescale")
    before = embedding_norm(student, train.images, device, dist=dist)
    goal = target if target is not None else math.sqrt(student.num_features)
    if not before > 0:
        return _not_rescaled("the embedding is zero on the training images")
    factor = goal / before
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.weight.mul_(factor)
    layer.bias.mul_(factor)
    after = embedding_norm(student, train.images, device, dist=dist)
    if abs(after - goal) > 0.02 * goal:
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        return _not_rescaled("the embedding is not proportional to the last normalisation layer's output")
    return {"handoff": f"rescaled: mean embedding norm {before:.3g} -> {after:.3g}",
            "handoff_scale": factor}


def imprinted_weights(emb: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      scale: float) -> torch.Tensor:
    """Weight imprinting: row k = the normalised mean of the L2-normalised embeddings of class k
    (the NCM protocol's centre), times ``scale / mean ||emb||``. With a zero bias the classifier
    then gives ``scale * (||z|| / mean norm) * cos(z, c_k)``: the NCM classifier's prediction
    for every input, with logits of size ``scale`` at a mean-norm embedding. A class without
    an instance gets a zero row."""
    from refilled.ncm import class_centers

    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    centers = class_centers(emb, labels, num_classes, normalize_inputs=True, allow_missing=True)
    norm = emb.norm(dim=1).mean()
    if not norm > 0:
        raise ValueError("the embeddings are zero: no class centre to imprint")
    return centers * (scale / norm)


@torch.no_grad()
def imprint_classifier(student, train, num_classes: int, scale: float, dist=None) -> dict:
    """Stage 2's classifier starts from the student's own class centres (:func:`imprinted_weights`
    of its embedding of the training images, eval mode, no augmentation; bias 0), so stage 2
    starts at the stage-1 NCM classifier's accuracy. Checked on the training images: where the
    classifier's logits are not those of the embedding it sees (a head that is not one
    ``nn.Linear`` on the embedding), it is left as it was, and the note says so."""
    from refilled.evaluation import predict
    from refilled.runtime import Dist

    dist = dist or Dist()
    head = student.classifier
    if not isinstance(head, nn.Linear) or head.in_features != student.num_features:
        return {"head_init": "random (the classifier is not one nn.Linear on the embedding)",
                "warning": "stage 2's classifier not imprinted: it is not one nn.Linear on the embedding"}
    device = head.weight.device
    emb, _ = predict(student, train.images, device, dist=dist)
    labels = train.labels.to(device)
    old_weight, old_bias = head.weight.detach().clone(), None if head.bias is None else head.bias.detach().clone()
    try:
        weight = imprinted_weights(emb, labels, num_classes, scale)
    except ValueError as err:
        return {"head_init": f"random ({err})", "warning": f"stage 2's classifier not imprinted: {err}"}
    head.weight.copy_(weight.to(head.weight.dtype))
    if head.bias is not None:
        head.bias.zero_()
    few = train.images[:256]
    check_emb, logits = predict(student, few, device, dist=dist)
    if logits is None or not torch.allclose(logits, check_emb @ weight.T, rtol=1e-3, atol=1e-4 * scale):
        head.weight.copy_(old_weight)
        if old_bias is not None:
            head.bias.copy_(old_bias)
        why = "the classifier's logits are not a linear map of the embedding"
        return {"head_init": f"random ({why})", "warning": f"stage 2's classifier not imprinted: {why}"}
    ncm = (logits.argmax(1) == labels[: len(few)]).double().mean().item()
    return {"head_init": f"imprinted (scale {scale:g}; accuracy {100 * ncm:.1f}% on {len(few)} "
                         "training images)"}


def stage_budgets(cfg) -> tuple:
    """(stage 1's schedule, stage 2's) for ``method=refilled``: ``stage1.optim`` and ``train``
    as given, or, with ``stage1.budget_share`` = f, their total epochs split: stage 1 gets
    ``round(f * total)``, stage 2 the rest (the other settings of each schedule unchanged)."""
    import dataclasses

    s1, s2, share = cfg.stage1.optim, cfg.train, cfg.stage1.budget_share
    if share is None:
        return s1, s2
    total = s1.epochs + s2.epochs
    first = round(share * total)
    return dataclasses.replace(s1, epochs=first), dataclasses.replace(s2, epochs=total - first)


def refilled_schedules(cfg) -> list:
    s1, s2 = stage_budgets(cfg)
    out = [("stage1.optim", s1, True)] if s1.epochs > 0 else []
    return out + [("train", s2, False)]


def shared_classes_term(r: Resolved) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
    """The class map of stage 2's shared-class KD term, or None (off), and a note saying why."""
    from refilled.errors import ConfigError

    cfg = r.cfg.stage2
    if cfg.shared_kd == 0:
        return None, "off (stage2.shared_kd = 0)"
    if len(r.student_ids) == 0:
        return None, "off (no class shared with the teacher's outputs)"
    if r.teacher is None or not r.teacher.has_logits:
        return None, "off (the teacher gives no logits: a feature extractor)"
    try:
        check_shared_ids(r.student_ids, r.teacher_ids, r.num_classes, r.teacher.network.num_classes)
    except ValueError as err:
        raise ConfigError(f"stage2.shared_kd: the shared classes do not fit the networks ({err}); "
                          "pass shared_classes=(student ids, teacher ids) that index the student's "
                          "and the teacher's logits, or set stage2.shared_kd=0") from None
    note = (f"on: {len(r.student_ids)} shared classes, weight {cfg.shared_kd:g}, "
            f"temperature {cfg.shared_kd_temperature:g}")
    return (r.student_ids, r.teacher_ids), note


@register_method("refilled", schedules=refilled_schedules,
                 global_centers=lambda cfg: cfg.stage2.centers == "global")
def build_refilled(r: Resolved) -> list[Stage]:
    """REFILLED: stage 1 (when it has epochs), then stage 2 from a fresh classifier."""
    cfg, student, teacher = r.cfg, r.student, r.teacher
    s1_optim, s2_optim = stage_budgets(cfg)
    stages = []
    if s1_optim.epochs > 0:
        dist = r.dist if cfg.speed.global_mining else None
        stages.append(Stage("stage1", RelationMatching(student, teacher, cfg.stage1, dist),
                            s1_optim, validate="ncm"))
    centers = r.centers if cfg.stage2.centers == "global" else None
    shared, shared_note = shared_classes_term(r)
    relation = (cfg.stage1, s2_optim.epochs) if cfg.stage2.relation_weight > 0 else None

    def fresh_classifier():
        torch.manual_seed(cfg.seed + 1)
        student.reset_classifier(r.num_classes)
        if cfg.stage2.handoff == "rescale":
            notes = rescale_embedding(student, r.train, cfg.stage2.embed_norm, r.dist)
        else:
            notes = {"handoff": "none", "handoff_scale": None}
        if cfg.stage2.head_init == "imprint":
            imprint = imprint_classifier(student, r.train, r.num_classes, cfg.stage2.imprint_scale, r.dist)
            if "warning" in imprint and "warning" in notes:
                imprint["warning"] = notes["warning"] + "; " + imprint["warning"]
            notes.update(imprint)
        notes["shared_kd"] = shared_note
        return notes

    method = LocalClassifierDistillation(student, teacher, cfg.stage2, centers, shared=shared,
                                         relation=relation)
    stages.append(Stage("stage2", method, s2_optim, prepare=fresh_classifier))
    return stages


def _stage1_only_schedules(cfg) -> list:
    return [("stage1.optim", cfg.stage1.optim, True)]


@register_method("refilled_stage1", schedules=_stage1_only_schedules, predictor="student_ncm")
def build_refilled_stage1(r: Resolved) -> list[Stage]:
    """REFILLED's stage 1 alone, reported with its nearest-class-mean classifier (ablation
    ``stage1_only``): the stage's budget is ``stage1.optim``."""
    from refilled.config import spell
    from refilled.errors import ConfigError

    if r.cfg.stage1.optim.epochs == 0:
        raise ConfigError(
            f"method 'refilled_stage1' trains REFILLED's stage 1 only, but "
            f"{spell('stage1.optim.epochs')} is 0; give it at least 1 epoch"
        )
    method = RelationMatching(r.student, r.teacher, r.cfg.stage1)
    return [Stage("stage1", method, r.cfg.stage1.optim, validate="ncm")]
