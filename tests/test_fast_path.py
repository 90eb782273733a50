"""Every path of SN (the fast path over the compiled, native and generic
backends, and the composite path) checked directly against the independent
float64 reference (tests/sn_reference.py): outputs, every gradient and the
running statistics in every mode; gradcheck in float64; low precision to
the rounding of its dtype; memory kept for backward; torch.compile."""
import copy

import pytest
import torch
from torch import nn

from mmsn import SwitchableNorm2d, SwitchableNorm3d
from mmsn import ops as sn_ops
from mmsn.ops import backends
from mmsn.ops.statistics import serial_small_ops
from sn_paths import (FAST_PATHS, PARAMS, PATHS, TOL, assert_all_close,
                      make_input, make_layer, path_of,  # noqa: F401 (fixture)
                      reference_run, run, uses_fast_path)
from test_switchable_norm import ARITIES, ARITY_IDS, C


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('cls,shape', ARITIES, ids=ARITY_IDS)
@pytest.mark.parametrize('using_bn,moving_average', [(True, True),
                                                     (True, False),
                                                     (False, True)],
                         ids=['bn-moving', 'bn-batch-average', 'no-bn'])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('unbiased', [True, False])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_every_path_matches_reference(path, cls, shape, using_bn,
                                      moving_average, training, unbiased,
                                      dtype, path_of):
    path_of(path)
    layer = make_layer(cls, dtype, using_bn=using_bn, unbiased=unbiased,
                       moving_average=moving_average).train(training)
    if not moving_average:
        layer.num_batches_tracked.fill_(3)
    x = make_input(shape, dtype)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(7),
                           dtype=dtype)
    want = reference_run(layer, x, grad_out)
    got = run(layer, x, grad_out, path)
    assert_all_close(got, want, TOL[dtype])


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('cls,shape', ARITIES, ids=ARITY_IDS)
@pytest.mark.parametrize('training', [True, False])
def test_no_grad_forward_matches_reference(path, cls, shape, training,
                                           path_of):
    path_of(path)
    layer = make_layer(cls, torch.float64).train(training)
    x = make_input(shape, torch.float64)
    want = reference_run(layer, x, torch.zeros(shape), steps=1)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, want[0][0], atol=1e-10, rtol=1e-10)
    for name, b in layer.named_buffers():
        torch.testing.assert_close(b, want[3][name], atol=1e-10, rtol=1e-10,
                                   check_dtype=False,
                                   msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('frozen', ['input', 'params'])
def test_partial_requires_grad(frozen):
    """Only some inputs need a gradient: the others come back as None and
    the rest match the reference."""
    shape = (4, C, 5, 3)
    layer = make_layer(SwitchableNorm2d, torch.float64)
    x = make_input(shape, torch.float64)
    grad_out = torch.randn(shape, dtype=torch.float64)
    want = reference_run(layer, x, grad_out, steps=1)
    if frozen == 'params':
        layer.requires_grad_(False)
    xi = x.clone().requires_grad_(frozen != 'input')
    y = layer(xi)
    assert uses_fast_path(y)
    y.backward(grad_out)
    grads = [getattr(layer, n).grad for n in PARAMS]
    if frozen == 'input':
        assert xi.grad is None
        for name, g in zip(PARAMS, grads):
            torch.testing.assert_close(g, want[2][name])
    else:
        assert all(g is None for g in grads)
        torch.testing.assert_close(xi.grad, want[1][0])


@pytest.mark.parametrize('path', FAST_PATHS)
@pytest.mark.parametrize('cls,shape', ARITIES, ids=ARITY_IDS)
@pytest.mark.parametrize('using_bn', [True, False])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('unbiased', [True, False])
def test_gradcheck_fast_path_float64(path, cls, shape, using_bn, training,
                                     unbiased, path_of):
    path_of(path)
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
    """Bytes of the distinct storages that autograd keeps for backward,
    other than the module's own parameters and buffers (alive anyway)."""
    storages = {}
    owned = set()
    if isinstance(fn, torch.nn.Module):
        owned = {t.untyped_storage().data_ptr()
                 for t in (*fn.parameters(), *fn.buffers())}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
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


def test_saved_memory_of_composite_path_is_larger():
    """Sanity check of the measurement itself."""
    layer = SwitchableNorm2d(16)
    x = torch.randn(4, 16, 7, 7, requires_grad=True)
    with backends.forced('composite'):
        nbytes, _ = saved_bytes(layer, x)
    assert nbytes / (x.numel() * x.element_size()) > 1.5


def ulp(dtype):
    """Spacing of ``dtype`` just above 1 (relative rounding: half of it)."""
    return torch.finfo(dtype).eps


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('low', [torch.bfloat16, torch.float16])
def test_low_precision_is_the_rounded_exact_result(path, low, path_of):
    """Low-precision input: statistics and arithmetic in float32, so the
    output and input gradient are the exact results (float64 reference on
    the same rounded values) rounded once to the low dtype; the parameter
    gradients (float32) are exact to float32."""
    path_of(path)
    layer = make_layer(SwitchableNorm2d)
    x = make_input((4, C, 6, 5)).to(low)
    grad_out = torch.randn(x.shape).to(low)
    want = reference_run(layer, x, grad_out, steps=1)
    got = run(layer, x, grad_out, path, steps=1)
    assert got[0][0].dtype == got[1][0].dtype == low
    # one rounding of a float32 result that is exact to ~1e-6 relative
    close = dict(rtol=ulp(low), atol=1e-5, check_dtype=False)
    torch.testing.assert_close(got[0][0], want[0][0], **close)
    torch.testing.assert_close(got[1][0], want[1][0], **close)
    for name in PARAMS:
        torch.testing.assert_close(got[2][name], want[2][name], atol=1e-5,
                                   rtol=1e-5, check_dtype=False,
                                   msg=lambda m: f'{name}: {m}')
    for name in ('running_mean', 'running_var'):
        torch.testing.assert_close(got[3][name], want[3][name], atol=1e-6,
                                   rtol=1e-6, check_dtype=False)


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


@pytest.mark.parametrize('numel,inside', [(32768, 1), (32767, 2)])
def test_small_ops_run_on_one_thread_from_the_grain_size(numel, inside):
    """At ATen's grain size (32768 elements) and above the block runs on one
    thread; below it, as it is; afterwards the thread count is restored."""
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with serial_small_ops(numel, torch.device('cpu')):
            assert torch.get_num_threads() == inside
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_small_ops_restore_the_threads_when_the_block_raises():
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ZeroDivisionError):
            with serial_small_ops(1 << 20, torch.device('cpu')):
                assert torch.get_num_threads() == 1
                1 / 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize('path', ['native', 'generic'])
