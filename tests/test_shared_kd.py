"""Issue 23: Hinton KD on the classes the student shares with the teacher, inside REFILLED's
stage 2 (losses.shared_kd_loss; stage2.shared_kd / shared_kd_temperature)."""

import math

import pytest
import torch
import torch.nn as nn
import yaml
from test_api import FcStudent
from tiny import run_cli, tiny

import refilled
from refilled.config import ABLATIONS, PRESETS, Stage2Config, make_config
from refilled.errors import ConfigError
from refilled.losses import check_shared_ids, kd_loss, local_classifier_loss, shared_kd_loss


def brute_force(student, teacher, s_ids, t_ids, temperature):
    """The definition, one instance and one class at a time, in float64."""
    total = 0.0
    for i in range(student.shape[0]):
        t = [float(teacher[i, j]) / temperature for j in t_ids]
        s = [float(student[i, j]) / temperature for j in s_ids]
        zt = sum(math.exp(v) for v in t)
        zs = sum(math.exp(v) for v in s)
        p = [math.exp(v) / zt for v in t]
        q = [math.exp(v) / zs for v in s]
        total += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
    return temperature**2 * total / student.shape[0]


# ------------------------------------------------------------------ the loss


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_shared_kd_matches_the_brute_force_definition(temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3
    s_ids, t_ids = torch.tensor([3, 0, 4]), torch.tensor([7, 2, 5])  # any order, aligned
    got = shared_kd_loss(student, teacher, s_ids, t_ids, temperature)
    assert got.item() == pytest.approx(brute_force(student, teacher, s_ids, t_ids, temperature), rel=1e-12)


def test_shared_kd_golden_value():
    # one instance, two shared classes: p = softmax([2, 0] / 2), q = softmax([0, 1] / 2), x T^2
    student = torch.tensor([[0.0, 5.0, 1.0]])
    teacher = torch.tensor([[9.0, 2.0, 0.0, -3.0]])
    got = shared_kd_loss(student, teacher, torch.tensor([0, 2]), torch.tensor([1, 2]), 2.0)
    p1 = 1 / (1 + math.exp(-1.0))  # softmax([1, 0])[0]
    q1 = 1 / (1 + math.exp(0.5))  # softmax([0, 0.5])[0]
    expected = 4 * (p1 * math.log(p1 / q1) + (1 - p1) * math.log((1 - p1) / (1 - q1)))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.02961, abs=1e-5)  # 4 x (0.7311 ln(0.7311/0.3775) + 0.2689 ln(0.2689/0.6225))


def test_shared_kd_renormalises_over_the_shared_classes_only():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 6, generator=g), torch.randn(4, 8, generator=g)
    s_ids, t_ids = torch.tensor([1, 2, 5]), torch.tensor([0, 6, 3])
    base = shared_kd_loss(student, teacher, s_ids, t_ids)
    moved_s, moved_t = student.clone(), teacher.clone()
    moved_s[:, [0, 3, 4]] += 50.0  # classes the teacher does not know
    moved_t[:, [1, 2, 4, 5, 7]] -= 50.0  # classes the student does not learn
    assert torch.equal(shared_kd_loss(moved_s, moved_t, s_ids, t_ids), base)
    # a shift of one side's shared logits by a constant changes nothing either (softmax)
    assert shared_kd_loss(student + 3.0, teacher, s_ids, t_ids).item() == pytest.approx(base.item(), rel=1e-5)
    # it is kd_loss of the aligned columns, and zero when the student copies the teacher
    assert torch.equal(base, kd_loss(student[:, s_ids], teacher[:, t_ids], 4.0))
    copy = student.clone()
    copy[:, s_ids] = teacher[:, t_ids]
    assert shared_kd_loss(copy, teacher, s_ids, t_ids).abs().item() < 1e-6


def test_shared_kd_gradient_reaches_only_the_student_on_the_shared_columns():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(5, 4, generator=g, requires_grad=True)
    teacher = torch.randn(5, 6, generator=g, requires_grad=True)
    shared_kd_loss(student, teacher, torch.tensor([0, 3]), torch.tensor([5, 1])).backward()
    assert teacher.grad is None  # a constant target
    assert torch.all(student.grad[:, [1, 2]] == 0) and student.grad[:, [0, 3]].abs().sum() > 0


