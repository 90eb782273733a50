"""SN as a first-class OpenMMLab norm layer: registry, build_norm_layer,
norm_eval, paramwise_cfg, sync conversion, conv fusion, PreciseBN."""
import pytest
import torch
from mmcv.cnn import build_norm_layer, fuse_conv_bn
from mmengine.model import convert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS
from torch import nn

import mmsn
from mmsn import (SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d,
                  SyncSwitchableNorm)


@pytest.mark.parametrize('name,cls', [('SN', SwitchableNorm2d),
                                      ('SN1d', SwitchableNorm1d),
                                      ('SN2d', SwitchableNorm2d),
                                      ('SN3d', SwitchableNorm3d),
                                      ('SyncSN', SyncSwitchableNorm)])
def test_registered_in_root_registry(name, cls):
    assert MODELS.get(name) is cls
    # reachable from a child registry (mmpretrain's) as well
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS
    layer = PRETRAIN_MODELS.build(dict(type=name, num_features=4))
    assert type(layer) is cls


def test_build_norm_layer_name_and_args():
    name, layer = build_norm_layer(
        dict(type='SN', using_bn=False, momentum=0.01, requires_grad=False),
        16, postfix=1)
    assert name == 'sn1'
    assert isinstance(layer, SwitchableNorm2d)
    assert layer.num_features == 16 and not layer.using_bn
    assert layer.momentum == 0.01 and layer.eps == 1e-5
    assert layer.mean_weight.shape == (2, )
    assert not any(p.requires_grad for p in layer.parameters())


def _sn_resnet(**kwargs):
    from mmpretrain.models import ResNet
    return ResNet(depth=18, norm_cfg=dict(type='SN'), **kwargs)


def _sn_layers(model):
    return [m for m in model.modules() if isinstance(m, SwitchableNorm2d)]


def test_mmpretrain_resnet_uses_sn_and_norm_eval_freezes_stats():
    model = _sn_resnet(norm_eval=True)
    model.init_weights()
    layers = _sn_layers(model)
    assert len(layers) == 1 + 8 * 2 + 3  # stem, 8 blocks x 2, 3 downsamples
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    model.train()
    assert all(not m.training for m in layers)
    model(torch.randn(2, 3, 32, 32))
    for m, (mean, var) in zip(layers, before):
        torch.testing.assert_close(m.running_mean, mean)
        torch.testing.assert_close(m.running_var, var)

    model = _sn_resnet(norm_eval=False)
    model.train()
    model(torch.randn(2, 3, 32, 32))
    assert int(layers[0].num_batches_tracked) == 0  # the old model's
    assert all(int(m.num_batches_tracked) == 1 for m in _sn_layers(model))


def _decay_by_name(model, paramwise_cfg):
    wrapper = build_optim_wrapper(
        model,
        dict(
            optimizer=dict(type='SGD', lr=0.1, momentum=0.9,
                           weight_decay=1e-4),
            paramwise_cfg=paramwise_cfg))
    by_param = {
        id(p): group['weight_decay']
        for group in wrapper.optimizer.param_groups for p in group['params']
    }
    return {name: by_param[id(p)] for name, p in model.named_parameters()}


def test_norm_decay_mult_reaches_gamma_beta_not_importance():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SwitchableNorm2d(4))
    decay = _decay_by_name(model, dict(norm_decay_mult=0.))
    assert decay['1.weight'] == 0 and decay['1.bias'] == 0
    assert decay['1.mean_weight'] == 1e-4 and decay['1.var_weight'] == 1e-4
    assert decay['0.weight'] == 1e-4

    decay = _decay_by_name(
        model,
        dict(norm_decay_mult=0.,
             custom_keys={'mean_weight': dict(decay_mult=0.)}))
    assert decay['1.mean_weight'] == 0 and decay['1.var_weight'] == 1e-4

    assert set(_decay_by_name(model, {}).values()) == {1e-4}


