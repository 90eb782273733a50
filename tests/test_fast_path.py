"""The fast SN path (mmsn.ops.switchable_norm._FusedSwitchableNorm and the
no-grad kernels) against the composite path (plain autograd over the same
equations): outputs, every gradient and the running statistics agree in every
mode; gradcheck in float64; memory kept for backward; torch.compile."""
import copy
import importlib
import os
import warnings

import pytest
import torch
from torch import nn

from mmsn import (SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d,
                  SyncSwitchableNorm)
from test_switchable_norm import C
from test_switchable_norm import make_input as random_input
from test_switchable_norm import make_layer as random_layer

# the package exports a function of the same name as the module
sn_ops = importlib.import_module('mmsn.ops.switchable_norm')

ARITIES = [
    (SwitchableNorm1d, (5, C)),
    (SwitchableNorm1d, (5, C, 7)),
    (SwitchableNorm2d, (4, C, 5, 3)),
    (SwitchableNorm3d, (3, C, 2, 3, 4)),
    (SyncSwitchableNorm, (4, C, 3, 4)),
]
ARITY_IDS = ['1d-NC', '1d-NCL', '2d', '3d', 'sync']
PARAMS = ('weight', 'bias', 'mean_weight', 'var_weight')

# big-tensor kernels of the fast path -> the MMSN_SN_PATH value that picks
# them on the CPU ('compiled' is the default when mmsn._C is built)
KERNELS = {'compiled': '', 'native': 'native', 'generic': 'generic'}


def kernel_path(kernels):
    if kernels == 'compiled' and not sn_ops.compiled_kernels_available():
        if os.environ.get('MMSN_WITH_OPS') == '0':
            pytest.skip('built with MMSN_WITH_OPS=0')
        pytest.fail('mmsn._C is not built: run tools/setup_env.sh (or '
                    'pip install --no-build-isolation -e .)')
    return KERNELS[kernels]


# the fast path is exercised in float32 unless a test asks for float64
def make_layer(cls, dtype=torch.float32, **kwargs):
    return random_layer(cls, dtype=dtype, **kwargs)


def make_input(shape, dtype=torch.float32, seed=1):
    return random_input(shape, dtype, seed)


def uses_fast_path(y):
    """Whether the fused Function is among the last few graph nodes."""
    nodes = [y.grad_fn]
    for _ in range(4):
        if any(type(f).__name__ == '_FusedSwitchableNormBackward'
               for f in nodes):
            return True
        nodes = [g for f in nodes if f is not None
                 for g, _ in f.next_functions]
    return False


def run(layer, x, grad_out, path, monkeypatch, steps=2):
    """Forward/backward ``steps`` times (running statistics evolve) through
    the given path; returns outputs, input grads, param grads, buffers."""
    monkeypatch.setattr(sn_ops, '_FORCED_PATH', path)
    outs, grads = [], []
    for _ in range(steps):
        xi = x.detach().clone().requires_grad_()
        y = layer(xi)
        if path != 'composite':
            assert uses_fast_path(y)
        y.backward(grad_out)
        outs.append(y.detach())
        grads.append(xi.grad)
    params = {n: getattr(layer, n).grad.clone() for n in PARAMS}
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    return outs, grads, params, buffers


