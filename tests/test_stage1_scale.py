"""Stage 1 at scale (issue 15): the sorted-range miner, the range-sum tuple loss and the blockwise
triplet op against the dense reference and the loop oracles; memory that grows like B^2; and
tracing with torch.compile(fullgraph=True)."""

import pytest
import torch
from test_core import make_batch, oracle_relation_loss, oracle_tuples

import refilled.losses as losses
from refilled.losses import (
    _relation_terms_dense,
    local_centers,
    local_classifier_loss,
    relation_matching_from_tuples,
    relation_matching_loss,
    relation_matching_terms,
    teacher_instance_weights,
)
from refilled.mining import (
    _margin_bound,
    candidate_tuples,
    normalized_distances,
    normalized_distances_fast,
    semihard_tuples,
    sorted_semihard_ranges,
)

DTYPES = [torch.float32, torch.float64]


def dense_sets(dist, labels, margin):
    """{(a, p): negatives} from the dense miner on a given distance matrix."""
    anchor, positive, mask = candidate_tuples(dist, labels, margin)
    return {
        (a, p): row.nonzero().flatten().tolist()
        for a, p, row in zip(anchor.tolist(), positive.tolist(), mask)
        if row.any()
    }


def sorted_sets(dist, labels, margin):
    """The same, read from sorted_semihard_ranges (and its counts checked on the way)."""
    r = sorted_semihard_ranges(dist, labels, margin)
    out = {}
    for a in range(labels.numel()):
        for i in r.positive[a].nonzero().flatten().tolist():
            negs = [r.order[a, j].item() for j in range(r.start[a, i], i) if r.negative[a, j]]
            assert len(negs) == r.count[a, i].item()
            if negs:
                out[(a, r.order[a, i].item())] = sorted(negs)
    assert torch.equal(r.distance, dist.gather(1, r.order))
    assert (r.distance[:, 1:] <= r.distance[:, :-1]).all()  # decreasing rows
    assert (r.count[~r.positive] == 0).all()
    return out


@pytest.fixture(autouse=True)
def sorted_path_always(monkeypatch):
    """These tests exercise the sorted path: no dense dispatch for few-tuple CPU batches."""
    monkeypatch.setattr(losses, "_DENSE_TUPLES_PER_ANCHOR", 0)


