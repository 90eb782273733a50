"""SSN layers: SN's equations (tests/sn_reference.py) with SparsestMax shares,
the freeze-when-one-hot rule across training steps and save/load, and SSN
wherever OpenMMLab meets SN (registry, build_norm_layer, norm_eval,
paramwise_cfg, sync conversion, fuse refusal, AMP, channels_last, safe
loading)."""
import io

import pytest
import torch
from mmcv.cnn import build_norm_layer, fuse_conv_bn
from mmengine.model import convert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS
from torch import nn
from torch.func import functional_call

import mmsn  # noqa: F401
from mmsn import (SparseSwitchableNorm1d, SparseSwitchableNorm2d,
                  SparseSwitchableNorm3d, SwitchableNorm2d,
                  SyncSparseSwitchableNorm, SyncSwitchableNorm)
from mmsn.ops.sparsestmax import sparsestmax
from sn_reference import reference_sn
from test_switchable_norm import make_input
from test_switchable_norm import make_layer as make_sn_layer

C = 6  # test_switchable_norm's layer and input factories
ARITIES = [
    (SparseSwitchableNorm1d, (6, C, 7)),
    (SparseSwitchableNorm2d, (4, C, 5, 3)),
    (SparseSwitchableNorm3d, (3, C, 2, 3, 4)),
    (SyncSparseSwitchableNorm, (4, C, 5, 3)),
]
ARITY_IDS = ['1d', '2d', '3d', 'sync']


def make_layer(cls=SparseSwitchableNorm2d, using_bn=True, radius=0.3,
               dtype=torch.float64, seed=0, **kwargs):
    """SN's random layer (affine, logits, running statistics) at a radius.
    """
    layer = make_sn_layer(cls, using_bn, dtype, seed, **kwargs)
    layer.radius.fill_(radius)
    return layer


def reference(layer, x, training):
    """SN's equations with the SparsestMax shares of the layer's parameters
    (log-shares as logits: the reference's softmax gives the shares back,
    exact zeros included)."""
    with torch.no_grad():
        mean_share = sparsestmax(layer.mean_weight, layer.radius)
        var_share = sparsestmax(layer.var_weight, layer.radius)
    running = (layer.running_mean, layer.running_var) if layer.using_bn \
        else None
    return reference_sn(x, layer.weight, layer.bias, mean_share.log(),
                        var_share.log(), running, training=training,
                        unbiased=layer.unbiased, eps=layer.eps)


@pytest.mark.parametrize('cls,shape', ARITIES, ids=ARITY_IDS)
@pytest.mark.parametrize('using_bn', [True, False])
@pytest.mark.parametrize('training', [True, False])
def test_forward_is_sn_with_sparsestmax_shares(cls, shape, using_bn,
                                               training):
    layer = make_layer(cls, using_bn, radius=0.35).train(training)
    x = make_input(shape)
    expected, batch = reference(layer, x, training)
    running = (layer.running_mean.clone(), layer.running_var.clone()) \
        if using_bn else None
    torch.testing.assert_close(layer(x), expected)
    if using_bn and training:
        m = layer.momentum
        torch.testing.assert_close(layer.running_mean,
                                   (1 - m) * running[0] + m * batch[0])
        torch.testing.assert_close(layer.running_var,
                                   (1 - m) * running[1] + m * batch[1])


def test_defaults_and_buffers():
    for cls in (SparseSwitchableNorm1d, SparseSwitchableNorm2d,
                SparseSwitchableNorm3d, SyncSparseSwitchableNorm):
        layer = cls(C)
        assert layer.momentum == 0.003  # the authors' 0.997, also in 2d
        assert layer.radius.dtype == torch.float32
        assert layer.radius.shape == (1, ) and layer.radius.item() == 0
        for flag in (layer.mean_fixed, layer.var_fixed):
            assert flag.dtype == torch.int64 and flag.shape == (1, )
            assert flag.item() == 0
        assert {'radius', 'mean_fixed', 'var_fixed', 'running_mean',
                'running_var'} <= set(layer.state_dict())
    assert SparseSwitchableNorm2d(C, momentum=0.1).momentum == 0.1
    # radius 0: SparsestMax is sparsemax, 1/3 each at the initial ones
    shares = SparseSwitchableNorm2d(C).importance()
    torch.testing.assert_close(shares[0], torch.full((3, ), 1 / 3))