def test_shared_kd_input_checks():
    s, t = torch.randn(3, 4), torch.randn(3, 5)
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        shared_kd_loss(s, t, ids, ids, 0.0)
    with pytest.raises(ValueError, match=r"student_logits must be 2-D"):
        shared_kd_loss(s[0], t, ids, ids)
    with pytest.raises(ValueError, match="teacher_logits has 2 rows, but the batch has 3"):
        shared_kd_loss(s, t[:2], ids, ids)
    with pytest.raises(ValueError, match="pair at least one class"):
        shared_kd_loss(s, t, ids, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="pair at least one class"):
        shared_kd_loss(s, t, ids[:0], ids[:0])
    with pytest.raises(ValueError, match=r"student class ids must be in \[0, 4\)"):
        shared_kd_loss(s, t, torch.tensor([0, 4]), ids)
    # the ids' values, alone: check_shared_ids (the training loop checks them once)
    check_shared_ids(ids, torch.tensor([4, 2]), 4, 5)
    for s_ids, t_ids, match in (
            (torch.tensor([0, 4]), torch.tensor([0, 1]), r"student class ids must be in \[0, 4\)"),
            (torch.tensor([0, 1]), torch.tensor([0, 5]), r"teacher class ids must be in \[0, 5\)"),
            (torch.tensor([0, -1]), torch.tensor([0, 1]), "student class ids must be in"),
            (torch.tensor([1, 1]), torch.tensor([0, 1]), "repeat a class"),
            (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "1-D tensor of class indices"),
            (torch.tensor([[0, 1]]), torch.tensor([0, 1]), "1-D tensor of class indices"),
            (torch.tensor([0]), torch.tensor([0, 1]), "pair at least one class"),
            (torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), "pair at least one")):
        with pytest.raises(ValueError, match=match):
            check_shared_ids(s_ids, t_ids, 4, 5)


def test_shared_kd_traces_without_a_graph_break():
    """No host sync on the training path: the loss compiles as one graph (fullgraph=True)."""
    compiled = torch.compile(shared_kd_loss, backend="eager", fullgraph=True)
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 7, generator=g)
    ids_s, ids_t = torch.tensor([0, 2, 4]), torch.tensor([6, 1, 3])
    assert torch.allclose(compiled(s, t, ids_s, ids_t, 2.0), shared_kd_loss(s, t, ids_s, ids_t, 2.0))


# ------------------------------------------------------------------ the stage-2 method


def _stage2(cfg: Stage2Config, shared=None, teacher_embedding=None):
    from refilled.methods.refilled import LocalClassifierDistillation
    from refilled.models import create_model
    from refilled.networks import FrozenTeacher, Network

    torch.manual_seed(0)
    teacher = FrozenTeacher(Network(create_model("cnn_small", 7, 1), embedding=teacher_embedding))
    student = Network(create_model("cnn_small", 5, 1))
    x = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    teacher.network.probe(x[:2])
    student.probe(x[:2])
    centers = torch.nn.functional.normalize(torch.randn(5, teacher.num_features), dim=1)
    return LocalClassifierDistillation(student, teacher, cfg, centers, shared=shared), x, torch.arange(20) % 5


def test_stage2_adds_the_weighted_term_and_nothing_else():
    cfg = Stage2Config(shared_kd=2.0, shared_kd_temperature=3.0)
    ids = (torch.tensor([1, 3]), torch.tensor([6, 0]))
    method, x, y = _stage2(cfg, shared=ids)
    method.eval()  # BN in eval mode: the same logits in every call
    losses = method.step(x, y, 0)
    assert list(losses) == ["ce", "distill", "shared_kd"]
    t_emb, t_logits = method.teacher(x)
    logits = method.student(x)
    assert torch.equal(losses["shared_kd"], 2.0 * shared_kd_loss(logits, t_logits, *ids, 3.0))
    assert losses["shared_kd"].item() == pytest.approx(
        2.0 * brute_force(logits.detach().double(), t_logits.double(), *ids, 3.0), rel=1e-3)
    # without the class map the step is the TPAMI step, value for value
    plain, _, _ = _stage2(cfg)
    plain.eval()
    off = plain.step(x, y, 0)
    assert list(off) == ["ce", "distill"]
    weights = refilled.teacher_instance_weights(t_logits)
    expected = local_classifier_loss(logits, t_emb, y, plain.centers, weights=weights)
    assert torch.equal(off["distill"], expected)
    assert torch.equal(off["ce"], torch.nn.functional.cross_entropy(logits, y))


