"""SSN's operators (``sparsestmax_shares``, its backward, and
``sparsestmax_freeze_``) on both implementations, the compiled CPU kernels
and the Python kernels CUDA and other devices run (mmsn/ops/library.py),
for every combination of frozen flags: the shares against SparsestMax
(tests/test_sparsestmax.py checks it against the constrained problem), the
Jacobian and gradients against autograd and finite differences, and the
freeze rule case by case (not one-hot: nothing; one-hot: stored and
flagged, its gradient cleared; flagged: rewritten whatever the parameter
became)."""
import pytest
import torch

from mmsn.ops import library
from mmsn.ops.sparsestmax import sparsestmax

OPS = library.layer_ops()
if OPS is None:
    pytest.skip('mmsn._C is not available', allow_module_level=True)

SHARES = {'cpu-op': lambda *a: OPS.sparsestmax_shares(*a),
          'python': library._shares_kernel}
SHARES_BACKWARD = {'cpu-op': lambda *a: OPS.sparsestmax_shares_backward(*a),
                   'python': library._shares_backward_kernel}
FREEZE = {'cpu-op': lambda *a: OPS.sparsestmax_freeze_(*a),
          'python': library._freeze_kernel}
FLAGS = [(0, 0), (1, 0), (0, 1), (1, 1)]


def _flag(v):
    return torch.tensor([v], dtype=torch.long)


def _logits(seed, k=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, generator=g, dtype=torch.float64) * .6,
            torch.randn(k, generator=g, dtype=torch.float64) * .6)


def _jacobian(v, radius):
    return torch.autograd.functional.jacobian(
        lambda row: sparsestmax(row, radius), v)


