"""SN layers against the equations (tests/sn_reference.py) and PyTorch's own
BN/IN/GN."""
import math
import re
import warnings

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mmsn import (SparseSwitchableNorm2d, SwitchableNorm1d, SwitchableNorm2d,
                  SwitchableNorm3d, SyncSwitchableNorm)
from mmsn.ops import backends
from _layers import randomize_
from sn_reference import batch_stats, reference_sn

C = 6
# (layer class, input shape)
ARITIES = [
    (SwitchableNorm1d, (5, C)),
    (SwitchableNorm1d, (5, C, 7)),
    (SwitchableNorm2d, (4, C, 5, 3)),
    (SwitchableNorm3d, (3, C, 2, 3, 4)),
]
ARITY_IDS = ['1d-NC', '1d-NCL', '2d', '3d']


def make_layer(cls, using_bn=True, dtype=torch.float64, seed=0, **kwargs):
    """A layer with random (non-default) parameters and running stats."""
    return randomize_(cls(C, using_bn=using_bn, **kwargs).to(dtype), seed)


def make_input(shape, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    # non-zero mean and per-channel scale so every branch differs
    scale = torch.rand((1, shape[1]) + (1, ) * (len(shape) - 2),
                       generator=g) * 3 + 0.2
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale +
            2.0).to(dtype)


def reference_for(layer, x, training):
    running = None
    if layer.using_bn:
        running = (layer.running_mean, layer.running_var)
    return reference_sn(
        x, layer.weight, layer.bias, layer.mean_weight, layer.var_weight,
        running, training=training, unbiased=layer.unbiased, eps=layer.eps)


@pytest.mark.parametrize('cls,shape', ARITIES, ids=ARITY_IDS)
@pytest.mark.parametrize('using_bn', [True, False])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('unbiased', [True, False])
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10),
                                       (torch.float32, 1e-5)])
def test_forward_backward_running_stats_match_equations(
        cls, shape, using_bn, training, unbiased, dtype, tol):
    layer = make_layer(cls, using_bn, dtype, unbiased=unbiased)
    layer.train(training)
    # the reference runs in float64, so float32 results are compared with
    # the exact values
    ref_layer = make_layer(cls, using_bn, torch.float64, unbiased=unbiased)
    running_before = (None if not using_bn else
                      (layer.running_mean.clone(), layer.running_var.clone()))

    x = make_input(shape, dtype).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    # zero-mean upstream gradient: with a large mean, any float32 sum of
    # dy * xhat (BN's too) cancels beyond 1e-5
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(7),
                           dtype=dtype)

    y = layer(x)
    y_ref, batch = reference_for(ref_layer, x_ref, training)
    close = dict(atol=tol, rtol=tol, check_dtype=False)
    torch.testing.assert_close(y, y_ref, **close)

    y.backward(grad_out)
    y_ref.backward(grad_out.double())
    torch.testing.assert_close(x.grad, x_ref.grad, **close)
    for name in ('weight', 'bias', 'mean_weight', 'var_weight'):
        torch.testing.assert_close(
            getattr(layer, name).grad, getattr(ref_layer, name).grad,
            **close, msg=lambda m: f'{name}: {m}')

    if not using_bn:
        assert layer.running_mean is None and layer.running_var is None
        assert layer.mean_weight.shape == (2, )
        return
    assert layer.mean_weight.shape == (3, )
    if training:
        m = layer.momentum
        mean_bn, var_bn = batch
        torch.testing.assert_close(
            layer.running_mean, (1 - m) * running_before[0] + m * mean_bn,
            **close)
        torch.testing.assert_close(
            layer.running_var, (1 - m) * running_before[1] + m * var_bn,
            **close)
        assert int(layer.num_batches_tracked) == 1
    else:
        torch.testing.assert_close(layer.running_mean, running_before[0])
        torch.testing.assert_close(layer.running_var, running_before[1])


def _gradcheck_layer(layer, x):
    names = ['weight', 'bias', 'mean_weight', 'var_weight']
    params = [getattr(layer, n).detach().clone().requires_grad_()
              for n in names]

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x, ))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


# small shapes keep the full Jacobian cheap
GRADCHECK_ARITIES = [
    (SwitchableNorm1d, (3, C)),
    (SwitchableNorm1d, (2, C, 3)),
    (SwitchableNorm2d, (2, C, 2, 2)),
    (SwitchableNorm3d, (2, C, 2, 1, 2)),
]