def _logged_options(model, paramwise_cfg):
    """The param groups' options as mmengine's INFO log states them
    (``paramwise_options -- NAME:KEY=VALUE``), and as they really are."""
    from logging.handlers import BufferingHandler

    from mmengine.logging import MMLogger
    collect = BufferingHandler(capacity=10**6)  # keeps what the logger emits
    logger = MMLogger.get_current_instance()
    logger.addHandler(collect)
    try:
        wrapper = build_optim_wrapper(
            model,
            dict(optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-4),
                 paramwise_cfg=paramwise_cfg))
    finally:
        logger.removeHandler(collect)
    logged = {}
    for message in (record.getMessage() for record in collect.buffer):
        if message.startswith('paramwise_options -- '):
            name, option = message[len('paramwise_options -- '):].split(':')
            key, value = option.split('=')
            assert (name, key) not in logged, message
            logged[name, key] = value
    names = {id(p): n for n, p in model.named_parameters()}
    real = {(names[id(p)], key): str(value)
            for group in wrapper.optimizer.param_groups
            for key, value in group.items() if key != 'params'
            for p in group['params']}
    return logged, real


def test_paramwise_log_states_the_importance_decay_really_given():
    """mmengine logs each param group's options; with norm_decay_mult the
    log must give the importance weights the decay they really get."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SwitchableNorm2d(4))
    logged, real = _logged_options(model, dict(norm_decay_mult=0.))
    assert {k: v for k, v in real.items() if k in logged} == logged
    assert logged == {
        ('1.weight', 'weight_decay'): '0.0',
        ('1.bias', 'weight_decay'): '0.0',
        ('1.mean_weight', 'weight_decay'): '0.0001',
        ('1.var_weight', 'weight_decay'): '0.0001',
    }
    # and where a custom key names them, what the custom key says
    logged, real = _logged_options(
        model,
        dict(norm_decay_mult=0.,
             custom_keys={'.mean_weight': dict(decay_mult=0., lr_mult=0.5)}))
    assert logged[('1.mean_weight', 'weight_decay')] == '0.0'
    assert logged[('1.mean_weight', 'lr')] == '0.05'
    assert logged[('1.var_weight', 'weight_decay')] == '0.0001'
    # every stated option is the param group's own value
    assert {k: v for k, v in real.items() if k in logged} == logged


def _conv_sn_bn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), SwitchableNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), SwitchableNorm2d(4)),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SwitchableNorm2d):
                m.mean_weight.normal_()
                m.var_weight.normal_()
                m.running_mean.normal_()
    return model


CONVERTERS = {
    'torch': nn.SyncBatchNorm.convert_sync_batchnorm,
    'mmengine-torch': lambda m: convert_sync_batchnorm(m, 'torch'),
    # mmcv's own SyncBN needs compiled ops, so this model holds SN only
    'mmengine-mmcv': lambda m: convert_sync_batchnorm(m, 'mmcv'),
}


@pytest.mark.parametrize('name', list(CONVERTERS))
def test_sync_conversion_turns_sn_into_sync_sn_with_its_state(name):
    model = _conv_sn_bn()
    if name == 'mmengine-mmcv':
        model = model[:4]
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    converted = CONVERTERS[name](model)
    sn_like = [
        m for m in converted.modules() if isinstance(m, SwitchableNorm2d)
    ]
    assert len(sn_like) == 2
    assert all(type(m) is SyncSwitchableNorm for m in sn_like)
    assert converted.state_dict().keys() == state.keys()
    for key, value in converted.state_dict().items():
        torch.testing.assert_close(value, state[key])
    torch.testing.assert_close(converted.eval()(x), expected)


def test_fuse_conv_bn_refuses_sn_with_a_clear_message():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SwitchableNorm2d(4))
    with pytest.raises(TypeError, match='cannot fold SwitchableNorm2d'):
        fuse_conv_bn(model)
    assert isinstance(model[1], SwitchableNorm2d)
    # plain BN still fuses
    bn_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 6, 6)
    expected = bn_model(x)
    fused = fuse_conv_bn(bn_model)
    assert isinstance(fused[1], nn.Identity)
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
