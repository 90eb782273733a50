"""The layer operators (mmsn/ops/library.py) kernel by kernel: the Python
kernels that CUDA and other devices run (over a backend's passes) against
the compiled CPU kernels, SSN's Jacobian against autograd, and the shapes
torch.compile traces with against what the kernels return."""
import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mmsn.ops import layer_kernels, library
from mmsn.ops.backends import GenericBackend, NativeBackend
from mmsn.ops.sparsestmax import sparsestmax, sparsestmax_jacobian

C = 5
OPS = library.layer_ops()
if OPS is None:
    pytest.skip('mmsn._C is not available', allow_module_level=True)


def _layer_args(using_bn=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = 3 if using_bn else 2
    weight = torch.rand(C, generator=g, dtype=dtype) + 0.5
    bias = torch.randn(C, generator=g, dtype=dtype)
    mean_weight = torch.randn(k, generator=g, dtype=dtype)
    var_weight = torch.randn(k, generator=g, dtype=dtype)
    running = None
    if using_bn:
        running = (torch.randn(C, generator=g, dtype=dtype),
                   torch.rand(C, generator=g, dtype=dtype) + 0.5)
    return weight, bias, mean_weight, var_weight, running


def _input(shape, dtype=torch.float32, seed=1, layout=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3)
    x = x.to(dtype)
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    return x


def _buffers(running, dtype=torch.float32):
    if running is None:
        return None, None, None, torch.zeros(4, dtype=torch.long)
    return (running[0].clone(), running[1].clone(),
            torch.tensor(3, dtype=torch.long),
            torch.zeros(4, dtype=torch.long))


TRAIN_CASES = [
    # (id, shape, layout, using_bn, momentum, moving_average, unbiased)
    ('2d', (4, C, 3, 5), None, True, 0.1, True, True),
    ('channels-last', (4, C, 3, 5), torch.channels_last, True, 0.03, True,
     False),
    ('cumulative', (3, C, 7), None, True, None, True, True),
    ('batch-average', (3, C, 2, 2, 3), None, True, 0.1, False, True),
    ('no-bn', (4, C, 3, 3), None, False, 0.1, True, True),
    ('1x1', (6, C, 1, 1), None, True, 0.2, True, True),
]


@pytest.mark.parametrize('backend', [GenericBackend(), NativeBackend()],
                         ids=['generic', 'native'])
@pytest.mark.parametrize('case', TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_python_kernels_equal_the_cpu_kernels(case, backend):
    """What a CUDA tensor would run (the same Python over a backend's
    passes), on CPU tensors, against mmsn._C: outputs, statistics, buffers
    and all gradients, training, eval and the backward of both."""
    _, shape, layout, using_bn, momentum, moving_average, unbiased = case
    weight, bias, mean_weight, var_weight, running = _layer_args(using_bn)
    x = _input(shape, layout=layout)
    dy = _input(shape, seed=2, layout=layout)
    results = []
    for train, evaluate, backward in (
            (OPS.switchable_norm_train, OPS.switchable_norm_eval,
             OPS.switchable_norm_backward),
            (lambda *a: layer_kernels.train(backend, *a),
             lambda *a: layer_kernels.evaluate(backend, *a),
             lambda *a: layer_kernels.backward(backend, *a))):
        mean, var, tracked, nonfinite = _buffers(running)
        with torch.no_grad():
            y, mean_in, var_in = train(
                x, weight, bias, mean_weight, var_weight, mean, var, tracked,
                nonfinite, True, momentum, moving_average, 1e-4, unbiased,
                True)
            grads = backward(dy, x, mean_in, var_in, weight, mean_weight,
                             var_weight, None, None, True, True, 1e-4,
                             unbiased, True)
            y_eval, m_eval, v_eval = evaluate(
                x, weight, bias, mean_weight, var_weight, mean, var,
                nonfinite, True, 1e-4, unbiased)
            eval_grads = backward(dy, x, m_eval, v_eval, weight, mean_weight,
                                  var_weight, mean, var, True, False, 1e-4,
                                  unbiased, False)
        results.append(dict(y=y, mean_in=mean_in, var_in=var_in,
                            grads=grads, y_eval=y_eval,
                            eval_grads=eval_grads[1:], buffers=(
                                mean, var, tracked, nonfinite)))
        assert eval_grads[0].numel() == 0  # need_dx=False
    want, got = results
    for key in ('y', 'mean_in', 'var_in', 'y_eval'):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f'{key}: {m}')
        assert got[key].dtype == want[key].dtype
        assert got[key].stride() == want[key].stride(), key
    for key in ('grads', 'eval_grads', 'buffers'):
        for a, b in zip(got[key], want[key]):
            if b is None:
                assert a is None
                continue
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f'{key}: {m}')