# ------------------------------------------------------------------ end to end (distill)


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images * 255 / 16).round().to(torch.uint8).unsqueeze(1)
    return x, torch.tensor(digits.target)


def Student() -> nn.Module:
    """A small CNN student with a 5-way classifier (test_api's, sized for 5 classes)."""
    return FcStudent(5)


@pytest.fixture(scope="module")
def overlap_task():
    """A digits teacher on 0-4 and a student on 3-7: classes 3 and 4 shared."""
    x, y = _digits()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))
    refilled.distill(None, teacher, (x[y < 5], y[y < 5]), method="ce", epochs=2, lr=0.05,
                     device="cpu", progress=False)
    idx = torch.cat([(y == c).nonzero().flatten()[:12] for c in range(3, 8)])
    return teacher, (x[idx], y[idx] - 3), (torch.tensor([0, 1]), torch.tensor([3, 4]))


def _fit(teacher, train, **settings):
    torch.manual_seed(1)
    student = Student()
    refilled.distill(teacher, student, train, stage1_epochs=2, stage2_epochs=3, batch_size=20,
                     m_per_class=4, lr=0.05, device="cpu", progress=False, **settings)
    return student


def _same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_term_is_exactly_absent_without_shared_class_weight_or_logits(overlap_task):
    teacher, train, ids = overlap_task
    off = _fit(teacher, train, stage2={"shared_kd": 0.0}, shared_classes=ids)
    assert off.refilled_history.notes["shared_kd"] == "off (stage2.shared_kd = 0)"
    assert "shared_kd" not in off.refilled_history[-1]
    none = _fit(teacher, train, stage2={"shared_kd": 1.0})  # no class map given: nothing shared
    assert none.refilled_history.notes["shared_kd"].startswith("off (no class shared")
    assert _same_weights(off, none)
    on = _fit(teacher, train, stage2={"shared_kd": 1.0}, shared_classes=ids)
    assert on.refilled_history.notes["shared_kd"] == "on: 2 shared classes, weight 1, temperature 2"
    assert on.refilled_history[-1]["shared_kd"] > 0 and not _same_weights(off, on)
    # a feature-extractor teacher (its embedding is its output): no logits, no term
    features = nn.Sequential(*list(teacher)[:3])
    a = _fit(features, train, stage2={"shared_kd": 1.0}, shared_classes=ids, teacher_embedding="output")
    b = _fit(features, train, stage2={"shared_kd": 0.0}, teacher_embedding="output")
    assert a.refilled_history.notes["shared_kd"] == "off (the teacher gives no logits: a feature extractor)"
    assert _same_weights(a, b)


# What REFILLED gave before issue 23 with classes 3 and 4 shared (the code of commit 03db1db,
# which had no shared-class term): the loss of each epoch and the sum of the student's parameters.
ISSUE14_LOSSES = [0.75009, 0.526214, 2.071677, 1.576656, 1.494857]
ISSUE14_PARAMETER_SUM = 52.47686314955354


def test_with_the_new_pieces_off_refilled_is_what_it_was(overlap_task):
    teacher, train, ids = overlap_task
    old = _fit(teacher, train, stage2={"shared_kd": 0.0, "relation_weight": 0.0}, shared_classes=ids)
    assert [r["loss"] for r in old.refilled_history] == pytest.approx(ISSUE14_LOSSES, rel=1e-5)
    assert float(sum(p.detach().double().sum() for p in old.parameters())) == pytest.approx(
        ISSUE14_PARAMETER_SUM, rel=1e-6)


