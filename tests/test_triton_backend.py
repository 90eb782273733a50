"""mmsn.ops.backends.triton.TritonBackend against float64 references.

Without a GPU the kernels run on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py before triton is imported); with
one, the same tests run the compiled kernels on CUDA tensors. Every method
of the RowBackend interface (the four passes and the fused whole-layer
methods the functional core calls) is checked against formulas written out
below in float64; whole SN layers run through mmsn with the Triton path
forced against the composite path and the paper's equations; and
tests/triton_compile_check.py compiles every kernel for sm_90 with the
installed triton, which the interpreter does not. The layer operators'
kernels (layer_train, ...) are tested in tests/test_triton_layer.py.
"""
import functools
import importlib
import os
import subprocess
import sys

import pytest
import torch

GPU = torch.cuda.is_available()
DEVICE = 'cuda' if GPU else 'cpu'

pytest.importorskip('triton', reason='triton is not installed')
try:
    tb = importlib.import_module('mmsn.ops.backends.triton')
except ImportError as err:  # a triton older than the backend supports
    pytest.skip(str(err), allow_module_level=True)
backends = importlib.import_module('mmsn.ops.backends')
if not GPU and not tb.kernels_interpreted():
    pytest.skip('no GPU, and Triton\'s interpreter is off (tests/conftest.py '
                'sets TRITON_INTERPRET=1 unless the environment sets it)',
                allow_module_level=True)
F64 = torch.float64
# small tiles and a demand for more programs than whole rows give: rows of
# a few dozen positions then span several tiles per program and are split
# across programs, and the per-sample kernels walk several channel blocks
SPLITTING = dict(tile=16, small_tile=2, min_programs=8)


