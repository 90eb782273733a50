"""The running-statistics rule and the non-finite counter, option by option,
on every implementation that applies them: the compiled CPU operator
(mmsn._C), the Python kernels CUDA and other devices run
(mmsn/ops/layer_kernels.py, here on CPU tensors), the device-side update
itself (:func:`mmsn.ops.statistics.update_running_stats_`) and the SN layer
on its paths. The expected values are the rules written out in float64
from the batch statistics of tests/sn_reference.py, over several batches
and from a non-zero ``num_batches_tracked`` (so that a count off by one,
a momentum ignored or a default that happens to equal the argument shows).
"""
import math

import pytest
import torch
import torch.utils.checkpoint

from mmsn import SwitchableNorm2d
from mmsn.ops import backends, layer_kernels, library
from mmsn.ops.backends import GenericBackend, NativeBackend
from mmsn.ops.statistics import (NONFINITE_EVAL, NONFINITE_INPUT,
                                 NONFINITE_POOLED, OVERFLOWED, nonfinite_slot,
                                 update_running_stats_)
from sn_reference import batch_stats

C = 4
OPS = library.layer_ops()
needs_ops = pytest.mark.skipif(OPS is None, reason='mmsn._C not available')

# (momentum, moving_average): non-default momenta only, so that a dropped
# argument cannot fall back to a default that equals it
RULES = [(0.3, True), (None, True), (0.3, False), (None, False),
         (0.0, True), (1.0, True)]
RULE_IDS = ['ema-0.3', 'cumulative', 'batch-average-0.3',
            'batch-average-none', 'ema-0', 'ema-1']


