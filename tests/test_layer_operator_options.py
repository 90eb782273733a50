"""The layer operators (``torch.ops.mmsn.switchable_norm_*``), option by
option, against SN's equations written out here with the shares taken as
given (so that the operator's own softmax, or its absence, is tested too):
the compiled CPU kernels through their C++ autograd, and the Python
kernels that CUDA and other devices run (mmsn/ops/layer_kernels.py) on CPU
tensors. Every option takes a value that differs from its default (eps,
affine, using_bn, unbiased, shares instead of logits), and gradients are
asked of every subset of the inputs, so that a dropped argument, a branch
that skips an option or a gradient returned for the wrong input shows."""
import itertools

import pytest
import torch

from mmsn.ops import layer_kernels, library
from mmsn.ops.backends import GenericBackend, NativeBackend
from sn_reference import instance_stats

OPS = library.layer_ops()
if OPS is None:
    pytest.skip('mmsn._C is not available', allow_module_level=True)

C = 4
SHAPE = (3, C, 2, 3)
EPS = 0.3  # large: the inputs' variances are about 1
TOL = dict(rtol=1e-9, atol=1e-9)


def reference(x, weight, bias, w, u, running, training, unbiased, eps):
    """SN with the shares ``w``, ``u`` as given ([IN, LN(, BN)]), in the
    authors' formulation (LN and BN statistics from the IN ones)."""
    n, c = x.shape[:2]
    mean_in, var_in = instance_stats(x, unbiased)
    second = var_in + mean_in**2
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = second.mean(1, keepdim=True) - mean_ln**2
    means, variances = [mean_in, mean_ln], [var_in, var_ln]
    if len(w) == 3:
        if training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = second.mean(0, keepdim=True) - mean_bn**2
        else:
            mean_bn, var_bn = (t.view(1, c) for t in running)
        means.append(mean_bn)
        variances.append(var_bn)
    mean = sum(s * m for s, m in zip(w, means))
    var = sum(s * v for s, v in zip(u, variances))
    shape = (n, c) + (1, ) * (x.dim() - 2)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        affine = (1, c) + (1, ) * (x.dim() - 2)
        y = y * weight.view(affine) + bias.view(affine)
    return y


def _case(using_bn, affine, softmax, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = 3 if using_bn else 2
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(SHAPE, **f64) * (torch.rand(1, C, 1, 1, **f64) + .5) + 1
    weight = bias = None
    if affine:
        weight = torch.rand(C, **f64) + .5
        bias = torch.randn(C, **f64)
    logits = (torch.randn(k, **f64), torch.randn(k, **f64))
    # shares given as such: a point of the simplex, not a softmax of them
    given = tuple(torch.rand(k, **f64) + .1 for _ in range(2))
    given = tuple(s / s.sum() for s in given)
    mean_weight, var_weight = logits if softmax else given
    running = None
    if using_bn:
        running = (torch.randn(C, **f64), torch.rand(C, **f64) + .5)
    dy = torch.randn(SHAPE, **f64)
    return x, weight, bias, mean_weight, var_weight, running, dy


def _reference_grads(x, weight, bias, mean_weight, var_weight, running, dy,
                     training, unbiased, softmax):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (x, weight, bias, mean_weight, var_weight)]
    xr, wr, br, mwr, vwr = leaves
    w, u = (torch.softmax(mwr, 0), torch.softmax(vwr, 0)) if softmax \
        else (mwr, vwr)
    y = reference(xr, wr, br, w, u, running, training, unbiased, EPS)
    y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _cpu_op(x, weight, bias, mean_weight, var_weight, running, dy, training,
            unbiased, softmax, requires):
    """Through the C++ autograd: the gradients of the inputs in
    ``requires`` (None for the others, which must get none)."""
    leaves = [t.detach().clone().requires_grad_(i in requires)
              if t is not None else None
              for i, t in enumerate((x, weight, bias, mean_weight,
                                     var_weight))]
    xl, wl, bl, mwl, vwl = leaves
    if training:
        tracked = torch.zeros((), dtype=torch.long)
        mean, var = (None, None) if running is None else \
            (running[0].clone(), running[1].clone())
        y = OPS.switchable_norm_train(
            xl, wl, bl, mwl, vwl, mean, var,
            None if running is None else tracked, None, softmax, 0.2, True,
            EPS, unbiased, True)[0]
    else:
        mean, var = (None, None) if running is None else running
        y = OPS.switchable_norm_eval(xl, wl, bl, mwl, vwl, mean, var, None,
                                     softmax, EPS, unbiased)[0]
    if requires:
        y.backward(dy)
    else:
        assert y.grad_fn is None
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _python_kernel(backend):
    def run(x, weight, bias, mean_weight, var_weight, running, dy, training,
            unbiased, softmax, requires):
        mean, var = (None, None) if running is None else \
            (running[0].clone(), running[1].clone())
        tracked = torch.zeros((), dtype=torch.long)
        if training:
            y, mean_in, var_in = layer_kernels.train(
                backend, x, weight, bias, mean_weight, var_weight, mean, var,
                None if running is None else tracked, None, softmax, 0.2,
                True, EPS, unbiased, True)
        else:
            y, mean_in, var_in = layer_kernels.evaluate(
                backend, x, weight, bias, mean_weight, var_weight, mean, var,
                None, softmax, EPS, unbiased)
        need_dx = 0 in requires
        grads = list(layer_kernels.backward(
            backend, dy, x, mean_in, var_in, weight, mean_weight,
            var_weight, None if training else mean,
            None if training else var, softmax, training, EPS, unbiased,
            need_dx))
        if not need_dx:
            assert grads[0].numel() == 0
        return y, [g if i in requires else None for i, g in enumerate(grads)]
    return run


