"""SparsestMax against independent computations.

* sparsemax against the threshold found by bisection (sum(max(v - tau, 0))
  = 1 is monotone in tau), a different algorithm from the sort-based one;
* sparsestmax against the circle-constrained problem it solves on the face
  of the sparsemax support S, ``argmin |p - v|`` over ``p`` in that face with
  ``|p - u_S| >= r``, found by dense sampling of the face, its edges and the
  circle; and, past the face's circumradius, a vertex of the face;
* gradients by finite differences (float64 gradcheck) away from kinks.
"""
import math

import pytest
import torch

from mmsn.ops.sparsestmax import is_one_hot, sparsemax, sparsestmax


def bisection_sparsemax(v, iters=200):
    lo, hi = v.min().item() - 1, v.max().item()
    for _ in range(iters):
        tau = (lo + hi) / 2
        if (v - tau).clamp_min(0).sum() > 1:
            lo = tau
        else:
            hi = tau
    return (v - (lo + hi) / 2).clamp_min(0)


@pytest.mark.parametrize('k', [2, 3, 5])
def test_sparsemax_matches_bisection(k):
    gen = torch.Generator().manual_seed(k)
    for scale in (0.1, 1.0, 5.0):
        v = torch.randn(50, k, generator=gen, dtype=torch.float64) * scale
        got = sparsemax(v)
        for row, out in zip(v, got):
            torch.testing.assert_close(out, bisection_sparsemax(row),
                                       atol=1e-12, rtol=0)
        torch.testing.assert_close(got.sum(-1), torch.ones(50,
                                                           dtype=v.dtype))


def _face_samples(support, k, centre, radius, n=400):
    """Points of the face spanned by ``support`` (vertices e_i, i in S):
    a barycentric grid, dense points on its edges and on the circle of
    ``radius`` around ``centre`` that lie in the face."""
    idx = [i for i in range(k) if support[i]]
    vertices = torch.eye(k, dtype=torch.float64)[idx]
    samples = []
    if len(idx) == 2:
        t = torch.linspace(0, 1, 200001, dtype=torch.float64)[:, None]
        samples.append(t * vertices[0] + (1 - t) * vertices[1])
    else:
        a, b = torch.meshgrid(
            torch.linspace(0, 1, n + 1, dtype=torch.float64),
            torch.linspace(0, 1, n + 1, dtype=torch.float64),
            indexing='ij')
        keep = a + b <= 1
        a, b = a[keep][:, None], b[keep][:, None]
        samples.append(a * vertices[0] + b * vertices[1] +
                       (1 - a - b) * vertices[2])
        t = torch.linspace(0, 1, 100001, dtype=torch.float64)[:, None]
        for i, j in ((0, 1), (1, 2), (0, 2)):
            samples.append(t * vertices[i] + (1 - t) * vertices[j])
        # the circle in the face's plane: an orthonormal basis of the plane
        d1 = (vertices[0] - vertices[1]) / math.sqrt(2)
        d2 = vertices[0] + vertices[1] - 2 * vertices[2]
        d2 = d2 / d2.norm()
        angle = torch.linspace(0, 2 * math.pi, 200001,
                               dtype=torch.float64)[:, None]
        circle = centre + radius * (angle.cos() * d1 + angle.sin() * d2)
        samples.append(circle[(circle >= 0).all(-1)])
    return torch.cat(samples)