def test_the_default_distils_the_shared_classes(overlap_task):
    teacher, train, ids = overlap_task
    default = _fit(teacher, train, shared_classes=ids)
    assert default.refilled_history.notes["shared_kd"] == "on: 2 shared classes, weight 0.5, temperature 2"
    assert all(r["shared_kd"] > 0 for r in default.refilled_history if r["stage"] == "stage2")
    ablated = _fit(teacher, train, shared_classes=ids, ablation="no_shared_kd")
    assert ablated.refilled_history.notes["shared_kd"] == "off (stage2.shared_kd = 0)"
    assert not _same_weights(default, ablated)


def test_shared_ids_outside_the_networks_are_refused_in_the_callers_words(overlap_task):
    teacher, train, _ = overlap_task
    with pytest.raises(ConfigError, match=r"stage2.shared_kd: .*teacher class ids must be in \[0, 5\).*"
                                          r"shared_classes=\(student ids, teacher ids\)"):
        _fit(teacher, train, stage2={"shared_kd": 1.0}, shared_classes=(torch.tensor([0]), torch.tensor([5])))


# ------------------------------------------------------------------ config, presets, ablation


def test_presets_and_the_ablation_switch_the_term_off():
    on = ["stage2.shared_kd=3", "stage2.shared_kd_temperature=2"]
    for preset in ("tpami", "cvpr_recon", "cvpr"):
        assert PRESETS[preset]["stage2.shared_kd"] == 0.0
        assert make_config({}, [f"stage2.preset={preset}"]).stage2.shared_kd == 0.0
        assert make_config({"stage2": {"shared_kd": 3.0}}, [f"ablation={preset}"]).stage2.shared_kd == 0.0
    assert ABLATIONS["no_shared_kd"] == {"method": "refilled", "stage2.shared_kd": 0.0}
    assert make_config({"stage2": {"shared_kd": 3.0}}, ["ablation=no_shared_kd"]).stage2.shared_kd == 0.0
    with pytest.raises(ConfigError, match="ablation 'no_shared_kd' sets stage2.shared_kd=0.0"):
        make_config({}, [*on, "ablation=no_shared_kd"])
    assert make_config({}, on).stage2.shared_kd_temperature == 2.0
    for override, key in (("stage2.shared_kd=-1", "stage2.shared_kd"),
                          ("stage2.shared_kd_temperature=0", "stage2.shared_kd_temperature")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            make_config({}, [override])


# ------------------------------------------------------------------ the CLI: class windows


def test_windows_give_the_class_map_and_an_external_teacher_turns_the_term_off(tmp_path, capsys):
    """data.student_offset=2 with 5 classes on each side: 3 shared classes, matched to the
    teacher's outputs; a teacher whose outputs are not its window gets no term (and a note)."""
    path = tmp_path / "overlap.yaml"
    tree = tiny(data={"student_offset": 2}, train={"epochs": 1},
                stage1={"optim": {"epochs": 1, "batch_size": 20, "m_per_class": 4, "lr": 0.05}})
    path.write_text(yaml.safe_dump({**tree, "out_dir": str(tmp_path / "runs")}))
    code, res, err = run_cli(capsys, "run", path, "stage2.shared_kd=1")
    assert code == 0, err
    assert res["overlap"] == 3 and res["shared_kd"] == "on: 3 shared classes, weight 1, temperature 2"
    # the same with a teacher of 1000 outputs (teacher.kwargs): REFILLED runs, the term is off
    models = tmp_path / "user_teacher.py"
    models.write_text("import torch.nn as nn\n\n\ndef teacher(num_classes):\n"
                      "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), "
                      "nn.Linear(32, num_classes))\n")
    weights = tmp_path / "t1000.pt"
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1000)).state_dict(),
               weights)
    code, res, err = run_cli(capsys, "run", path, "stage2.shared_kd=1", f"teacher.arch={models}:teacher",
                             "teacher.kwargs={num_classes: 1000}", f"teacher.weights={weights}")
    assert code == 0, err
    assert res["overlap"] == 3 and res["shared_kd"] == "off (no class shared with the teacher's outputs)"
