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


# -- SSN's training forward in one call -------------------------------------
def _training_state(seed, flags, stale_grads):
    """x, gamma, beta, the logits (the mean vector one-hot at radius 0.2 for
    seed 0), radius, flags, stale gradients and running statistics."""
    g = torch.Generator().manual_seed(seed)
    c = 5

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mean_weight, var_weight = _logits(seed)
    if seed == 0:
        mean_weight = torch.tensor([0.0, 1.5, 0.2], dtype=torch.float64)
    leaves = [randn(4, c, 3, 2) * 2 + 3, 1 + randn(c) * .3, randn(c) * .3,
              mean_weight, var_weight]
    leaves = [t.requires_grad_() for t in leaves]
    if stale_grads:
        leaves[3].grad = torch.ones(3, dtype=torch.float64)
        leaves[4].grad = torch.full((3, ), -2., dtype=torch.float64)
    state = [torch.tensor([0.2], dtype=torch.float64), _flag(flags[0]),
             _flag(flags[1]), randn(c), randn(c).abs() + .5,
             torch.tensor(7), torch.zeros(4, dtype=torch.long)]
    return leaves, state


def _train_in_one_call(leaves, state, momentum, moving_average, update):
    x, weight, bias, mean_weight, var_weight = leaves
    radius, mean_fixed, var_fixed, *running = state
    return OPS.sparse_switchable_norm_train(
        x, weight, bias, mean_weight, var_weight, radius, mean_fixed,
        var_fixed, mean_weight.grad, var_weight.grad, *running, momentum,
        moving_average, 1e-5, True, update)


def _train_in_steps(leaves, state, momentum, moving_average, update):
    """What the layer called before the operator was one: the shares, the
    freeze, SN's training forward with the shares (each tested above and
    in test_layer_operators.py)."""
    x, weight, bias, mean_weight, var_weight = leaves
    radius, mean_fixed, var_fixed, *running = state
    mean_share, var_share, _ = OPS.sparsestmax_shares(
        mean_weight, var_weight, radius, mean_fixed, var_fixed)
    OPS.sparsestmax_freeze_(mean_weight, var_weight, mean_fixed, var_fixed,
                            mean_weight.grad, var_weight.grad, mean_share,
                            var_share)
    return OPS.switchable_norm_train(x, weight, bias, mean_share, var_share,
                                     *running, False, momentum,
                                     moving_average, 1e-5, True, update)


OPTIONS = [(0.1, True, True), (None, True, True), (0.3, False, False)]


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('flags', FLAGS, ids=[f'{a}{b}' for a, b in FLAGS])
@pytest.mark.parametrize('stale_grads', [False, True])
@pytest.mark.parametrize('options', OPTIONS,
                         ids=['momentum', 'cumulative', 'no-update'])
