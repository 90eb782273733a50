"""``mmsn.convert_switchable_norm`` on models from outside OpenMMLab.

The main subject is torchvision's ResNet-18, built with a BatchNorm of
non-default eps (1e-3) and momentum (0.01) so that an argument dropped on
the way shows. The independent checks: with every SN layer's shares set to
BN only, the converted model in eval must give the BN model's logits (the
BN branch then normalizes with the carried running statistics, as BN does);
after one training step the first layer's running statistics must have
moved by momentum 0.01 towards the batch statistics computed here from the
layer's input; and the state dict survives a save/load into a freshly
converted model.
"""
import copy
import functools
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmsn
from mmsn import (SparseSwitchableNorm1d, SparseSwitchableNorm2d,
                  SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d,
                  SyncSparseSwitchableNorm, SyncSwitchableNorm,
                  convert_switchable_norm)

torchvision = pytest.importorskip('torchvision')

EPS = 1e-3
MOMENTUM = 0.01
BN = functools.partial(nn.BatchNorm2d, eps=EPS, momentum=MOMENTUM)
# softmax([-100, -100, 100]) is [0, 0, 1] in float32: BN's statistics only
BN_ONLY_LOGITS = (-100., -100., 100.)


def _resnet18(seed=0):
    """torchvision's ResNet-18 (10 classes) with non-trivial BN state."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=BN)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(7)
    return model


def _bn_names(model):
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d)]


def _set_bn_only(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SwitchableNorm2d):
                m.mean_weight.copy_(torch.tensor(BN_ONLY_LOGITS))
                m.var_weight.copy_(torch.tensor(BN_ONLY_LOGITS))


def _input(shape=(4, 3, 64, 64), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_resnet18_layers_and_state_are_carried():
    bn_model = _resnet18()
    names = _bn_names(bn_model)
    assert len(names) == 20
    reference = copy.deepcopy(bn_model)
    sn_model = convert_switchable_norm(bn_model)
    assert sn_model is bn_model  # in place, as convert_sync_batchnorm
    modules = dict(sn_model.named_modules())
    for name in names:
        old, new = dict(reference.named_modules())[name], modules[name]
        assert type(new) is SwitchableNorm2d, name
        assert new.num_features == old.num_features
        assert new.eps == EPS and new.momentum == MOMENTUM
        assert new.affine and new.using_bn and new.moving_average
        for key in ('weight', 'bias', 'running_mean', 'running_var',
                    'num_batches_tracked'):
            assert torch.equal(getattr(new, key), getattr(old, key)), key
    assert not any(
        isinstance(m, nn.BatchNorm2d) and not isinstance(m, SwitchableNorm2d)
        for m in sn_model.modules())
    # BN's keys, and the importance logits of each former BN layer
    assert set(sn_model.state_dict()) == set(reference.state_dict()) | {
        f'{n}.{w}' for n in names for w in ('mean_weight', 'var_weight')}


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12),
                                       (torch.float32, 2e-5)])
def test_resnet18_bn_only_shares_give_the_bn_logits_in_eval(dtype, tol):
    bn_model = _resnet18().to(dtype).eval()
    sn_model = convert_switchable_norm(copy.deepcopy(bn_model))
    _set_bn_only(sn_model)
    x = _input().to(dtype)
    with torch.no_grad():
        expected = bn_model(x)
        got = sn_model(x)
    assert expected.std() > 0.1  # spread logits, not a constant
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= tol * max(1.0, scale)


def test_resnet18_default_shares_are_not_bn():
    """The check above can fail: SN's initial (equal) shares mix IN and LN
    in, which changes the logits."""
    bn_model = _resnet18().double().eval()
    sn_model = convert_switchable_norm(copy.deepcopy(bn_model))
    x = _input().double()
    with torch.no_grad():
        assert (sn_model(x) - bn_model(x)).abs().max() > 1e-2


def test_resnet18_train_step_moves_running_stats_by_the_bn_momentum():
    model = convert_switchable_norm(_resnet18().double()).train()
    first = model.bn1
    old_mean = first.running_mean.clone()
    old_var = first.running_var.clone()
    seen = []

    def record_input(layer, args):
        seen.append(args[0].detach().clone())  # returns None: input kept

    first.register_forward_pre_hook(record_input)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _input().double(), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), \
            name
    assert first.mean_weight.grad.abs().sum() > 0
    before = first.mean_weight.detach().clone()
    optimizer.step()
    assert not torch.equal(first.mean_weight, before)

    # BN statistics of the batch, from the IN ones (unbiased IN variance)
    (inp, ) = seen
    mean_in = inp.mean((2, 3))
    var_in = inp.var((2, 3), unbiased=True)
    mean_bn = mean_in.mean(0)
    var_bn = (var_in + mean_in**2).mean(0) - mean_bn**2
    torch.testing.assert_close(
        first.running_mean, (1 - MOMENTUM) * old_mean + MOMENTUM * mean_bn)
    torch.testing.assert_close(
        first.running_var, (1 - MOMENTUM) * old_var + MOMENTUM * var_bn)
    assert int(first.num_batches_tracked) == 8


def test_resnet18_state_dict_round_trip():
    model = convert_switchable_norm(_resnet18(seed=0)).eval()
    with torch.no_grad():  # shares that differ per layer
        for i, m in enumerate(model.modules()):
            if isinstance(m, SwitchableNorm2d):
                m.mean_weight.copy_(torch.tensor([0.1 * i, -0.2, 0.3]))
                m.var_weight.copy_(torch.tensor([0.5, 0.1 * i, -0.4]))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = convert_switchable_norm(_resnet18(seed=1)).eval()
    x = _input()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), model(x))
        fresh.load_state_dict(torch.load(buffer, weights_only=True),
                              strict=True)
        assert torch.equal(fresh(x), model(x))


def test_sparse_variant_and_other_ranks():
    net = nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6, eps=1e-4, momentum=0.2),
        nn.Unflatten(1, (6, 1, 1)), nn.BatchNorm2d(6, momentum=None),
        nn.Flatten(2), nn.Unflatten(2, (1, 1, 1)),
        nn.BatchNorm3d(6, affine=False))
    converted = convert_switchable_norm(copy.deepcopy(net), 'SSN')
    assert [type(converted[i]) for i in (1, 3, 6)] == [
        SparseSwitchableNorm1d, SparseSwitchableNorm2d,
        mmsn.SparseSwitchableNorm3d
    ]
    # BN's momentum, not SSN's default 0.003; None (cumulative) too
    assert converted[1].momentum == 0.2 and converted[1].eps == 1e-4
    assert converted[3].momentum is None
    assert not converted[6].affine and converted[6].weight is None
    assert converted(torch.randn(4, 3)).shape == (4, 6, 1, 1, 1)

    plain = convert_switchable_norm(copy.deepcopy(net))
    assert [type(plain[i]) for i in (1, 3, 6)] == [
        SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d]


def test_options_reach_every_layer():
    model = convert_switchable_norm(
        _resnet18(), using_bn=False, moving_average=False, unbiased=False)
    layers = [m for m in model.modules() if isinstance(m, SwitchableNorm2d)]
    assert len(layers) == 20
    for m in layers:
        assert not m.using_bn and not m.moving_average and not m.unbiased
        assert m.running_mean is None and m.mean_weight.shape == (2, )
    model.eval()(_input())


def test_group_norm_only_when_asked():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8, eps=1e-4))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.normal_()
    with pytest.warns(UserWarning, match='only with group_norm_dim'):
        kept = convert_switchable_norm(copy.deepcopy(net))
    assert type(kept[1]) is nn.GroupNorm

    converted = convert_switchable_norm(copy.deepcopy(net), group_norm_dim=2)
    new = converted[1]
    assert type(new) is SwitchableNorm2d
    assert new.num_features == 8 and new.eps == 1e-4
    assert new.momentum == 0.1  # GroupNorm has none: SN2d's default
    assert torch.equal(new.weight, net[1].weight)
    assert torch.equal(new.bias, net[1].bias)
    assert int(new.num_batches_tracked) == 0

    one_d = convert_switchable_norm(
        nn.Sequential(nn.GroupNorm(2, 4)), group_norm_dim=1)
    assert type(one_d[0]) is SwitchableNorm1d


def test_sync_batchnorm_keeps_its_group():
    group = object()  # stands for a ProcessGroup; only carried here
    sync = nn.SyncBatchNorm(5, eps=1e-3, momentum=0.3, process_group=group)
    new = convert_switchable_norm(nn.Sequential(sync), 'SN')[0]
    assert type(new) is SyncSwitchableNorm
    assert new.process_group is group
    assert (new.eps, new.momentum) == (1e-3, 0.3)
    sparse = convert_switchable_norm(
        nn.Sequential(nn.SyncBatchNorm(5)), 'SSN')[0]
    assert type(sparse) is SyncSparseSwitchableNorm


def test_frozen_and_eval_layers_stay_frozen_and_in_eval():
    model = _resnet18()
    for param in model.layer1.parameters():
        param.requires_grad_(False)
    model.layer1.eval()
    model = convert_switchable_norm(model)
    frozen = model.layer1[0].bn1
    assert not frozen.training and not frozen.weight.requires_grad
    assert not frozen.mean_weight.requires_grad
    trained = model.layer2[0].bn1
    assert trained.training and trained.mean_weight.requires_grad


def test_shared_layer_stays_shared():
    shared = nn.BatchNorm1d(3)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    net = convert_switchable_norm(net)
    assert net[0] is net[2] and type(net[0]) is SwitchableNorm1d


def test_root_layer_is_returned_converted():
    new = convert_switchable_norm(nn.BatchNorm2d(4, eps=1e-3))
    assert type(new) is SwitchableNorm2d and new.eps == 1e-3


class _BNWithActivation(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: BN followed by an activation."""

    def forward(self, x):
        return F.relu(super().forward(x))