def test_gradient_reaches_importance_parameters_by_finite_differences():
    layer = make_layer(radius=0.35).eval()
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.1, 0.05, -0.02]))
        layer.var_weight.copy_(torch.tensor([-0.05, 0.08, 0.02]))
    x = make_input((3, C, 4, 4))
    params = dict(layer.named_parameters())
    # both vectors strictly inside the simplex (no kink within eps)
    for name in ('mean_weight', 'var_weight'):
        assert (sparsestmax(params[name].detach(), 0.35) > 1e-3).all()

    def out(mean_weight, var_weight):
        return functional_call(
            layer, {**params, 'mean_weight': mean_weight,
                    'var_weight': var_weight}, (x, ))

    inputs = tuple(params[n].detach().clone().requires_grad_()
                   for n in ('mean_weight', 'var_weight'))
    assert torch.autograd.gradcheck(out, inputs, eps=1e-6, atol=1e-6)


def _one_hot_layer(**kwargs):
    """A layer whose mean vector is one-hot (LN) and whose variance vector
    is pushed to the circle of radius 0.2 inside the triangle (so it has a
    gradient)."""
    layer = make_layer(dtype=torch.float32, radius=0.2, **kwargs)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.0, 1.5, 0.2]))
        layer.var_weight.copy_(torch.tensor([0.30, 0.32, 0.31]))
    return layer


def test_one_hot_vector_freezes_and_gets_no_gradient():
    layer = _one_hot_layer().train()
    x = make_input((4, C, 3, 3), dtype=torch.float32)
    # eval forwards never change the state
    layer.eval()(x)
    assert layer.mean_fixed.item() == 0
    torch.testing.assert_close(layer.mean_weight.detach(),
                               torch.tensor([0.0, 1.5, 0.2]))
    layer.train()
    layer(x).square().sum().backward()
    assert layer.mean_fixed.item() == 1 and layer.var_fixed.item() == 0
    assert layer.mean_weight.tolist() == [0.0, 1.0, 0.0]
    assert (layer.mean_weight.grad == 0).all()
    assert layer.var_weight.grad.abs().sum() > 0

    # momentum and weight decay cannot move the frozen vector
    opt = torch.optim.SGD(layer.parameters(), lr=1.0, momentum=0.9,
                          weight_decay=0.1)
    with torch.no_grad():
        layer.mean_weight.grad.fill_(0.3)  # a stale gradient and momentum
    opt.step()
    assert layer.mean_weight.tolist() != [0.0, 1.0, 0.0]
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().sum().backward()
        assert layer.mean_weight.tolist() == [0.0, 1.0, 0.0]
        assert (layer.mean_weight.grad == 0).all()
        opt.step()
    # whatever the parameter holds after a step, the shares stay one-hot
    mean_share, _ = layer.importance()
    assert mean_share.tolist() == [0.0, 1.0, 0.0]
    layer.restore_frozen_()
    assert layer.mean_weight.tolist() == [0.0, 1.0, 0.0]


def test_freeze_drops_gradient_accumulated_before_it():
    # sparsemax puts the mean on the edge {IN, LN}: one-hot once the radius
    # passes the edge's half-length 0.707
    layer = _one_hot_layer()
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.1, 0.8, 0.5]))
        layer.radius.fill_(0.0)
    x = make_input((4, C, 3, 3), dtype=torch.float32)
    layer.train()(x).sum().backward()
    assert layer.mean_weight.grad.abs().sum() > 0
    with torch.no_grad():
        layer.radius.fill_(0.75)
    layer(x).sum().backward()
    assert (layer.mean_weight.grad == 0).all()


def test_frozen_state_survives_save_and_load():
    layer = _one_hot_layer().train()
    x = make_input((4, C, 3, 3), dtype=torch.float32)
    layer(x)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = SparseSwitchableNorm2d(C)
    fresh.load_state_dict(state)
    assert fresh.mean_fixed.item() == 1 and fresh.var_fixed.item() == 0
    assert fresh.radius.item() == pytest.approx(0.2)
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x))
    # a smaller radius cannot unfreeze it; the gradient stays zero
    with torch.no_grad():
        fresh.radius.fill_(0.0)
    fresh.train()(x).square().sum().backward()
    assert fresh.mean_fixed.item() == 1
    assert fresh.importance()[0].tolist() == [0.0, 1.0, 0.0]
    assert (fresh.mean_weight.grad == 0).all()


@pytest.mark.parametrize('name,cls', [('SSN', SparseSwitchableNorm2d),
                                      ('SSN1d', SparseSwitchableNorm1d),
                                      ('SSN2d', SparseSwitchableNorm2d),
                                      ('SSN3d', SparseSwitchableNorm3d),
                                      ('SyncSSN', SyncSparseSwitchableNorm)])
def test_registered_in_root_registry(name, cls):
    assert MODELS.get(name) is cls
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS
    assert type(PRETRAIN_MODELS.build(dict(type=name,
                                           num_features=4))) is cls


