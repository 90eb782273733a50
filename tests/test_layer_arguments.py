"""Each constructor argument of SN and SSN reaches every path (the layer
operators, the functional core over each backend, the composite path):
a layer built with values that all differ from the defaults (eps,
momentum, affine, using_bn, moving_average, unbiased) against the float64
equations (tests/sn_reference.py) with those values, for the output, every
gradient and the running statistics over two steps."""
import math
import warnings

import pytest
import torch

from mmsn import (SparseSwitchableNorm2d, SwitchableNorm1d, SwitchableNorm2d,
                  SwitchableNorm3d)
from mmsn.ops import backends
from mmsn.ops.sparsestmax import sparsestmax
from _layers import randomize_
from sn_paths import PATHS
from sn_reference import batch_stats, reference_sn

C = 4
SHAPES = {SwitchableNorm1d: (5, C, 3), SwitchableNorm2d: (3, C, 2, 3),
          SwitchableNorm3d: (2, C, 2, 1, 3),
          SparseSwitchableNorm2d: (3, C, 3, 2)}
# (id, constructor arguments): none at its default
OPTIONS = [
    ('eps-momentum', dict(eps=0.3, momentum=0.3)),
    ('cumulative-biased', dict(eps=0.2, momentum=None, unbiased=False)),
    ('batch-average', dict(eps=0.4, momentum=0.3, moving_average=False)),
    ('no-affine', dict(eps=0.25, momentum=0.05, affine=False)),
    ('no-bn', dict(eps=0.3, using_bn=False, unbiased=False)),
]


def _layer(cls, kwargs):
    layer = randomize_(cls(C, **kwargs).double(), batches_tracked=2)
    with torch.no_grad():
        if hasattr(layer, 'radius'):
            layer.radius.fill_(0.2)
    return layer


