"""Baseline methods on the shared loop, and REFILLED's stage 1 alone (an ablation).

Every baseline is cross-entropy on the student's own classes plus one weighted distillation term
from :mod:`refilled.baseline_losses`; the weights live in the config's ``baselines:`` section.
What each method matches:

=================  ================================================================================
``kd``             logits, over the classes both sides know only (Hinton et al. 2015)
``rkd``            distances and angles between embeddings (pooled last feature maps; Park 2019)
``pkt``            cosine-kernel conditional probabilities between embeddings (Passalis 2018)
``sp``             batch similarity of the last feature maps (Tung & Mori 2019)
``at``             attention maps of every pair of stage outputs of equal spatial size
                   (Zagoruyko & Komodakis 2017)
``fitnet``         the last feature map, through a trainable 1x1 conv + BN regressor from the
                   student's width to the teacher's (Romero et al. 2015; one joint stage)
``label_smoothing``  no teacher: CE with smoothed targets, the control for "soft targets"
``teacher_ncm``    no training: the teacher's own embedding, cosine NCM with class means of the
                   student's training images (a reference; evaluated by the protocol)
=================  ================================================================================

Feature maps come from the models' ``forward_maps``; the student's logits are computed from the
same forward pass (its last map, pooled, is its embedding). The teacher is only ever run through
:class:`FrozenTeacher` or under ``torch.no_grad()`` in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from refilled.baseline_losses import at_loss, fitnet_loss, kd_loss, pkt_loss, rkd_loss, sp_loss
from refilled.errors import ConfigError
from refilled.methods.base import Context, FrozenTeacher, Method, Stage, register_method
from refilled.methods.ce import CrossEntropy
from refilled.methods.refilled import RelationMatching

# ------------------------------------------------------------------ helpers


def select_shared(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit columns of the classes both sides know, aligned: (B, K) and (B, K)."""
    return student_logits[:, student_ids], teacher_logits[:, teacher_ids]