def make_x(shape, layout='contiguous', dtype=torch.float32, seed=0,
           offset=2.0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand((1, shape[1]) + (1, ) * (len(shape) - 2),
                       generator=g) * 3 + 0.2
    x = (torch.randn(shape, generator=g, dtype=F64) * scale + offset)
    x = x.to(dtype).to(DEVICE)
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    return x


def rows_of(x):
    """The (N, C, L) view the backend takes (strided for channels_last)."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    assert x3.data_ptr() == x.data_ptr()
    return x3


def rand(*shape, seed=1, low=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=F64) + low).to(DEVICE)


def shares(k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(k, generator=g, dtype=F64), 0).to(DEVICE)


def correction_for(length):
    return 1 if length > 1 else 0


# -- float64 references, from the paper's equations ------------------------
def ref_moments(x3, correction):
    x = x3.to(F64)
    mean = x.sum(2) / x.shape[2]
    var = ((x - mean[..., None])**2).sum(2) / (x.shape[2] - correction)
    return mean, var


def ref_sn(x3, weight, bias, w, u, batch, eps, correction, pooled_bn=False):
    """SN output from x (float64, differentiable in every input). BN
    statistics: pooled from this x when ``pooled_bn``, else ``batch``
    (constants) or None (no BN branch)."""
    n, c, _ = x3.shape
    mean_in, var_in = ref_moments(x3, correction)
    second = var_in + mean_in**2
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = second.mean(1, keepdim=True) - mean_ln**2
    mean = w[0] * mean_in + w[1] * mean_ln
    var = u[0] * var_in + u[1] * var_ln
    if pooled_bn:
        mean_bn = mean_in.mean(0)
        batch = (mean_bn, second.mean(0) - mean_bn**2)
    if batch is not None:
        mean = mean + w[2] * batch[0]
        var = var + u[2] * batch[1]
    y = (x3 - mean[..., None]) / torch.sqrt(var[..., None] + eps)
    if weight is not None:
        y = y * weight[:, None]
    if bias is not None:
        y = y + bias[:, None]
    return y


def f32(t):
    return None if t is None else t.float()


def close(actual, expected, tol, name=''):
    torch.testing.assert_close(actual.to(F64), expected.to(F64).to(
        actual.device), atol=tol, rtol=tol, msg=lambda m: f'{name}: {m}')


# tolerance of results in the input's dtype (statistics are float32)
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

# (shape, layout, backend options)
CASES = [
    ((2, 3, 5), 'contiguous', {}),  # odd length, one tile
    ((3, 4, 1), 'contiguous', {}),  # one position: correction 0
    ((2, 3, 37), 'contiguous', SPLITTING),  # several tiles, split rows
    ((2, 5, 3, 5), 'channels_last', {}),
    ((2, 5, 4, 7), 'channels_last', SPLITTING),
    ((2, 3, 2, 3, 3), 'channels_last', {}),  # 5D channels_last_3d
]
CASE_IDS = ['odd', 'L1', 'split', 'cl4d', 'cl4d-split', 'cl5d']


@pytest.mark.parametrize('shape,layout,opts', CASES, ids=CASE_IDS)
def test_moments(shape, layout, opts):
    x3 = rows_of(make_x(shape, layout))
    correction = correction_for(x3.shape[2])
    mean, var, _ = tb.TritonBackend(**opts).moments(x3, correction)
    ref_mean, ref_var = ref_moments(x3, correction)
    assert mean.dtype == var.dtype == torch.float32
    assert mean.shape == var.shape == x3.shape[:2]
    close(mean, ref_mean, 1e-6, 'mean')
    close(var, ref_var, 1e-5, 'var')


@pytest.mark.parametrize('opts', [{}, SPLITTING], ids=['whole', 'split'])
def test_moments_do_not_cancel_for_a_large_mean(opts):
    """1e4 + N(0, 1) in float32: E[x^2] - E[x]^2 would lose every digit."""
    x3 = rows_of(make_x((2, 3, 41), offset=1e4))
    mean, var, _ = tb.TritonBackend(**opts).moments(x3, 1)
    ref_mean, ref_var = ref_moments(x3, 1)
    close(mean, ref_mean, 1e-6, 'mean')
    torch.testing.assert_close(var.to(F64), ref_var, rtol=1e-5, atol=0)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_moments_of_low_precision_input_accumulate_in_float32(dtype):
    x3 = rows_of(make_x((2, 3, 37), dtype=dtype))
    mean, var, _ = tb.TritonBackend(**SPLITTING).moments(x3, 1)
    ref_mean, ref_var = ref_moments(x3, 1)  # of the rounded input
    assert mean.dtype == torch.float32
    close(mean, ref_mean, 1e-5, 'mean')
    close(var, ref_var, 1e-5, 'var')


@pytest.mark.parametrize('shape,layout,opts', CASES[2:4],
                         ids=CASE_IDS[2:4])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_row_passes(shape, layout, opts, dtype):
    """rows_affine, rows_grad_sums and rows_grad_input."""
    backend = tb.TritonBackend(**opts)
    x3 = rows_of(make_x(shape, layout, dtype))
    dy3 = rows_of(make_x(shape, 'contiguous', dtype, seed=3, offset=0.5))
    n, c, _ = x3.shape
    mean, a, b, k = (rand(n, c, seed=s) for s in (4, 5, 6, 7))
    xd, dyd = x3.to(F64), dy3.to(F64)

    y = backend.rows_affine(x3, None, mean.float(), a.float(), b.float())
    assert y.dtype == dtype and y.stride() == x3.stride()
    close(y, (xd - mean[..., None]) * a[..., None] + b[..., None],
          OUT_TOL[dtype], 'affine')

    dot, sum_dy = backend.rows_grad_sums(dy3, x3, mean.float())
    close(dot, (dyd * (xd - mean[..., None])).sum(2), 1e-5, 'dot')
    close(sum_dy, dyd.sum(2), 1e-5, 'sum_dy')

    dx = backend.rows_grad_input(dy3, x3, mean.float(), a.float(), b.float(),
                                 k.float())
    assert dx.dtype == dtype and dx.stride() == x3.stride()
    close(dx, a[..., None] * dyd + b[..., None] * (xd - mean[..., None]) +
          k[..., None], OUT_TOL[dtype], 'grad_input')


def layer_inputs(c, using_bn, affine, seed=0):
    k = 3 if using_bn else 2
    weight = rand(c, seed=seed + 10, low=0.5) if affine else None
    bias = rand(c, seed=seed + 11, low=-0.5) if affine else None
    batch = None
    if using_bn:
        batch = (rand(c, seed=seed + 12, low=1.0),
                 rand(c, seed=seed + 13, low=0.5))
    return weight, bias, shares(k, seed + 14), shares(k, seed + 15), batch


@pytest.mark.parametrize('shape,layout,opts', CASES, ids=CASE_IDS)
@pytest.mark.parametrize('using_bn,affine', [(True, True), (False, False)],
                         ids=['bn-affine', 'nobn-noaffine'])
def test_sn_normalize_and_forward_fixed(shape, layout, opts, using_bn,
                                        affine):
    backend = tb.TritonBackend(**opts)
    x3 = rows_of(make_x(shape, layout))
    correction = correction_for(x3.shape[2])
    weight, bias, w, u, batch = layer_inputs(x3.shape[1], using_bn, affine)
    eps = 1e-5
    expected = ref_sn(x3.to(F64), weight, bias, w, u, batch, eps, correction)
    args = (f32(weight), f32(bias), w.float(), u.float(),
            *(tuple(t.float() for t in batch) if batch else (None, None)),
            eps)
    # the training path gets moments from the reference
    mean_in, var_in = ref_moments(x3, correction)
    y = backend.sn_normalize(x3, mean_in.float(), var_in.float(), *args)
    assert y.stride() == x3.stride()
    close(y, expected, 1e-5, 'sn_normalize')

    y, mean, var = backend.sn_forward_fixed(x3, *args, correction)
    assert y.stride() == x3.stride()
    close(y, expected, 1e-5, 'sn_forward_fixed')
    close(mean, mean_in, 1e-6, 'mean_in')
    close(var, var_in, 1e-5, 'var_in')


def reference_grads(x3, dy3, weight, w, u, batch, eps, correction,
                    pooled_bn):
    """(dx, d_gamma, d_beta, d_mean_share, d_var_share) by float64
    autograd of ref_sn; d_gamma is taken at gamma = 1 without weight."""
    c = x3.shape[1]
    leaves = [
        x3.to(F64).detach().requires_grad_(),
        (weight if weight is not None else torch.ones(
            c, dtype=F64, device=x3.device)).detach().requires_grad_(),
        torch.zeros(c, dtype=F64, device=x3.device, requires_grad=True),
        w.detach().requires_grad_(),
        u.detach().requires_grad_()
    ]
    xd, g, b, wd, ud = leaves
    y = ref_sn(xd, g, b, wd, ud, None if pooled_bn else batch, eps,
               correction, pooled_bn=pooled_bn)
    return torch.autograd.grad(y, leaves, dy3.to(F64))


BACKWARD_MODES = [
    # (using_bn, pooled_bn, affine, need_dx)
    (True, True, True, True),  # training: BN statistics of this batch
    (True, False, True, True),  # BN statistics are constants
    (False, False, True, True),  # no BN branch
    (True, True, False, True),  # weight None
    (True, True, True, False),  # parameters only
]
BACKWARD_IDS = ['pooled', 'fixed-bn', 'no-bn', 'no-weight', 'no-dx']


@pytest.mark.parametrize('shape,layout,opts', CASES, ids=CASE_IDS)
@pytest.mark.parametrize('mode', BACKWARD_MODES, ids=BACKWARD_IDS)
def test_sn_backward(shape, layout, opts, mode):
    using_bn, pooled_bn, affine, need_dx = mode
    backend = tb.TritonBackend(**opts)
    x3 = rows_of(make_x(shape, layout))
    dy3 = rows_of(make_x(shape, seed=5, offset=0.3))
    n, c, length = x3.shape
    correction = correction_for(length)
    weight, _, w, u, batch = layer_inputs(c, using_bn, affine)
    eps = 1e-5
    mean_in, var_in = ref_moments(x3, correction)
    if pooled_bn:  # what the Function mixes: pooled from the IN moments
        mean_bn = mean_in.mean(0)
        batch = (mean_bn, (var_in + (mean_in - mean_bn)**2).mean(0))
    grads = backend.sn_backward(
        dy3, x3, mean_in.float(), var_in.float(), f32(weight), w.float(),
        u.float(), *(tuple(t.float() for t in batch) if batch else
                     (None, None)), pooled_bn, eps, correction, need_dx)
    expected = reference_grads(x3, dy3, weight, w, u, batch, eps, correction,
                               pooled_bn)
    names = ['dx', 'd_gamma', 'd_beta', 'd_mean_share', 'd_var_share']
    for name, got, ref in zip(names, grads, expected):
        if name == 'dx' and not need_dx:
            assert got.numel() == 0
            continue
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        # sums over every element: float32 rounding grows with their count
        close(got, ref, 1e-5 if name == 'dx' else 2e-5, name)
    if need_dx:
        assert grads[0].stride() == x3.stride()


@pytest.mark.parametrize('grad_layout', ['expanded', 'channels_last'])
def test_backward_takes_any_layout_of_the_gradient(grad_layout):
    """dy of ``y.sum().backward()`` is an expanded scalar (stride 0);
    dy may be channels_last while x is not."""
    backend = tb.TritonBackend(**SPLITTING)
    shape = (2, 5, 4, 7)
    x3 = rows_of(make_x(shape))
    if grad_layout == 'expanded':
        dy3 = torch.full((1, 1, 1), 0.7, device=DEVICE).expand(x3.shape)
    else:
        dy3 = rows_of(make_x(shape, 'channels_last', seed=5, offset=0.3))
    weight, _, w, u, _ = layer_inputs(5, True, True)
    mean_in, var_in = ref_moments(x3, 1)
    mean_bn = mean_in.mean(0)
    batch = (mean_bn, (var_in + (mean_in - mean_bn)**2).mean(0))
    grads = backend.sn_backward(dy3, x3, mean_in.float(), var_in.float(),
                                f32(weight), w.float(), u.float(),
                                *(t.float() for t in batch), True, 1e-5, 1,
                                True)
    expected = reference_grads(x3, dy3, weight, w, u, None, 1e-5, 1, True)
    for name, got, ref in zip(['dx', 'd_gamma', 'd_beta', 'd_mean_share',
                               'd_var_share'], grads, expected):
        close(got, ref, 2e-5, name)


def test_empty_batch():
    backend = tb.TritonBackend()
    x3 = torch.zeros(0, 3, 5, device=DEVICE)
    mean, var, _ = backend.moments(x3, 1)
    assert mean.shape == var.shape == (0, 3)
    one = torch.ones(3, device=DEVICE)
    shares = torch.full((3, ), 1 / 3, device=DEVICE)
    y = backend.sn_normalize(x3, mean, var, one, one, shares, shares, one,
                             one, 1e-5)
    assert y.shape == x3.shape
    dx, d_gamma, _, d_w, _ = backend.sn_backward(
        x3, x3, mean, var, one, shares, shares, one, one, True, 1e-5, 1,
        True)
    assert dx.shape == x3.shape
    assert torch.equal(d_gamma, torch.zeros(3, device=DEVICE))
    assert torch.equal(d_w, torch.zeros(3, device=DEVICE))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_layer(dtype):
    """bf16/fp16 in and out, float32 statistics: output and gradients
    within the input dtype's rounding of the float64 results."""
    backend = tb.TritonBackend(**SPLITTING)
    x3 = rows_of(make_x((2, 5, 4, 7), 'channels_last', dtype))
    dy3 = rows_of(make_x((2, 5, 4, 7), dtype=dtype, seed=5, offset=0.3))
    weight, bias, w, u, _ = layer_inputs(5, True, True)
    mean_in, var_in, _ = backend.moments(x3, 1)
    mean_bn = mean_in.mean(0)
    batch = (mean_bn, (var_in + (mean_in - mean_bn)**2).mean(0))
    y = backend.sn_normalize(x3, mean_in, var_in, f32(weight), f32(bias),
                             w.float(), u.float(), *batch, 1e-5)
    assert y.dtype == dtype and y.stride() == x3.stride()
    expected = ref_sn(x3.to(F64), weight, bias, w, u, None, 1e-5, 1,
                      pooled_bn=True)
    close(y, expected, OUT_TOL[dtype], 'y')
    grads = backend.sn_backward(dy3, x3, mean_in, var_in, f32(weight),
                                w.float(), u.float(), *batch, True, 1e-5, 1,
                                True)
    ref = reference_grads(x3, dy3, weight, w, u, None, 1e-5, 1, True)
    assert grads[0].dtype == dtype
    close(grads[0], ref[0], OUT_TOL[dtype], 'dx')
    for name, got, want in zip(['d_gamma', 'd_beta', 'd_mean_share',
                                'd_var_share'], grads[1:], ref[1:]):
        close(got, want, 1e-4, name)  # float32 sums of the rounded input


# -- a whole SN layer through mmsn with the Triton path forced -------------
triton_path = functools.partial(backends.forced, 'triton')
composite_path = functools.partial(backends.forced, 'composite')


@pytest.mark.parametrize('shape,layout', [((3, 4, 5, 3), 'contiguous'),
                                          ((2, 5, 3, 5), 'channels_last'),
                                          ((4, 3, 1, 1), 'contiguous')],
                         ids=['2d', 'cl', '1x1'])
@pytest.mark.parametrize('training,using_bn', [(True, True), (False, True),
                                               (True, False)],
                         ids=['train', 'eval', 'nobn'])
def test_layer_through_backend_equals_composite(shape, layout, training,
                                                using_bn):
    mixed_norm = importlib.import_module('mmsn.ops').mixed_norm
    x = make_x(shape, layout)
    dy = make_x(shape, seed=9, offset=0.0)
    c = shape[1]
    weight, bias, w, u, running = layer_inputs(c, using_bn, True, seed=3)
    params = [t.float().requires_grad_() for t in (weight, bias, w, u)]
    running = tuple(t.float() for t in running) if running else None

    def batch_stats():
        if not using_bn:
            return None
        if training:
            return importlib.import_module(
                'mmsn.ops').batch_stats_from_instance
        return running

    xb = x.clone().requires_grad_()
    with triton_path():
        y = mixed_norm(xb, *params, batch_stats(), 1e-5, True)
    y.backward(dy)
    got = [y, xb.grad] + [p.grad for p in params]
    for p in params:
        p.grad = None
    xc = x.clone().requires_grad_()
    with composite_path():
        y_ref = mixed_norm(xc, *params, batch_stats(), 1e-5, True)
    y_ref.backward(dy)
    expected = [y_ref, xc.grad] + [p.grad for p in params]
    names = ['y', 'dx', 'd_weight', 'd_bias', 'd_mean_share', 'd_var_share']
    for name, a, b in zip(names, got, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5,
                                   msg=lambda m: f'{name}: {m}')


def check_layer(device, cls, shape, layout, dtype, using_bn, tol):
    """An SN layer on ``device`` (whatever path mmsn picks there) against
    the paper's equations in float64 on the CPU: output, every gradient,
    running statistics over a training step, then eval."""
    from test_switchable_norm import make_input, make_layer, reference_for
    layer = make_layer(cls, using_bn, torch.float32).to(device)
    ref_layer = make_layer(cls, using_bn, F64)
    x = make_input(shape, F64)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(7),
                           dtype=F64)
    for training in (True, False):
        layer.train(training)
        running_before = [t.clone() for t in layer.buffers()
                          if t.is_floating_point()]
        xd = x.to(device, dtype)
        if layout == 'channels_last':
            xd = xd.contiguous(memory_format=torch.channels_last
                               if xd.dim() == 4 else torch.channels_last_3d)
        xd.requires_grad_()
        x_ref = xd.detach().double().cpu().requires_grad_()
        y = layer(xd)
        y_ref, batch = reference_for(ref_layer, x_ref, training)
        assert y.dtype == dtype
        if y.dim() == 4:
            assert y.is_contiguous(memory_format=(
                torch.channels_last if layout == 'channels_last' else
                torch.contiguous_format))
        close(y, y_ref, tol, f'y (training={training})')
        dy = grad_out.to(device, dtype)
        y.backward(dy)
        y_ref.backward(dy.double().cpu())
        close(xd.grad, x_ref.grad, tol, 'dx')
        for name in ('weight', 'bias', 'mean_weight', 'var_weight'):
            close(getattr(layer, name).grad,
                  getattr(ref_layer, name).grad, max(tol, 1e-4), name)
            getattr(layer, name).grad = None
            getattr(ref_layer, name).grad = None
        if using_bn and training:
            m = layer.momentum
            close(layer.running_mean,
                  (1 - m) * running_before[0].double().cpu() + m * batch[0],
                  max(tol, 1e-5), 'running_mean')
            close(layer.running_var,
                  (1 - m) * running_before[1].double().cpu() + m * batch[1],
                  max(tol, 1e-5), 'running_var')
            # the reference's eval uses the updated running statistics
            ref_layer.running_mean.copy_(layer.running_mean.double().cpu())
            ref_layer.running_var.copy_(layer.running_var.double().cpu())