def _input(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    # variances near eps, so that eps shows
    return torch.randn(shape, generator=g, dtype=torch.float64) * .6 + 1


def _reference(layer, x, dy, training):
    params = {}
    for name in ('weight', 'bias', 'mean_weight', 'var_weight'):
        p = getattr(layer, name)
        params[name] = None if p is None else \
            p.detach().clone().requires_grad_()
    gamma = params['weight'] if layer.affine else torch.ones(
        C, dtype=torch.float64)
    beta = params['bias'] if layer.affine else torch.zeros(
        C, dtype=torch.float64)
    mean_logits, var_logits = params['mean_weight'], params['var_weight']
    if hasattr(layer, 'radius'):  # SSN: log-shares as logits
        mean_logits = sparsestmax(mean_logits, float(layer.radius)).log()
        var_logits = sparsestmax(var_logits, float(layer.radius)).log()
    running = (layer.running_mean.clone(), layer.running_var.clone()) \
        if layer.using_bn else None
    xr = x.clone().requires_grad_()
    y, _ = reference_sn(xr, gamma, beta, mean_logits, var_logits, running,
                        training=training, unbiased=layer.unbiased,
                        eps=layer.eps)
    y.backward(dy)
    return y.detach(), xr.grad, {n: p.grad for n, p in params.items()
                                 if p is not None}


def _expected_running(layer, batches):
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    tracked = int(layer.num_batches_tracked)
    for x in batches:
        mean_bn, var_bn = batch_stats(x, layer.unbiased)
        tracked += 1
        m = layer.momentum
        f = m if layer.moving_average and m is not None else 1 / tracked
        new_mean = (1 - f) * mean + f * mean_bn
        if layer.moving_average:
            var = (1 - f) * var + f * var_bn
        else:
            var = (1 - f) * (var + mean**2) + f * (var_bn + mean_bn**2) \
                - new_mean**2
        mean = new_mean
    return mean, var, tracked


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('cls', list(SHAPES), ids=lambda c: c.__name__)
@pytest.mark.parametrize('option', [o[1] for o in OPTIONS],
                         ids=[o[0] for o in OPTIONS])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_arguments_reach_every_path(path, cls, option, training):
    with backends.forced(path):
        _check_arguments(path, cls, option, training)


def _check_arguments(path, cls, option, training):
    layer = _layer(cls, option).train(training)
    shape = SHAPES[cls]
    batches = [_input(shape, seed) for seed in (1, 2)]
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(7),
                     dtype=torch.float64)
    want_running = _expected_running(layer, batches) \
        if training and layer.using_bn else None
    for x in batches:
        want_y, want_dx, want_grads = _reference(layer, x, dy, training)
        for p in layer.parameters():
            p.grad = None
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        close = dict(rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(y, want_y, **close)
        torch.testing.assert_close(xi.grad, want_dx, **close)
        for name, want in want_grads.items():
            torch.testing.assert_close(getattr(layer, name).grad, want,
                                       **close, msg=lambda m: f'{name} {m}')
    if not layer.using_bn:
        assert layer.running_mean is None
        return
    if want_running is None:  # eval reads the running statistics only
        assert int(layer.num_batches_tracked) == 2
        return
    mean, var, tracked = want_running
    torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(layer.running_var, var, rtol=1e-12,
                               atol=1e-12)
    assert int(layer.num_batches_tracked) == tracked
    assert layer.nonfinite.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize('path', PATHS)
def test_eps_is_the_layer_s_on_a_constant_input(path):
    """A constant sample: every variance is 0, so y = beta exactly and
    dy/dx = gamma / sqrt(eps) * (dy - its means): eps itself, no
    default."""
    eps = 0.04
    layer = SwitchableNorm2d(C, eps=eps, using_bn=False).double()
    with torch.no_grad():
        layer.weight.fill_(2.0)
        layer.bias.fill_(-1.0)
        layer.mean_weight.copy_(torch.tensor([-math.inf, 0.]))  # LN only
        layer.var_weight.copy_(torch.tensor([-math.inf, 0.]))
    x = torch.full((2, C, 2, 2), 3.0, dtype=torch.float64,
                   requires_grad=True)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2),
                     dtype=torch.float64)
    with backends.forced(path):
        y = layer(x)
    torch.testing.assert_close(y, torch.full_like(y, -1.0))
    y.backward(dy)
    # LN over (C, H, W) with variance 0: dx = gamma / sqrt(eps) * (dy -
    # mean over the sample of dy)
    want = 2.0 / math.sqrt(eps) * (dy - dy.mean((1, 2, 3), keepdim=True))
    torch.testing.assert_close(x.grad, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('cls', [SwitchableNorm2d, SparseSwitchableNorm2d],
                         ids=lambda c: c.__name__)
def test_a_bad_value_leaves_the_other_outputs_exact(path, bad, training,
                                                    cls):
    """A NaN or Inf at (sample 1, channel 2) reaches that sample's LN and
    that channel's BN statistics: every output the equations leave finite
    is still exact (rows next to a bad one are computed apart, with the
    layer's own eps)."""
    layer = _layer(cls, dict(eps=0.3, momentum=0.3)).train(training)
    x = _input((3, C, 2, 3))
    x[1, 2, 0, 1] = bad
    want, _, _ = _reference(layer, x, torch.ones_like(x), training)
    with backends.forced(path), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tests/test_nonfinite_report.py
        y = layer(x).detach()
    finite = torch.isfinite(want)
    # all but sample 1 (and channel 2 of the others in training)
    assert int(finite.sum()) == (36 if training else 48)
    torch.testing.assert_close(y[finite], want[finite], rtol=1e-9,
                               atol=1e-9)
    assert not torch.isfinite(y[~finite]).any()


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_ssn_freezes_in_training_only_on_every_path(path, training):
    """Shares that come out one-hot are stored and flagged by a training
    forward; an eval forward leaves the parameters and flags alone."""
    layer = _layer(SparseSwitchableNorm2d, {}).train(training)
    logits = torch.tensor([0.1, 3.0, -2.0], dtype=torch.float64)
    with torch.no_grad():
        layer.radius.fill_(0.3)
        layer.mean_weight.copy_(logits)  # one-hot already by sparsemax
        layer.var_weight.copy_(torch.tensor([.5, .25, .375]))  # mixed
    with backends.forced(path):
        layer(_input((3, C, 2, 2))).sum().backward()
    if training:
        assert layer.mean_fixed.tolist() == [1]
        assert layer.mean_weight.tolist() == [0., 1., 0.]
        assert layer.mean_weight.grad.tolist() == [0., 0., 0.]
    else:
        assert layer.mean_fixed.tolist() == [0]
        assert layer.mean_weight.tolist() == logits.tolist()
    assert layer.var_fixed.tolist() == [0]
    assert layer.var_weight.tolist() == [.5, .25, .375]