# ---------------------------------------------------------------- mining


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [0.0, 0.2, 0.5, 1.0])
def test_sorted_ranges_equal_the_dense_miner_with_ties_and_duplicates(dtype, margin):
    for trial in range(6):
        g = torch.Generator().manual_seed(trial)
        batch, classes = 30, [1, 2, 3, 5, 10, 30][trial]
        labels = torch.randint(classes, (batch,), generator=g)
        emb = torch.randn(batch, 3, generator=g, dtype=dtype)
        if trial % 2:
            emb = (2 * emb).round()  # many exactly equal distances
        emb[1] = emb[0]  # duplicates: zero distances, and ties across classes
        emb[2] = emb[0]
        dist = normalized_distances(emb)
        got = sorted_sets(dist, labels, margin)
        assert got == dense_sets(dist, labels, margin)
        if trial % 2 == 0 and dtype == torch.float64:
            assert got == oracle_tuples(emb, labels, margin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sorted_ranges_reproduce_the_dense_boundary_bit_for_bit(dtype):
    # Distances placed on and around d(a, p) + margin and d(a, p), a few ulps either way: the
    # rounded gap test decides, and the sorted ranges must decide the same.
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 10 + [1] * 20)
    base = torch.rand(30, 30, generator=g, dtype=dtype)
    dist = (base + base.T) / 2
    dist.fill_diagonal_(0)
    down, up = torch.tensor(-1.0, dtype=dtype), torch.tensor(9.0, dtype=dtype)
    for a in range(10):
        for k, n in enumerate(range(10, 30)):
            p = (a + 1 + k % 9) % 10
            t = dist[a, p] + (0.2 if k % 2 else 0.0)
            for _ in range(k % 4):
                t = torch.nextafter(t, down)
            for _ in range((k // 4) % 3):
                t = torch.nextafter(t, up)
            dist[a, n] = t
    got = sorted_sets(dist, labels, 0.2)
    assert got == dense_sets(dist, labels, 0.2)
    assert len(got) > 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [0.2, 0.5, 1.0, 0.05, 1e-3, 2.0])
def test_margin_bound_is_exact_in_every_binade(dtype, margin):
    g = torch.Generator().manual_seed(1)
    if dtype == torch.float32:  # random bit patterns: every binade of [0, 4) equally often
        top = torch.tensor(4.0).view(torch.int32).item()
        d = torch.randint(0, top, (200_000,), generator=g, dtype=torch.int32).view(torch.float32)
    else:
        d = 4 * torch.rand(200_000, generator=g, dtype=dtype) ** 8
    d = torch.cat([d, torch.zeros(3, dtype=dtype)])
    t = _margin_bound(d, margin)
    assert ((t - d) <= margin).all()
    assert not ((torch.nextafter(t, torch.full_like(t, float("inf"))) - d) <= margin).any()


def test_sorted_ranges_check_their_input():
    with pytest.raises(ValueError, match="does not match"):
        sorted_semihard_ranges(torch.zeros(3, 3), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------- distances


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_distances_equal_cdist_and_its_gradient(dtype):
    emb, _, _ = make_batch(40, 3, 6, dtype, seed=3)
    emb[1] = emb[0]  # a zero distance: gradient 0 there, as torch.cdist gives
    emb.requires_grad_(True)
    g = torch.randn(40, 40, dtype=dtype, generator=torch.Generator().manual_seed(4))
    fast, ref = normalized_distances_fast(emb), normalized_distances(emb)
    assert torch.equal(fast, ref)
    (g_fast,), (g_ref,) = torch.autograd.grad(fast, emb, g), torch.autograd.grad(ref, emb, g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(g_fast, g_ref, rtol=tol, atol=tol)
    assert torch.autograd.gradcheck(
        normalized_distances_fast, (emb[2:9].detach().double().requires_grad_(True),)
    )


# ---------------------------------------------------------------- stage-1 loss


@pytest.fixture(params=["band", "grid"])
def triplet_strategy(request, monkeypatch):
    """Both triplet strategies, with small budgets so that every loop runs several times."""
    monkeypatch.setattr(losses, "_TRIPLET_BAND", request.param == "band")
    monkeypatch.setattr(losses, "_TRIPLET_BAND_ELEMENTS", 300)
    monkeypatch.setattr(losses, "_TRIPLET_BLOCK_BYTES", 1)  # one anchor per grid block
    return request.param


@pytest.fixture()
def small_row_blocks(monkeypatch):
    """Row blocks of 7 anchors for the tuple loss (uneven last block)."""
    monkeypatch.setattr(losses, "row_block", lambda batch, *args, **kw: min(batch, 7))


def compare_with_dense(student, teacher, labels, mode, margin, tol):
    s_fast = student.clone().requires_grad_(True)
    s_ref = student.clone().requires_grad_(True)
    loss, num = relation_matching_terms(s_fast, teacher, labels, margin=margin, mode=mode)
    ref, ref_num = _relation_terms_dense(s_ref, teacher, labels, margin=margin, mode=mode)
    assert loss.dtype == ref.dtype and num.dtype == torch.int64 and num.shape == ()
    assert num.item() == ref_num.item()
    assert loss.item() == pytest.approx(ref.item(), rel=tol, abs=tol)
    (g_fast,), (g_ref,) = torch.autograd.grad(loss, s_fast), torch.autograd.grad(ref, s_ref)
    scale = g_ref.abs().max().clamp_min(1e-30)
    assert ((g_fast - g_ref).abs().max() / scale).item() < 10 * tol
    return loss.item(), num.item()


@pytest.mark.parametrize("batch,classes", [(2, 1), (9, 3), (64, 10), (150, 5), (200, 20)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tuple_loss_equals_dense_and_oracle(batch, classes, dtype, small_row_blocks):
    student, teacher, labels = make_batch(batch, classes, 5, dtype, seed=batch + classes)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    loss, num = compare_with_dense(student, teacher, labels, "tuple", 0.5, tol)
    if batch <= 64:
        want = oracle_relation_loss(student, teacher, labels, 4.0, 0.5, "tuple", 1000.0)
        assert loss == pytest.approx(want, rel=tol, abs=tol)
        assert num == len(oracle_tuples(student, labels, 0.5))


@pytest.mark.parametrize("batch,classes", [(2, 1), (9, 3), (64, 10), (120, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triplet_loss_equals_dense_and_oracle(batch, classes, dtype, triplet_strategy):
    student, teacher, labels = make_batch(batch, classes, 5, dtype, seed=batch * classes)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    loss, num = compare_with_dense(student, teacher, labels, "triplet", 0.5, tol)
    if batch <= 64:
        want = oracle_relation_loss(student, teacher, labels, 4.0, 0.5, "triplet", 1000.0)
        assert loss == pytest.approx(want, rel=tol, abs=tol)


@pytest.mark.parametrize("mode", ["tuple", "triplet"])
def test_loss_equals_dense_with_ties_duplicates_and_tau(mode, small_row_blocks):
    g = torch.Generator().manual_seed(8)
    labels = torch.randint(4, (48,), generator=g)
    student = (2 * torch.randn(48, 3, generator=g, dtype=torch.float64)).round()
    student[5] = student[4]
    teacher = torch.randn(48, 7, generator=g, dtype=torch.float64)
    for tau in (4.0, 0.5, 0.1):
        s = student.clone().requires_grad_(True)
        loss, num = relation_matching_terms(s, teacher, labels, tau=tau, margin=0.3, mode=mode)
        ref, ref_num = _relation_terms_dense(student, teacher, labels, tau=tau, margin=0.3, mode=mode)
        assert num.item() == ref_num.item() > 0
        assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("mode", ["tuple", "triplet"])
def test_gradcheck_float64(mode, triplet_strategy):
    student, teacher, labels = make_batch(14, 3, 5, torch.float64, seed=21)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: relation_matching_loss(s, teacher, labels, margin=0.5, mode=mode, scale=1.0),
        (student,),
    )


@pytest.mark.parametrize("mode", ["tuple", "triplet"])
def test_empty_batches_give_a_connected_exact_zero(mode, triplet_strategy):
    cases = [
        (torch.randn(8, 4), torch.arange(8)),  # no positives
        (torch.randn(8, 4), torch.zeros(8, dtype=torch.long)),  # one class only
        (torch.ones(6, 4), torch.tensor([0, 0, 0, 1, 1, 1])),  # all distances 0
        (torch.randn(1, 4), torch.tensor([3])),  # batch of 1
    ]
    for emb, labels in cases:
        emb.requires_grad_(True)
        loss, num = relation_matching_terms(emb, torch.randn(len(labels), 3), labels, mode=mode)
        assert loss.item() == 0.0 and num.item() == 0 and loss.requires_grad
        loss.backward()
        assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_half_precision_is_promoted_to_float32():
    student, teacher, labels = make_batch(32, 4, 8, torch.float32, seed=6)
    for mode in ("tuple", "triplet"):
        loss, _ = relation_matching_terms(student.bfloat16(), teacher.half(), labels, mode=mode)
        ref, _ = _relation_terms_dense(student.bfloat16(), teacher.half(), labels, mode=mode)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


def test_from_tuples_is_the_dense_loss_on_given_tuples():
    student, teacher, labels = make_batch(40, 4, 6, torch.float64, seed=12)
    tuples = semihard_tuples(student, labels, margin=0.5)
    for mode in ("tuple", "triplet"):
        got, num = relation_matching_from_tuples(student, teacher, *tuples, mode=mode)
        want, want_num = relation_matching_terms(student, teacher, labels, margin=0.5, mode=mode)
        assert num.item() == want_num.item()
        assert got.item() == pytest.approx(want.item(), rel=1e-10)
    # a caller's subset of the tuples: the loss over exactly those
    anchor, positive, mask = tuples
    keep = torch.arange(anchor.numel()) % 3 == 0
    got, num = relation_matching_from_tuples(student, teacher, anchor[keep], positive[keep], mask[keep])
    assert num.item() == int(keep.sum())
    # empty, and misshapen input
    got, num = relation_matching_from_tuples(
        student.requires_grad_(True), teacher, anchor[:0], positive[:0], mask[:0]
    )
    assert got.item() == 0.0 and num.item() == 0 and got.requires_grad
    with pytest.raises(ValueError, match="do not fit"):
        relation_matching_from_tuples(student, teacher, anchor, positive, mask[:, :5])
    with pytest.raises(ValueError, match="mode"):
        relation_matching_from_tuples(student, teacher, *tuples, mode="pairs")


def test_few_tuple_cpu_batches_take_the_dense_path_in_eager_only(monkeypatch):
    monkeypatch.setattr(losses, "_DENSE_TUPLES_PER_ANCHOR", 4)
    student, teacher, labels = make_batch(64, 100, 8, torch.float64, seed=5)  # T ~ 0.6 B
    crowded = torch.arange(64) % 4  # T = 15 B
    d_s = normalized_distances(student)
    assert losses._few_tuples(d_s, labels) and not losses._few_tuples(d_s, crowded)

    def sorted_path(*args):
        raise AssertionError("sorted path")

    monkeypatch.setattr(losses._TupleKL, "apply", sorted_path)
    loss, num = relation_matching_terms(student, teacher, labels, margin=0.5)
    ref, ref_num = _relation_terms_dense(student, teacher, labels, margin=0.5)
    assert (loss.item(), num.item()) == (ref.item(), ref_num.item())
    with pytest.raises(AssertionError, match="sorted path"):
        relation_matching_terms(student, teacher, crowded, margin=0.5)


# ---------------------------------------------------------------- memory ~ B^2


def largest_allocation(fn, *args, **kwargs):
    """Bytes of the largest allocation any single op makes in fn(...) forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = fn(*args, **kwargs)
        loss.backward()
    return max(event.self_cpu_memory_usage for event in prof.events())


@pytest.mark.parametrize("mode", ["tuple", "triplet"])
def test_no_tuples_by_batch_tensor(mode, monkeypatch):
    monkeypatch.setattr(losses, "_TRIPLET_BAND_ELEMENTS", 4096)
    batch = 200  # 10 classes: ~4000 tuples; a (tuples x batch) float32 tensor is ~80 B^2 bytes
    student, teacher, labels = make_batch(batch, 10, 16, torch.float32, seed=0)
    student.requires_grad_(True)
    fast = largest_allocation(relation_matching_terms, student, teacher, labels, mode=mode)
    dense = largest_allocation(_relation_terms_dense, student, teacher, labels, mode=mode)
    # at most a couple of (B, B) int64 buffers, where the dense path needs (tuples x B)
    assert fast <= 24 * batch**2 < dense / 2


# ---------------------------------------------------------------- torch.compile(fullgraph=True)


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="eager", fullgraph=True)


@pytest.mark.parametrize("mode", ["tuple", "triplet"])
def test_relation_matching_traces_without_graph_break(mode):
    student, teacher, labels = make_batch(24, 3, 6, torch.float32, seed=2)
    s_eager = student.clone().requires_grad_(True)
    s_comp = student.clone().requires_grad_(True)

    def step(s, t, y):
        return relation_matching_terms(s, t, y, margin=0.5, mode=mode)

    loss, num = compiled(step)(s_comp, teacher, labels)
    ref, ref_num = step(s_eager, teacher, labels)
    assert num.item() == ref_num.item() > 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(s_comp.grad, s_eager.grad)
    torch._dynamo.reset()


def test_few_tuple_batches_still_trace(monkeypatch):
    # the dense dispatch reads T on the host; under torch.compile it must not be taken
    monkeypatch.setattr(losses, "_DENSE_TUPLES_PER_ANCHOR", 4)
    student, teacher, labels = make_batch(32, 30, 6, torch.float32, seed=9)
    loss, num = compiled(lambda s, t, y: relation_matching_terms(s, t, y, margin=0.5))(
        student, teacher, labels
    )
    ref, ref_num = _relation_terms_dense(student, teacher, labels, margin=0.5)
    assert num.item() == ref_num.item()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch._dynamo.reset()


def test_stage2_losses_trace_without_graph_break():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 5, generator=g, requires_grad=True)
    t_emb, t_logits = torch.randn(16, 7, generator=g), torch.randn(16, 4, generator=g)
    labels = torch.randint(5, (16,), generator=g)
    centers = compiled(local_centers)(t_emb, labels, 5)
    torch.testing.assert_close(centers, local_centers(t_emb, labels, 5))
    weights = compiled(teacher_instance_weights)(t_logits)
    torch.testing.assert_close(weights, teacher_instance_weights(t_logits))

    def distill(logits, t_emb, labels, centers, weights):
        return local_classifier_loss(logits, t_emb, labels, centers, tau_teacher=2.0,
                                     tau_student=2.0, weights=weights)

    got = compiled(distill)(logits, t_emb, labels, centers, weights)
    want = distill(logits, t_emb, labels, centers, weights)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want)
    torch._dynamo.reset()
