"""The bookkeeping around SN's and SSN's state that no output shows: the
repr names every argument's value, SSN's reset clears what the freeze and
the radius hook set, in-place writes of the layer operators are visible to
autograd (version counters), and the choices made for other devices that
can be asked on CPU tensors."""
import math
import warnings

import pytest
import torch

from mmsn import SparseSwitchableNorm2d, SwitchableNorm1d, SwitchableNorm2d
from mmsn.models.norms.nonfinite import NonFiniteReport
from mmsn.ops import library
from mmsn.ops.sparsestmax import sparsestmax

OPS = library.layer_ops()
needs_ops = pytest.mark.skipif(OPS is None, reason='mmsn._C not available')


@pytest.mark.parametrize('cls', [SwitchableNorm1d, SwitchableNorm2d,
                                 SparseSwitchableNorm2d])
def test_repr_shows_each_argument_s_value(cls):
    layer = cls(7, eps=0.25, momentum=0.375, affine=False, using_bn=False,
                moving_average=False, unbiased=False, last_gamma=True)
    text = layer.extra_repr()
    for part in ('7', 'eps=0.25', 'momentum=0.375', 'affine=False',
                 'using_bn=False', 'moving_average=False', 'unbiased=False',
                 'last_gamma=True'):
        assert part in text.split(', '), part
    default = cls(7).extra_repr().split(', ')
    assert f'momentum={cls._default_momentum}' in default
    for part in ('eps=1e-05', 'affine=True', 'using_bn=True',
                 'moving_average=True', 'unbiased=True', 'last_gamma=False'):
        assert part in default, part
    assert text.endswith(', sparsestmax') == (
        cls is SparseSwitchableNorm2d)


def test_ssn_reset_clears_radius_flags_and_logits():
    layer = SparseSwitchableNorm2d(3, last_gamma=True)
    with torch.no_grad():
        layer.radius.fill_(0.9)
        layer.mean_fixed.fill_(1)
        layer.var_fixed.fill_(1)
        layer.mean_weight.copy_(torch.tensor([0., 1., 0.]))
        layer.weight.fill_(3.)
    layer.reset_parameters()
    assert layer.radius.tolist() == [0.]
    assert layer.mean_fixed.tolist() == [0] and layer.var_fixed.tolist() == [0]
    assert layer.mean_weight.tolist() == [1., 1., 1.]
    assert layer.weight.tolist() == [0., 0., 0.]  # last_gamma


@needs_ops
@pytest.mark.parametrize('requires_grad', [True, False])
def test_operators_bump_the_versions_of_what_they_write(requires_grad):
    """A training forward writes the running statistics, the count and the
    counter in place (with or without a graph): their version counters
    move, so that autograd and torch.compile see the writes."""
    layer = SwitchableNorm2d(3).requires_grad_(requires_grad)
    names = ('running_mean', 'running_var', 'num_batches_tracked',
             'nonfinite')
    before = {n: getattr(layer, n)._version for n in names}
    layer(torch.randn(2, 3, 2, 2))
    for n in names[:3]:
        assert getattr(layer, n)._version > before[n], n
    x = torch.randn(2, 3, 2, 2)
    x[0, 0, 0, 0] = math.nan
    before = layer.nonfinite._version
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        layer.eval()(x)
    assert layer.nonfinite._version > before
    assert layer.nonfinite.tolist() == [0, 0, 1, 0]


def test_a_counter_that_cannot_be_read_reports_nothing():
    report = NonFiniteReport()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        report.poll('L', torch.ones(4, dtype=torch.long, device='meta'))
    assert report.reported == [0, 0, 0, 0]


def test_float64_on_cuda_runs_the_generic_backend():
    """Triton's kernels are float32: float64 CUDA tensors take the generic
    ops (decided from the dtype; asked here with CPU tensors)."""
    assert library._cuda_backend(
        torch.zeros(1, dtype=torch.float64)) is library._GENERIC
    want = library._triton() or library._GENERIC
    assert library._cuda_backend(torch.zeros(1)) is want


@needs_ops
@pytest.mark.parametrize('which', [0, 1])
def test_shares_operator_records_a_graph_for_either_vector(which):
    """Only one of the two logit vectors requires a gradient: it gets one
    (an SSN whose other vector is a frozen constant)."""
    g = torch.Generator().manual_seed(which)
    logits = [torch.randn(3, generator=g, dtype=torch.float64)
              for _ in range(2)]
    logits[which].requires_grad_()
    fixed = torch.zeros(1, dtype=torch.long)
    shares = OPS.sparsestmax_shares(*logits, torch.tensor([.2]), fixed,
                                    fixed)
    coef = torch.tensor([1., -2., .5], dtype=torch.float64)
    (shares[which] * coef).sum().backward()
    v = logits[which].detach().clone().requires_grad_()
    (sparsestmax(v, .2) * coef).sum().backward()
    torch.testing.assert_close(logits[which].grad, v.grad)
    assert logits[1 - which].grad is None
