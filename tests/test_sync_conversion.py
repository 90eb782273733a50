"""Sync conversion keeps which parameters are frozen: torch's and
mmengine's converters (both patched by mmsn) and SyncSN's own, on SN, SSN
and BN with some parameters frozen and others not."""
import copy

import mmengine.model
import pytest
import torch
from torch import nn

from mmsn import (SparseSwitchableNorm2d, SwitchableNorm2d,
                  SyncSparseSwitchableNorm, SyncSwitchableNorm)

# looked up when called: a name imported from mmengine before mmsn was is
# the original function, which converts an SN root to SyncBatchNorm
CONVERTERS = {
    'torch': lambda m: nn.SyncBatchNorm.convert_sync_batchnorm(m),
    'mmengine-torch':
    lambda m: mmengine.model.convert_sync_batchnorm(m, 'torch'),
    'mmengine-mmcv':
    lambda m: mmengine.model.convert_sync_batchnorm(m, 'mmcv'),
    'sync-sn': SyncSwitchableNorm.convert_sync_switchable_norm,
}
# mmcv's own SyncBN needs its compiled ops, SyncSN's converter leaves BN
WITH_BN = ('torch', 'mmengine-torch')


def _freeze(module, *names):
    for name in names:
        getattr(module, name).requires_grad_(False)
    return module


def _mixed_model(with_bn):
    """Each norm layer with another mix of frozen parameters: gamma and
    beta frozen with the importance weights trained, the reverse, a mix
    within each pair, and all frozen."""
    torch.manual_seed(0)
    layers = [
        nn.Conv2d(3, 4, 1),
        _freeze(SwitchableNorm2d(4), 'weight', 'bias'),
        nn.Sequential(nn.Conv2d(4, 4, 1),
                      _freeze(SwitchableNorm2d(4), 'mean_weight',
                              'var_weight')),
        _freeze(SparseSwitchableNorm2d(4), 'weight', 'var_weight'),
        _freeze(SwitchableNorm2d(4, moving_average=False), 'bias',
                'mean_weight'),
        SwitchableNorm2d(4, requires_grad=False),
    ]
    if with_bn:
        layers.append(_freeze(nn.BatchNorm2d(4), 'weight'))
    return nn.Sequential(*layers)


def _frozen(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize('name', list(CONVERTERS))
def test_conversion_keeps_frozen_parameters_frozen(name):
    model = _mixed_model(with_bn=name in WITH_BN)
    expected = _frozen(model)
    # every kind of mix is there, so a converter that sets all parameters
    # alike, or one per layer, fails
    assert sum(expected.values()) and not all(expected.values())
    converted = CONVERTERS[name](copy.deepcopy(model))
    assert type(converted[1]) is SyncSwitchableNorm
    assert type(converted[3]) is SyncSparseSwitchableNorm
    assert _frozen(converted) == expected
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


@pytest.mark.parametrize('name', list(CONVERTERS))
@pytest.mark.parametrize('frozen', [('weight', 'bias'),
                                    ('mean_weight', 'var_weight')],
                         ids=['affine_frozen', 'importance_frozen'])
def test_converting_an_sn_root_keeps_frozen_parameters_frozen(name, frozen):
    layer = _freeze(SwitchableNorm2d(4), *frozen)
    converted = CONVERTERS[name](layer)
    assert type(converted) is SyncSwitchableNorm
    assert _frozen(converted) == _frozen(layer)


@pytest.mark.parametrize('name', list(CONVERTERS))
def test_converted_layers_hold_the_same_tensors(name):
    """As SyncBatchNorm's conversion does: an optimizer built before the
    conversion still trains the converted layers' parameters, and the
    buffers (running statistics, SSN's flags) are the very same."""
    model = _mixed_model(with_bn=name in WITH_BN)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    converted = CONVERTERS[name](model)
    for key, param in converted.named_parameters():
        assert param is params[key], key
    for key, buf in converted.named_buffers():
        assert buf is buffers[key], key
    assert converted.state_dict().keys() == model.state_dict().keys()
