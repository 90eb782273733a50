"""What an SN call costs the host: no host sync anywhere, at most twice
BatchNorm's dispatched operators through the layer operators, and graphs
that torch.compile captures whole (issue 17). Counts only; times are the
benchmark's (tools/analysis/benchmark_norm.py)."""
import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmsn import (SparseSwitchableNorm1d, SparseSwitchableNorm2d,
                  SparseSwitchableNorm3d, SwitchableNorm1d, SwitchableNorm2d,
                  SwitchableNorm3d, SyncSwitchableNorm)
from mmsn.analysis.host_path import graph_breaks, layer_costs
from mmsn.ops import backends, compile_with_layer_ops

C = 6


def _ssn(cls, radius=0.3, frozen=False):
    def make(c):
        layer = cls(c)
        layer.radius.fill_(radius)
        if frozen:  # a one-hot vector, as after its freeze
            layer.mean_weight.data = torch.tensor([0., 0., 1.])
            layer.mean_fixed.fill_(1)
        return layer
    return make


# (name, layer factory, input shape, BN class of that input)
LAYERS = [
    ('SN2d', SwitchableNorm2d, (4, C, 3, 5), nn.BatchNorm2d),
    ('SN1d-NC', SwitchableNorm1d, (4, C), nn.BatchNorm1d),
    ('SN1d-NCL', SwitchableNorm1d, (4, C, 7), nn.BatchNorm1d),
    ('SN3d', SwitchableNorm3d, (2, C, 2, 3, 2), nn.BatchNorm3d),
    ('SN2d-momentum-None', lambda c: SwitchableNorm2d(c, momentum=None),
     (4, C, 3, 5), nn.BatchNorm2d),
    ('SN2d-batch-average', lambda c: SwitchableNorm2d(
        c, moving_average=False), (4, C, 3, 5), nn.BatchNorm2d),
    ('SN2d-no-BN', lambda c: SwitchableNorm2d(c, using_bn=False),
     (4, C, 3, 5), nn.BatchNorm2d),
    ('SN2d-biased-no-affine', lambda c: SwitchableNorm2d(
        c, unbiased=False, affine=False), (4, C, 3, 5), nn.BatchNorm2d),
    ('SyncSN-no-group', SyncSwitchableNorm, (4, C, 3, 5), nn.BatchNorm2d),
    ('SSN2d', _ssn(SparseSwitchableNorm2d), (4, C, 3, 5), nn.BatchNorm2d),
    ('SSN2d-frozen', _ssn(SparseSwitchableNorm2d, frozen=True),
     (4, C, 3, 5), nn.BatchNorm2d),
    ('SSN1d', _ssn(SparseSwitchableNorm1d, radius=0.8), (4, C, 7),
     nn.BatchNorm1d),
    ('SSN3d', _ssn(SparseSwitchableNorm3d, radius=0.), (2, C, 2, 3, 2),
     nn.BatchNorm3d),
]


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name,make,shape,bn_cls', LAYERS,
                         ids=[r[0] for r in LAYERS])
def test_layer_call_dispatches_at_most_twice_bn_and_never_syncs(
        name, make, shape, bn_cls, train):
    x = torch.randn(shape)
    bn_ops, bn_syncs, _ = layer_costs(bn_cls(C), x, train)
    ops, syncs, counter = layer_costs(make(C), x, train)
    assert syncs == 0, counter
    assert bn_syncs == 0
    assert ops <= 2 * bn_ops, (ops, bn_ops, counter)
    # a training step moves the running statistics on the device
    layer = make(C)
    if train and getattr(layer, 'running_mean', None) is not None:
        before = layer.running_mean.clone()
        layer_costs(layer, x, train)
        assert not torch.equal(layer.running_mean, before)


@pytest.mark.parametrize('path', ['native', 'generic', 'composite'])
@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name,make,shape,bn_cls', LAYERS[:6] + LAYERS[9:11],
                         ids=[r[0] for r in LAYERS[:6] + LAYERS[9:11]])
def test_functional_paths_never_sync(name, make, shape, bn_cls, train, path):
    """The paths that compose PyTorch ops (no layer operators) do not read
    a value back either."""
    with backends.forced(path):
        _, syncs, counter = layer_costs(make(C), torch.randn(shape), train)
    assert syncs == 0, counter


def test_non_finite_batch_is_decided_on_the_device_and_reported_once():
    """A NaN batch leaves the running statistics and num_batches_tracked,
    counts in the layer's device counter (no sync) and is reported once:
    right after the forward on a CPU tensor."""
    layer = SwitchableNorm2d(C)
    x = torch.randn(4, C, 3, 3)
    layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = x.clone()
    bad[1, 2, 0, 0] = float('nan')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ops, syncs, counter = layer_costs(layer, bad, True)
        layer(x)  # a good batch: nothing new to report
    assert syncs == 0, counter
    assert [str(w.message) for w in caught] == [
        'SwitchableNorm2d: non-finite batch statistics (NaN or Inf in the '
        'input); running statistics keep their last value.'] * 2
    # two bad steps (warm-up and counted one), then a good one
    assert layer.nonfinite.tolist() == [2, 0, 0, 0]
    assert int(layer.num_batches_tracked) == int(
        state['num_batches_tracked']) + 1


