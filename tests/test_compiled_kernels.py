"""The compiled CPU kernels of mmsn._C, pass by pass, against float64
formulas written out here, and as a whole layer against the float64
reference (tests/sn_reference.py), at 1, 2 and 3 threads; their input
checks; and that the install built them (the fast path falls back to slower
kernels silently otherwise)."""
import contextlib
import os

import pytest
import torch

from mmsn import SwitchableNorm1d
from mmsn.ops import backends, compiled_kernels_available
from sn_reference import batch_stats, reference_sn

if os.environ.get('MMSN_WITH_OPS') == '0':
    pytest.skip('built with MMSN_WITH_OPS=0', allow_module_level=True)

ops = torch.ops.mmsn

# (N, C, L): one position; a row shorter than a vector; rows shorter than
# 32 positions, which the reductions sum 8 rows at a time, a row per lane
# (15 and 18 rows: whole groups of 8 and the rest one by one); a ragged
# length; more rows than one thread's grain (parallel split of rows)
SHAPES = [(3, 4, 1), (2, 3, 5), (3, 5, 7), (2, 9, 31), (4, 6, 37),
          (64, 64, 49)]
# Split between threads: a task holds at least 32768 // L rows (7 and 15
# here), so 65 rows of 4099 positions go to 2 or 3 threads in chunks of 33
# or 22 rows, and 2 * 37 rows of 2053 in chunks of 37 or 25 (per sample
# when there are fewer samples than threads): chunks start part-way
# through a sample, and N * C divides evenly among neither 2 nor 3 threads.
# 13 * 401 short rows (a task: 4681 or more) go to 2 threads in chunks of
# 2607, which are not whole groups of 8 rows.
THREADED_SHAPES = [(13, 5, 4099), (2, 37, 2053), (13, 401, 7)]
THREADS = [1, 2, 3]


@contextlib.contextmanager
def num_threads(threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def test_install_built_the_kernels():
    from mmsn.ops._extension import load_compiled_ops
    assert compiled_kernels_available(), (
        f'mmsn._C is missing: {load_compiled_ops()[1]}')


def rows(shape, dtype, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3 +
            offset).to(dtype)


def per_row(shape, dtype, seed):
    return rows(shape[:2], dtype, seed)


def tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(
        atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize('shape,threads',
                         [(s, 1) for s in SHAPES] +
                         [(s, t) for s in THREADED_SHAPES for t in THREADS])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
# a large mean relative to the spread is where one-pass formulas cancel
@pytest.mark.parametrize('offset', [0.0, 1e4])
def test_passes_match_float64_formulas(shape, threads, dtype, offset):
    with num_threads(threads):
        check_passes(shape, dtype, offset)


def check_passes(shape, dtype, offset):
    x = rows(shape, dtype, 0, offset)
    x64 = x.double()
    correction = 1 if shape[2] > 1 else 0
    mean, var = ops.instance_moments(x, correction)
    assert mean.dtype == var.dtype == dtype and mean.shape == shape[:2]
    mean64 = x64.mean(2)
    var64 = (x64 - mean64[..., None]).square().sum(2) / (shape[2] -
                                                         correction)
    torch.testing.assert_close(mean.double(), mean64, **tol(dtype))
    torch.testing.assert_close(var.double(), var64, **tol(dtype))

    # the later passes take the mean as given (rounded to x's dtype)
    m = mean.double()[..., None]
    scale, shift = per_row(shape, dtype, 1), per_row(shape, dtype, 2)
    y = ops.rows_affine(x, mean, scale, shift)
    want = (x64 - m) * scale.double()[..., None] + shift.double()[..., None]
    torch.testing.assert_close(y.double(), want, **tol(dtype))

    dy = rows(shape, dtype, 3)
    dot, sum_dy = ops.rows_grad_sums(dy, x, mean)
    torch.testing.assert_close(sum_dy.double(), dy.double().sum(2),
                               **tol(dtype))
    torch.testing.assert_close(dot.double(),
                               (dy.double() * (x64 - m)).sum(2),
                               **tol(dtype))

    a, b, k = (per_row(shape, dtype, s) for s in (4, 5, 6))
    dx = ops.rows_grad_input(dy, x, mean, a, b, k)
    want = (a.double()[..., None] * dy.double() +
            b.double()[..., None] * (x64 - m) + k.double()[..., None])
    torch.testing.assert_close(dx.double(), want, **tol(dtype))


def test_threads_do_not_change_results():
    """Rows are split between threads, and the backward's sums over (N, C)
    run in fixed sample blocks: bit-identical results for any thread
    count."""
    n, c = 64, 64
    x = rows((n, c, 49), torch.float32, 0)
    dy = rows((n, c, 49), torch.float32, 1)
    shares = torch.softmax(torch.tensor([0.2, -0.1, 0.4]), 0)
    gamma, beta = per_row((2, c), torch.float32, 2)

    def run_all():
        mean, var = ops.instance_moments(x, 1)
        mean_bn, var_bn = mean.mean(0), var.mean(0)
        y = ops.sn_affine(x, mean, var, gamma, beta, shares, shares,
                          mean_bn, var_bn, 1e-5)
        grads = ops.sn_backward(dy, x, mean, var, gamma, shares, shares,
                                mean_bn, var_bn, True, 1e-5, 1, True)
        return (mean, var, y, *grads)

    with num_threads(1):
        serial = run_all()
    for threads in (2, 3):
        with num_threads(threads):
            parallel = run_all()
        for a, b in zip(serial, parallel):
            assert torch.equal(a, b)


@pytest.mark.parametrize('shape', THREADED_SHAPES)
@pytest.mark.parametrize('threads', THREADS)
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5),
                                       (torch.float64, 1e-10)])
