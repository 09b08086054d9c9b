"""Issue 23's hand-off candidates from stage 1 to stage 2: weight imprinting
(stage2.head_init=imprint), stage 1's loss kept in stage 2 with a decaying weight
(stage2.relation_weight / relation_decay), and a longer stage 1 at equal budget
(stage1.budget_share)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_shared_kd import _fit, _same_weights

import refilled
from refilled.config import PRESETS, make_config
from refilled.errors import ConfigError
from refilled.methods.refilled import (
    imprint_classifier,
    imprinted_weights,
    refilled_schedules,
    relation_weight,
    stage_budgets,
)
from refilled.ncm import class_centers, ncm_logits
from refilled.data import Split

# ------------------------------------------------------------------ the decaying weight


def test_relation_weight_decays_to_zero_over_stage_2():
    assert relation_weight(2.0, 0, 10) == 2.0
    assert relation_weight(2.0, 5, 10) == pytest.approx(1.0)  # cosine: half-way, half
    assert relation_weight(2.0, 10, 10) == pytest.approx(0.0, abs=1e-15)
    assert relation_weight(2.0, 3, 10) == pytest.approx(2.0 * (1 + math.cos(math.pi * 0.3)) / 2)
    assert relation_weight(2.0, 3, 10, "linear") == pytest.approx(1.4)
    cosine = [relation_weight(1.0, e, 7) for e in range(7)]
    assert all(a > b for a, b in zip(cosine, cosine[1:]))  # strictly decreasing, all positive
    assert cosine[-1] > 0
    assert relation_weight(1.0, 0, 0) == 0.0  # no stage 2
    assert relation_weight(0.0, 0, 5) == 0.0
    with pytest.raises(ValueError, match="'cosine' or 'linear'"):
        relation_weight(1.0, 0, 5, "exp")


# ------------------------------------------------------------------ imprinting


def test_imprinted_weights_are_the_ncm_classifier():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(60, 16, generator=g, dtype=torch.float64) * torch.rand(60, 1, generator=g, dtype=torch.float64) * 5
    labels = torch.arange(60) % 6
    weight = imprinted_weights(emb, labels, 7, scale=12.0)
    # oracle: normalised mean of normalised embeddings, times scale / mean norm; class 6 absent
    mean_norm = sum(float(e.norm()) for e in emb) / len(emb)
    for k in range(6):
        mine = F.normalize(emb[labels == k], dim=1).mean(dim=0)
        assert torch.allclose(weight[k], mine / mine.norm() * 12.0 / mean_norm, atol=1e-12)
    assert torch.all(weight[6] == 0)
    # predictions = the NCM classifier's (class centres from the same embeddings), anywhere
    other = torch.randn(200, 16, generator=g, dtype=torch.float64)
    centers = class_centers(emb, labels, 6, normalize_inputs=True)
    assert torch.equal((other @ weight[:6].T).argmax(1), ncm_logits(other, centers).argmax(1))
    # a mean-norm embedding pointing at a centre gets logit `scale` for that class
    z = weight[2] / weight[2].norm() * mean_norm
    assert (weight @ z)[2].item() == pytest.approx(12.0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        imprinted_weights(emb, labels, 6, scale=0.0)
    with pytest.raises(ValueError, match="embeddings are zero"):
        imprinted_weights(torch.zeros(4, 3), torch.arange(4) % 2, 2, scale=1.0)


def _network_and_split():
    from refilled.models import create_model
    from refilled.networks import Network

    torch.manual_seed(0)
    net = Network(create_model("cnn_small", 4, 1))
    images = torch.randint(0, 256, (48, 1, 12, 12), dtype=torch.uint8)
    net.probe(images[:2].float() / 255)
    return net, Split(images, torch.arange(48) % 4)


def test_imprint_classifier_starts_at_the_ncm_accuracy():
    from refilled.evaluation import ncm_predictor, predict

    net, train = _network_and_split()
    net.reset_classifier(4)
    note = imprint_classifier(net, train, 4, scale=10.0)
    assert note["head_init"].startswith("imprinted (scale 10") and "warning" not in note
    assert torch.all(net.classifier.bias == 0)
    other = torch.randint(0, 256, (30, 1, 12, 12), dtype=torch.uint8)
    ncm = ncm_predictor(net, train.images, train.labels, 4, "cpu")
    emb, logits = predict(net, other, "cpu")
    assert torch.equal(logits.argmax(1), ncm(other))
    assert logits.abs().max() <= 10.0 * emb.norm(dim=1).max() / predict(net, train.images, "cpu")[0].norm(dim=1).mean() + 1e-4


def test_imprint_leaves_a_head_that_is_not_a_linear_map_of_the_embedding_alone():
    from refilled.networks import Network

    class Doubled(nn.Module):  # logits = 2 * fc(z) + 1: the embedding hook sees z, not what fc is applied to
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return 2 * self.fc(self.body(x).mean(dim=(2, 3))) + 1

    torch.manual_seed(0)
    net = Network(Doubled(), head="fc")  # named: a guessed head must give the logits themselves
    images = torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8)
    net.probe(images[:2].float() / 255)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    note = imprint_classifier(net, Split(images, torch.arange(24) % 4), 4, scale=10.0)
    assert note["head_init"].startswith("random (the classifier's logits are not a linear map")
    assert note["warning"].startswith("stage 2's classifier not imprinted")
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


# ------------------------------------------------------------------ the budget split


def test_budget_share_splits_the_total_epochs():
    cfg = make_config({}, ["stage1.optim.epochs=30", "train.epochs=70", "stage1.optim.lr=0.4"])
    s1, s2 = stage_budgets(cfg)
    assert (s1.epochs, s2.epochs) == (30, 70) and s1 is cfg.stage1.optim  # None: as given
    half = make_config({}, ["stage1.optim.epochs=30", "train.epochs=70", "stage1.optim.lr=0.4",
                            "stage1.budget_share=0.5"])
    s1, s2 = stage_budgets(half)
    assert (s1.epochs, s2.epochs) == (50, 50) and s1.lr == 0.4 and s2.lr == half.train.lr
    assert [(k, o.epochs) for k, o, _ in refilled_schedules(half)] == [("stage1.optim", 50), ("train", 50)]
    odd = make_config({}, ["stage1.optim.epochs=9", "train.epochs=21", "stage1.budget_share=0.5"])
    assert [o.epochs for o in stage_budgets(odd)] == [15, 15]
    tiny_share = make_config({}, ["stage1.optim.epochs=1", "train.epochs=2", "stage1.budget_share=0.1"])
    assert [(k, o.epochs) for k, o, _ in refilled_schedules(tiny_share)] == [("train", 3)]  # no stage 1
    for bad in ("0", "1", "1.5", "-0.2"):
        with pytest.raises(ConfigError, match=r"stage1\.budget_share.*must be in \(0, 1\)"):
            make_config({}, [f"stage1.budget_share={bad}"])


def test_presets_switch_the_candidates_off_and_keys_are_checked():
    on = {"stage2": {"head_init": "imprint", "relation_weight": 1.0}, "stage1": {"budget_share": 0.5}}
    for preset in ("tpami", "cvpr_recon", "cvpr"):
        for key, value in (("stage2.head_init", "random"), ("stage2.relation_weight", 0.0),
                           ("stage1.budget_share", None)):
            assert PRESETS[preset][key] == value
        c = make_config(on, [f"ablation={preset}"])
        assert (c.stage2.head_init, c.stage2.relation_weight, c.stage1.budget_share) == ("random", 0.0, None)
    for override, key in (("stage2.head_init=ncm", "stage2.head_init"),
                          ("stage2.relation_decay=exp", "stage2.relation_decay"),
                          ("stage2.relation_weight=-1", "stage2.relation_weight"),
                          ("stage2.imprint_scale=0", "stage2.imprint_scale")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            make_config({}, [override])


# ------------------------------------------------------------------ end to end (distill)


@pytest.fixture(scope="module")
def cross_task():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images * 255 / 16).round().to(torch.uint8).unsqueeze(1)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))
    refilled.distill(None, teacher, (x[y < 5], y[y < 5]), method="ce", epochs=2, lr=0.05,
                     device="cpu", progress=False)
    idx = torch.cat([(y == c).nonzero().flatten()[:12] for c in range(5, 10)])
    return teacher, (x[idx], y[idx] - 5)


# What REFILLED gave before issue 23 on this tiny task (the code of commit 03db1db): the loss of
# each epoch (stage 1, stage 1, stage 2 x 3) and the sum of the student's parameters.
ISSUE14_LOSSES = [0.49647, 0.47006, 2.174038, 1.622575, 1.481538]
ISSUE14_PARAMETER_SUM = 61.212496750755236


def test_with_the_candidates_off_refilled_is_what_it_was(cross_task):
    """The default (no class shared here, every hand-off candidate off) is issue 14's REFILLED."""
    teacher, train = cross_task
    default = _fit(teacher, train)
    assert [r["loss"] for r in default.refilled_history] == pytest.approx(ISSUE14_LOSSES, rel=1e-5)
    assert float(sum(p.detach().double().sum() for p in default.parameters())) == pytest.approx(
        ISSUE14_PARAMETER_SUM, rel=1e-6)
    off = _fit(teacher, train, stage2={"head_init": "random", "relation_weight": 0.0},
               stage1={"budget_share": None})
    assert _same_weights(default, off) and "relation" not in default.refilled_history[-1]
    assert "head_init" not in default.refilled_history.notes