@pytest.mark.parametrize('impl', list(SHARES))
@pytest.mark.parametrize('flags', FLAGS, ids=[f'{a}{b}' for a, b in FLAGS])
@pytest.mark.parametrize('radius', [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize('k', [2, 3])
@pytest.mark.parametrize('seed', range(3))
def test_shares_and_jacobian_per_vector(impl, flags, radius, k, seed):
    """A frozen vector: the one-hot vector of its parameter's largest
    entry, with a zero Jacobian; the other: SparsestMax at the radius, with
    autograd's Jacobian."""
    logits = _logits(seed, k)
    mean_share, var_share, jacobian = SHARES[impl](
        *logits, torch.tensor([radius], dtype=torch.float64),
        *(_flag(f) for f in flags))
    assert jacobian.shape == (2, k, k)
    for i, (share, v) in enumerate(zip((mean_share, var_share), logits)):
        if flags[i]:
            assert share.tolist() == torch.nn.functional.one_hot(
                v.argmax(), k).double().tolist()
            assert torch.equal(jacobian[i], torch.zeros(k, k,
                                                        dtype=v.dtype))
        else:
            torch.testing.assert_close(share, sparsestmax(v, radius))
            torch.testing.assert_close(jacobian[i], _jacobian(v, radius))


@pytest.mark.parametrize('impl', list(SHARES_BACKWARD))
@pytest.mark.parametrize('seed', range(4))
def test_shares_backward_is_the_transposed_jacobian_product(impl, seed):
    g = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    grads = torch.randn(2, 3, generator=g, dtype=torch.float64)
    out = SHARES_BACKWARD[impl](grads[0], grads[1], jacobian)
    for i in range(2):
        torch.testing.assert_close(out[i], jacobian[i].T @ grads[i])


@pytest.mark.parametrize('flags', FLAGS, ids=[f'{a}{b}' for a, b in FLAGS])
@pytest.mark.parametrize('radius', [0.0, 0.3, 0.6])
@pytest.mark.parametrize('seed', range(3))
def test_gradient_through_the_operator_by_finite_differences(flags, radius,
                                                             seed):
    """The operator under autograd (C++ autograd on the CPU): the
    gradient of a loss of both shares, for each logit vector, by central
    differences of SparsestMax; zero for a frozen vector."""
    logits = [v.clone().requires_grad_() for v in _logits(seed)]
    r = torch.tensor([radius], dtype=torch.float64)
    fixed = [_flag(f) for f in flags]
    coef = torch.tensor([[.3, -1.2, .7], [1.1, .4, -.5]],
                        dtype=torch.float64)
    mean_share, var_share, _ = OPS.sparsestmax_shares(*logits, r, *fixed)
    ((mean_share * coef[0]).sum() + (var_share * coef[1]).sum()).backward()
    h = 1e-6
    for i, v in enumerate(logits):
        if flags[i]:
            assert torch.equal(v.grad, torch.zeros(3, dtype=v.dtype))
            continue
        want = torch.zeros(3, dtype=torch.float64)
        for j in range(3):
            step = torch.zeros(3, dtype=torch.float64)
            step[j] = h
            plus = sparsestmax(v.detach() + step, radius)
            minus = sparsestmax(v.detach() - step, radius)
            want[j] = ((plus - minus) * coef[i]).sum() / (2 * h)
        torch.testing.assert_close(v.grad, want, rtol=1e-5, atol=1e-6)


def _freeze(impl, params, flags, grads, shares):
    state = [p.clone() for p in params] + [_flag(f) for f in flags]
    grads = [None if g is None else g.clone() for g in grads]
    FREEZE[impl](*state, *grads, *shares)
    return state[:2], [int(f) for f in state[2:]], grads


@pytest.mark.parametrize('impl', list(FREEZE))
@pytest.mark.parametrize('with_grads', [True, False])
def test_freeze_rule_case_by_case(impl, with_grads):
    params = (torch.tensor([.2, .5, .3]), torch.tensor([.9, -.4, .1]))
    grads = (torch.tensor([1., 2., 3.]), torch.tensor([-1., .5, 4.]))
    if not with_grads:
        grads = (None, None)
    mixed = torch.tensor([.0, .6, .4])
    one_hot = torch.tensor([.0, .0, 1.])

    # neither one-hot nor flagged: nothing changes
    p, f, g = _freeze(impl, params, (0, 0), grads, (mixed, mixed))
    assert [t.tolist() for t in p] == [t.tolist() for t in params]
    assert f == [0, 0]
    if with_grads:
        assert [t.tolist() for t in g] == [t.tolist() for t in grads]

    # the var shares came out one-hot: stored, flagged, gradient cleared;
    # the mean vector is left alone
    p, f, g = _freeze(impl, params, (0, 0), grads, (mixed, one_hot))
    assert p[0].tolist() == params[0].tolist()
    assert p[1].tolist() == [0., 0., 1.]
    assert f == [0, 1]
    if with_grads:
        assert g[0].tolist() == grads[0].tolist()
        assert g[1].tolist() == [0., 0., 0.]

    # the mean vector is flagged (its shares are its stored one-hot
    # vector) but an optimizer step moved its parameter: rewritten
    p, f, g = _freeze(impl, params, (1, 0), grads,
                      (torch.tensor([0., 1., 0.]), mixed))
    assert p[0].tolist() == [0., 1., 0.]
    assert p[1].tolist() == params[1].tolist()
    assert f == [1, 0]
    if with_grads:
        assert g[0].tolist() == [0., 0., 0.]
        assert g[1].tolist() == grads[1].tolist()

    # flagged, whatever the shares handed in: the one-hot vector of their
    # largest entry (the flag, not the shares, decides)
    p, f, g = _freeze(impl, params, (0, 1), grads, (mixed, mixed))
    assert p[0].tolist() == params[0].tolist()
    assert p[1].tolist() == [0., 1., 0.]
    assert f == [0, 1]
    if with_grads:
        assert g[1].tolist() == [0., 0., 0.]


@pytest.mark.parametrize('impl', list(FREEZE))
def test_freeze_keeps_the_parameter_dtype(impl):
    params = (torch.tensor([.2, .5, .3], dtype=torch.float64),
              torch.tensor([.9, -.4, .1], dtype=torch.float64))
    shares = (torch.tensor([1., 0., 0.]), torch.tensor([0., 1., 0.]))
    p, f, _ = _freeze(impl, params, (0, 0), (None, None), shares)
    assert [t.dtype for t in p] == [torch.float64] * 2
    assert [t.tolist() for t in p] == [[1., 0., 0.], [0., 1., 0.]]
    assert f == [1, 1]