@pytest.mark.parametrize('radius', [0.0, 0.3, 0.6, 0.9])
@pytest.mark.parametrize('seed', range(6))
def test_sparsestmax_jacobian_is_autograd_s(radius, seed):
    """The Jacobian carried through SparsestMax's steps (Python and C++)
    equals what autograd takes of the plain formulation."""
    v = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64) * 0.7
    want = torch.stack([
        torch.autograd.functional.jacobian(
            lambda row: sparsestmax(row, radius), v[i]) for i in range(2)
    ])
    shares, jacobian = sparsestmax_jacobian(v, radius)
    torch.testing.assert_close(shares, sparsestmax(v, radius))
    torch.testing.assert_close(jacobian, want)
    fixed = torch.zeros(1, dtype=torch.long)
    mean_share, var_share, cpp_jacobian = OPS.sparsestmax_shares(
        v[0], v[1], torch.tensor([radius]), fixed, fixed)
    torch.testing.assert_close(torch.stack([mean_share, var_share]), shares)
    torch.testing.assert_close(cpp_jacobian, want)


def test_ssn_python_kernels_equal_the_cpu_kernels():
    """SSN's shares, their backward and the freeze, as a CUDA tensor would
    run them, against mmsn._C (a frozen vector gives its stored one-hot
    vector and no gradient; a one-hot one is frozen into its parameter)."""
    g = torch.Generator().manual_seed(3)
    mean_weight = torch.randn(3, generator=g)
    var_weight = torch.tensor([0.1, 3.0, -2.0])  # one-hot at this radius
    radius = torch.tensor([0.7])
    mean_fixed = torch.zeros(1, dtype=torch.long)
    var_fixed = torch.zeros(1, dtype=torch.long)
    grads = (torch.randn(3, generator=g), torch.randn(3, generator=g))
    cpu = OPS.sparsestmax_shares(mean_weight, var_weight, radius, mean_fixed,
                                 var_fixed)
    py = library._shares_kernel(mean_weight, var_weight, radius, mean_fixed,
                                var_fixed)
    for a, b in zip(py, cpu):
        torch.testing.assert_close(a, b)
    for a, b in zip(library._shares_backward_kernel(*grads, py[2]),
                    OPS.sparsestmax_shares_backward(*grads, cpu[2])):
        torch.testing.assert_close(a, b)
    states = []
    for freeze in (OPS.sparsestmax_freeze_, library._freeze_kernel):
        state = [t.clone() for t in (mean_weight, var_weight, mean_fixed,
                                     var_fixed)] + [torch.ones(3),
                                                    torch.ones(3)]
        freeze(*state, *cpu[:2])
        states.append(state)
    for a, b in zip(*states):
        torch.testing.assert_close(a, b)
    frozen_var = states[0][1]
    assert frozen_var.tolist() == [0., 1., 0.]
    assert states[0][3].tolist() == [1] and states[0][2].tolist() == [0]
    assert states[0][5].tolist() == [0., 0., 0.]  # its gradient cleared
    assert states[0][4].tolist() == [1., 1., 1.]
    # frozen: the stored vector, no gradient
    shares = OPS.sparsestmax_shares(mean_weight, frozen_var, radius,
                                    mean_fixed, states[0][3])
    assert shares[1].tolist() == [0., 1., 0.]
    assert torch.equal(shares[2][1], torch.zeros(3, 3))


def _fake_matches(op, *args):
    real = op(*[copy.deepcopy(a) for a in args])
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor)
                     else a for a in args])
    real = real if isinstance(real, tuple) else (real, )
    fakes = fakes if isinstance(fakes, tuple) else (fakes, )
    for a, b in zip(fakes, real):
        assert a.shape == b.shape and a.dtype == b.dtype, (a, b)
        assert a.stride() == b.stride(), (a.stride(), b.stride())


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16,
                                   torch.float64])
@pytest.mark.parametrize('layout', [None, torch.channels_last])
def test_shapes_for_torch_compile_match_the_kernels(dtype, layout):
    weight, bias, mean_weight, var_weight, running = _layer_args(
        dtype=torch.float32)
    x = _input((3, C, 2, 4), dtype=dtype, layout=layout)
    mean, var, tracked, nonfinite = _buffers(running)
    _fake_matches(OPS.switchable_norm_train, x, weight, bias, mean_weight,
                  var_weight, mean, var, tracked, nonfinite, True, 0.1, True,
                  1e-5, True, True)
    _fake_matches(OPS.switchable_norm_eval, x, weight, bias, mean_weight,
                  var_weight, mean, var, nonfinite, True, 1e-5, True)
    _, mean_in, var_in = OPS.switchable_norm_train(
        x, weight, bias, mean_weight, var_weight, mean, var, tracked,
        nonfinite, True, 0.1, True, 1e-5, True, True)
    for need_dx in (True, False):
        _fake_matches(OPS.switchable_norm_backward, x, x, mean_in, var_in,
                      weight, mean_weight, var_weight, None, None, True, True,
                      1e-5, True, need_dx)
    fixed = torch.zeros(1, dtype=torch.long)
    _fake_matches(OPS.sparsestmax_shares, mean_weight, var_weight,
                  torch.tensor([0.3]), fixed, fixed)
    _fake_matches(OPS.sparse_switchable_norm_train, x, weight, bias,
                  mean_weight, var_weight, torch.tensor([0.3]), fixed,
                  fixed.clone(), None, None, mean, var, tracked, nonfinite,
                  0.1, True, 1e-5, True, True)
    _fake_matches(OPS.sparse_switchable_norm_eval, x, weight, bias,
                  mean_weight, var_weight, torch.tensor([0.3]), fixed,
                  fixed, mean, var, nonfinite, 1e-5, True)
