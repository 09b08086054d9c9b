"""REFILLED's pure functions against brute-force loop oracles (SPEC §2-3)."""

import math

import pytest
import torch

from refilled.losses import (
    local_centers,
    local_classifier_loss,
    relation_matching_loss,
    teacher_instance_weights,
)
from refilled.mining import semihard_tuples
from refilled.ncm import class_centers, ncm_accuracy, ncm_logits

DTYPES = [torch.float32, torch.float64]


def make_batch(batch, classes, dim, dtype=torch.float64, seed=0, dim_t=None):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (batch,), generator=g)
    student = torch.randn(batch, dim, generator=g, dtype=dtype)
    teacher = torch.randn(batch, dim_t or dim + 3, generator=g, dtype=dtype)
    return student, teacher, labels


# ---------------------------------------------------------------- brute-force oracles


def unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm > 0 else v


def oracle_distances(emb):
    z = [unit(row) for row in emb.double().tolist()]
    return [[math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b))) for b in z] for a in z]


def oracle_tuples(emb, labels, margin):
    """{(a, p): sorted negatives} for every pair with at least one semi-hard negative."""
    d, y = oracle_distances(emb), labels.tolist()
    out = {}
    for a in range(len(y)):
        for p in range(len(y)):
            if a == p or y[a] != y[p]:
                continue
            negs = [n for n in range(len(y)) if y[n] != y[a] and 0 < d[a][n] - d[a][p] <= margin]
            if negs:
                out[(a, p)] = negs
    return out


def oracle_relation_loss(student, teacher, labels, tau, margin, mode, scale):
    tuples = oracle_tuples(student, labels, margin)
    ds, dt = oracle_distances(student), oracle_distances(teacher)
    kls = []
    for (a, p), negs in tuples.items():
        if mode == "tuple":
            cols = [p] + negs
            ps = [math.exp(-ds[a][j] / tau) for j in cols]
            pt = [math.exp(-dt[a][j] / tau) for j in cols]
            ps, pt = [x / sum(ps) for x in ps], [x / sum(pt) for x in pt]
            kls.append(sum(t * math.log(t / s) for t, s in zip(pt, ps)))
        else:
            for n in negs:
                qs = 1 / (1 + math.exp(-(ds[a][n] - ds[a][p]) / tau))
                qt = 1 / (1 + math.exp(-(dt[a][n] - dt[a][p]) / tau))
                kls.append(qt * math.log(qt / qs) + (1 - qt) * math.log((1 - qt) / (1 - qs)))
    return scale * sum(kls) / len(kls) if kls else 0.0


def oracle_local_loss(student_logits, teacher_emb, labels, centers, tt, ts, weights, norm_t):
    present = sorted(set(labels.tolist()))
    total = 0.0
    for i in range(student_logits.shape[0]):
        e = teacher_emb[i].double().tolist()
        if norm_t:
            e = unit(e)
        t = [sum(a * b for a, b in zip(e, centers[k].double().tolist())) / tt for k in present]
        s = [student_logits[i, k].item() / ts for k in present]
        pt = [math.exp(v - max(t)) for v in t]
        ps = [math.exp(v - max(s)) for v in s]
        pt, ps = [x / sum(pt) for x in pt], [x / sum(ps) for x in ps]
        w = 1.0 if weights is None else weights[i].item()
        total += w * sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return total / student_logits.shape[0]


# ---------------------------------------------------------------- mining