def test_training_forward_in_one_call_equals_its_steps(seed, flags,
                                                       stale_grads, options):
    """The one-call operator against the calls it replaces, bit for bit:
    the output, the IN statistics, every gradient (the logits' through the
    SparsestMax Jacobian), the freeze (seed 0: the mean vector comes out
    one-hot) and the running statistics."""
    runs = []
    for call in (_train_in_one_call, _train_in_steps):
        leaves, state = _training_state(seed, flags, stale_grads)
        y, mean_in, var_in = call(leaves, state, *options)
        coef = torch.linspace(-1, 2, y.numel(), dtype=y.dtype)
        (y * coef.view_as(y)).sum().backward()
        runs.append([y, mean_in, var_in, *leaves, *state] +
                    [t.grad for t in leaves])
    if seed == 0:  # the freeze happened (flags or not)
        assert runs[0][6].tolist() == [0., 1., 0.]
        assert runs[0][9].tolist() == [1]
        assert runs[0][-2].tolist() == [0., 0., 0.]
    for a, b in zip(*runs):
        assert torch.equal(a, b), (a, b)


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('flags', FLAGS, ids=[f'{a}{b}' for a, b in FLAGS])
@pytest.mark.parametrize('using_bn', [True, False])
def test_eval_forward_in_one_call_equals_its_steps(seed, flags, using_bn):
    """The eval operator against the shares and SN's eval operator, bit for
    bit, gradients included; nothing is frozen (seed 0 has a one-hot mean
    vector) and the running statistics are read, not moved."""
    runs = []
    for one_call in (True, False):
        leaves, state = _training_state(seed, flags, False)
        x, weight, bias, mean_weight, var_weight = leaves
        radius, mean_fixed, var_fixed, running_mean, running_var, _, bad = \
            state
        if not using_bn:
            mean_weight, var_weight = (mean_weight[:2].detach().clone()
                                       .requires_grad_(), var_weight[:2]
                                       .detach().clone().requires_grad_())
            leaves[3:] = mean_weight, var_weight
            running_mean = running_var = None
        if one_call:
            out = OPS.sparse_switchable_norm_eval(
                x, weight, bias, mean_weight, var_weight, radius, mean_fixed,
                var_fixed, running_mean, running_var, bad, 1e-5, True)
        else:
            mean_share, var_share, _ = OPS.sparsestmax_shares(
                mean_weight, var_weight, radius, mean_fixed, var_fixed)
            out = OPS.switchable_norm_eval(x, weight, bias, mean_share,
                                           var_share, running_mean,
                                           running_var, bad, False, 1e-5,
                                           True)
        coef = torch.linspace(-1, 2, x.numel(), dtype=x.dtype)
        (out[0] * coef.view_as(x)).sum().backward()
        runs.append([*out, *leaves, *state] + [t.grad for t in leaves])
    assert runs[0][9].tolist() == [flags[0]]  # eval never freezes
    # frozen, or one-hot shares (a zero Jacobian): no gradient. (With two
    # branches SparsestMax is locally constant inside the radius: zero too.)
    for logits, grad, flag in zip(runs[0][6:8], runs[0][-2:], flags):
        one_hot = (sparsestmax(logits.detach(), 0.2) > 0).sum() == 1
        if flag or one_hot:
            assert (grad == 0).all()
        elif using_bn:
            assert grad.abs().sum() > 0
    for a, b in zip(*runs):
        assert torch.equal(a, b), (a, b)


@pytest.mark.parametrize('grad_mode', ['no_grad', 'inference_mode'])
def test_training_forward_in_one_call_without_a_graph(grad_mode):
    """Under no_grad (autograd's kernel without a node) and inference mode
    (below autograd) the same output, freeze and running statistics."""
    runs = []
    for call in (_train_in_one_call, _train_in_steps):
        leaves, state = _training_state(0, (0, 0), True)
        context = torch.no_grad() if grad_mode == 'no_grad' \
            else torch.inference_mode()
        with context:
            out = call(leaves, state, 0.1, True, True)
        assert not out[0].requires_grad
        runs.append([*out, *leaves, *state, leaves[3].grad])
    assert runs[0][-1].tolist() == [0., 0., 0.]  # the freeze cleared it
    for a, b in zip(*runs):
        assert torch.equal(a, b), (a, b)


def test_training_layer_gradients_by_finite_differences():
    """The training forward of the layer (the one-call operator) against
    central differences: x, gamma, beta and both logit vectors, shares
    inside the simplex (no kink within the step)."""
    from torch.func import functional_call

    from mmsn import SparseSwitchableNorm2d
    layer = SparseSwitchableNorm2d(4, momentum=0.2).double().train()
    layer.radius.fill_(0.35)
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64) + 2,
              1 + torch.randn(4, generator=g, dtype=torch.float64) * .2,
              torch.randn(4, generator=g, dtype=torch.float64) * .2,
              torch.tensor([0.1, 0.05, -0.02], dtype=torch.float64),
              torch.tensor([-0.05, 0.08, 0.02], dtype=torch.float64))
    for v in inputs[3:]:
        assert (sparsestmax(v, 0.35) > 1e-3).all()
    names = ('weight', 'bias', 'mean_weight', 'var_weight')

    def out(x, *params):
        return functional_call(layer, dict(zip(names, params)), (x, ))

    inputs = tuple(t.requires_grad_() for t in inputs)
    # one graph node, straight from the logits (not through a shares node)
    edges = [f.name() for f, _ in out(*inputs).grad_fn.next_functions[:5]]
    assert edges == ['torch::autograd::AccumulateGrad'] * 5, edges
    assert torch.autograd.gradcheck(out, inputs, eps=1e-6, atol=1e-6)
