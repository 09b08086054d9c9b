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


class LocalClassifierDistillation(Method):
    """Stage 2: CE + lambda * w_i * KL(teacher's embedding-induced local classifier || student).

    ``centers`` are the teacher's class centres of the student's classes (global variant);
    ``None`` with ``cfg.centers == "local"`` computes them inside each batch (CVPR). A teacher
    without logits (a feature extractor) gives no instance weights (w = 1).
    """

    def __init__(self, student, teacher: "FrozenTeacher", cfg: "Stage2Config", centers=None):
        super().__init__(student)
        self.teacher, self.cfg = teacher, cfg
        if cfg.centers == "global" and centers is None:
            raise ValueError("global centres must be computed before stage 2")
        self.register_buffer("centers", centers, persistent=False)

    def lam(self, epoch: int) -> float:
        return self.cfg.lam * math.exp(-self.cfg.lam_decay * epoch)

    def step(self, x, y, epoch):
        t_emb, t_logits = self.teacher(x)
        logits = self.student(x)
        num_classes = logits.shape[1]
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
        return {"ce": F.cross_entropy(logits, y), "distill": self.lam(epoch) * distill}


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


def refilled_schedules(cfg) -> list:
    out = [("stage1.optim", cfg.stage1.optim, True)] if cfg.stage1.optim.epochs > 0 else []
    return out + [("train", cfg.train, False)]


@register_method("refilled", schedules=refilled_schedules,
                 global_centers=lambda cfg: cfg.stage2.centers == "global")
def build_refilled(r: Resolved) -> list[Stage]:
    """REFILLED: stage 1 (when stage1.optim.epochs > 0), then stage 2 from a fresh classifier."""
    cfg, student, teacher = r.cfg, r.student, r.teacher
    stages = []
    if cfg.stage1.optim.epochs > 0:
        dist = r.dist if cfg.speed.global_mining else None
        stages.append(Stage("stage1", RelationMatching(student, teacher, cfg.stage1, dist),
                            cfg.stage1.optim, validate="ncm"))
    centers = r.centers if cfg.stage2.centers == "global" else None

    def fresh_classifier():
        torch.manual_seed(cfg.seed + 1)
        student.reset_classifier(r.num_classes)
        if cfg.stage2.handoff == "rescale":
            return rescale_embedding(student, r.train, cfg.stage2.embed_norm, r.dist)
        return {"handoff": "none", "handoff_scale": None}

    stages.append(Stage("stage2", LocalClassifierDistillation(student, teacher, cfg.stage2, centers),
                        cfg.train, prepare=fresh_classifier))
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