def assert_all_close(a, b, tol):
    close = dict(atol=tol, rtol=tol)
    for ya, yb in zip(a[0], b[0]):
        torch.testing.assert_close(ya, yb, **close, msg=lambda m: 'y ' + m)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, **close, msg=lambda m: 'dx ' + m)
    for name in PARAMS:
        torch.testing.assert_close(a[2][name], b[2][name], **close,
                                   msg=lambda m: f'{name}: {m}')
    for name in a[3]:
        torch.testing.assert_close(a[3][name], b[3][name], **close,
                                   msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('kernels', list(KERNELS))
@pytest.mark.parametrize('cls,shape', ARITIES, ids=ARITY_IDS)
@pytest.mark.parametrize('using_bn,moving_average', [(True, True),
                                                     (True, False),
                                                     (False, True)],
                         ids=['bn-moving', 'bn-batch-average', 'no-bn'])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('unbiased', [True, False])
def test_fast_path_equals_composite(kernels, cls, shape, using_bn,
                                    moving_average, training, unbiased,
                                    monkeypatch):
    kwargs = dict(using_bn=using_bn, unbiased=unbiased,
                  moving_average=moving_average)
    fast = make_layer(cls, **kwargs).train(training)
    ref = copy.deepcopy(fast)
    x = make_input(shape)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    got = run(fast, x, grad_out, kernel_path(kernels),
              monkeypatch)
    want = run(ref, x, grad_out, 'composite', monkeypatch)
    assert_all_close(got, want, 1e-5)


@pytest.mark.parametrize('kernels', list(KERNELS))
@pytest.mark.parametrize('training', [True, False])
def test_channels_last(kernels, training, monkeypatch):
    shape = (3, C, 5, 4)
    fast = make_layer(SwitchableNorm2d).train(training)
    ref = copy.deepcopy(fast)
    x = make_input(shape).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(shape).contiguous(
        memory_format=torch.channels_last)
    got = run(fast, x, grad_out, kernel_path(kernels),
              monkeypatch)
    want = run(ref, x, grad_out, 'composite', monkeypatch)
    assert_all_close(got, want, 1e-5)
    assert got[0][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('kernels', list(KERNELS))
@pytest.mark.parametrize('cls,shape', ARITIES[:4], ids=ARITY_IDS[:4])
@pytest.mark.parametrize('training', [True, False])
def test_no_grad_forward_equals_composite(kernels, cls, shape, training,
                                          monkeypatch):
    fast = make_layer(cls).train(training)
    ref = copy.deepcopy(fast)
    x = make_input(shape)
    monkeypatch.setattr(sn_ops, '_FORCED_PATH',
                        kernel_path(kernels))
    with torch.no_grad():
        y = fast(x)
    monkeypatch.setattr(sn_ops, '_FORCED_PATH', 'composite')
    with torch.no_grad():
        y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(fast.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('frozen', ['input', 'params'])
def test_partial_requires_grad(frozen, monkeypatch):
    """Only some inputs need a gradient: the others come back as None and
    the rest still match."""
    shape = (4, C, 5, 3)
    fast = make_layer(SwitchableNorm2d)
    ref = copy.deepcopy(fast)
    x = make_input(shape)
    grad_out = torch.randn(shape)
    results = []
    for layer, path in ((fast, ''), (ref, 'composite')):
        monkeypatch.setattr(sn_ops, '_FORCED_PATH', path)
        if frozen == 'params':
            layer.requires_grad_(False)
        xi = x.clone().requires_grad_(frozen != 'input')
        layer(xi).backward(grad_out)
        results.append((xi.grad, [getattr(layer, n).grad for n in PARAMS]))
    (gx, gp), (gx_ref, gp_ref) = results
    if frozen == 'input':
        assert gx is None
        for a, b in zip(gp, gp_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:
        assert all(g is None for g in gp)
        torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kernels', list(KERNELS))
@pytest.mark.parametrize('cls,shape', ARITIES, ids=ARITY_IDS)
@pytest.mark.parametrize('using_bn', [True, False])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('unbiased', [True, False])
def test_gradcheck_fast_path_float64(kernels, cls, shape, using_bn, training,
                                     unbiased, monkeypatch):
    monkeypatch.setattr(sn_ops, '_FORCED_PATH',
                        kernel_path(kernels))
    layer = make_layer(cls, torch.float64, using_bn=using_bn,
                       unbiased=unbiased).train(training)
    params = [getattr(layer, n).detach().clone().requires_grad_()
              for n in PARAMS]

    def fn(x, *ps):
        y = torch.func.functional_call(layer, dict(zip(PARAMS, ps)), (x, ))
        assert uses_fast_path(y)
        return y

    x = make_input(shape, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


def test_batch_stats_fn_called_once_per_forward():
    calls = []

    def batch_stats_fn(mean_in, var_in):
        calls.append(1)
        return sn_ops.batch_stats_from_instance(mean_in, var_in)

    x = make_input((4, C, 5, 3)).requires_grad_()
    layer = make_layer(SwitchableNorm2d)
    y = sn_ops.switchable_norm(x, layer.weight, layer.bias,
                               layer.mean_weight, layer.var_weight,
                               batch_stats_fn)
    y.sum().backward()
    assert len(calls) == 1
    with torch.no_grad():
        sn_ops.switchable_norm(x, layer.weight, layer.bias,
                               layer.mean_weight, layer.var_weight,
                               batch_stats_fn)
    assert len(calls) == 2


def saved_bytes(fn, *args):
    """Bytes of the distinct storages that autograd keeps for backward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(storages.values()), out


@pytest.mark.parametrize('shape', [(4, 16, 7, 7), (2, 32, 14, 14),
                                   (2, 8, 28, 28), (2, 4, 4, 4, 4)])
@pytest.mark.parametrize('using_bn', [True, False])
def test_saved_memory_at_most_input_size(shape, using_bn):
    cls = SwitchableNorm3d if len(shape) == 5 else SwitchableNorm2d
    layer = cls(shape[1], using_bn=using_bn)
    x = torch.randn(shape, requires_grad=True)
    nbytes, y = saved_bytes(layer, x)
    ratio = nbytes / (x.numel() * x.element_size())
    assert ratio <= 1.05, ratio
    y.sum().backward()  # what was saved suffices


def test_saved_memory_of_composite_path_is_larger(monkeypatch):
    """Sanity check of the measurement itself."""
    monkeypatch.setattr(sn_ops, '_FORCED_PATH', 'composite')
    layer = SwitchableNorm2d(16)
    x = torch.randn(4, 16, 7, 7, requires_grad=True)
    nbytes, _ = saved_bytes(layer, x)
    assert nbytes / (x.numel() * x.element_size()) > 1.5


@pytest.mark.parametrize('low', [torch.bfloat16, torch.float16])
def test_low_precision_fast_path_matches_float32(low):
    layer = make_layer(SwitchableNorm2d)
    x = make_input((4, C, 6, 5)).to(low)
    grad_out = torch.randn(x.shape).to(low)
    xi = x.clone().requires_grad_()
    y = layer(xi)
    y.backward(grad_out)
    assert y.dtype == low and xi.grad.dtype == low
    ref = copy.deepcopy(layer)
    ref.zero_grad()
    xr = x.float().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(grad_out.float())
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y.float(), y_ref.to(low).float(), **tol)
    torch.testing.assert_close(xi.grad.float(), xr.grad.to(low).float(),
                               **tol)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad,
                               atol=1e-5, rtol=1e-5)


class _ConvSN(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.sn = SwitchableNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.sn2 = SwitchableNorm2d(4, using_bn=False)

    def forward(self, x):
        return self.sn2(self.conv2(torch.relu(self.sn(self.conv(x)))))


@pytest.mark.parametrize('training', [True, False])
def test_torch_compile_matches_eager(training):
    """A compiled conv+SN model gives the eager outputs, gradients and
    running statistics. backend='aot_eager' traces the same graphs as
    inductor (AOTAutograd) without compiling C++ kernels, which would take
    minutes on a small CI machine."""
    torch.manual_seed(0)
    eager = _ConvSN().train(training)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend='aot_eager')
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        xe = x.clone().requires_grad_()
        xc = x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5)
    # parameter gradients sum over every position and both steps: float32
    # summation order differs between the two graphs
    for (name, p), q in zip(eager.named_parameters(),
                            compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f'{name}: {m}')
    for (name, b), b2 in zip(eager.named_buffers(),
                             compiled_model.buffers()):
        torch.testing.assert_close(b2, b, msg=lambda m: f'{name}: {m}')


def test_many_rows_run_small_ops_serially_and_restore_threads(monkeypatch):
    """N*C >= 32768: the per-(n, c) algebra runs on one thread; the thread
    count is restored and the results still match."""
    threads = torch.get_num_threads()
    shape = (16, 2048, 2, 2)
    layer = SwitchableNorm2d(2048)
    ref = copy.deepcopy(layer)
    x = make_input(shape)
    grad_out = torch.randn(shape)
    got = run(layer, x, grad_out, '', monkeypatch, steps=1)
    assert torch.get_num_threads() == threads
    want = run(ref, x, grad_out, 'composite', monkeypatch, steps=1)
    assert_all_close(got, want, 1e-5)


@pytest.mark.parametrize('kernels', list(KERNELS))
def test_custom_batch_stats_fn_is_differentiated(kernels, monkeypatch):
    """A batch_stats_fn other than the default pooling (SyncSN's all-reduce
    of sums, written here without communication) is differentiated through
    autograd; gradients match the composite path."""

    def sums_batch_stats(mean_in, var_in):
        n = mean_in.shape[0]
        mean_bn = mean_in.sum(0) / n
        var_bn = (var_in + mean_in.square()).sum(0) / n - mean_bn.square()
        return mean_bn, var_bn

    layer = make_layer(SwitchableNorm2d)
    x = make_input((4, C, 5, 3))
    grad_out = torch.randn(x.shape)
    results = []
    for path in (kernel_path(kernels), 'composite'):
        monkeypatch.setattr(sn_ops, '_FORCED_PATH', path)
        xi = x.clone().requires_grad_()
        params = [getattr(layer, n).detach().clone().requires_grad_()
                  for n in PARAMS]
        y = sn_ops.switchable_norm(xi, *params, sums_batch_stats)
        y.backward(grad_out)
        results.append([y.detach(), xi.grad] + [p.grad for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_missing_compiled_kernels_warn_once_and_fall_back(monkeypatch):
    """Without mmsn._C (not built, or built against another torch) the CPU
    path uses PyTorch's kernels, says so once, and gives the same numbers;
    MMSN_WITH_OPS=0 (an explicit choice) silences the warning."""
    monkeypatch.setattr(sn_ops, '_COMPILED', None)
    monkeypatch.setattr(sn_ops, '_COMPILED_ERROR', 'ImportError: gone')
    monkeypatch.setattr(sn_ops, '_warned_native', False)
    monkeypatch.delenv('MMSN_WITH_OPS', raising=False)
    layer = make_layer(SwitchableNorm2d)
    ref = copy.deepcopy(layer)
    x = make_input((4, C, 5, 3))
    grad_out = torch.randn(x.shape)
    with pytest.warns(RuntimeWarning, match=r'mmsn\._C.*ImportError: gone'):
        got = run(layer, x, grad_out, '', monkeypatch, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        layer(x)
        monkeypatch.setattr(sn_ops, '_warned_native', False)
        monkeypatch.setenv('MMSN_WITH_OPS', '0')
        layer(x)
    want = run(ref, x, grad_out, 'composite', monkeypatch, steps=1)
    assert_all_close(got, want, 1e-5)


@pytest.mark.parametrize('training', [True, False])
def test_composite_path_gives_second_order_gradients(training, monkeypatch):
    """What the docs offer for gradient penalties: MMSN_SN_PATH=composite
    (in training mode this differentiates the pooled BN statistics' own
    closed-form backward)."""
    monkeypatch.setattr(sn_ops, '_FORCED_PATH', 'composite')
    layer = make_layer(SwitchableNorm2d, torch.float64).train(training)
    x = make_input((3, C, 3, 2), torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(layer, (x, ), eps=1e-6, atol=1e-5)


def test_fixed_batch_stats_are_checked():
    x = make_input((2, C, 3, 3))
    layer = make_layer(SwitchableNorm2d)
    params = [getattr(layer, n) for n in PARAMS]
    with pytest.raises(TypeError, match='callable, a \\(mean, var\\) pair'):
        sn_ops.switchable_norm(x, *params, torch.zeros(C))
    with pytest.raises(ValueError, match=f'shape \\({C},\\)'):
        sn_ops.switchable_norm(x, *params, (torch.zeros(C + 1),
                                            torch.ones(C + 1)))


@pytest.mark.parametrize('kernels', list(KERNELS))
def test_fixed_batch_stats_equal_a_function_returning_them(kernels,
                                                           monkeypatch):
    """Fixed (running) statistics take the one-sweep forward on the CPU;
    the result, gradients included, is what a batch_stats_fn returning the
    same constants gives."""
    layer = make_layer(SwitchableNorm2d).eval()
    fixed = (layer.running_mean, layer.running_var)
    x = make_input((4, C, 5, 3))
    grad_out = torch.randn(x.shape)
    monkeypatch.setattr(sn_ops, '_FORCED_PATH', kernel_path(kernels))
    results = []
    for stats in (fixed, lambda mean_in, var_in: fixed):
        xi = x.clone().requires_grad_()
        params = [getattr(layer, n).detach().clone().requires_grad_()
                  for n in PARAMS]
        y = sn_ops.switchable_norm(xi, *params, stats)
        y.backward(grad_out)
        with torch.no_grad():
            y_no_grad = sn_ops.switchable_norm(x, *params, stats)
        results.append([y.detach(), y_no_grad, xi.grad] +
                       [p.grad for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