def test_many_rows_run_small_ops_serially_and_restore_threads(
        path, path_of, monkeypatch):
    """The Python paths' per-(n, c) algebra (N*C >= 32768) runs on one
    thread and the thread count comes back; the results still match. (The
    compiled kernels do that algebra in C++, without ATen ops.)"""
    path_of(path)
    counts = []
    set_threads = torch.set_num_threads

    def recording(n):
        counts.append(n)
        set_threads(n)

    saved = torch.get_num_threads()
    shape = (16, 2048, 2, 2)
    layer = SwitchableNorm2d(2048)
    x = make_input(shape)
    grad_out = torch.randn(shape)
    want = reference_run(layer, x, grad_out, steps=1)
    try:
        set_threads(2)
        monkeypatch.setattr(torch, 'set_num_threads', recording)
        got = run(layer, x, grad_out, path, steps=1)
        assert torch.get_num_threads() == 2
    finally:
        monkeypatch.undo()
        set_threads(saved)
    # forward and backward each drop to one thread and come back to two
    assert counts.count(1) >= 2 and counts[-1] == 2, counts
    assert counts == [1, 2] * (len(counts) // 2), counts
    assert_all_close(got, want, 1e-5)


@pytest.mark.parametrize('path', PATHS)
def test_custom_batch_stats_fn_is_differentiated(path, path_of):
    """A batch_stats_fn other than the default pooling (SyncSN's all-reduce
    of sums, written here without communication) is differentiated through
    autograd; the result is the reference's, which pools the same way."""

    def sums_batch_stats(mean_in, var_in):
        n = mean_in.shape[0]
        mean_bn = mean_in.sum(0) / n
        var_bn = (var_in + mean_in.square()).sum(0) / n - mean_bn.square()
        return mean_bn, var_bn

    path_of(path)
    layer = make_layer(SwitchableNorm2d, torch.float64)
    x = make_input((4, C, 5, 3), torch.float64)
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    want = reference_run(layer, x, grad_out, steps=1)
    xi = x.clone().requires_grad_()
    params = [getattr(layer, n).detach().clone().requires_grad_()
              for n in PARAMS]
    y = sn_ops.switchable_norm(xi, *params, sums_batch_stats)
    y.backward(grad_out)
    torch.testing.assert_close(y, want[0][0])
    torch.testing.assert_close(xi.grad, want[1][0])
    for name, p in zip(PARAMS, params):
        torch.testing.assert_close(p.grad, want[2][name])


@pytest.mark.parametrize('training', [True, False])
def test_composite_path_gives_second_order_gradients(training, path_of):
    """What the docs offer for gradient penalties: MMSN_SN_PATH=composite
    (in training mode this differentiates the pooled BN statistics' own
    closed-form backward)."""
    path_of('composite')
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


@pytest.mark.parametrize('path', PATHS)
def test_fixed_batch_stats_equal_a_function_returning_them(path, path_of):
    """Fixed (running) statistics take the one-sweep forward on the CPU;
    the result, gradients included, is what a batch_stats_fn returning the
    same constants gives."""
    path_of(path)
    layer = make_layer(SwitchableNorm2d).eval()
    fixed = (layer.running_mean, layer.running_var)
    x = make_input((4, C, 5, 3))
    grad_out = torch.randn(x.shape)
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


def test_second_order_gradients_are_refused_by_the_layer_operators():
    """Their backward is not differentiable again: asking for it (a
    gradient penalty) is an error naming the path that can."""
    layer = make_layer(SwitchableNorm2d, torch.float64)
    x = make_input((3, C, 3, 3), torch.float64).requires_grad_()
    y = layer(x)
    assert 'SwitchableNormTrain' in y.grad_fn.name()
    with pytest.raises(RuntimeError, match='not differentiable twice.*'
                       'MMSN_SN_PATH=composite'):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@pytest.mark.parametrize('training', [True, False])
def test_composite_path_gives_second_order_gradients(training, path_of):
    path_of('composite')
    layer = make_layer(SwitchableNorm2d, torch.float64).train(training)
    x = make_input((3, C, 2, 3), torch.float64).requires_grad_()
    params = [layer.weight, layer.mean_weight]
    torch.autograd.gradgradcheck(
        lambda x, *p: layer(x).square().sum(), (x, *params))
