"""Baseline methods on the shared loop, and the teacher-NCM reference.

Every baseline is cross-entropy on the student's own classes plus one weighted distillation term
from :mod:`refilled.losses`; the weights live in the config's ``baselines:`` section.
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

Feature maps come from the networks' ``maps_and_logits`` (the zoo's ``forward_maps``, or the
outputs of the submodules named in ``maps``), in the same forward pass as the logits. The
teacher is only ever run through
:class:`FrozenTeacher` or under ``torch.no_grad()`` in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from refilled.config import say
from refilled.errors import ConfigError
from refilled.losses import at_loss, fitnet_loss, kd_loss, pkt_loss, rkd_loss, sp_loss
from refilled.methods.base import Method, Resolved, Stage, register_method
from refilled.methods.ce import CrossEntropy
from refilled.networks import FrozenTeacher

# ------------------------------------------------------------------ helpers


def select_shared(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit columns of the classes both sides know, aligned: (B, K) and (B, K)."""
    return student_logits[:, student_ids], teacher_logits[:, teacher_ids]


@torch.no_grad()
def map_shapes(network, example: torch.Tensor) -> list[torch.Size]:
    """Shapes of a network's feature maps on ``example`` (eval mode: no BN statistic moves)."""
    was_training = network.training
    network.eval()
    try:
        shapes = [m.shape for m in network.maps_and_logits(example[:2])[0]]
    finally:
        network.train(was_training)
    return shapes


def _sizes(shapes) -> str:
    return ", ".join(f"{s[2]}x{s[3]}" if len(s) == 4 else "x".join(map(str, s[1:])) for s in shapes)


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
        z, logits = self.student.features_and_logits(x)
        t_emb, _ = self.teacher(x)
        return {"ce": F.cross_entropy(logits, y), self.name: self.weight * self.loss_fn(z, t_emb)}


class SimilarityPreserving(Method):
    """CE + gamma * SP loss between the last feature maps (any widths and sizes)."""

    def __init__(self, student, teacher: FrozenTeacher, gamma: float):
        super().__init__(student)
        self.teacher, self.gamma = teacher, gamma

    def step(self, x, y, epoch):
        maps, logits = self.student.maps_and_logits(x)
        t_maps = self.teacher.maps(x)
        return {"ce": F.cross_entropy(logits, y), "sp": self.gamma * sp_loss(maps[-1], t_maps[-1])}


class AttentionTransfer(Method):
    """CE + beta / 2 * AT loss summed over the (student, teacher) map pairs of equal size."""

    def __init__(self, student, teacher: FrozenTeacher, pairs: list[tuple[int, int]], beta: float):
        super().__init__(student)
        self.teacher, self.pairs, self.beta = teacher, pairs, beta

    def step(self, x, y, epoch):
        maps, logits = self.student.maps_and_logits(x)
        t_maps = self.teacher.maps(x)
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
        maps, logits = self.student.maps_and_logits(x)
        t_maps = self.teacher.maps(x)
        hint = fitnet_loss(self.regressor(maps[-1]), t_maps[-1])
        return {"ce": F.cross_entropy(logits, y), "fitnet": self.weight * hint}


# ------------------------------------------------------------------ builders


@register_method("kd", shared_classes=2, teacher_logits=True)
def build_kd(r: Resolved) -> list[Stage]:
    """Hinton KD over the classes both windows hold (at least two)."""
    b = r.cfg.baselines
    method = HintonKD(r.student, r.teacher, r.student_ids, r.teacher_ids, b.kd_temperature, b.kd_alpha)
    return [Stage("train", method, r.cfg.train)]


@register_method("rkd")
def build_rkd(r: Resolved) -> list[Stage]:
    """RKD: distances and angles between embeddings."""
    b = r.cfg.baselines

    def loss(s, t):
        return rkd_loss(s, t, b.rkd_distance_weight, b.rkd_angle_weight)

    return [Stage("train", EmbeddingDistillation(r.student, r.teacher, "rkd", loss, 1.0), r.cfg.train)]