@pytest.mark.parametrize("batch,classes", [(2, 1), (2, 2), (16, 2), (40, 10), (64, 100), (9, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mining_matches_oracle(batch, classes, dtype):
    emb, _, labels = make_batch(batch, classes, 6, dtype, seed=batch + classes)
    anchor, positive, mask = semihard_tuples(emb, labels, margin=0.2)
    got = {
        (a, p): row.nonzero().flatten().tolist()
        for a, p, row in zip(anchor.tolist(), positive.tolist(), mask)
    }
    assert got == oracle_tuples(emb, labels, 0.2)
    assert mask.dtype == torch.bool and mask.shape == (anchor.numel(), batch)
    assert bool(mask.any(dim=1).all())


def test_mining_wide_margin_finds_tuples_and_matches():
    emb, _, labels = make_batch(30, 3, 4, seed=3)
    anchor, positive, mask = semihard_tuples(emb, labels, margin=1.0)
    assert anchor.numel() > 10
    got = {(a, p): r.nonzero().flatten().tolist() for a, p, r in zip(anchor.tolist(), positive.tolist(), mask)}
    assert got == oracle_tuples(emb, labels, 1.0)


def test_mining_equals_pytorch_metric_learning():
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    for seed, (batch, classes) in enumerate([(128, 10), (128, 100), (64, 2), (32, 5)]):
        emb, _, labels = make_batch(batch, classes, 16, torch.float64, seed=seed)
        a, p, n = miner(emb, labels)
        theirs = set(zip(a.tolist(), p.tolist(), n.tolist()))
        anchor, positive, mask = semihard_tuples(emb, labels)
        t_idx, n_idx = mask.nonzero(as_tuple=True)
        ours = set(zip(anchor[t_idx].tolist(), positive[t_idx].tolist(), n_idx.tolist()))
        assert len(ours) > 0
        assert ours == theirs


def test_mining_edge_cases():
    # all labels distinct: no positive pair
    emb = torch.randn(8, 4)
    a, p, m = semihard_tuples(emb, torch.arange(8))
    assert a.numel() == 0 and m.shape == (0, 8)
    # duplicated embeddings: zero distances are neither positives' gaps nor semi-hard
    emb = torch.ones(6, 4)
    a, p, m = semihard_tuples(emb, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert a.numel() == 0
    # bfloat16 input is mined in float32 without error
    emb, _, labels = make_batch(32, 4, 8, torch.float32)
    a1, _, m1 = semihard_tuples(emb.bfloat16(), labels)
    assert m1.dtype == torch.bool


# ---------------------------------------------------------------- stage 1 loss


@pytest.mark.parametrize("mode", ["tuple", "triplet"])
@pytest.mark.parametrize("batch,classes", [(2, 1), (8, 2), (24, 3), (64, 10), (50, 100)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_relation_loss_matches_oracle(mode, batch, classes, dtype):
    student, teacher, labels = make_batch(batch, classes, 5, dtype, seed=7 * batch + classes)
    margin = 0.5
    got = relation_matching_loss(student, teacher, labels, tau=4.0, margin=margin, mode=mode)
    want = oracle_relation_loss(student, teacher, labels, 4.0, margin, mode, 1000.0)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert got.dtype == dtype
    assert got.item() == pytest.approx(want, rel=tol, abs=tol)


@pytest.mark.parametrize("mode", ["tuple", "triplet"])
def test_relation_loss_gradcheck(mode):
    student, teacher, labels = make_batch(12, 3, 5, torch.float64, seed=11)
    assert semihard_tuples(student, labels, margin=0.5)[0].numel() > 0
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: relation_matching_loss(s, teacher, labels, margin=0.5, mode=mode, scale=1.0),
        (student,),
    )


def test_relation_loss_is_zero_when_teacher_equals_student():
    student, _, labels = make_batch(40, 4, 6, seed=2)
    for mode in ("tuple", "triplet"):
        loss = relation_matching_loss(student, 3.0 * student, labels, margin=1.0, mode=mode)
        assert abs(loss.item()) < 1e-9


@pytest.mark.parametrize("mode", ["tuple", "triplet"])
def test_relation_loss_empty_is_graph_connected_zero(mode):
    cases = [
        (torch.randn(8, 4), torch.arange(8)),  # no positives
        (torch.randn(8, 4), torch.zeros(8, dtype=torch.long)),  # one class only: no negatives
        (torch.ones(6, 4), torch.tensor([0, 0, 0, 1, 1, 1])),  # duplicates
        (torch.randn(2, 4), torch.tensor([0, 1])),  # batch of 2
    ]
    for emb, labels in cases:
        emb.requires_grad_(True)
        loss = relation_matching_loss(emb, torch.randn(len(labels), 3), labels, mode=mode)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_relation_loss_gradients_finite_with_duplicates():
    student, teacher, labels = make_batch(32, 4, 6, torch.float32, seed=5)
    student[1] = student[0]
    student[2] = student[0]
    labels[:3] = labels[0]
    student.requires_grad_(True)
    for mode in ("tuple", "triplet"):
        loss = relation_matching_loss(student, teacher, labels, margin=1.0, mode=mode)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_relation_loss_teacher_gets_no_gradient_and_checks_args():
    student, teacher, labels = make_batch(20, 3, 5, seed=1)
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    relation_matching_loss(student, teacher, labels, margin=1.0).backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(ValueError, match="mode"):
        relation_matching_loss(student, teacher, labels, mode="pairs")
    with pytest.raises(ValueError, match="tau"):
        relation_matching_loss(student, teacher, labels, tau=0.0)
    with pytest.raises(ValueError, match="rows, but the batch has"):
        relation_matching_loss(student, teacher[:5], labels)


# ---------------------------------------------------------------- stage 2 loss


@pytest.mark.parametrize("batch,classes", [(2, 2), (16, 10), (32, 100), (7, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted,norm_t,taus", [(False, False, (1.0, 1.0)), (True, True, (2.0, 3.0))])
def test_local_classifier_loss_matches_oracle(batch, classes, dtype, weighted, norm_t, taus):
    g = torch.Generator().manual_seed(batch * classes)
    student_logits = torch.randn(batch, classes, generator=g, dtype=dtype)
    teacher_emb = torch.randn(batch, 6, generator=g, dtype=dtype)
    labels = torch.randint(classes, (batch,), generator=g)
    centers = torch.nn.functional.normalize(torch.randn(classes, 6, generator=g, dtype=dtype), dim=1)
    weights = torch.rand(batch, generator=g, dtype=dtype) if weighted else None
    got = local_classifier_loss(
        student_logits, teacher_emb, labels, centers,
        tau_teacher=taus[0], tau_student=taus[1], weights=weights, normalize_teacher=norm_t,
    )
    want = oracle_local_loss(student_logits, teacher_emb, labels, centers, *taus, weights, norm_t)
    assert got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert got.item() == pytest.approx(want, rel=tol, abs=tol)


def test_local_classifier_loss_ignores_absent_classes_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 2, 2, 3, 3])
    centers = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    loss = local_classifier_loss(logits, emb, labels, centers)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad[:, [1, 4]], torch.zeros(6, 2, dtype=torch.float64))
    # moving an absent class's logit changes nothing
    shifted = logits.detach().clone()
    shifted[:, 4] += 10
    assert local_classifier_loss(shifted, emb, labels, centers).item() == pytest.approx(loss.item())
    assert torch.autograd.gradcheck(
        lambda s: local_classifier_loss(s, emb, labels, centers, tau_student=2.0), (logits,)
    )
    with pytest.raises(ValueError, match="one teacher centre per student class"):
        local_classifier_loss(logits, emb, labels, centers[:3])


def test_local_centers_oracle():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(10, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 3, 3, 3, 0, 1, 1, 3])
    got = local_centers(emb, labels, 5)
    for k in range(5):
        rows = [emb[i] for i in range(10) if labels[i] == k]
        if rows:
            mean = sum(rows) / len(rows)
            torch.testing.assert_close(got[k], mean / mean.norm())
        else:
            assert torch.equal(got[k], torch.zeros(3, dtype=torch.float64))


def test_teacher_instance_weights_oracle_and_edge_cases():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 4, generator=g, dtype=torch.float64) * 3
    u = []
    for row in logits.tolist():
        z = sum(math.exp(v) for v in row)
        u.append(-math.log(max(math.exp(v) / z for v in row)))
    lo, hi = min(u), max(u)
    want = [2 / (1 + math.exp((x - lo) / (hi - lo))) for x in u]
    got = teacher_instance_weights(logits)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert got.min().item() == pytest.approx(2 / (1 + math.e)) and got.max().item() == 1.0
    # every instance equally uncertain (or a batch of one): all weights 1, no NaN
    assert torch.equal(teacher_instance_weights(torch.zeros(5, 3)), torch.ones(5))
    assert torch.equal(teacher_instance_weights(torch.randn(1, 3)), torch.ones(1))
    assert got.requires_grad is False


# ---------------------------------------------------------------- NCM


@pytest.mark.parametrize("normalize_inputs", [False, True])
def test_class_centers_oracle(normalize_inputs):
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(30, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(30) % 3
    got = class_centers(emb, labels, 3, normalize_inputs=normalize_inputs)
    for k in range(3):
        rows = [emb[i] / (emb[i].norm() if normalize_inputs else 1) for i in range(30) if labels[i] == k]
        mean = sum(rows) / len(rows)
        torch.testing.assert_close(got[k], mean / mean.norm())


def test_class_centers_missing_class_is_named():
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        class_centers(torch.randn(4, 2), torch.tensor([0, 0, 2, 2]), 4)


def test_ncm_accuracy_oracle():
    g = torch.Generator().manual_seed(4)
    train, train_y = torch.randn(40, 5, generator=g), torch.arange(40) % 4
    test, test_y = torch.randn(25, 5, generator=g), torch.randint(4, (25,), generator=g)
    centers = class_centers(train, train_y, 4, normalize_inputs=True)
    correct = 0
    for i in range(25):
        sims = [float(torch.dot(test[i] / test[i].norm(), centers[k])) for k in range(4)]
        correct += int(max(range(4), key=lambda k: sims[k]) == test_y[i])
    assert ncm_accuracy(train, train_y, test, test_y, 4) == pytest.approx(correct / 25)
    assert ncm_logits(test, centers).shape == (25, 4)
    # separable clusters are classified perfectly
    means = torch.eye(4, 5) * 10
    x = means[train_y] + 0.1 * torch.randn(40, 5, generator=g)
    assert ncm_accuracy(x, train_y, x, train_y, 4) == 1.0


@pytest.mark.gpu
def test_losses_follow_the_cuda_device_and_match_cpu():
    student, teacher, labels = make_batch(64, 8, 16, torch.float32, seed=9)
    for mode in ("tuple", "triplet"):
        cpu = relation_matching_loss(student, teacher, labels, margin=0.5, mode=mode)
        gpu = relation_matching_loss(student.cuda(), teacher.cuda(), labels.cuda(), margin=0.5, mode=mode)
        assert gpu.device.type == "cuda"
        assert gpu.item() == pytest.approx(cpu.item(), rel=1e-4)
    logits = torch.randn(64, 8)
    centers = torch.nn.functional.normalize(torch.randn(8, 19), dim=1)
    cpu = local_classifier_loss(logits, teacher, labels, centers, weights=teacher_instance_weights(logits))
    gpu = local_classifier_loss(logits.cuda(), teacher.cuda(), labels.cuda(), centers.cuda(),
                                weights=teacher_instance_weights(logits.cuda()))
    assert gpu.device.type == "cuda" and gpu.item() == pytest.approx(cpu.item(), rel=1e-4)
    centers_gpu = class_centers(student.cuda(), labels.cuda(), 8)
    assert centers_gpu.device.type == "cuda"


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # the authors' reduction, on purpose
def test_cvpr_element_reduction_matches_the_authors_kldivloss():
    """The CVPR code: nn.KLDivLoss() (element mean) of the student's log-softmax over the batch's
    classes against the teacher's softmax, both at temperature 2."""
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 2, 2, 5, 5, 5, 7, 0])  # |C_B| = 4 of 9 classes
    logits = torch.randn(8, 9, generator=g, dtype=torch.float64)
    teacher = torch.randn(8, 6, generator=g, dtype=torch.float64)
    centers = torch.nn.functional.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=1)
    present = torch.tensor([0, 2, 5, 7])
    t_logits = (teacher @ centers.T)[:, present] / 2
    authors = torch.nn.KLDivLoss()(torch.log_softmax(logits[:, present] / 2, dim=1), torch.softmax(t_logits, dim=1))
    ours = local_classifier_loss(logits, teacher, labels, centers, tau_teacher=2, tau_student=2, reduction="element")
    assert ours.item() == pytest.approx(authors.item(), rel=1e-12)
    batch = local_classifier_loss(logits, teacher, labels, centers, tau_teacher=2, tau_student=2)
    assert batch.item() == pytest.approx(4 * ours.item(), rel=1e-12)  # lambda acts |C_B| times stronger
    from refilled.config import make_config

    assert make_config({}, ["stage2.preset=cvpr"]).stage2.reduction == "element"
    assert make_config({}, ["stage2.preset=tpami"]).stage2.reduction == "batch"