def test_the_candidates_act_when_switched_on(cross_task):
    teacher, train = cross_task
    default = _fit(teacher, train)
    kept = _fit(teacher, train, stage2={"relation_weight": 0.1})
    rows = [r for r in kept.refilled_history if r["stage"] == "stage2"]
    assert all("relation" in r for r in rows) and rows[0]["relation"] > 0
    assert rows[0]["relation"] > rows[-1]["relation"]  # decaying
    assert not _same_weights(default, kept)
    imprinted = _fit(teacher, train, stage2={"head_init": "imprint"})
    assert imprinted.refilled_history.notes["head_init"].startswith("imprinted (scale 10")
    assert not _same_weights(default, imprinted)
    longer = _fit(teacher, train, stage1={"budget_share": 0.8})
    stages = [r["stage"] for r in longer.refilled_history]
    assert stages.count("stage1") == 4 and stages.count("stage2") == 1


@pytest.mark.gpu
def test_no_host_sync_in_a_stage_2_step_with_every_new_term():
    from refilled.config import Stage1Config, Stage2Config
    from refilled.methods import LocalClassifierDistillation
    from refilled.models import create_model
    from refilled.networks import FrozenTeacher, Network

    torch.manual_seed(0)
    teacher = FrozenTeacher(Network(create_model("cnn_small", 7, 1)).cuda())
    student = Network(create_model("cnn_small", 5, 1)).cuda()
    centers = F.normalize(torch.randn(5, teacher.num_features, device="cuda"), dim=1)
    ids = (torch.tensor([0, 2], device="cuda"), torch.tensor([6, 1], device="cuda"))
    method = LocalClassifierDistillation(student, teacher, Stage2Config(shared_kd=1.0, relation_weight=1.0),
                                         centers, shared=ids, relation=(Stage1Config(), 10))
    x = torch.rand(40, 1, 16, 16, device="cuda")
    y = (torch.arange(40) % 5).cuda()
    method.step(x, y, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = method.step(x, y, 3)
        sum(losses.values()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(losses) == {"ce", "distill", "shared_kd", "relation"}
