"""Helpers for testing every path of SN against the independent float64
reference (tests/sn_reference.py): run a layer through a forced path, and
what the reference says it must return."""
import pytest
import torch

from mmsn import ops as sn_ops
from mmsn.ops import backends
from sn_reference import batch_stats, reference_sn
from test_switchable_norm import make_input as random_input
from test_switchable_norm import make_layer as random_layer

PARAMS = ('weight', 'bias', 'mean_weight', 'var_weight')


def _runs_on_cpu_tensors(path: str) -> bool:
    with backends.forced(path):
        try:
            backends.backend_name('cpu')
        except RuntimeError:
            return False
    return True


# Without a GPU, 'triton' runs its kernels in Triton's interpreter on CPU
# tensors (conftest.py sets TRITON_INTERPRET=1); with one (where these CPU
# tests do not interpret), or with a triton the backend does not support,
# tests/test_triton_backend.py covers it or says why not.
FAST_PATHS = ['compiled', 'native', 'generic'] + (
    ['triton'] if _runs_on_cpu_tensors('triton') else [])
PATHS = FAST_PATHS + ['composite']
# float64 paths agree with the float64 reference to rounding; float32 ones
# to float32 rounding of sums over a few hundred values
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture
def path_of(request):
    """``path_of(name)`` forces the path for the rest of the test."""
    stack = []

    def force(path):
        if path == 'compiled' and not sn_ops.compiled_kernels_available():
            from mmsn.ops._extension import load_compiled_ops
            pytest.fail(f'mmsn._C is not available: {load_compiled_ops()[1]}')
        ctx = backends.forced(path)
        ctx.__enter__()
        stack.append(ctx)

    yield force
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


def make_layer(cls, dtype=torch.float32, **kwargs):
    return random_layer(cls, dtype=dtype, **kwargs)


def make_input(shape, dtype=torch.float32, seed=1):
    return random_input(shape, dtype, seed)


# grad_fn names of the fast paths: the layer operators' C++ autograd
# (compiled path), the autograd Function over a backend (the others)
FAST_NODES = ('SwitchableNormTrain', 'SwitchableNormEval',
              'FusedSwitchableNormBackward')


def uses_fast_path(y):
    """Whether a fast path's node is among the last few graph nodes."""
    nodes = [y.grad_fn]
    for _ in range(4):
        if any(f is not None and any(n in f.name() for n in FAST_NODES)
               for f in nodes):
            return True
        nodes = [g for f in nodes if f is not None
                 for g, _ in f.next_functions]
    return False


def run(layer, x, grad_out, path, steps=2):
    """Forward/backward ``steps`` times (running statistics evolve) through
    the given path; returns outputs, input grads, param grads, buffers."""
    outs, grads = [], []
    with backends.forced(path):
        for _ in range(steps):
            xi = x.detach().clone().requires_grad_()
            y = layer(xi)
            assert uses_fast_path(y) == (path != 'composite')
            y.backward(grad_out)
            outs.append(y.detach())
            grads.append(xi.grad)
    params = {n: getattr(layer, n).grad.clone() for n in PARAMS}
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    return outs, grads, params, buffers


def expected_running(layer, x, steps):
    """Running statistics after ``steps`` training steps on ``x``, from the
    reference's batch statistics and the update rules written out."""
    mean, var = layer.running_mean.double(), layer.running_var.double()
    mean_bn, var_bn = batch_stats(x.double(), layer.unbiased)
    tracked = int(layer.num_batches_tracked)
    for _ in range(steps):
        tracked += 1
        if layer.moving_average:
            m = layer.momentum
            mean = (1 - m) * mean + m * mean_bn
            var = (1 - m) * var + m * var_bn
        else:  # pooled mean and second moment of all batches so far
            f = 1 / tracked
            second = (1 - f) * (var + mean**2) + f * (var_bn + mean_bn**2)
            mean = (1 - f) * mean + f * mean_bn
            var = second - mean**2
    return mean, var


def reference_run(layer, x, grad_out, steps=2):
    """What :func:`run` must return, from tests/sn_reference.py in float64.
    """
    x64 = x.detach().double().requires_grad_()
    params = [getattr(layer, n).detach().double().requires_grad_()
              for n in PARAMS]
    running = None
    if layer.using_bn:
        running = (layer.running_mean.double().clone(),
                   layer.running_var.double().clone())
    y, _ = reference_sn(x64, *params, running, training=layer.training,
                        unbiased=layer.unbiased, eps=layer.eps)
    y.backward(grad_out.double())
    buffers = {}
    if layer.using_bn:
        mean, var = running
        if layer.training:
            mean, var = expected_running(layer, x, steps)
        buffers = {'running_mean': mean, 'running_var': var,
                   'num_batches_tracked': layer.num_batches_tracked +
                   (steps if layer.training else 0)}
    buffers['nonfinite'] = torch.zeros_like(layer.nonfinite)
    # parameter gradients accumulate over the steps
    return ([y.detach()] * steps, [x64.grad] * steps,
            {n: p.grad * steps for n, p in zip(PARAMS, params)}, buffers)


def assert_all_close(got, want, tol):
    close = dict(atol=tol, rtol=tol, check_dtype=False)
    for ya, yb in zip(got[0], want[0]):
        torch.testing.assert_close(ya, yb, **close, msg=lambda m: 'y ' + m)
    for ga, gb in zip(got[1], want[1]):
        torch.testing.assert_close(ga, gb, **close, msg=lambda m: 'dx ' + m)
    for name in PARAMS:
        torch.testing.assert_close(got[2][name], want[2][name], **close,
                                   msg=lambda m: f'{name}: {m}')
    assert got[3].keys() == want[3].keys()
    for name in got[3]:
        torch.testing.assert_close(got[3][name], want[3][name], **close,
                                   msg=lambda m: f'{name}: {m}')