def test_build_norm_layer_name_and_args():
    name, layer = build_norm_layer(
        dict(type='SSN', using_bn=False, momentum=0.01, requires_grad=False),
        16, postfix=1)
    assert name == 'ssn1'
    assert isinstance(layer, SparseSwitchableNorm2d)
    assert not layer.using_bn and layer.momentum == 0.01
    assert layer.mean_weight.shape == (2, )
    assert not any(p.requires_grad for p in layer.parameters())
    assert build_norm_layer(dict(type='SyncSSN'), 8, postfix=2)[0] == 'ssn2'


def _ssn_resnet(**kwargs):
    from mmpretrain.models import ResNet
    return ResNet(depth=18, norm_cfg=dict(type='SSN'), **kwargs)


def test_norm_eval_freezes_running_stats_and_shares():
    model = _ssn_resnet(norm_eval=True)
    layers = [m for m in model.modules()
              if isinstance(m, SparseSwitchableNorm2d)]
    assert len(layers) == 20
    for layer in layers:
        with torch.no_grad():
            layer.radius.fill_(0.9)  # one-hot, but eval must not freeze
            layer.mean_weight.copy_(torch.tensor([0.2, 0.1, 0.0]))
    model.train()
    model(torch.randn(2, 3, 32, 32))
    assert all(not m.training for m in layers)
    assert all(int(m.num_batches_tracked) == 0 for m in layers)
    assert all(m.mean_fixed.item() == 0 for m in layers)


def test_paramwise_recipe_and_norm_decay_mult():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SparseSwitchableNorm2d(4))
    importance = dict(lr_mult=0.1, decay_mult=0.0, max_grad_norm=1.0)
    wrapper = build_optim_wrapper(
        model,
        dict(
            constructor='GroupClipOptimWrapperConstructor',
            optimizer=dict(type='SGD', lr=0.1, momentum=0.9,
                           weight_decay=1e-4),
            paramwise_cfg=dict(
                norm_decay_mult=0.,
                custom_keys={
                    '.mean_weight': importance,
                    '.var_weight': importance
                })))
    groups = {
        name: group
        for name, p in model.named_parameters()
        for group in wrapper.optimizer.param_groups
        if group['params'][0] is p
    }
    for name in ('1.mean_weight', '1.var_weight'):
        assert groups[name]['lr'] == pytest.approx(0.01)
        assert groups[name]['weight_decay'] == 0
    assert groups['1.weight']['weight_decay'] == 0  # norm_decay_mult
    assert groups['0.weight']['weight_decay'] == 1e-4
    assert groups['0.weight']['lr'] == 0.1


def test_sync_conversion_turns_ssn_into_sync_ssn_with_its_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 3), _one_hot_layer(),
                          nn.Sequential(nn.Conv2d(C, 4, 1),
                                        SwitchableNorm2d(4)))
    model[1].train()(torch.randn(2, C, 4, 4))  # freeze the mean vector
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    for convert in (nn.SyncBatchNorm.convert_sync_batchnorm,
                    lambda m: convert_sync_batchnorm(m, 'torch')):
        import copy
        converted = convert(copy.deepcopy(model))
        assert type(converted[1]) is SyncSparseSwitchableNorm
        assert type(converted[2][1]) is SyncSwitchableNorm
        assert converted[1].mean_fixed.item() == 1
        assert converted.state_dict().keys() == model.state_dict().keys()
        torch.testing.assert_close(converted.eval()(x), expected)


def test_sync_ssn_pools_like_sync_sn_and_equals_ssn_alone():
    # the cross-process statistics are SyncSN's own
    assert SyncSparseSwitchableNorm._reduce_batch_stats is \
        SyncSwitchableNorm._reduce_batch_stats
    ssn = make_layer(SparseSwitchableNorm2d).train()
    sync = make_layer(SyncSparseSwitchableNorm).train()
    x = make_input((4, C, 5, 3))
    torch.testing.assert_close(sync(x), ssn(x))
    torch.testing.assert_close(sync.running_mean, ssn.running_mean)


def test_fuse_conv_bn_refuses_ssn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SparseSwitchableNorm2d(4))
    with pytest.raises(TypeError,
                       match='cannot fold SparseSwitchableNorm2d'):
        fuse_conv_bn(model)


def test_autocast_and_channels_last():
    layer = make_layer(dtype=torch.float32).train()
    x = make_input((4, C, 6, 6), dtype=torch.float32)
    expected = layer.eval()(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.05)
    cl = layer(x.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, expected)


def test_empty_batch_leaves_state_alone():
    layer = _one_hot_layer().train()
    out = layer(torch.zeros(0, C, 3, 3))
    assert out.shape == (0, C, 3, 3) and layer.mean_fixed.item() == 0