def test_layer_matches_reference_at_any_thread_count(shape, threads,
                                                     training, dtype, tol):
    """The whole layer on mmsn._C (forward, backward, running statistics;
    the one-sweep forward in eval) split between threads, against the
    float64 reference."""
    n, c, length = shape
    g = torch.Generator().manual_seed(0)
    layer = SwitchableNorm1d(c, momentum=0.1).to(dtype).train(training)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        layer.running_var.uniform_(0.5, 2, generator=g)
    params = [p.detach().double().requires_grad_()
              for p in layer.parameters()]
    running = (layer.running_mean.double().clone(),
               layer.running_var.double().clone())
    x = rows(shape, dtype, 1, offset=2.0)
    dy = rows(shape, dtype, 2)
    x64 = x.double().clone().requires_grad_()
    y_ref, _ = reference_sn(x64, *params, running, training=training)
    y_ref.backward(dy.double())

    xi = x.clone().requires_grad_()
    with backends.forced('compiled'), num_threads(threads):
        y = layer(xi)
        y.backward(dy)
    close = dict(atol=tol, rtol=tol, check_dtype=False)
    torch.testing.assert_close(y, y_ref, **close)
    torch.testing.assert_close(xi.grad, x64.grad, **close)
    for (name, p), p_ref in zip(layer.named_parameters(), params):
        torch.testing.assert_close(p.grad, p_ref.grad, **close,
                                   msg=lambda m: f'{name}: {m}')
    if training:
        mean_bn, var_bn = batch_stats(x.double(), unbiased=True)
        running = (0.9 * running[0] + 0.1 * mean_bn,
                   0.9 * running[1] + 0.1 * var_bn)
    torch.testing.assert_close(layer.running_mean, running[0], **close)
    torch.testing.assert_close(layer.running_var, running[1], **close)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match='contiguous'):
        ops.instance_moments(x.transpose(1, 2), 1)
    with pytest.raises(RuntimeError, match='float32 or float64'):
        ops.instance_moments(x.half(), 1)
    with pytest.raises(RuntimeError, match=r'\(N, C, L\)'):
        ops.instance_moments(x[0], 1)
    with pytest.raises(RuntimeError, match='degrees of freedom'):
        ops.instance_moments(torch.randn(2, 3, 1), 1)
    with pytest.raises(RuntimeError, match='N \\* C elements'):
        ops.rows_affine(x, torch.zeros(6), torch.zeros(5), torch.zeros(6))
    with pytest.raises(RuntimeError, match='must match'):
        ops.rows_grad_sums(torch.randn(2, 3, 5), x, torch.zeros(6))
    mean, var = ops.instance_moments(x, 1)
    with pytest.raises(RuntimeError, match='expected 3 importance shares'):
        ops.sn_affine(x, mean, var, None, None, torch.zeros(2),
                      torch.zeros(3), mean[0], var[0], 1e-5)
    with pytest.raises(RuntimeError, match='batch statistics must have C'):
        ops.sn_affine(x, mean, var, None, None, torch.zeros(3),
                      torch.zeros(3), torch.zeros(4), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match='pooled_bn needs batch'):
        ops.sn_backward(x, x, mean, var, None, torch.zeros(2),
                        torch.zeros(2), None, None, True, 1e-5, 1, True)


@pytest.mark.parametrize('n', [1, 4])
@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('with_bn', [True, False])
def test_fixed_stats_forward_equals_the_two_pass_forward(n, threads, with_bn):
    """sn_forward_fixed (one sweep, sample by sample: rows of one sample in
    parallel when there are fewer samples than threads, whole samples per
    thread otherwise) gives exactly the moments of instance_moments and the
    output of sn_affine."""
    c = 6
    x = rows((n, c, 37), torch.float32, 0, offset=3.0)
    gamma, beta = per_row((2, c), torch.float32, 1)
    k = 3 if with_bn else 2
    # importance shares on the simplex
    mw = torch.softmax(torch.linspace(-0.5, 0.5, k), 0)
    vw = torch.softmax(torch.linspace(0.3, -0.2, k), 0)
    fixed = (rows((c, ), torch.float32, 2), rows((c, ), torch.float32, 3).abs()
             ) if with_bn else (None, None)
    with num_threads(threads):
        y, mean, var = ops.sn_forward_fixed(x, gamma, beta, mw, vw, *fixed,
                                            1e-5, 1)
    mean_ref, var_ref = ops.instance_moments(x, 1)
    y_ref = ops.sn_affine(x, mean_ref, var_ref, gamma, beta, mw, vw, *fixed,
                          1e-5)
    assert torch.equal(mean, mean_ref) and torch.equal(var, var_ref)
    assert torch.equal(y, y_ref)