def student_maps_and_logits(student: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward pass: the stage outputs and the logits (from the pooled last map)."""
    maps = student.forward_maps(x)
    return maps, student.forward_head(maps[-1].mean(dim=(2, 3)))


@torch.no_grad()
def teacher_maps(teacher: FrozenTeacher, x: torch.Tensor) -> list[torch.Tensor]:
    teacher.model.eval()
    return teacher.model.forward_maps(x)


@torch.no_grad()
def map_shapes(model: nn.Module, ctx: Context) -> list[torch.Size]:
    """Shapes of ``model.forward_maps`` on inputs of the task's image size (a 2-image probe in
    eval mode, so no BN statistics change)."""
    ref = next(model.parameters())
    was_training = model.training
    model.eval()
    probe = torch.zeros(2, *ctx.task.train.images.shape[1:], device=ref.device, dtype=ref.dtype)
    shapes = [m.shape for m in model.forward_maps(probe)]
    model.train(was_training)
    return shapes


def _sizes(shapes) -> str:
    return ", ".join(f"{s[2]}x{s[3]}" for s in shapes)


def _teacher(ctx: Context) -> FrozenTeacher:
    if ctx.teacher is None:  # pragma: no cover - the protocol builds one for these methods
        raise ConfigError(f"method '{ctx.cfg.method}' needs a teacher")
    return ctx.teacher


# ------------------------------------------------------------------ methods


class HintonKD(Method):
    """(1 - alpha) * CE + alpha * T^2 KL(teacher || student), over the shared classes only."""

    def __init__(self, student, teacher: FrozenTeacher, student_ids, teacher_ids,
                 temperature: float, alpha: float):
        super().__init__(student)
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha
        self.register_buffer("student_ids", student_ids, persistent=False)
        self.register_buffer("teacher_ids", teacher_ids, persistent=False)

    def step(self, x, y, epoch):
        logits = self.student(x)
        _, t_logits = self.teacher(x)
        s, t = select_shared(logits, t_logits, self.student_ids, self.teacher_ids)
        return {"ce": (1 - self.alpha) * F.cross_entropy(logits, y),
                "kd": self.alpha * kd_loss(s, t, self.temperature)}


class EmbeddingDistillation(Method):
    """CE + weight * loss(student embedding, teacher embedding) (RKD, PKT)."""

    def __init__(self, student, teacher: FrozenTeacher, name: str, loss_fn, weight: float):
        super().__init__(student)
        self.teacher, self.name, self.loss_fn, self.weight = teacher, name, loss_fn, weight

    def step(self, x, y, epoch):
        z = self.student.forward_features(x)
        logits = self.student.forward_head(z)
        t_emb, _ = self.teacher(x)
        return {"ce": F.cross_entropy(logits, y), self.name: self.weight * self.loss_fn(z, t_emb)}


class SimilarityPreserving(Method):
    """CE + gamma * SP loss between the last feature maps (any widths and sizes)."""

    def __init__(self, student, teacher: FrozenTeacher, gamma: float):
        super().__init__(student)
        self.teacher, self.gamma = teacher, gamma

    def step(self, x, y, epoch):
        maps, logits = student_maps_and_logits(self.student, x)
        t_maps = teacher_maps(self.teacher, x)
        return {"ce": F.cross_entropy(logits, y), "sp": self.gamma * sp_loss(maps[-1], t_maps[-1])}


class AttentionTransfer(Method):
    """CE + beta / 2 * AT loss summed over the (student, teacher) map pairs of equal size."""

    def __init__(self, student, teacher: FrozenTeacher, pairs: list[tuple[int, int]], beta: float):
        super().__init__(student)
        self.teacher, self.pairs, self.beta = teacher, pairs, beta

    def step(self, x, y, epoch):
        maps, logits = student_maps_and_logits(self.student, x)
        t_maps = teacher_maps(self.teacher, x)
        at = at_loss([maps[i] for i, _ in self.pairs], [t_maps[j] for _, j in self.pairs])
        return {"ce": F.cross_entropy(logits, y), "at": self.beta / 2 * at}


class FitNet(Method):
    """CE + weight * MSE(regressor(student's last map), teacher's last map).

    The regressor (1x1 conv + BN, student width -> teacher width) is a submodule: it trains,
    is checkpointed and resumes with the student, and is not part of the saved model.
    """

    def __init__(self, student, teacher: FrozenTeacher, student_channels: int,
                 teacher_channels: int, weight: float):
        super().__init__(student)
        self.teacher, self.weight = teacher, weight
        self.regressor = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False), nn.BatchNorm2d(teacher_channels)
        )

    def step(self, x, y, epoch):
        maps, logits = student_maps_and_logits(self.student, x)
        t_maps = teacher_maps(self.teacher, x)
        hint = fitnet_loss(self.regressor(maps[-1]), t_maps[-1])
        return {"ce": F.cross_entropy(logits, y), "fitnet": self.weight * hint}


# ------------------------------------------------------------------ builders


@register_method("kd")
def build_kd(ctx: Context) -> list[Stage]:
    """Hinton KD over the classes both windows hold; refused when they share fewer than two."""
    student_ids, teacher_ids = ctx.class_map()
    if len(student_ids) == 0:
        raise ConfigError(
            "method 'kd' needs classes the teacher knows, but the student's classes share none "
            "with the teacher's (disjoint class windows); use refilled, rkd, pkt, sp, at or fitnet, "
            "which transfer knowledge without shared classes"
        )
    if len(student_ids) == 1:
        raise ConfigError(
            "method 'kd' matches the softmax over the shared classes, but the windows share only "
            "one class (a softmax over one class carries nothing); use refilled, rkd, pkt, sp, at "
            "or fitnet instead"
        )
    b = ctx.cfg.baselines
    method = HintonKD(ctx.student, _teacher(ctx), student_ids, teacher_ids, b.kd_temperature, b.kd_alpha)
    return [Stage("train", method, ctx.cfg.train)]


@register_method("rkd")
def build_rkd(ctx: Context) -> list[Stage]:
    b = ctx.cfg.baselines

    def loss(s, t):
        return rkd_loss(s, t, b.rkd_distance_weight, b.rkd_angle_weight)

    return [Stage("train", EmbeddingDistillation(ctx.student, _teacher(ctx), "rkd", loss, 1.0), ctx.cfg.train)]


@register_method("pkt")
def build_pkt(ctx: Context) -> list[Stage]:
    method = EmbeddingDistillation(ctx.student, _teacher(ctx), "pkt", pkt_loss, ctx.cfg.baselines.pkt_weight)
    return [Stage("train", method, ctx.cfg.train)]


@register_method("sp")
def build_sp(ctx: Context) -> list[Stage]:
    method = SimilarityPreserving(ctx.student, _teacher(ctx), ctx.cfg.baselines.sp_gamma)
    return [Stage("train", method, ctx.cfg.train)]


def at_pairs(student_shapes, teacher_shapes) -> list[tuple[int, int]]:
    """(student index, teacher index) of the maps of equal spatial size, one pair per size (the
    last map of that size on each side), in the student's order; 1x1 maps carry no attention."""
    last_s = {tuple(s[2:]): i for i, s in enumerate(student_shapes) if s[2] * s[3] > 1}
    last_t = {tuple(s[2:]): j for j, s in enumerate(teacher_shapes) if s[2] * s[3] > 1}
    return [(i, last_t[hw]) for hw, i in sorted(last_s.items(), key=lambda kv: kv[1]) if hw in last_t]


@register_method("at")
def build_at(ctx: Context) -> list[Stage]:
    teacher = _teacher(ctx)
    s_shapes, t_shapes = map_shapes(ctx.student, ctx), map_shapes(teacher.model, ctx)
    pairs = at_pairs(s_shapes, t_shapes)
    if not pairs:
        raise ConfigError(
            f"method 'at' pairs student and teacher feature maps of equal spatial size, but the "
            f"student {ctx.cfg.student.arch} has {_sizes(s_shapes)} and the teacher "
            f"{ctx.cfg.teacher.arch} has {_sizes(t_shapes)}; use architectures with the same "
            f"downsampling (e.g. two CNNs) or another method"
        )
    return [Stage("train", AttentionTransfer(ctx.student, teacher, pairs, ctx.cfg.baselines.at_beta),
                  ctx.cfg.train)]


@register_method("fitnet")
def build_fitnet(ctx: Context) -> list[Stage]:
    teacher = _teacher(ctx)
    s_last, t_last = map_shapes(ctx.student, ctx)[-1], map_shapes(teacher.model, ctx)[-1]
    if s_last[2:] != t_last[2:]:
        raise ConfigError(
            f"method 'fitnet' regresses the student's last feature map onto the teacher's, but they "
            f"differ in size ({_sizes([s_last])} for {ctx.cfg.student.arch}, {_sizes([t_last])} for "
            f"{ctx.cfg.teacher.arch}); use architectures with the same downsampling or another method"
        )
    ref = next(ctx.student.parameters())
    method = FitNet(ctx.student, teacher, s_last[1], t_last[1], ctx.cfg.baselines.fitnet_weight)
    method.regressor.to(device=ref.device, dtype=ref.dtype)
    return [Stage("train", method, ctx.cfg.train)]


@register_method("label_smoothing", needs_teacher=False)
def build_label_smoothing(ctx: Context) -> list[Stage]:
    """The no-teacher control: CE with smoothed targets (``baselines.label_smoothing``)."""
    return [Stage("train", CrossEntropy(ctx.student, ctx.cfg.baselines.label_smoothing), ctx.cfg.train)]


@register_method("teacher_ncm")
def build_teacher_ncm(ctx: Context) -> list[Stage]:
    """The reference with no stage: :func:`refilled.protocols.run` evaluates the teacher's
    embedding with the normalised class means of the student's training images (cosine NCM)."""
    return []


@register_method("refilled_stage1")
def build_refilled_stage1(ctx: Context) -> list[Stage]:
    """REFILLED's stage 1 alone, reported with its nearest-class-mean classifier (ablation
    ``stage1_only``): the stage's budget is ``stage1.optim``."""
    if ctx.cfg.stage1.optim.epochs == 0:
        raise ConfigError(
            "method 'refilled_stage1' trains REFILLED's stage 1 only, but stage1.optim.epochs is 0; "
            "set stage1.optim.epochs > 0"
        )
    method = RelationMatching(ctx.student, _teacher(ctx), ctx.cfg.stage1)
    return [Stage("stage1", method, ctx.cfg.stage1.optim, validate="ncm")]