def _batch(seed, shape=(3, C, 3, 4), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(1, C, 1, 1, generator=g, dtype=torch.float64) * 3 + .5
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return (x + torch.randn(1, C, 1, 1, generator=g,
                            dtype=torch.float64) * 2).to(dtype)


def _params(seed=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(weight=(torch.rand(C, generator=g) + .5).to(dtype),
                bias=torch.randn(C, generator=g).to(dtype),
                mean_weight=torch.randn(3, generator=g).to(dtype),
                var_weight=torch.randn(3, generator=g).to(dtype))


def _buffers(tracked=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    return dict(mean=torch.randn(C, generator=g).to(dtype),
                var=(torch.rand(C, generator=g) + .5).to(dtype),
                tracked=torch.tensor(tracked, dtype=torch.long),
                nonfinite=torch.zeros(4, dtype=torch.long))


def expected_after(buffers, batches, momentum, moving_average, unbiased):
    """Running mean, var and count after ``batches``; non-finite batches
    (None in ``batches``' statistics) leave everything as it is."""
    mean = buffers['mean'].double().clone()
    var = buffers['var'].double().clone()
    tracked = int(buffers['tracked'])
    for x in batches:
        mean_bn, var_bn = batch_stats(x.double(), unbiased)
        if not torch.isfinite(torch.cat([mean_bn, var_bn])).all():
            continue
        tracked += 1
        if moving_average and momentum is not None:
            f = momentum
        else:
            f = 1.0 / tracked
        new_mean = (1 - f) * mean + f * mean_bn
        if moving_average:
            var = (1 - f) * var + f * var_bn
        else:
            second = (1 - f) * (var + mean**2) + f * (var_bn + mean_bn**2)
            var = second - new_mean**2
        mean = new_mean
    return mean, var, tracked


def _cpu_op(x, p, b, momentum, moving_average, eps, unbiased, update):
    return OPS.switchable_norm_train(
        x, p['weight'], p['bias'], p['mean_weight'], p['var_weight'],
        b['mean'], b['var'], b['tracked'], b['nonfinite'], True, momentum,
        moving_average, eps, unbiased, update)


def _python_kernel(backend):
    def step(x, p, b, momentum, moving_average, eps, unbiased, update):
        return layer_kernels.train(
            backend, x, p['weight'], p['bias'], p['mean_weight'],
            p['var_weight'], b['mean'], b['var'], b['tracked'],
            b['nonfinite'], True, momentum, moving_average, eps, unbiased,
            update)
    return step


TRAINS = {'cpu-op': _cpu_op,
          'python-generic': _python_kernel(GenericBackend()),
          'python-native': _python_kernel(NativeBackend())}


def _cpu_eval(x, p, b, eps, unbiased):
    return OPS.switchable_norm_eval(
        x, p['weight'], p['bias'], p['mean_weight'], p['var_weight'],
        b['mean'], b['var'], b['nonfinite'], True, eps, unbiased)


def _python_eval(backend):
    def run(x, p, b, eps, unbiased):
        return layer_kernels.evaluate(
            backend, x, p['weight'], p['bias'], p['mean_weight'],
            p['var_weight'], b['mean'], b['var'], b['nonfinite'], True, eps,
            unbiased)
    return run


EVALS = {'cpu-op': _cpu_eval,
         'python-generic': _python_eval(GenericBackend()),
         'python-native': _python_eval(NativeBackend())}


def _assert_running(b, want, tol=1e-5):
    mean, var, tracked = want
    torch.testing.assert_close(b['mean'].double(), mean, rtol=tol, atol=tol)
    torch.testing.assert_close(b['var'].double(), var, rtol=tol, atol=tol)
    assert int(b['tracked']) == tracked


@needs_ops
@pytest.mark.parametrize('impl', list(TRAINS))
@pytest.mark.parametrize('momentum,moving_average', RULES, ids=RULE_IDS)
@pytest.mark.parametrize('unbiased', [True, False])
def test_operator_moves_running_stats_by_the_rule(impl, momentum,
                                                  moving_average, unbiased):
    """Three batches from num_batches_tracked = 2: the moving average with
    the given momentum; the cumulative average (momentum None) and the
    batch average (moving_average=False, whatever the momentum) with the
    factor 1 / batches seen, the batch average pooling second moments."""
    p, b = _params(), _buffers(tracked=2)
    start = {k: v.clone() for k, v in b.items()}
    batches = [_batch(s) for s in range(3)]
    with torch.no_grad():
        for x in batches:
            TRAINS[impl](x, p, b, momentum, moving_average, 1e-5, unbiased,
                         True)
    _assert_running(b, expected_after(start, batches, momentum,
                                      moving_average, unbiased))
    assert b['nonfinite'].tolist() == [0, 0, 0, 0]


@needs_ops
@pytest.mark.parametrize('impl', list(TRAINS))
def test_update_stats_false_leaves_every_buffer(impl):
    """``update_stats=False`` (activation checkpointing's recomputation):
    the same output, no buffer moves."""
    p = _params()
    x = _batch(0)
    outs = []
    for update in (True, False):
        b = _buffers()
        start = {k: v.clone() for k, v in b.items()}
        with torch.no_grad():
            outs.append(TRAINS[impl](x, p, b, 0.3, True, 1e-5, True,
                                     update)[0])
        for k in ('mean', 'var', 'tracked'):
            assert torch.equal(b[k], start[k]) != update, k
        assert b['nonfinite'].tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def _nan_batch(seed=0):
    x = _batch(seed)
    x[1, 2, 0, 1] = math.nan
    return x


def _inf_batch(seed=0):
    x = _batch(seed)
    x[0, 1, 2, 2] = -math.inf
    return x


def _overflowing_batch(seed=0):
    # finite float32 values whose squared deviations overflow float32
    return _batch(seed) * 4e19


@needs_ops
@pytest.mark.parametrize('impl', list(TRAINS))
@pytest.mark.parametrize('bad,slot', [(_nan_batch, NONFINITE_INPUT),
                                      (_inf_batch, NONFINITE_INPUT),
                                      (_overflowing_batch, OVERFLOWED)],
                         ids=['nan', 'inf', 'overflow'])
@pytest.mark.parametrize('momentum,moving_average',
                         [(0.3, True), (None, True), (0.3, False)],
                         ids=['ema', 'cumulative', 'batch-average'])
def test_non_finite_batches_count_in_their_slot_and_move_nothing(
        impl, bad, slot, momentum, moving_average):
    """good, bad, good, bad: each bad batch counts once in its slot (input
    NaN/Inf: 0; finite input whose statistics overflow: 1) and leaves the
    running statistics and num_batches_tracked; the good ones move them as
    if the bad ones had never been seen (the 1 / count factor too)."""
    p, b = _params(), _buffers(tracked=1)
    start = {k: v.clone() for k, v in b.items()}
    batches = [_batch(1), bad(2), _batch(3), bad(4)]
    with torch.no_grad():
        for i, x in enumerate(batches):
            before = {k: v.clone() for k, v in b.items()}
            TRAINS[impl](x, p, b, momentum, moving_average, 1e-5, True, True)
            if i % 2:  # bad: nothing but the counter moves
                for k in ('mean', 'var', 'tracked'):
                    assert torch.equal(b[k], before[k]), k
    want = [0, 0, 0, 0]
    want[slot] = 2
    assert b['nonfinite'].tolist() == want
    _assert_running(b, expected_after(start, batches[::2], momentum,
                                      moving_average, True))


@needs_ops
@pytest.mark.parametrize('impl', list(EVALS))
@pytest.mark.parametrize('bad', [_nan_batch, _inf_batch, _overflowing_batch],
                         ids=['nan', 'inf', 'overflow'])
def test_eval_counts_non_finite_statistics_in_the_eval_slot(impl, bad):
    """Eval: a forward whose statistics are not finite counts in slot 2
    (once per forward), a finite one nowhere; the running statistics are
    only read."""
    p, b = _params(), _buffers()
    start = {k: v.clone() for k, v in b.items()}
    with torch.no_grad():
        EVALS[impl](_batch(0), p, b, 1e-5, True)
        assert b['nonfinite'].tolist() == [0, 0, 0, 0]
        for _ in range(2):
            EVALS[impl](bad(), p, b, 1e-5, True)
    want = [0, 0, 0, 0]
    want[NONFINITE_EVAL] = 2
    assert b['nonfinite'].tolist() == want
    for k in ('mean', 'var', 'tracked'):
        assert torch.equal(b[k], start[k]), k


# -- update_running_stats_ itself (the rule on devices without mmsn._C) --
@pytest.mark.parametrize('momentum,moving_average', RULES, ids=RULE_IDS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_update_running_stats_follows_the_rule(momentum, moving_average,
                                               dtype):
    b = _buffers(tracked=4, dtype=dtype)
    start = {k: v.clone() for k, v in b.items()}
    batches = [_batch(s, dtype=torch.float64) for s in range(3)]
    for x in batches:
        mean_bn, var_bn = batch_stats(x, True)
        update_running_stats_(b['mean'], b['var'], b['tracked'],
                              b['nonfinite'], mean_bn.to(dtype),
                              var_bn.to(dtype), torch.tensor(0), momentum,
                              moving_average)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    _assert_running(b, expected_after(start, batches, momentum,
                                      moving_average, True), tol)
    assert b['mean'].dtype == dtype and b['var'].dtype == dtype
    assert b['nonfinite'].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize('slot', [NONFINITE_INPUT, OVERFLOWED,
                                  NONFINITE_EVAL, NONFINITE_POOLED, -1])
@pytest.mark.parametrize('which', ['mean', 'var'])
def test_update_running_stats_counts_a_bad_batch_in_the_slot_given(
        slot, which):
    """A non-finite mean or variance counts in ``slot_if_bad`` (a negative
    slot: nowhere) and moves nothing; a finite batch counts nowhere, even
    with a slot given."""
    b = _buffers(tracked=3)
    start = {k: v.clone() for k, v in b.items()}
    mean_bn, var_bn = torch.randn(C), torch.rand(C) + .5
    bad = dict(mean=mean_bn.clone(), var=var_bn.clone())
    bad[which][1] = math.inf if which == 'var' else math.nan
    for _ in range(2):
        update_running_stats_(b['mean'], b['var'], b['tracked'],
                              b['nonfinite'], bad['mean'], bad['var'],
                              torch.tensor(slot), 0.3, True)
    for k in ('mean', 'var', 'tracked'):
        assert torch.equal(b[k], start[k]), k
    want = [0, 0, 0, 0]
    if slot >= 0:
        want[slot] = 2
    assert b['nonfinite'].tolist() == want
    update_running_stats_(b['mean'], b['var'], b['tracked'], b['nonfinite'],
                          mean_bn, var_bn, torch.tensor(slot), 0.3, True)
    assert b['nonfinite'].tolist() == want
    assert int(b['tracked']) == 4
    torch.testing.assert_close(b['mean'], .7 * start['mean'] + .3 * mean_bn)
    torch.testing.assert_close(b['var'], .7 * start['var'] + .3 * var_bn)


def test_update_running_stats_without_a_counter():
    b = _buffers(tracked=0)
    update_running_stats_(b['mean'], b['var'], b['tracked'], None,
                          torch.full((C, ), math.nan), torch.ones(C),
                          torch.tensor(0), 0.3, True)
    assert int(b['tracked']) == 0


def test_nonfinite_slot_tells_input_from_overflow():
    finite = torch.randn(3, C)
    assert int(nonfinite_slot(finite)) == OVERFLOWED
    for bad in (math.nan, math.inf, -math.inf):
        m = finite.clone()
        m[2, 1] = bad
        assert int(nonfinite_slot(m)) == NONFINITE_INPUT


# -- the layer: its own momentum, moving_average and eps reach the rule ----
LAYER_PATHS = ['compiled', 'composite', 'generic']


@pytest.mark.parametrize('path', LAYER_PATHS)
@pytest.mark.parametrize('momentum,moving_average', RULES[:4],
                         ids=RULE_IDS[:4])
def test_layer_moves_its_running_stats_by_its_own_arguments(
        path, momentum, moving_average):
    if path == 'compiled' and OPS is None:
        pytest.skip('mmsn._C not available')
    layer = SwitchableNorm2d(C, momentum=momentum,
                             moving_average=moving_average, eps=0.2)
    b = _buffers(tracked=2)
    with torch.no_grad():
        layer.running_mean.copy_(b['mean'])
        layer.running_var.copy_(b['var'])
        layer.num_batches_tracked.fill_(2)
    batches = [_batch(s) for s in range(3)]
    with backends.forced(path):
        for x in batches:
            layer(x.requires_grad_())
    got = dict(mean=layer.running_mean, var=layer.running_var,
               tracked=layer.num_batches_tracked)
    _assert_running(got, expected_after(b, batches, momentum, moving_average,
                                        True))


@pytest.mark.parametrize('path', LAYER_PATHS)
@pytest.mark.parametrize('bad,slot', [(_nan_batch, NONFINITE_INPUT),
                                      (_overflowing_batch, OVERFLOWED)],
                         ids=['nan', 'overflow'])
def test_layer_counts_bad_batches_in_their_slot(path, bad, slot):
    if path == 'compiled' and OPS is None:
        pytest.skip('mmsn._C not available')
    layer = SwitchableNorm2d(C, momentum=0.3)
    with backends.forced(path), pytest.warns(RuntimeWarning):
        layer(bad(1))
        layer(bad(2))
        layer.eval()
        layer(_nan_batch(3))
    want = [0, 0, 1, 0]
    want[slot] = 2
    got = layer.nonfinite.tolist()
    if path != 'compiled':
        # the functional core, which the other paths run, does not count
        # eval forwards (yet): only the training slots are asked of it
        got[NONFINITE_EVAL] = want[NONFINITE_EVAL]
    assert got == want
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.zeros(C))
    assert torch.equal(layer.running_var, torch.ones(C))


@pytest.mark.parametrize('path', LAYER_PATHS)
@pytest.mark.parametrize('use_reentrant', [False, True])
def test_checkpoint_recomputation_moves_running_stats_once(path,
                                                           use_reentrant):
    """Activation checkpointing reruns the forward in backward: the
    running statistics move once per step, as without checkpointing."""
    if path == 'compiled' and OPS is None:
        pytest.skip('mmsn._C not available')
    layers = [SwitchableNorm2d(C, momentum=0.3) for _ in range(2)]
    x = _batch(0)
    with backends.forced(path):
        for i, layer in enumerate(layers):
            xi = x.clone().requires_grad_()
            if i:
                y = torch.utils.checkpoint.checkpoint(
                    layer, xi, use_reentrant=use_reentrant)
            else:
                y = layer(xi)
            (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    plain, checkpointed = layers
    assert int(checkpointed.num_batches_tracked) == 1
    for name in ('running_mean', 'running_var'):
        torch.testing.assert_close(getattr(checkpointed, name),
                                   getattr(plain, name), rtol=0, atol=0)