class _BNXd(nn.modules.batchnorm._BatchNorm):
    """Like mmengine's _BatchNormXd: any rank."""

    def _check_input_dim(self, x):
        pass


@pytest.mark.parametrize('layer,using_bn,message', [
    (nn.BatchNorm2d(4, track_running_stats=False), True,
     r"layer \(BatchNorm2d\): has no running statistics "
     r"\(track_running_stats=False.*using_bn=False"),
    (nn.BatchNorm2d(4, eps=0.), True,
     r'layer \(BatchNorm2d\): eps must be a positive finite float, got 0'),
    (_BNWithActivation(4), True,
     r'layer \(_BNWithActivation\): a subclass of BatchNorm2d with its own '
     r'forward'),
    (_BNXd(4), True,
     r'layer \(_BNXd\): not a BatchNorm1d/2d/3d or SyncBatchNorm'),
    (nn.LazyBatchNorm2d(), True,
     r'layer \(LazyBatchNorm2d\): a lazy layer that is not initialized'),
])
def test_unmappable_layers_are_refused_and_nothing_changes(
        layer, using_bn, message):
    net = nn.Sequential()
    net.add_module('conv', nn.Conv2d(3, 4, 1))
    net.add_module('ok', nn.BatchNorm2d(4))
    net.add_module('layer', layer)
    with pytest.raises(ValueError, match=message) as info:
        convert_switchable_norm(net, using_bn=using_bn)
    assert 'nothing was changed' in str(info.value)
    assert type(net.ok) is nn.BatchNorm2d  # the good layer was not replaced
    assert net.layer is layer