@pytest.mark.parametrize('layout', ['contiguous', 'channels_last'])
def test_layer_with_triton_forced_matches_the_equations(layout):
    """The SN module, training step then eval, with every call on the Triton
    path (interpreted on CPU tensors without a GPU)."""
    from mmsn import SwitchableNorm2d
    with triton_path():
        assert backends.backend_name(DEVICE) == 'triton'
        check_layer(DEVICE, SwitchableNorm2d, (3, 6, 5, 3), layout,
                    torch.float32, True, OUT_TOL[torch.float32])


@pytest.mark.skipif(not GPU, reason='needs a GPU: the whole layer as mmsn '
                    'runs it on CUDA tensors')
@pytest.mark.parametrize('dim,layout,dtype', [
    (4, 'contiguous', torch.float32), (4, 'channels_last', torch.float32),
    (5, 'channels_last', torch.float32), (4, 'contiguous', torch.bfloat16)
], ids=['2d', '2d-cl', '3d-cl', '2d-bf16'])
@pytest.mark.parametrize('using_bn', [True, False], ids=['bn', 'nobn'])
def test_layer_on_cuda_matches_the_equations(dim, layout, dtype, using_bn):
    from mmsn import SwitchableNorm2d, SwitchableNorm3d
    cls, shape = ((SwitchableNorm2d, (4, 6, 9, 7)) if dim == 4 else
                  (SwitchableNorm3d, (3, 6, 2, 3, 5)))
    check_layer(DEVICE, cls, shape, layout, dtype, using_bn, OUT_TOL[dtype])


