"""SN layers through the Triton backend's layer methods, as the layer
operators' CUDA kernels call them (mmsn.ops.layer_kernels.train/backward/
evaluate with a TritonBackend): how many kernels a layer launches, that
its Python code runs no other op (nothing is read back to the host), and
its results against the paper's equations in float64
(tests/sn_reference.py), running statistics and non-finite counts
included.

Without a GPU the kernels run on CPU tensors in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1); with one, on CUDA tensors.
"""
import contextlib
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmsn import SwitchableNorm2d, SwitchableNorm3d
from mmsn.ops import layer_kernels
from _layers import randomize_
from sn_reference import reference_sn

GPU = torch.cuda.is_available()
DEVICE = 'cuda' if GPU else 'cpu'
F64 = torch.float64

pytest.importorskip('triton', reason='triton is not installed')
try:
    tb = importlib.import_module('mmsn.ops.backends.triton')
except ImportError as err:  # a triton older than the backend supports
    pytest.skip(str(err), allow_module_level=True)
launch = importlib.import_module('mmsn.ops.backends.triton_launch')
if not GPU and not tb.kernels_interpreted():
    pytest.skip('no GPU, and Triton\'s interpreter is off',
                allow_module_level=True)

# tiny tiles and blocks, more programs than whole rows: rows split across
# programs, several channel and sample blocks in every pooling loop
SPLITTING = dict(tile=16, small_tile=2, min_programs=8)
MAX_TRAIN_LAUNCHES, MAX_EVAL_LAUNCHES = 4, 2
# ops that only allocate or view: no kernel, no host synchronisation
ALLOCATIONS_AND_VIEWS = {
    'empty', 'empty_like', 'empty_strided', 'new_empty', 'view',
    '_unsafe_view', 'reshape', 'select', 'slice', 'split', 'split_with_sizes',
    'unbind', 'alias', 'as_strided', 'detach'
}


class _Ops(TorchDispatchMode):
    """Names of the aten ops dispatched outside the kernels' launches."""

    def __init__(self):
        super().__init__()
        self.names, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counted(monkeypatch):
    """Counts the Triton launches (``.launches``) and the other aten ops
    (``.names``) inside the block."""
    ops = _Ops()
    ops.launches = 0
    real = launch._launch

    def counting(*args, **kwargs):
        ops.launches += 1
        ops.paused = True  # the interpreter's own tensor handling
        try:
            real(*args, **kwargs)
        finally:
            ops.paused = False

    monkeypatch.setattr(launch, '_launch', counting)
    with ops:
        yield ops
    monkeypatch.setattr(launch, '_launch', real)


def make_layer(cls, c, seed=0, **kwargs):
    """A float32 layer with random parameters and running statistics."""
    return randomize_(cls(c, **kwargs), seed, batches_tracked=3).to(DEVICE)


