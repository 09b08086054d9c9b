"""The public Python API: refilled.distill on modules refilled did not write, and the losses."""

import pytest
import torch
import torch.nn as nn

import refilled
from refilled.errors import ConfigError, UserError
from refilled.losses import local_classifier_loss, relation_matching_loss


def digits(lo, hi, per_class=None, seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
    y = torch.tensor(d.target)
    keep = (y >= lo) & (y < hi)
    x, y = x[keep], y[keep] - lo
    if per_class:
        g = torch.Generator().manual_seed(seed)
        idx = torch.cat([(y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per_class]]
                         for c in range(hi - lo)])
        x, y = x[idx], y[idx]
    return x, y


def sequential_teacher(classes=5):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, classes))


class FcStudent(nn.Module):
    def __init__(self, classes=10):  # deliberately the wrong size: distill() replaces fc
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


SMALL = dict(stage1_epochs=2, stage2_epochs=2, batch_size=20, m_per_class=4, lr=0.05, stage1_lr=0.05,
             device="cpu", progress=False)


def test_distill_on_plain_modules_keeps_the_teacher_untouched():
    torch.manual_seed(0)
    teacher = sequential_teacher().train()  # in training mode: distill must not move anything
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = FcStudent()
    old_fc = student.fc
    out = refilled.distill(teacher, student, digits(5, 10, per_class=12), val=digits(5, 10, per_class=5, seed=1),
                           **SMALL)
    assert out is student
    assert student.fc is not old_fc and student.fc.out_features == 5
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert teacher.training and all(p.grad is None for p in teacher.parameters())
    for module in (*teacher.modules(), *student.modules()):  # no hook left behind
        assert not module._forward_hooks and not module._forward_pre_hooks
    history = student.refilled_history
    assert [r["stage"] for r in history] == ["stage1"] * 2 + ["stage2"] * 2
    assert "val_ncm_accuracy" in history[1] and "val_accuracy" in history[-1]
    assert "stage1" in history.snapshots


def test_distill_takes_a_dataset_and_resumes_from_run_dir(tmp_path):
    x, y = digits(5, 10, per_class=12)
    data = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    first = refilled.distill(sequential_teacher(), FcStudent(5), data, run_dir=tmp_path / "run", **SMALL)
    assert (tmp_path / "run" / "stage2.ckpt").is_file() and (tmp_path / "run" / "metrics.csv").is_file()
    mtime = (tmp_path / "run" / "stage2.ckpt").stat().st_mtime_ns
    torch.manual_seed(0)
    again = refilled.distill(sequential_teacher(), FcStudent(5), data, run_dir=tmp_path / "run", **SMALL)
    assert (tmp_path / "run" / "stage2.ckpt").stat().st_mtime_ns == mtime  # nothing redone
    for (k, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_distill_errors_name_the_setting():
    data = digits(5, 10, per_class=6)
    with pytest.raises(ConfigError, match=r"unknown keyword stage1_epoch=; did you mean stage1_epochs="):
        refilled.distill(sequential_teacher(), FcStudent(5), data, stage1_epoch=3)
    with pytest.raises(UserError, match="needs a teacher"):
        refilled.distill(None, FcStudent(5), data, **SMALL)
    with pytest.raises(ConfigError, match="classes the teacher knows.*shared_classes"):
        refilled.distill(sequential_teacher(), FcStudent(5), data, method="kd", **SMALL)
    with pytest.raises(UserError, match=r"train=: the labels must be integer class indices"):
        refilled.distill(sequential_teacher(), FcStudent(5), (data[0], data[1].float()), **SMALL)


def test_distill_kd_with_shared_classes_and_ce_without_teacher():
    data = digits(0, 5, per_class=10)
    torch.manual_seed(0)
    ids = torch.arange(5)
    student = refilled.distill(sequential_teacher(), FcStudent(5), data, method="kd",
                               shared_classes=(ids, ids), **SMALL)
    assert [r["stage"] for r in student.refilled_history] == ["train"] * 2
    alone = refilled.distill(None, FcStudent(5), data, method="ce", **SMALL)
    assert "ce" in alone.refilled_history[0]


def test_loss_modules_equal_the_functions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(24, 6, generator=g, requires_grad=True), torch.randn(24, 9, generator=g)
    y = torch.arange(24) % 4
    loss = refilled.RelationMatchingLoss(tau=3.0, margin=0.5)
    assert torch.equal(loss(s, t, y), relation_matching_loss(s, t, y, tau=3.0, margin=0.5))
    tuples = refilled.semihard_tuples(s.detach(), y, margin=0.5)
    assert torch.allclose(loss(s, t, y, indices_tuple=tuples), loss(s, t, y), rtol=1e-5)
    logits = torch.randn(24, 4, generator=g)
    centers = refilled.class_centers(t, y, 4)
    w = refilled.teacher_instance_weights(torch.randn(24, 7, generator=g))
    local = refilled.LocalClassifierLoss(tau_teacher=2.0, tau_student=3.0)
    want = local_classifier_loss(logits, t, y, centers, tau_teacher=2.0, tau_student=3.0, weights=w)
    assert torch.equal(local(logits, t, y, centers, w), want)


def test_relation_loss_takes_pytorch_metric_learning_triplets():
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    from pytorch_metric_learning.distances import LpDistance

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(30, 5, generator=g), torch.randn(30, 8, generator=g)
    y = torch.arange(30) % 3
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard",
                                      distance=LpDistance(normalize_embeddings=True, p=2, power=1))
    loss = refilled.RelationMatchingLoss()
    assert torch.allclose(loss(s, t, y, indices_tuple=miner(s, y)), loss(s, t, y), rtol=1e-5)


def test_a_handoff_that_cannot_rescale_warns_once_and_notes_why(capsys):
    torch.manual_seed(0)
    student = sequential_teacher()  # no normalisation layer: nothing to rescale
    refilled.distill(sequential_teacher(), student, digits(5, 10, per_class=12), **{**SMALL, "progress": True})
    err = capsys.readouterr().err
    assert err.count("hand-off not rescaled: no normalisation layer to rescale") == 1, err
    notes = student.refilled_history.notes
    assert notes["handoff"] == "none (no normalisation layer to rescale)" and notes["handoff_scale"] is None
    assert "warning" not in notes  # printed for the user, not stored with the run