@pytest.mark.parametrize('bad', ['overflow', 'nan'])
def test_eval_non_finite_statistics_are_reported(bad):
    """Eval statistics that are not finite (|x| ~ 1e20 overflows float32;
    a NaN) leave an output that does not normalize the input, and say so
    (SSN and SN alike), without a host sync."""
    for layer in (SwitchableNorm2d(C), _ssn(SparseSwitchableNorm2d)(C)):
        layer.eval()
        x = torch.randn(2, C, 3, 3)
        if bad == 'overflow':
            x *= 1e20
        else:
            x[0, 1, 2, 2] = float('nan')
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            _, syncs, _ = layer_costs(layer, x, False)
        name = type(layer).__name__
        assert [str(w.message) for w in caught] == [
            f'{name}: non-finite statistics in eval mode (NaN or Inf in the '
            'input, or |x| beyond ~1.8e+19 in float32), so the output does '
            'not normalize the input.'] * 2
        assert syncs == 0
        assert layer.nonfinite.tolist() == [0, 0, 2, 0]


# --- torch.compile ---------------------------------------------------------
class _Net(nn.Module):

    def __init__(self, norm, checkpointed=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = norm(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm2 = norm(8)
        self.checkpointed = checkpointed

    def block(self, x):
        x = torch.relu(self.norm1(self.conv1(x)))
        return self.norm2(self.conv2(x))

    def forward(self, x):
        if self.checkpointed:
            return checkpoint(self.block, x, use_reentrant=False)
        return self.block(x)


NORMS = [('SN', SwitchableNorm2d),
         ('SN-batch-average', lambda c: SwitchableNorm2d(
             c, moving_average=False, momentum=None)),
         ('SSN', _ssn(SparseSwitchableNorm2d))]


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name,norm', NORMS, ids=[n for n, _ in NORMS])
def test_no_graph_breaks(name, norm, train):
    net = _Net(norm).train(train)
    x = torch.randn(2, 3, 6, 6, requires_grad=train)

    def step(x):
        y = net(x)
        if train:
            y.square().mean().backward()
        return y

    breaks, reasons = graph_breaks(step if not train else net, (x, ))
    assert breaks == 0, reasons


@pytest.mark.parametrize('name,norm,traced_as_operator', [
    ('SN', SwitchableNorm2d, True),
    ('SSN', _ssn(SparseSwitchableNorm2d), False)], ids=['SN', 'SSN'])
def test_compiled_graph_traces_each_layer_as_it_chooses(name, norm,
                                                        traced_as_operator):
    """SN as its layer operators (the eager kernels), SSN as plain ops (its
    freeze writes parameters in place); compile_with_layer_ops forces
    either."""
    import torch._dynamo
    net = _Net(norm)
    x = torch.randn(2, 3, 6, 6)
    for forced in (None, True, False):
        torch._dynamo.reset()
        context = compile_with_layer_ops(forced) if forced is not None \
            else contextlib.nullcontext()
        with context:
            code = torch._dynamo.explain(net)(x).graphs[0].code
        expected = traced_as_operator if forced is None else forced
        assert ('mmsn.switchable_norm_train' in code) == expected, forced


def _steps(model, x, steps=3):
    outs = []
    for _ in range(steps):
        y = model(x)
        y.square().mean().backward()
        outs.append(y.detach())
    return outs


@pytest.mark.parametrize('checkpointed', [False, True],
                         ids=['plain', 'checkpointed'])
@pytest.mark.parametrize('name,norm', NORMS, ids=[n for n, _ in NORMS])
def test_compiled_fullgraph_equals_eager(name, norm, checkpointed):
    """Outputs, gradients and buffers (running statistics move once per
    step, also when the forward is recomputed for backward) of three
    training steps and an eval forward."""
    torch.manual_seed(0)
    eager = _Net(norm, checkpointed)
    compiled_net = copy.deepcopy(eager)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_net, fullgraph=True)
    for got, want in zip(_steps(compiled, x), _steps(eager, x)):
        torch.testing.assert_close(got, want)
    for p, q in zip(compiled_net.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    for (k, b), c in zip(eager.named_buffers(), compiled_net.buffers()):
        torch.testing.assert_close(c, b, msg=lambda m: f'{k}: {m}')
    assert int(compiled_net.norm1.num_batches_tracked) == 3
    eager.eval()
    compiled_net.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x))


def _leaf():
    return sum(range(50))


def _called_three_times():
    for _ in range(3):
        _leaf()


def test_host_profile_counts_per_call_and_sees_the_backward():
    from mmsn.analysis.host_path import host_profile

    rows = {r.function: r for r in host_profile(_called_three_times, reps=7,
                                                top=50)}
    leaf = [r for name, r in rows.items() if name.endswith('(_leaf)')]
    assert len(leaf) == 1 and leaf[0].calls == 3
    assert 0 < leaf[0].self_us <= leaf[0].total_us

    class Square(torch.autograd.Function):

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):
            (x, ) = ctx.saved_tensors
            return 2 * x * grad

    x = torch.randn(3, requires_grad=True)
    names = [r.function for r in host_profile(
        lambda: Square.apply(x).sum().backward(), reps=4, top=200)]
    assert any(name.endswith('(backward)') and 'test_host_path' in name
               for name in names), names


def test_share_convolutions_leaves_only_the_norms_apart():
    from mmsn.analysis.host_path import share_convolutions

    def net(norm):
        return nn.Sequential(
            nn.Conv2d(3, 4, 3), norm(4), nn.ReLU(),
            nn.Sequential(nn.Conv2d(4, 4, 1), norm(4)), nn.Flatten(),
            nn.Linear(4 * 6 * 6, 2))

    bn, sn = net(nn.BatchNorm2d), net(SwitchableNorm2d)
    share_convolutions(sn, bn)
    # nested ones too, found by name
    assert sn[0] is bn[0] and sn[3][0] is bn[3][0] and sn[5] is bn[5]
    assert isinstance(sn[1], SwitchableNorm2d)
    assert isinstance(sn[3][1], SwitchableNorm2d)
    x = torch.randn(2, 3, 8, 8)
    assert sn(x).shape == (2, 2)