# -- plan, errors, compilation ---------------------------------------------
def test_tiles_follow_the_layout_and_split_only_long_rows():
    # NCHW: tiles long along positions; 64 rows of 12544 are split to fill
    # 528 programs (4 per multiprocessor of an H100), 65536 rows of 49 not
    few_long = tb.plan_tiles(1, 64, 12544, False, 4096, min_programs=528)
    assert few_long.block_l >= 256 and few_long.splits > 1
    assert few_long.programs >= 528 or few_long.chunk == few_long.block_l
    assert (few_long.splits - 1) * few_long.chunk < 12544 <= \
        few_long.splits * few_long.chunk
    many_short = tb.plan_tiles(32, 2048, 49, False, 4096,
                               min_programs=528)
    assert many_short.splits == 1 and many_short.block_l == 64
    assert many_short.block_c * many_short.block_l <= 4096
    # channels_last: tiles long along channels; 64 tiles of whole rows are
    # split to fill the programs
    cl = tb.plan_tiles(32, 256, 3136, True, 4096, min_programs=528)
    assert (cl.block_c, cl.block_l) == (128, 32)
    assert cl.programs >= 528 and cl.chunk % cl.block_l == 0


def test_bad_input_is_a_clear_error(monkeypatch):
    backend = tb.TritonBackend()
    x3 = torch.zeros(2, 3, 4, dtype=F64, device=DEVICE)
    with pytest.raises(TypeError, match='float64'):
        backend.moments(x3, 1)
    with pytest.raises(ValueError, match='degrees of freedom'):
        backend.moments(torch.zeros(2, 3, 1, device=DEVICE), 1)
    x3 = x3.float()
    one = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match='pooled_bn needs'):
        backend.sn_backward(x3, x3, x3[..., 0], x3[..., 0], None,
                            one[:2] / 2, one[:2] / 2, None, None, True, 1e-5,
                            1, True)
    with pytest.raises(ValueError, match='expected 3 importance shares'):
        backend.sn_normalize(x3, x3[..., 0], x3[..., 0], None, None,
                             one[:2] / 2, one[:2] / 2, one, one, 1e-5)
    if not GPU:
        monkeypatch.setattr(tb, 'kernels_interpreted', lambda: False)
        with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
            backend.moments(x3, 1)


@pytest.mark.skipif(GPU, reason='on a GPU the tests compile (and run) '
                    'each kernel variant they launch with the installed '
                    'triton')
def test_kernels_compile_for_sm90():
    """Triton's compiler (not the interpreter) accepts every kernel variant
    the backend launches."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    script = os.path.join(os.path.dirname(__file__),
                          'triton_compile_check.py')
    proc = subprocess.run([sys.executable, script, '--quick'], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ' 0 failed' in proc.stdout


def test_float64_input_is_never_computed_in_float32():
    """Triton's kernels are float32: float64 input on the Triton path goes
    to the generic backend, and keeps float64 accuracy."""
    x = torch.randn(2, 3, 4, 5, dtype=F64, device=DEVICE)
    with triton_path():
        assert backends.select(x).name == 'generic'
        assert backends.select(x.float()).name == 'triton'