def make_x(shape, layout='contiguous', dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand((1, shape[1]) + (1, ) * (len(shape) - 2),
                       generator=g) * 3 + 0.2
    x = (torch.randn(shape, generator=g, dtype=F64) * scale + 2.0)
    x = x.to(dtype).to(DEVICE)
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    return x


def params(layer):
    """What a layer hands the operators: parameters (detached: the C++
    autograd calls the kernels below autograd) and its own buffers."""
    p = {k: v.detach() for k, v in layer.named_parameters()}
    return (p.get('weight'), p.get('bias'), p['mean_weight'],
            p['var_weight'])


def train(backend, layer, x, update_stats=True):
    b = layer._buffers
    return layer_kernels.train(
        backend, x, *params(layer), b['running_mean'], b['running_var'],
        b['num_batches_tracked'], b['nonfinite'], True, layer.momentum,
        layer.moving_average, layer.eps, layer.unbiased, update_stats)


def backward(backend, layer, dy, x, mean_in, var_in, batch_stats=True):
    b = layer._buffers
    weight, _, mean_weight, var_weight = params(layer)
    return layer_kernels.backward(
        backend, dy, x, mean_in, var_in, weight, mean_weight, var_weight,
        b['running_mean'], b['running_var'], True, batch_stats, layer.eps,
        layer.unbiased, True)


def evaluate(backend, layer, x):
    b = layer._buffers
    return layer_kernels.evaluate(
        backend, x, *params(layer), b['running_mean'], b['running_var'],
        b['nonfinite'], True, layer.eps, layer.unbiased)


def reference(layer, x, dy, training):
    """y, (dx, d_weight, d_bias, d_mean_weight, d_var_weight) and the BN
    statistics of the batch (training), in float64 on the CPU; d_weight is
    taken at gamma = 1 without affine parameters (as the operators do)."""
    c = x.shape[1]
    weight, bias, mean_weight, var_weight = params(layer)
    if weight is None:
        weight, bias = torch.ones(c), torch.zeros(c)
    leaves = [t.detach().cpu().double().requires_grad_()
              for t in (x, weight, bias, mean_weight, var_weight)]
    running = None
    if layer.using_bn:
        running = (layer.running_mean.cpu().double(),
                   layer.running_var.cpu().double())
    y, batch = reference_sn(*leaves, running, training=training,
                            unbiased=layer.unbiased, eps=layer.eps)
    grads = torch.autograd.grad(y, leaves, dy.cpu().double())
    return y.detach(), grads, batch


def expected_running(layer, batch, before):
    """The buffers after one finite batch (mmsn's documented rule)."""
    mean, var, seen = (t.cpu().double() for t in before)
    seen = seen + 1
    factor = layer.momentum
    if factor is None or not layer.moving_average:
        factor = 1.0 / seen
    new_mean = mean + factor * (batch[0] - mean)
    if layer.moving_average:
        new_var = var + factor * (batch[1] - var)
    else:
        second = var + mean**2
        new_var = second + factor * (batch[1] + batch[0]**2 - second) - \
            new_mean**2
    return new_mean, new_var, seen


def close(actual, expected, tol, name):
    torch.testing.assert_close(actual.cpu().double(), expected.double(),
                               atol=tol, rtol=tol,
                               msg=lambda m: f'{name}: {m}')


LAYERS = [
    # (layer class, input shape, layout, layer options, backend options)
    (SwitchableNorm2d, (3, 5, 4, 3), 'contiguous', {}, {}),
    (SwitchableNorm2d, (3, 5, 4, 3), 'contiguous', dict(using_bn=False), {}),
    (SwitchableNorm2d, (3, 5, 4, 3), 'contiguous', dict(momentum=None), {}),
    (SwitchableNorm2d, (3, 5, 4, 3), 'contiguous',
     dict(moving_average=False), {}),
    (SwitchableNorm2d, (3, 5, 4, 7), 'channels_last', {}, SPLITTING),
    (SwitchableNorm2d, (2, 3, 5, 8), 'contiguous', dict(unbiased=False),
     SPLITTING),
    (SwitchableNorm3d, (2, 5, 2, 3, 3), 'channels_last',
     dict(affine=False), {}),
]
LAYER_IDS = ['sn2d', 'no-bn', 'cumulative', 'batch-average', 'cl-split',
             'nchw-split-biased', 'sn3d-cl-noaffine']


@pytest.mark.parametrize('cls,shape,layout,options,tiles', LAYERS,
                         ids=LAYER_IDS)
def test_layer_launches_and_matches_the_equations(monkeypatch, cls, shape,
                                                  layout, options, tiles):
    layer = make_layer(cls, shape[1], **options)
    backend = tb.TritonBackend(**tiles)
    x = make_x(shape, layout)
    dy = make_x(shape, seed=7) - 2.0
    y_ref, grads_ref, batch = reference(layer, x, dy, training=True)
    if layer.using_bn:
        before = [t.clone() for t in (layer.running_mean, layer.running_var,
                                      layer.num_batches_tracked)]
    train(backend, make_layer(cls, shape[1], **options), x)  # tickets
    with counted(monkeypatch) as run:
        y, mean_in, var_in = train(backend, layer, x)
        grads = backward(backend, layer, dy, x, mean_in, var_in)
    assert run.launches <= MAX_TRAIN_LAUNCHES
    assert set(run.names) <= ALLOCATIONS_AND_VIEWS, run.names
    assert y.dtype == x.dtype and y.stride() == x.stride()
    close(y, y_ref, 1e-5, 'y')
    names = ['dx', 'd_weight', 'd_bias', 'd_mean_weight', 'd_var_weight']
    for name, got, want in zip(names, grads, grads_ref):
        if name == 'dx':
            assert got.stride() == x.stride()
        close(got, want, 1e-5 if name == 'dx' else 5e-5, name)
    assert torch.equal(layer.nonfinite.cpu(), torch.zeros(4,
                                                          dtype=torch.long))
    if layer.using_bn:
        mean, var, seen = expected_running(layer, batch, before)
        close(layer.running_mean, mean, 1e-6, 'running_mean')
        close(layer.running_var, var, 1e-6, 'running_var')
        assert layer.num_batches_tracked.item() == seen.item()

    layer.eval()
    y_ref, grads_ref, _ = reference(layer, x, dy, training=False)
    with counted(monkeypatch) as run:
        y, mean_in, var_in = evaluate(backend, layer, x)
    assert run.launches <= MAX_EVAL_LAUNCHES
    assert set(run.names) <= ALLOCATIONS_AND_VIEWS, run.names
    close(y, y_ref, 1e-5, 'y (eval)')
    # backward of an eval forward: the running statistics are constants
    grads = backward(backend, layer, dy, x, mean_in, var_in,
                     batch_stats=False)
    for name, got, want in zip(names, grads, grads_ref):
        close(got, want, 1e-5 if name == 'dx' else 5e-5, f'{name} (eval)')
    assert torch.equal(layer.nonfinite.cpu(), torch.zeros(4,
                                                          dtype=torch.long))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_layer(dtype):
    layer = make_layer(SwitchableNorm2d, 5)
    x = make_x((3, 5, 4, 7), 'channels_last', dtype)
    dy = (make_x((3, 5, 4, 7), seed=7) - 2.0).to(dtype)
    y_ref, grads_ref, _ = reference(layer, x, dy, training=True)
    backend = tb.TritonBackend(**SPLITTING)
    y, mean_in, var_in = train(backend, layer, x)
    grads = backward(backend, layer, dy, x, mean_in, var_in)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert y.dtype == grads[0].dtype == dtype
    close(y, y_ref, tol, 'y')
    close(grads[0], grads_ref[0], tol, 'dx')
    for name, got, want in zip(['d_weight', 'd_bias', 'd_mean_weight',
                                'd_var_weight'], grads[1:], grads_ref[1:]):
        assert got.dtype == torch.float32
        close(got, want, 1e-4, name)  # float32 sums of the rounded input


def test_share_gradients_keep_their_precision_for_a_large_mean():
    """With a mean of 1e4 the logit gradients are small differences of
    large share gradients; summed around each row's mixed statistic they
    stay within float32 rounding of the data (summed plainly: 1.5e-3)."""
    layer = make_layer(SwitchableNorm2d, 8)
    x = make_x((4, 8, 5, 5)) + 1e4
    dy = make_x((4, 8, 5, 5), seed=7) - 2.0
    _, grads_ref, _ = reference(layer, x, dy, training=True)
    backend = tb.TritonBackend()
    y, mean_in, var_in = train(backend, layer, x)
    grads = backward(backend, layer, dy, x, mean_in, var_in)
    close(grads[3], grads_ref[3], 3e-4, 'd_mean_weight')
    close(grads[4], grads_ref[4], 3e-4, 'd_var_weight')


@pytest.mark.parametrize('value', [1e4, 12345.678])
@pytest.mark.parametrize('using_bn', [True, False], ids=['bn', 'no-bn'])
def test_constant_input_gives_exactly_beta(using_bn, value):
    """Equal IN, LN and BN statistics mix to exactly that statistic, so
    x - mean is exactly 0 although the shares do not sum to exactly 1 (with
    these logits, the plain sum of shares times 1e4 is not 1e4)."""
    layer = make_layer(SwitchableNorm2d, 5, seed=2, using_bn=using_bn)
    x = torch.full((3, 5, 4, 3), value, device=DEVICE)
    y, mean_in, var_in = train(tb.TritonBackend(**SPLITTING), layer, x)
    assert torch.equal(y, layer.bias.detach().view(1, 5, 1, 1).expand_as(y))
    assert torch.equal(var_in, torch.zeros_like(var_in))


@pytest.mark.parametrize('tiles', [{}, SPLITTING], ids=['whole', 'split'])
@pytest.mark.parametrize('bad,slot', [(float('nan'), 0), (1e20, 1)],
                         ids=['nan-input', 'overflow'])
def test_nonfinite_batch_leaves_running_stats_and_is_counted(
        tiles, bad, slot):
    """NaN in the input: counted in slot 0; a finite input whose float32
    variance overflows (1e20 * randn): slot 1. The running statistics and
    num_batches_tracked do not move; an eval call counts in slot 2."""
    layer = make_layer(SwitchableNorm2d, 5)
    backend = tb.TritonBackend(**tiles)
    x = make_x((3, 5, 4, 3))
    if bad != bad:
        x[1, 2, 0, 1] = bad
    else:
        x = x * bad
    before = [t.clone() for t in (layer.running_mean, layer.running_var,
                                  layer.num_batches_tracked)]
    train(backend, layer, x)
    for name, t, old in zip(['running_mean', 'running_var',
                             'num_batches_tracked'],
                            (layer.running_mean, layer.running_var,
                             layer.num_batches_tracked), before):
        assert torch.equal(t, old), name
    expected = torch.zeros(4, dtype=torch.long)
    expected[slot] = 1
    assert torch.equal(layer.nonfinite.cpu(), expected)
    train(backend, layer, make_x((3, 5, 4, 3)), update_stats=False)
    evaluate(backend, layer, x)
    expected[2] = 1
    assert torch.equal(layer.nonfinite.cpu(), expected)
    evaluate(backend, layer, make_x((3, 5, 4, 3)))  # finite: not counted
    assert torch.equal(layer.nonfinite.cpu(), expected)


def test_outputs_start_on_16_byte_boundaries():
    """torch.compile assumes the layer operators' outputs are aligned as
    their fake kernels allocate them, and checks it: with N * C = 15 and 3
    shares, plain views into one buffer would not be."""
    layer = make_layer(SwitchableNorm2d, 5)
    backend = tb.TritonBackend()
    x = make_x((3, 5, 4, 3))
    outputs = list(train(backend, layer, x))
    outputs += backward(backend, layer, x, x, outputs[1], outputs[2])
    outputs += evaluate(backend, layer, x)
    for i, t in enumerate(outputs):
        assert t.data_ptr() % 16 == 0, i


def test_update_stats_false_moves_nothing():
    """Activation checkpointing's recomputation passes update_stats=False."""
    layer = make_layer(SwitchableNorm2d, 5)
    before = [t.clone() for t in layer.buffers()]
    train(tb.TritonBackend(), layer, make_x((3, 5, 4, 3)), update_stats=False)
    for t, old in zip(layer.buffers(), before):
        assert torch.equal(t, old)


def test_tickets_are_left_zeroed():
    """Each kernel resets the counters it used: the next launch relies on
    finding them at 0."""
    layer = make_layer(SwitchableNorm2d, 5)
    backend = tb.TritonBackend(**SPLITTING)
    x = make_x((3, 5, 4, 7), 'channels_last')
    y, mean_in, var_in = train(backend, layer, x)
    backward(backend, layer, x, x, mean_in, var_in)
    evaluate(backend, layer, x)
    buffers = list(backend._tickets._buffers.values())
    assert buffers and all(not b.any() for b in buffers)


@pytest.mark.skipif(not GPU, reason='on a GPU, programs run concurrently; '
                    'the interpreter runs them one after another')
def test_gradients_do_not_depend_on_scheduling():
    layer = make_layer(SwitchableNorm2d, 64)
    backend = tb.TritonBackend(tile=256, small_tile=64, min_programs=4096)
    x = make_x((8, 64, 24, 24))
    dy = make_x((8, 64, 24, 24), seed=7) - 2.0
    y, mean_in, var_in = train(backend, layer, x)
    first = backward(backend, layer, dy, x, mean_in, var_in)
    for _ in range(5):
        again = backward(backend, layer, dy, x, mean_in, var_in)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
