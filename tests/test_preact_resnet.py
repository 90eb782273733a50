"""PreActResNet: layout, pre-activation semantics, freezing, norm_eval."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmsn  # noqa: F401  (registers SN and the backbone)
from mmpretrain.registry import MODELS
from mmsn.models.backbones import (PreActBasicBlock, PreActBottleneck,
                                   PreActResNet)
from mmsn.models.norms.switchable_norm import _SwitchableNorm


def _build(**kwargs):
    cfg = dict(type='PreActResNet', depth=18, norm_cfg=dict(type='SN'))
    cfg.update(kwargs)
    return MODELS.build(cfg)


def _authors_resnetv2sn_keys(stage_blocks=(3, 4, 6, 3)):
    """Parameter names of the authors' resnetv2sn50 below 'module.'."""
    sn = ('weight', 'bias', 'mean_weight', 'var_weight', 'running_mean',
          'running_var')
    keys = {'conv1.weight'} | {f'sn1.{p}' for p in sn}
    for i, n in enumerate(stage_blocks, 1):
        for j in range(n):
            pre = f'layer{i}.{j}'
            for k in (1, 2, 3):
                keys.add(f'{pre}.conv{k}.weight')
                keys |= {f'{pre}.sn{k}.{p}' for p in sn}
        # a bare nn.Conv2d in the authors' model, no Sequential index
        keys.add(f'layer{i}.0.downsample.weight')
    keys |= {f'sn_out.{p}' for p in sn}
    return keys


def test_registered_in_mmpretrain_and_depths():
    assert MODELS.get('PreActResNet') is PreActResNet
    for depth, block, blocks in [(18, PreActBasicBlock, (2, 2, 2, 2)),
                                 (34, PreActBasicBlock, (3, 4, 6, 3)),
                                 (50, PreActBottleneck, (3, 4, 6, 3)),
                                 (101, PreActBottleneck, (3, 4, 23, 3)),
                                 (152, PreActBottleneck, (3, 8, 36, 3))]:
        assert PreActResNet.arch_settings[depth] == (block, blocks)
    with pytest.raises(KeyError):
        _build(depth=20)


def test_sn_names_map_onto_authors_resnetv2sn50():
    """Every name is the authors' except the shortcut conv, which is
    ``downsample.0`` here (a Sequential, as in mmpretrain's ResNets); the
    converter's renames for resnetv2sn50 map exactly that one."""
    from mmsn.converters import KNOWN_MODELS, authors_name
    renames = KNOWN_MODELS['resnetv2sn50'].renames
    model = _build(depth=50)
    keys = {
        k
        for k in model.state_dict() if not k.endswith('num_batches_tracked')
    }
    assert {authors_name('backbone.' + k, renames)
            for k in keys} == _authors_resnetv2sn_keys()
    assert {authors_name('backbone.' + k, renames)
            for k in keys} - keys == {
                f'layer{i}.0.downsample.weight' for i in range(1, 5)}
    # The shortcut is a bare conv: no norm in downsample.
    assert len(model.layer2[0].downsample) == 1
    assert isinstance(model.layer2[0].downsample[0], nn.Conv2d)
    assert model.feat_dim == 2048


def test_norm_agnostic_names():
    model = _build(norm_cfg=dict(type='BN'))
    assert model.norm1_name == 'bn1' and model.norm_out_name == 'bn_out'
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d)
    gn = _build(norm_cfg=dict(type='GN', num_groups=8))
    assert isinstance(gn.gn_out, nn.GroupNorm)
    out = gn(torch.randn(2, 3, 32, 32))
    assert out[0].shape == (2, 512, 1, 1)


@pytest.mark.parametrize('depth,channels', [(18, (64, 128, 256, 512)),
                                            (50, (256, 512, 1024, 2048))])
def test_out_indices_shapes(depth, channels):
    model = _build(depth=depth, out_indices=(0, 1, 2, 3))
    outs = model(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [
        (2, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate(channels)
    ]
    # Only the last stage goes through the final norm + ReLU.
    assert outs[-1].min() >= 0
    assert outs[0].min() < 0
    outs[-1].sum().backward()
    assert model.conv1.weight.grad is not None


def test_fewer_stages_and_negative_index():
    model = _build(num_stages=3, out_indices=(-1, ))
    assert model.out_indices == [2]
    assert model.norm_out.num_features == 256
    assert model(torch.randn(1, 3, 32, 32))[0].shape == (1, 256, 2, 2)
    with pytest.raises(AssertionError):
        _build(out_indices=(4, ))


def test_block_is_preactivation_with_preactivated_shortcut():
    torch.manual_seed(0)
    model = _build(depth=50, norm_cfg=dict(type='BN'))
    block = model.layer2[0]
    block.eval()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
        x = torch.randn(2, 256, 8, 8)

        def bn_relu(bn, t):
            return F.relu(
                F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight,
                             bn.bias, False, 0., bn.eps))

        pre = bn_relu(block.bn1, x)
        out = block.conv1(pre)
        out = block.conv2(bn_relu(block.bn2, out))
        out = block.conv3(bn_relu(block.bn3, out))
        expected = out + block.downsample[0](pre)
        assert torch.allclose(block(x), expected, atol=1e-5)
        # A block without downsample adds its raw input.
        block = model.layer2[1].eval()
        x = torch.randn(2, 512, 4, 4)
        pre = bn_relu(block.bn1, x)
        out = block.conv3(
            bn_relu(block.bn3,
                    block.conv2(bn_relu(block.bn2, block.conv1(pre)))))
        assert torch.allclose(block(x), out + x, atol=1e-5)


@pytest.mark.parametrize('depth', [18, 50])
def test_zero_init_residual_makes_blocks_identity(depth):
    model = _build(depth=depth, zero_init_residual=True)
    model.init_weights()
    last = 'sn3' if depth == 50 else 'sn2'
    for name, m in model.named_modules():
        if name.endswith(last) and name.startswith('layer'):
            assert torch.all(m.weight == 0) and torch.all(m.bias == 0)
    block = model.layer1[1]
    x = torch.randn(2, block.in_channels, 8, 8)
    assert torch.allclose(block(x), x)
    # Default (the authors' v2): gamma of every norm starts at 1.
    model = _build(depth=depth)
    model.init_weights()
    assert torch.all(getattr(model.layer1[1], last).weight == 1)


def test_frozen_stages():
    model = _build(frozen_stages=1)
    model.train()
    for m in (model.conv1, model.sn1, model.layer1):
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not mod.training for mod in m.modules())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert model.layer2.training
    assert all(p.requires_grad for p in model.sn_out.parameters())
    model = _build(frozen_stages=4)
    model.train()
    assert not any(p.requires_grad for p in model.parameters())


def test_norm_eval_keeps_sn_running_stats():
    model = _build(norm_eval=True)
    model.train()
    sns = [m for m in model.modules() if isinstance(m, _SwitchableNorm)]
    assert sns and all(not m.training for m in sns)
    before = model.sn_out.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.sn_out.running_mean, before)
    # Without norm_eval the running statistics move.
    model = _build()
    model.train()
    before = model.sn_out.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(model.sn_out.running_mean, before)


def test_sn_without_bn_branch_and_with_cp():
    model = _build(norm_cfg=dict(type='SN', using_bn=False), with_cp=True)
    assert model.sn_out.mean_weight.shape == (2, )
    assert 'sn_out.running_mean' not in model.state_dict()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    model(x)[0].sum().backward()
    assert model.layer1[0].conv1.weight.grad is not None