def _cases(k, count, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        v = torch.randn(k, generator=gen, dtype=torch.float64) * \
            torch.empty(1, dtype=torch.float64).uniform_(0.05, 1.0,
                                                         generator=gen)
        radius = torch.empty(1, dtype=torch.float64).uniform_(
            0, 1, generator=gen).item()
        yield v, radius


@pytest.mark.parametrize('k', [2, 3])
def test_sparsestmax_solves_the_circle_constrained_problem(k):
    checked_push = checked_vertex = 0
    for v, radius in _cases(k, 60, seed=10 + k):
        got = sparsestmax(v, radius)
        w = sparsemax(v)
        support = w > 0
        size = int(support.sum())
        assert got.sum().item() == pytest.approx(1, abs=1e-9)
        assert (got >= 0).all()
        if size == 1:
            torch.testing.assert_close(got, w)
            continue
        centre = support.double() / size
        circumradius = math.sqrt(1 - 1 / size)
        if radius >= circumradius + 1e-6:
            # no point of the face is that far from its centre: a vertex of
            # the face, the one towards which w was pushed
            assert is_one_hot(got).item() and support[got.argmax()]
            direction = (w - centre) / (w - centre).norm()
            pushed = centre + radius * direction
            nearest = torch.eye(k, dtype=torch.float64)[support]
            nearest = nearest[(nearest - pushed).norm(dim=-1).argmin()]
            torch.testing.assert_close(got, nearest)
            checked_vertex += 1
            continue
        if radius > circumradius - 1e-3:
            continue  # within sampling resolution of the vertices
        samples = _face_samples(support, k, centre, radius)
        feasible = samples[(samples - centre).norm(dim=-1) >= radius - 1e-12]
        best = feasible[(feasible - v).norm(dim=-1).argmin()]
        # feasible: in the face and outside the circle
        assert ((got > 0) <= support).all()
        assert (got - centre).norm() >= radius - 1e-9
        # optimal: no sampled feasible point is closer to v
        assert (got - v).norm() <= (best - v).norm() + 1e-9
        assert (got - best).norm() < 2e-3
        checked_push += (w - centre).norm() < radius
    # the cases exercised the push, not only the plain projection
    assert checked_push >= 10 and checked_vertex >= 5


def test_hand_computed_cases():
    # K=2: (0.6, 0.4) is 0.1*sqrt(2) from the centre; r=0.3 pushes it
    # along (1, -1) to 0.3 from (0.5, 0.5).
    got = sparsestmax(torch.tensor([0.6, 0.4], dtype=torch.float64), 0.3)
    off = 0.3 / math.sqrt(2)
    torch.testing.assert_close(
        got, torch.tensor([0.5 + off, 0.5 - off], dtype=torch.float64))
    # K=3: the push leaves the triangle through the edge {0, 1}, where the
    # circle of radius r around (1/3, 1/3, 1/3) crosses it at
    # 1/2 +- sqrt(r^2 - 1/6) / sqrt(2) (the recursion's reduced radius).
    v = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    r = 0.6
    half = math.sqrt(r * r - 1 / 6) / math.sqrt(2)
    torch.testing.assert_close(
        sparsestmax(v, r),
        torch.tensor([0.5 + half, 0.5 - half, 0], dtype=torch.float64))
    # r = 0 is sparsemax; a one-hot sparsemax stays
    v = torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64)
    torch.testing.assert_close(sparsestmax(v, 0.0), sparsemax(v))
    torch.testing.assert_close(
        sparsestmax(torch.tensor([2.0, 0.1, -1.0]), 0.2),
        torch.tensor([1.0, 0.0, 0.0]))
    # the exact centre has no direction: returned as is, no NaN
    centre = sparsestmax(torch.ones(3), 0.5)
    torch.testing.assert_close(centre, torch.full((3, ), 1 / 3))


@pytest.mark.parametrize('k,threshold', [(2, math.sqrt(1 / 2)),
                                         (3, math.sqrt(2 / 3))])
def test_one_hot_past_the_circumradius(k, threshold):
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(500, k, generator=gen) * 0.3
    for r in (threshold + 1e-3, 0.9, 1.0):
        assert is_one_hot(sparsestmax(v, r)).all()
    # just below it, most rows are not yet one-hot
    assert not is_one_hot(sparsestmax(v, threshold - 0.05)).all()


def test_batched_rows_and_radius_shapes():
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(4, 2, 3, generator=gen)
    radius = torch.tensor([0.4])
    batched = sparsestmax(v, radius)
    for i in range(4):
        for j in range(2):
            torch.testing.assert_close(batched[i, j],
                                       sparsestmax(v[i, j], 0.4))
    per_row = torch.tensor([0.0, 0.5, 0.7, 0.9])
    got = sparsestmax(v[:, 0], per_row)
    for i in range(4):
        torch.testing.assert_close(got[i], sparsestmax(v[i, 0],
                                                       per_row[i]))
    with pytest.raises(ValueError, match='at least 2 entries'):
        sparsestmax(torch.ones(3, 1), 0.1)


@pytest.mark.parametrize('k', [2, 3])
def test_gradients_by_finite_differences(k):
    gen = torch.Generator().manual_seed(3 + k)
    checked = 0
    for _ in range(40):
        v = (torch.randn(k, generator=gen, dtype=torch.float64) *
             0.4).requires_grad_()
        r = torch.empty(1).uniform_(0, 0.8, generator=gen).item()
        out = sparsestmax(v, r)
        if is_one_hot(out).item():
            continue
        # away from kinks: the same branch within +-1e-4 of v
        pattern = [(sparsestmax(v.detach() + d, r) > 0).tolist()
                   for d in (1e-4, -1e-4)]
        if any(p != (out > 0).tolist() for p in pattern):
            continue
        assert torch.autograd.gradcheck(
            lambda t: sparsestmax(t, r), (v, ), eps=1e-6, atol=1e-6)
        checked += 1
    assert checked >= 15


def test_gradient_is_zero_when_one_hot_and_finite_at_the_centre():
    v = torch.tensor([3.0, 0.0, -1.0], requires_grad=True)
    sparsestmax(v, 0.3).mul(torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert (v.grad == 0).all()
    v = torch.ones(3, requires_grad=True)
    sparsestmax(v, 0.5).mul(torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.isfinite(v.grad).all()
