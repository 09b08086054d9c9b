"""Oracle tests for the baselines' losses (refilled.losses): each loss against a brute-force Python-loop version."""

from __future__ import annotations

import math

import pytest
import torch

from refilled.losses import (
    at_loss,
    fitnet_loss,
    kd_loss,
    label_smoothing_ce,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    sp_loss,
)

DTYPES = [torch.float32, torch.float64]
BATCHES = [2, 3, 5]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype))


def _huber(x: float, y: float) -> float:
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


# ------------------------------------------------------------------------------ oracles


def kd_oracle(s, t, T):
    total = 0.0
    for i in range(s.shape[0]):
        zs = [math.exp(v / T) for v in s[i].tolist()]
        zt = [math.exp(v / T) for v in t[i].tolist()]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return T * T * total / s.shape[0]


def rkd_distance_oracle(s, t):
    def norm_dists(e):
        b = e.shape[0]
        d = [[float(torch.linalg.vector_norm(e[i].double() - e[j].double())) for j in range(b)] for i in range(b)]
        pos = [d[i][j] for i in range(b) for j in range(b) if i != j and d[i][j] > 0]
        mu = sum(pos) / len(pos) if pos else 1.0
        return [[v / mu for v in row] for row in d]

    ds, dt = norm_dists(s), norm_dists(t)
    b = s.shape[0]
    return sum(_huber(ds[i][j], dt[i][j]) for i in range(b) for j in range(b)) / b**2


def rkd_angle_oracle(s, t):
    def cos(e, i, j, k):
        u, v = e[i].double() - e[j].double(), e[k].double() - e[j].double()
        nu, nv = float(u.norm()), float(v.norm())
        if nu == 0 or nv == 0:
            return 0.0
        return float(u @ v) / (nu * nv)

    b = s.shape[0]
    total = sum(
        _huber(cos(s, i, j, k), cos(t, i, j, k)) for i in range(b) for j in range(b) for k in range(b)
    )
    return total / b**3


def at_oracle(fs_list, ft_list, p):
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        b, _, h, w = fs.shape
        for n in range(b):
            maps = []
            for f in (fs, ft):
                a = [sum(abs(float(f[n, c, y, x])) ** p for c in range(f.shape[1])) / f.shape[1]
                     for y in range(h) for x in range(w)]
                nrm = math.sqrt(sum(v * v for v in a))
                maps.append([v / nrm for v in a])
            total += sum((x - y) ** 2 for x, y in zip(*maps)) / (b * h * w)
    return total