@register_method("pkt")
def build_pkt(r: Resolved) -> list[Stage]:
    """PKT: cosine-kernel conditional probabilities between embeddings."""
    method = EmbeddingDistillation(r.student, r.teacher, "pkt", pkt_loss, r.cfg.baselines.pkt_weight)
    return [Stage("train", method, r.cfg.train)]


@register_method("sp", maps=True)
def build_sp(r: Resolved) -> list[Stage]:
    """SP: batch similarity of the last feature maps."""
    method = SimilarityPreserving(r.student, r.teacher, r.cfg.baselines.sp_gamma)
    return [Stage("train", method, r.cfg.train)]


def at_pairs(student_shapes, teacher_shapes) -> list[tuple[int, int]]:
    """(student index, teacher index) of the maps of equal spatial size, one pair per size (the
    last map of that size on each side), in the student's order; 1x1 maps carry no attention."""
    last_s = {tuple(s[2:]): i for i, s in enumerate(student_shapes) if s[2] * s[3] > 1}
    last_t = {tuple(s[2:]): j for j, s in enumerate(teacher_shapes) if s[2] * s[3] > 1}
    return [(i, last_t[hw]) for hw, i in sorted(last_s.items(), key=lambda kv: kv[1]) if hw in last_t]


def _arch(r: Resolved, role: str) -> str:
    """What the caller calls the network: its config arch (CLI), or its class (Python)."""
    network = r.student if role == "student" else r.teacher.network
    return say(getattr(r.cfg, role).arch, type(network.module).__name__)


@register_method("at", maps=True)
def build_at(r: Resolved) -> list[Stage]:
    """AT: attention maps of every pair of stage outputs of equal spatial size."""
    s_shapes, t_shapes = map_shapes(r.student, r.example), map_shapes(r.teacher.network, r.example)
    pairs = at_pairs(s_shapes, t_shapes)
    if not pairs:
        raise ConfigError(
            f"method 'at' pairs student and teacher feature maps of equal spatial size, but the "
            f"student {_arch(r, 'student')} has {_sizes(s_shapes)} and the teacher "
            f"{_arch(r, 'teacher')} has {_sizes(t_shapes)}; use architectures with the same "
            f"downsampling (e.g. two CNNs) or another method"
        )
    return [Stage("train", AttentionTransfer(r.student, r.teacher, pairs, r.cfg.baselines.at_beta),
                  r.cfg.train)]


@register_method("fitnet", maps=True)
def build_fitnet(r: Resolved) -> list[Stage]:
    """FitNet: the last feature map through a trainable 1x1 conv + BN regressor."""
    s_last, t_last = map_shapes(r.student, r.example)[-1], map_shapes(r.teacher.network, r.example)[-1]
    if len(s_last) != 4 or len(t_last) != 4 or s_last[2:] != t_last[2:]:
        raise ConfigError(
            f"method 'fitnet' regresses the student's last feature map onto the teacher's, but they "
            f"differ in size ({_sizes([s_last])} for {_arch(r, 'student')}, {_sizes([t_last])} for "
            f"{_arch(r, 'teacher')}); use architectures with the same downsampling or another method"
        )
    ref = next(r.student.parameters())
    method = FitNet(r.student, r.teacher, s_last[1], t_last[1], r.cfg.baselines.fitnet_weight)
    method.regressor.to(device=ref.device, dtype=ref.dtype)
    return [Stage("train", method, r.cfg.train)]


@register_method("label_smoothing", needs_teacher=False)
def build_label_smoothing(r: Resolved) -> list[Stage]:
    """The no-teacher control: CE with smoothed targets (``baselines.label_smoothing``)."""
    return [Stage("train", CrossEntropy(r.student, r.cfg.baselines.label_smoothing), r.cfg.train)]


@register_method("teacher_ncm", predictor="teacher_ncm", schedules=lambda cfg: [])
def build_teacher_ncm(r: Resolved) -> list[Stage]:
    """The reference with no training: the teacher's embedding with the normalised class means
    of the student's training images (cosine NCM)."""
    return []