def test_every_unmappable_layer_is_named():
    net = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False),
                        nn.BatchNorm2d(4, eps=0.))
    with pytest.raises(ValueError) as info:
        convert_switchable_norm(net)
    text = str(info.value)
    assert 'cannot convert 2 layer(s)' in text
    assert '\n  0 (BatchNorm2d): has no running statistics' in text
    assert '\n  1 (BatchNorm2d): eps must be' in text


def test_without_running_statistics_converts_without_bn_branch():
    net = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False))
    new = convert_switchable_norm(net, using_bn=False)[0]
    assert type(new) is SwitchableNorm2d and not new.using_bn


@pytest.mark.parametrize('kwargs,error,message', [
    (dict(norm_type='BN'), ValueError,
     r"norm_type must be one of \['SN', 'SSN'\], got 'BN'"),
    (dict(group_norm_dim=4), ValueError,
     r'group_norm_dim must be None, 1, 2 or 3, got 4'),
    (dict(group_norm_dim=True), ValueError,
     r'group_norm_dim must be None, 1, 2 or 3, got True'),
    (dict(using_bn='no'), TypeError,
     r"using_bn must be True or False, got 'no'"),
    (dict(moving_average=1), TypeError,
     r'moving_average must be True or False, got 1'),
    (dict(unbiased=None), TypeError,
     r'unbiased must be True or False, got None'),
])
def test_bad_options_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        convert_switchable_norm(nn.BatchNorm2d(2), **kwargs)


def test_already_switchable_layers_are_left_alone():
    sn = SwitchableNorm2d(4, eps=1e-3)
    net = nn.Sequential(sn, nn.BatchNorm2d(4))
    net = convert_switchable_norm(net, 'SSN')
    assert net[0] is sn
    assert type(net[1]) is SparseSwitchableNorm2d


def test_timm_resnet_converts_and_batchnorm_act_is_refused():
    timm = pytest.importorskip('timm')
    model = timm.create_model('resnet18', pretrained=False, num_classes=5)
    bn_count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model = convert_switchable_norm(model).eval()
    assert sum(type(m) is SwitchableNorm2d
               for m in model.modules()) == bn_count == 20
    assert model(_input((2, 3, 64, 64))).shape == (2, 5)
    from timm.layers import BatchNormAct2d
    with pytest.raises(ValueError, match='BatchNormAct2d.*own forward'):
        convert_switchable_norm(nn.Sequential(BatchNormAct2d(4)))


def test_ssn_training_loop_of_the_readme_picks_one_norm_per_layer():
    """The README's loop outside mmengine (radius = step / total before each
    step, restore_frozen_ after each optimizer step) ends with every SSN
    layer frozen on one norm for its mean and one for its variance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3))
    model = convert_switchable_norm(model, 'SSN').train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    total_steps = 20
    ssn_layers = [m for m in model.modules() if hasattr(m, 'restore_frozen_')]
    assert len(ssn_layers) == 2
    x, y = _input((8, 3, 12, 12)), torch.arange(8) % 3
    for step in range(total_steps):
        for layer in ssn_layers:
            layer.radius.fill_(step / total_steps)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        for layer in ssn_layers:
            layer.restore_frozen_()
    for layer in ssn_layers:
        assert int(layer.mean_fixed) == 1 and int(layer.var_fixed) == 1
        for shares in layer.importance():
            assert sorted(shares.tolist()) == [0.0, 0.0, 1.0]