def sp_oracle(fs, ft):
    b = fs.shape[0]

    def gram(f):
        f = f.reshape(b, -1).double()
        g = [[float(f[i] @ f[j]) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in g]

    gs, gt = gram(fs), gram(ft)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def pkt_oracle(s, t, eps):
    b = s.shape[0]

    def cond(e):
        e = e.reshape(b, -1).double()
        k = [[(float(e[i] @ e[j]) / float(e[i].norm() * e[j].norm()) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = cond(s), cond(t)
    return sum(
        pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)
    ) / b


# ------------------------------------------------------------------------- oracle tests


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", BATCHES)
def test_kd_oracle(dtype, b):
    s, t = _randn(b, 7, dtype=dtype, seed=1) * 3, _randn(b, 7, dtype=dtype, seed=2) * 3
    for T in (1.0, 4.0):
        _close(kd_loss(s, t, temperature=T), kd_oracle(s, t, T))
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(s / 4, 1), torch.softmax(t / 4, 1), reduction="batchmean"
    ) * 16
    torch.testing.assert_close(kd_loss(s, t), ref)


def test_kd_zero_when_equal():
    s = _randn(4, 10, dtype=torch.float64, seed=3)
    torch.testing.assert_close(kd_loss(s, s.clone()), torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", BATCHES)
def test_rkd_oracle(dtype, b):
    s, t = _randn(b, 6, dtype=dtype, seed=4), _randn(b, 9, dtype=dtype, seed=5)
    dist, ang = rkd_distance_oracle(s, t), rkd_angle_oracle(s, t)
    _close(rkd_distance_loss(s, t), dist)
    _close(rkd_angle_loss(s, t), ang)
    _close(rkd_loss(s, t), 25 * dist + 50 * ang)
    _close(rkd_loss(s, t, distance_weight=1.0, angle_weight=2.0), dist + 2 * ang)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", BATCHES)
def test_fitnet_oracle(dtype, b):
    s, t = _randn(b, 3, 4, 4, dtype=dtype, seed=6), _randn(b, 3, 4, 4, dtype=dtype, seed=7)
    per_sample = [float(((s[i] - t[i]) ** 2).sum()) for i in range(b)]
    _close(fitnet_loss(s, t), sum(per_sample) / s.numel())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("p", [1, 2])
def test_at_oracle(dtype, b, p):
    fs = [_randn(b, 3, 4, 4, dtype=dtype, seed=8), _randn(b, 5, 2, 3, dtype=dtype, seed=9)]
    ft = [_randn(b, 6, 4, 4, dtype=dtype, seed=10), _randn(b, 2, 2, 3, dtype=dtype, seed=11)]
    _close(at_loss(fs, ft, p=p), at_oracle(fs, ft, p))
    _close(at_loss(fs[0], ft[0], p=p), at_oracle(fs[:1], ft[:1], p))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", BATCHES)
def test_sp_oracle(dtype, b):
    fs, ft = _randn(b, 3, 4, 4, dtype=dtype, seed=12), _randn(b, 8, 2, 2, dtype=dtype, seed=13)
    _close(sp_loss(fs, ft), sp_oracle(fs, ft))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", BATCHES)
def test_pkt_oracle(dtype, b):
    s, t = _randn(b, 5, dtype=dtype, seed=14), _randn(b, 11, dtype=dtype, seed=15)
    _close(pkt_loss(s, t), pkt_oracle(s, t, 1e-7))
    _close(pkt_loss(s, t, eps=1e-3), pkt_oracle(s, t, 1e-3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_label_smoothing_oracle(dtype):
    logits, labels = _randn(5, 4, dtype=dtype, seed=16), torch.tensor([0, 3, 1, 1, 2])
    eps, total = 0.1, 0.0
    for i in range(5):
        logp = torch.log_softmax(logits[i].double(), 0)
        total += (1 - eps) * -float(logp[labels[i]]) + eps * -float(logp.mean())
    _close(label_smoothing_ce(logits, labels), total / 5)
    _close(label_smoothing_ce(logits, labels, smoothing=0.0), torch.nn.functional.cross_entropy(logits, labels))


# -------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", DTYPES)
def test_rkd_duplicates_finite(dtype):
    s = _randn(4, 6, dtype=dtype, seed=17)
    s[2] = s[0]
    t = _randn(4, 6, dtype=dtype, seed=18)
    t[3] = t[1]
    s.requires_grad_(True)
    loss = rkd_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    _close(rkd_distance_loss(s, t), rkd_distance_oracle(s.detach(), t))
    _close(rkd_angle_loss(s, t), rkd_angle_oracle(s.detach(), t))


@pytest.mark.parametrize("b", [1, 2])
def test_rkd_tiny_batches_finite(b):
    s = _randn(b, 4, dtype=torch.float32, seed=19).requires_grad_(True)
    t = _randn(b, 4, dtype=torch.float32, seed=20)
    loss = rkd_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # all-identical embeddings: every distance is zero
    z = torch.zeros(3, 4, requires_grad=True)
    loss = rkd_loss(z, torch.ones(3, 4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_rkd_teacher_detached():
    s = _randn(4, 3, dtype=torch.float64, seed=21).requires_grad_(True)
    t = _randn(4, 3, dtype=torch.float64, seed=22).requires_grad_(True)
    rkd_loss(s, t).backward()
    assert t.grad is None and s.grad is not None


# -------------------------------------------------------------------------- invariances


def test_rkd_distance_scale_invariant():
    s, t = _randn(5, 6, dtype=torch.float64, seed=23), _randn(5, 3, dtype=torch.float64, seed=24)
    base = rkd_distance_loss(s, t)
    torch.testing.assert_close(rkd_distance_loss(7.5 * s, t), base)
    torch.testing.assert_close(rkd_distance_loss(s, 0.2 * t), base)
    torch.testing.assert_close(rkd_angle_loss(3.0 * s, t), rkd_angle_loss(s, t))


def test_at_positive_scale_invariant():
    fs, ft = _randn(3, 4, 5, 5, dtype=torch.float64, seed=25), _randn(3, 2, 5, 5, dtype=torch.float64, seed=26)
    base = at_loss([fs], [ft])
    torch.testing.assert_close(at_loss([4.0 * fs], [ft]), base)
    torch.testing.assert_close(at_loss([fs], [0.3 * ft]), base)


def test_sp_scale_invariant():
    fs, ft = _randn(4, 3, 3, 3, dtype=torch.float64, seed=27), _randn(4, 10, dtype=torch.float64, seed=28)
    base = sp_loss(fs, ft)
    torch.testing.assert_close(sp_loss(5.0 * fs, ft), base)
    torch.testing.assert_close(sp_loss(fs, 0.1 * ft), base)


def test_zero_when_identical():
    x = _randn(4, 3, 2, 2, dtype=torch.float64, seed=29)
    zero = torch.zeros((), dtype=torch.float64)
    for loss in (rkd_loss, fitnet_loss, sp_loss, pkt_loss):
        torch.testing.assert_close(loss(x, x.clone()), zero)
    torch.testing.assert_close(at_loss([x], [x.clone()]), zero)


# ----------------------------------------------------------------------------- gradcheck


def test_gradcheck():
    g = _gen(30)
    s = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: rkd_loss(a, t), (s,))
    assert torch.autograd.gradcheck(sp_loss, (s, t))
    assert torch.autograd.gradcheck(pkt_loss, (s, t))
    t5 = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(kd_loss, (s, t5))
    fs = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    ft = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(at_loss, (fs, ft))


# ---------------------------------------------------------------------- dtype / device


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_dtype_device(dtype):
    x, y = _randn(3, 4, dtype=dtype, seed=31), _randn(3, 4, dtype=dtype, seed=32)
    m, n = _randn(3, 2, 4, 4, dtype=dtype, seed=33), _randn(3, 5, 4, 4, dtype=dtype, seed=34)
    outs = [
        kd_loss(x, y), rkd_loss(x, y), rkd_distance_loss(x, y), rkd_angle_loss(x, y),
        fitnet_loss(x, y), at_loss([m], [n]), sp_loss(m, n), pkt_loss(x, y),
        label_smoothing_ce(x, torch.tensor([0, 1, 3])),
    ]
    for out in outs:
        assert out.dtype == dtype and out.device == x.device and out.shape == ()


# ---------------------------------------------------------------------------- bad shapes


def test_bad_shapes_raise():
    a, b = torch.randn(3, 4), torch.randn(3, 5)
    with pytest.raises(ValueError, match="shapes must match"):
        kd_loss(a, b)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        kd_loss(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="shapes must match"):
        fitnet_loss(a, b)
    for loss in (rkd_loss, rkd_distance_loss, rkd_angle_loss, sp_loss, pkt_loss):
        with pytest.raises(ValueError, match="batch size"):
            loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="spatial"):
        at_loss([torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 2, 2)])
    with pytest.raises(ValueError, match="batch"):
        at_loss([torch.randn(2, 3, 4, 4)], [torch.randn(3, 3, 4, 4)])
    with pytest.raises(ValueError, match="number"):
        at_loss([torch.randn(2, 3, 4, 4)], [])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        at_loss([torch.randn(2, 16)], [torch.randn(2, 16)])