IMPLS = {'cpu-op': _cpu_op, 'python-generic': _python_kernel(
    GenericBackend()), 'python-native': _python_kernel(NativeBackend())}
NAMES = ('x', 'weight', 'bias', 'mean_weight', 'var_weight')


@pytest.mark.parametrize('impl', list(IMPLS))
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('using_bn', [True, False], ids=['bn', 'no-bn'])
@pytest.mark.parametrize('affine', [True, False], ids=['affine', 'plain'])
@pytest.mark.parametrize('softmax', [True, False],
                         ids=['logits', 'shares'])
@pytest.mark.parametrize('unbiased', [True, False],
                         ids=['unbiased', 'biased'])
def test_operator_options_match_the_equations(impl, training, using_bn,
                                              affine, softmax, unbiased):
    case = _case(using_bn, affine, softmax)
    x, weight, bias, mean_weight, var_weight, running, dy = case
    y_ref, grads_ref = _reference_grads(*case, training, unbiased, softmax)
    requires = {i for i, t in enumerate((x, weight, bias)) if t is not None}
    requires |= {3, 4}
    y, grads = IMPLS[impl](*case, training, unbiased, softmax, requires)
    torch.testing.assert_close(y, y_ref, **TOL)
    for name, g, want in zip(NAMES, grads, grads_ref):
        if want is None:
            assert g is None, name
            continue
        torch.testing.assert_close(g, want, **TOL, msg=lambda m: f'{name} {m}')


# every non-empty subset of (x, weight, bias, mean_weight, var_weight)
SUBSETS = [set(s) for r in range(0, 6)
           for s in itertools.combinations(range(5), r)]


@pytest.mark.parametrize('impl', list(IMPLS))
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('requires', SUBSETS,
                         ids=['+'.join(NAMES[i] for i in s) or 'none'
                              for s in SUBSETS])
def test_gradients_of_exactly_the_inputs_that_require_them(impl, training,
                                                           requires):
    case = _case(True, True, True, seed=3)
    y_ref, grads_ref = _reference_grads(*case, training, True, True)
    y, grads = IMPLS[impl](*case, training, True, True, requires)
    torch.testing.assert_close(y, y_ref, **TOL)
    for i, (name, g, want) in enumerate(zip(NAMES, grads, grads_ref)):
        if i not in requires:
            assert g is None, name
            continue
        torch.testing.assert_close(g, want, **TOL, msg=lambda m: f'{name} {m}')


@pytest.mark.parametrize('impl', list(IMPLS))
@pytest.mark.parametrize('positions', [(1, 1), (1, 2)], ids=['1', '2'])
@pytest.mark.parametrize('unbiased', [True, False],
                         ids=['unbiased', 'biased'])
def test_few_positions(impl, positions, unbiased):
    """One position: variance 0 by any definition (no Bessel correction);
    two: the correction applies when unbiased."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn((5, C) + positions, generator=g, dtype=torch.float64)
    case = list(_case(True, True, True))
    case[0] = x
    case[6] = torch.randn(x.shape, generator=g, dtype=torch.float64)
    y_ref, grads_ref = _reference_grads(*case, True, unbiased and
                                        x[0, 0].numel() > 1, True)
    y, grads = IMPLS[impl](*case, True, unbiased, True, set(range(5)))
    torch.testing.assert_close(y, y_ref, **TOL)
    for name, g, want in zip(NAMES, grads, grads_ref):
        torch.testing.assert_close(g, want, **TOL, msg=lambda m: f'{name} {m}')