@pytest.mark.parametrize('cls,shape', GRADCHECK_ARITIES, ids=ARITY_IDS)
# (moving_average only decides how the running statistics are updated, which
# has no gradient: it is tested with the running statistics)
@pytest.mark.parametrize('using_bn', [True, False], ids=['bn', 'no-bn'])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('unbiased', [True, False])
def test_gradcheck_float64(cls, shape, using_bn, training, unbiased):
    layer = make_layer(cls, using_bn, unbiased=unbiased).train(training)
    x = make_input(shape).requires_grad_()
    _gradcheck_layer(layer, x)


def _one_hot(layer, branch):
    with torch.no_grad():
        for logits in (layer.mean_weight, layer.var_weight):
            logits.fill_(-math.inf)
            logits[branch] = 0.0


def test_one_hot_bn_equals_batch_norm_train_and_eval():
    layer = make_layer(SwitchableNorm2d, unbiased=False)
    _one_hot(layer, 2)
    x = make_input((4, C, 5, 6))
    running_mean0 = layer.running_mean.clone()
    running_var0 = layer.running_var.clone()
    running_mean = running_mean0.clone()
    running_var = running_var0.clone()
    y = layer(x)
    y_bn = F.batch_norm(x, running_mean, running_var, layer.weight,
                        layer.bias, training=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(y, y_bn, atol=1e-10, rtol=1e-10)
    # Same running mean; BN's running var takes the unbiased batch variance,
    # SN's (like the authors') the pooled biased one.
    torch.testing.assert_close(layer.running_mean, running_mean)
    biased_var = x.var(dim=(0, 2, 3), unbiased=False)
    unbiased_var = x.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(layer.running_var,
                               0.9 * running_var0 + 0.1 * biased_var)
    torch.testing.assert_close(running_var,
                               0.9 * running_var0 + 0.1 * unbiased_var)

    layer.eval()
    y_eval = layer(x)
    y_bn_eval = F.batch_norm(x, layer.running_mean, layer.running_var,
                             layer.weight, layer.bias, training=False,
                             eps=1e-5)
    torch.testing.assert_close(y_eval, y_bn_eval, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize('training', [True, False])
def test_one_hot_in_equals_instance_norm(training):
    layer = make_layer(SwitchableNorm2d, unbiased=False).train(training)
    _one_hot(layer, 0)
    x = make_input((3, C, 4, 5))
    y_in = F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=1e-5)
    torch.testing.assert_close(layer(x), y_in, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize('cls,shape', ARITIES[1:], ids=ARITY_IDS[1:])
def test_one_hot_ln_equals_group_norm_with_one_group(cls, shape):
    layer = make_layer(cls, unbiased=False)
    _one_hot(layer, 1)
    x = make_input(shape)
    y_gn = F.group_norm(x, 1, layer.weight, layer.bias, eps=1e-5)
    torch.testing.assert_close(layer(x), y_gn, atol=1e-10, rtol=1e-10)


def test_momentum_defaults_follow_the_authors():
    # authors: 0.9 for 2d, 0.997 for 1d/3d -> PyTorch momentum 0.1 / 0.003
    assert SwitchableNorm2d(4).momentum == pytest.approx(0.1)
    assert SwitchableNorm1d(4).momentum == pytest.approx(0.003)
    assert SwitchableNorm3d(4).momentum == pytest.approx(0.003)
    assert SwitchableNorm2d(4, momentum=0.01).momentum == 0.01
    assert SwitchableNorm2d(4, momentum=None).momentum is None


def test_cumulative_average_with_momentum_none():
    layer = make_layer(SwitchableNorm2d, momentum=None)
    layer.reset_running_stats()
    batches = [make_input((4, C, 3, 3), seed=s) for s in range(3)]
    for x in batches:
        layer(x)
    stats = [batch_stats(x, unbiased=True) for x in batches]
    torch.testing.assert_close(layer.running_mean,
                               torch.stack([s[0] for s in stats]).mean(0))
    torch.testing.assert_close(layer.running_var,
                               torch.stack([s[1] for s in stats]).mean(0))


def test_batch_average_pools_batches_and_is_used_in_eval():
    layer = make_layer(SwitchableNorm2d, moving_average=False)
    layer.reset_running_stats()
    batches = [make_input((4, C, 3, 3), seed=s) for s in range(4)]
    for x in batches:
        layer(x)
    assert int(layer.num_batches_tracked) == 4
    stats = [batch_stats(x, unbiased=True) for x in batches]
    pooled_mean = torch.stack([m for m, _ in stats]).mean(0)
    pooled_second = torch.stack([v + m**2 for m, v in stats]).mean(0)
    torch.testing.assert_close(layer.running_mean, pooled_mean)
    torch.testing.assert_close(layer.running_var,
                               pooled_second - pooled_mean**2)

    layer.eval()
    x = make_input((2, C, 3, 3), seed=9)
    y_ref, _ = reference_sn(x, layer.weight, layer.bias, layer.mean_weight,
                            layer.var_weight, (pooled_mean, pooled_second -
                                               pooled_mean**2),
                            training=False)
    torch.testing.assert_close(layer(x), y_ref)


def test_last_gamma_and_affine():
    assert torch.all(SwitchableNorm2d(4, last_gamma=True).weight == 0)
    assert torch.all(SwitchableNorm2d(4).weight == 1)
    layer = SwitchableNorm2d(4, affine=False)
    assert layer.weight is None and layer.bias is None
    x = make_input((2, 4, 3, 3), torch.float32)
    y_ref, _ = reference_sn(x, torch.ones(4), torch.zeros(4), torch.ones(3),
                            torch.ones(3), (layer.running_mean,
                                            layer.running_var))
    torch.testing.assert_close(layer(x), y_ref)


def test_requires_grad_argument():
    layer = SwitchableNorm2d(4, requires_grad=False)
    assert not any(p.requires_grad for p in layer.parameters())
    x = make_input((2, 4, 3, 3), torch.float32)
    assert not layer(x).requires_grad


# --- bad input ------------------------------------------------------------


@pytest.mark.parametrize('cls,bad_shape,expected', [
    (SwitchableNorm2d, (2, C, 4), '4D'),
    (SwitchableNorm2d, (2, C, 4, 4, 4), '4D'),
    (SwitchableNorm1d, (2, C, 4, 4), '2D or 3D'),
    (SwitchableNorm3d, (2, C, 4, 4), '5D'),
])
def test_wrong_number_of_dimensions_is_a_clear_error(cls, bad_shape,
                                                     expected):
    with pytest.raises(ValueError, match=expected):
        cls(C)(torch.randn(bad_shape))


def test_wrong_number_of_channels_is_a_clear_error():
    with pytest.raises(ValueError, match='built for 6 channels.*5 channels'):
        SwitchableNorm2d(C)(torch.randn(2, 5, 3, 3))


NON_FLOAT_INPUTS = {
    'int64': lambda shape: torch.randint(0, 5, shape),
    'uint8': lambda shape: torch.randint(0, 255, shape, dtype=torch.uint8),
    'bool': lambda shape: torch.rand(shape) > 0.5,
    'complex64': lambda shape: torch.randn(shape, dtype=torch.complex64),
}


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('kind', list(NON_FLOAT_INPUTS))
@pytest.mark.parametrize('cls,shape', [
    (SwitchableNorm1d, (4, C)), (SwitchableNorm2d, (4, C, 3, 3)),
    (SwitchableNorm3d, (2, C, 2, 2, 2)), (SyncSwitchableNorm, (4, C, 3, 3)),
    (SparseSwitchableNorm2d, (4, C, 3, 3))
], ids=lambda v: getattr(v, '__name__', None))
def test_non_float_input_is_refused_naming_its_dtype(cls, shape, kind,
                                                     training):
    """As BatchNorm refuses it: an integer input would be normalized into
    {-1, 0, 1} and move the running statistics, uint8 wrap around, complex
    lose its imaginary part. Nothing changes."""
    layer = cls(C).train(training)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = NON_FLOAT_INPUTS[kind](shape)
    with pytest.raises(TypeError) as raised:
        layer(x)
    assert str(raised.value) == (f'{cls.__name__} expects a floating-point '
                                 f'input, got {x.dtype}')
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize('path', ['', 'native', 'generic', 'composite'])
@pytest.mark.parametrize('value', [1e4, -3.5, 0.0])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_constant_input_gives_beta_exactly(value, training, path):
    """Equal IN, LN and BN statistics give exactly that statistic although
    the float32 softmax shares do not sum to 1, so x - mean is exactly 0:
    the output is beta and gamma's gradient 0, exactly (the layer
    operators, each Python path and the traced one)."""
    layer = make_layer(SwitchableNorm2d, dtype=torch.float32)
    if not training:  # running statistics equal to the input's
        layer.running_mean.fill_(value)
        layer.running_var.zero_()
    layer.train(training)
    x = torch.full((3, C, 3, 3), value, requires_grad=True)
    grad = torch.randn(x.shape)
    with backends.forced(path):
        y = layer(x)
        (y * grad).sum().backward()
    torch.testing.assert_close(
        y, layer.bias.detach().view(1, C, 1, 1).expand_as(y), rtol=0, atol=0)
    assert torch.equal(layer.weight.grad, torch.zeros(C))
    # and the input gradient is that of a zero-mean input: a path that
    # folds the mean into a constant loses it at the scale of 1e4
    x0 = torch.full_like(x, 0.0, requires_grad=True)
    with backends.forced(path):
        (layer(x0) * grad).sum().backward()
    torch.testing.assert_close(x.grad, x0.grad, rtol=1e-5, atol=1e-5)


# Every row: constructor arguments -> the exact error (the message names the
# argument), for every SN class.
BAD_ARGUMENTS = [
    (dict(num_features=0), ValueError,
     'num_features must be a positive int, got 0'),
    (dict(num_features=-3), ValueError,
     'num_features must be a positive int, got -3'),
    (dict(num_features=6.0), TypeError,
     'num_features must be a positive int, got 6.0 (float)'),
    (dict(num_features=True), TypeError,
     'num_features must be a positive int, got True (bool)'),
    (dict(eps=-1), ValueError, 'eps must be a positive finite float, got -1'),
    (dict(eps=0.0), ValueError,
     'eps must be a positive finite float, got 0.0'),
    (dict(eps=math.nan), ValueError,
     'eps must be a positive finite float, got nan'),
    (dict(eps=math.inf), ValueError,
     'eps must be a positive finite float, got inf'),
    (dict(eps='1e-5'), TypeError,
     "eps must be a positive float, got '1e-5' (str)"),
    (dict(momentum=2.0), ValueError,
     'momentum must be in [0, 1] or None, got 2.0'),
    (dict(momentum=-0.1), ValueError,
     'momentum must be in [0, 1] or None, got -0.1'),
    (dict(momentum=math.nan), ValueError,
     'momentum must be in [0, 1] or None, got nan'),
    (dict(momentum='0.1'), TypeError,
     "momentum must be a float in [0, 1] or None, got '0.1' (str)"),
    (dict(using_bn='no'), TypeError,
     "using_bn must be True or False, got 'no' (str)"),
    (dict(moving_average=0), TypeError,
     'moving_average must be True or False, got 0 (int)'),
    (dict(unbiased=None), TypeError,
     'unbiased must be True or False, got None (NoneType)'),
    (dict(affine='yes'), TypeError,
     "affine must be True or False, got 'yes' (str)"),
    (dict(last_gamma=1), TypeError,
     'last_gamma must be True or False, got 1 (int)'),
    (dict(requires_grad='false'), TypeError,
     "requires_grad must be True or False, got 'false' (str)"),
]
ALL_CLASSES = [SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d,
               SyncSwitchableNorm]


@pytest.mark.parametrize('cls', ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize('kwargs,error,message', BAD_ARGUMENTS,
                         ids=[repr(r[0]) for r in BAD_ARGUMENTS])
def test_bad_constructor_arguments_table(cls, kwargs, error, message):
    kwargs = dict(dict(num_features=C), **kwargs)
    with pytest.raises(error, match='^' + re.escape(message) + '$'):
        cls(**kwargs)


@pytest.mark.parametrize('kwargs', [
    dict(momentum=None), dict(momentum=0), dict(momentum=1),
    dict(eps=1e-12), dict(num_features=np.int64(C))
], ids=repr)
def test_edge_arguments_are_accepted(kwargs):
    kwargs = dict(dict(num_features=C), **kwargs)
    layer = SwitchableNorm2d(**kwargs)
    for name, value in kwargs.items():
        assert getattr(layer, name) == value


def test_bad_argument_through_the_registry_keeps_the_message():
    from mmcv.cnn import build_norm_layer
    with pytest.raises(TypeError,
                       match="using_bn must be True or False, got 'no'"):
        build_norm_layer(dict(type='SN', using_bn='no'), C)


def _overflowing_input():
    # finite in float32, but its squared deviations are not (above ~1.8e19)
    return torch.randn(2, C, 3, 3, generator=torch.Generator().manual_seed(
        3)) * 4e19


def _with(value):
    x = make_input((2, C, 3, 3), torch.float32)
    x[1, 2, 0, 0] = value
    return x


def _nan_in_sample_1_and_channel_2(x, y):
    """Where a bad value at (1, 2) reaches: its sample's LN statistics and
    its channel's BN statistics, nothing else."""
    expected = torch.zeros_like(y, dtype=torch.bool)
    expected[1] = True
    expected[:, 2] = True
    return torch.equal(y.isnan(), expected)


# Every row: a training-mode input -> the exact warning (None: none) and
# output of a fresh SwitchableNorm2d(C) (gamma 1, beta 0); the running
# statistics move only where no warning is given.
BAD_INPUTS = [
    ('finite-overflowing-float32', _overflowing_input, lambda x: (
        'SwitchableNorm2d: the batch statistics overflowed float32 although '
        'the input is finite (squared deviations do not fit float32 beyond '
        '|x| ~ 1.8e+19), so '
        'the output does not normalize the input; running statistics keep '
        'their last value. Scale the input down or run this layer in '
        'float64.'), lambda x, y: torch.equal(y, torch.zeros_like(y))),
    ('nan', lambda: _with(math.nan), lambda x: (
        'SwitchableNorm2d: non-finite batch statistics (NaN or Inf in the '
        'input); running statistics keep their last value.'),
     _nan_in_sample_1_and_channel_2),
    ('inf', lambda: _with(math.inf), lambda x: (
        'SwitchableNorm2d: non-finite batch statistics (NaN or Inf in the '
        'input); running statistics keep their last value.'),
     _nan_in_sample_1_and_channel_2),
    ('same-scale-in-float64', lambda: _overflowing_input().double(),
     lambda x: None, lambda x, y: torch.allclose(
         y, reference_sn(x, *(torch.full((n, ), v, dtype=x.dtype)
                              for n, v in ((C, 1), (C, 0), (3, 1), (3, 1))),
                         (None, None))[0],
         rtol=1e-9, atol=1e-9)),
    ('empty-batch', lambda: torch.randn(0, C, 3, 3), lambda x: None,
     lambda x, y: y.shape == x.shape),
]


@pytest.mark.parametrize('make_x,expected_warning,output_is_expected',
                         [r[1:] for r in BAD_INPUTS],
                         ids=[r[0] for r in BAD_INPUTS])
def test_bad_input_table(make_x, expected_warning, output_is_expected):
    x = make_x()
    layer = SwitchableNorm2d(C).to(x.dtype)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    message = expected_warning(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        y = layer(x)
    assert [str(w.message) for w in caught] == ([message] if message else [])
    assert output_is_expected(x, y)
    kept = message is not None or x.numel() == 0
    for k in ('running_mean', 'running_var', 'num_batches_tracked'):
        assert torch.equal(layer.state_dict()[k], state[k]) == kept, k


@pytest.mark.parametrize('unbiased', [True, False])
def test_1x1_spatial_input_is_finite_and_correct(unbiased):
    # The authors' layer returns NaN here (unbiased variance of one value).
    layer = make_layer(SwitchableNorm2d, unbiased=unbiased)
    ref_layer = make_layer(SwitchableNorm2d, unbiased=unbiased)
    x = make_input((4, C, 1, 1)).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    assert torch.isfinite(y).all()
    # a single value has variance 0: the biased equations apply
    y_ref, _ = reference_for(ref_layer, x_ref, True)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert torch.isfinite(layer.running_var).all()


def test_empty_batch_returns_empty_and_keeps_state():
    layer = make_layer(SwitchableNorm2d, dtype=torch.float32)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(0, C, 4, 4, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, C, 4, 4)
    y.sum().backward()
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, state[k])


@pytest.mark.parametrize('bad', [math.nan, math.inf])
def test_non_finite_batch_does_not_poison_running_stats(bad):
    layer = make_layer(SwitchableNorm2d, dtype=torch.float32)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = make_input((2, C, 3, 3), torch.float32)
    x[1, 2, 0, 0] = bad
    with pytest.warns(RuntimeWarning, match='non-finite'):
        layer(x)
    for k in ('running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(layer.state_dict()[k], state[k])
    # a good batch afterwards updates them as usual
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        layer(make_input((2, C, 3, 3), torch.float32))
    assert int(layer.num_batches_tracked) == 1
    assert torch.isfinite(layer.running_mean).all()


# --- precision and layout --------------------------------------------------


@pytest.mark.parametrize('low', [torch.bfloat16, torch.float16])
def test_low_precision_keeps_statistics_in_float32(low):
    layer = make_layer(SwitchableNorm2d, dtype=torch.float32)
    ref = make_layer(SwitchableNorm2d, dtype=torch.float32)
    x = make_input((4, C, 5, 5), torch.float32).to(low)
    y = layer(x)
    assert y.dtype == low
    assert layer.running_mean.dtype == torch.float32
    # statistics equal the float32 computation on the same values
    y32 = ref(x.float())
    torch.testing.assert_close(layer.running_mean, ref.running_mean,
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.running_var, ref.running_var,
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y, y32.to(low))


def test_autocast_bfloat16_on_cpu():
    """Under autocast the layer computes in float32 on the bfloat16 values:
    its output and input gradient are the float32 layer's rounded to
    bfloat16, its parameter gradients the float32 layer's, all within
    rounding of the float64 equations."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, C, 3)
    layer = make_layer(SwitchableNorm2d, dtype=torch.float32)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        h = conv(x)
        h.retain_grad()
        y = layer(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert layer.running_mean.dtype == torch.float32
    # an upstream gradient that bfloat16 holds exactly
    grad_out = torch.randn(y.shape).to(torch.bfloat16)
    y.backward(grad_out)

    f32 = make_layer(SwitchableNorm2d, dtype=torch.float32)
    h32 = h.detach().float().requires_grad_()
    y32 = f32(h32)
    y32.backward(grad_out.float())
    assert torch.equal(y, y32.to(torch.bfloat16))
    assert torch.equal(h.grad, h32.grad.to(torch.bfloat16))
    for name in ('weight', 'bias', 'mean_weight', 'var_weight'):
        assert torch.equal(getattr(layer, name).grad,
                           getattr(f32, name).grad), name
    assert torch.equal(layer.running_var, f32.running_var)

    ref = make_layer(SwitchableNorm2d)
    h64 = h.detach().double().requires_grad_()
    y64, _ = reference_for(ref, h64, True)
    y64.backward(grad_out.double())
    # bfloat16 keeps 8 significant bits: half an ulp is 2^-9 relative
    torch.testing.assert_close(y.double(), y64, rtol=2**-8, atol=2**-8)
    for name in ('weight', 'bias', 'mean_weight', 'var_weight'):
        torch.testing.assert_close(getattr(layer, name).grad.double(),
                                   getattr(ref, name).grad, rtol=1e-5,
                                   atol=1e-5, msg=name)


def test_channels_last_matches_contiguous():
    layer = make_layer(SwitchableNorm2d, dtype=torch.float32)
    ref = make_layer(SwitchableNorm2d, dtype=torch.float32)
    x = make_input((4, C, 5, 7), torch.float32)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    y_cl, y = layer(x_cl), ref(x)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y)
    g = torch.randn(4, C, 5, 7)
    y_cl.backward(g)
    y.backward(g)
    torch.testing.assert_close(x_cl.grad, x.grad)
    torch.testing.assert_close(layer.mean_weight.grad, ref.mean_weight.grad)
    torch.testing.assert_close(layer.running_var, ref.running_var)


def test_sync_sn_without_process_group_equals_sn():
    layer = make_layer(SwitchableNorm2d)
    sync = make_layer(SyncSwitchableNorm)
    x = make_input((4, C, 3, 3))
    torch.testing.assert_close(sync(x), layer(x))
    torch.testing.assert_close(sync.running_var, layer.running_var)
