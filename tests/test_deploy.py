"""Collapsing trained SSN/SN layers into the norms they picked.

CollapsedNorm is checked against SN's equations with one-hot shares
(tests/sn_reference.py) and against the SSN layer it replaces, for every
mean/variance combination; the tool end to end: its written config and
checkpoint load and run in a process that never imports mmsn and give the
SSN model's logits."""
import copy
import json
import os.path as osp
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import fuse_conv_bn
from mmengine.config import Config
from torch import nn

import mmsn  # noqa: F401
from mmsn import SparseSwitchableNorm2d, SwitchableNorm2d
from mmsn.deploy import (CollapseError, collapse_model, collapsed_config,
                         plan_collapse)
from mmsn_runtime import BRANCHES, CollapsedNorm, expose_batch_norms
from mmsn.models.norms.switchable_norm import _SwitchableNorm
from sn_reference import reference_sn

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'deploy', 'collapse_norms.py')
SSN_DEMO = osp.join(REPO, 'configs', 'demo', 'resnet_ssn_digits.py')
SN_DEMO = osp.join(REPO, 'configs', 'demo', 'resnet_sn_digits.py')
C = 6
COMBOS = [(m, v) for m in BRANCHES for v in BRANCHES]


def load_tool(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location('tool', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_hot(branch, using_bn=True):
    return F.one_hot(torch.tensor(BRANCHES.index(branch)),
                     3 if using_bn else 2).double()


def _frozen_ssn(mean, var, using_bn=True, seed=0, cls=SparseSwitchableNorm2d,
                unbiased=True):
    """An SSN layer frozen at the given picks, random affine and stats."""
    g = torch.Generator().manual_seed(seed)
    layer = cls(C, using_bn=using_bn, unbiased=unbiased).double()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=g))
        layer.mean_weight.copy_(_one_hot(mean, using_bn))
        layer.var_weight.copy_(_one_hot(var, using_bn))
        layer.mean_fixed.fill_(1)
        layer.var_fixed.fill_(1)
        if using_bn:
            layer.running_mean.copy_(torch.randn(C, generator=g))
            layer.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    return layer.eval()


def _input(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand((1, shape[1]) + (1, ) * (len(shape) - 2),
                       generator=g) * 3 + 0.2
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + 2


@pytest.mark.parametrize('mean,var', COMBOS)
@pytest.mark.parametrize('unbiased', [True, False])
def test_collapsed_norm_is_sn_with_one_hot_shares(mean, var, unbiased):
    layer = _frozen_ssn(mean, var, unbiased=unbiased)
    module = nn.Sequential(copy.deepcopy(layer))
    (pick, ) = collapse_model(module)
    assert isinstance(module[0], CollapsedNorm)
    assert module[0].picks == (mean, var) == (pick.mean, pick.var)
    for shape in ((4, C, 5, 3), (4, C, 1, 1), (3, C, 2, 3, 4), (5, C, 7)):
        x = _input(shape)
        expected, _ = reference_sn(
            x, layer.weight, layer.bias,
            _one_hot(mean).log(), _one_hot(var).log(),
            (layer.running_mean, layer.running_var), training=False,
            unbiased=unbiased, eps=layer.eps)
        got = module[0].double()(x)
        torch.testing.assert_close(got, expected)
        if len(shape) == 4:
            torch.testing.assert_close(got, layer(x))


@pytest.mark.parametrize('mean,var', [(m, v) for m in ('IN', 'LN')
                                      for v in ('IN', 'LN')])
def test_layers_without_bn_branch(mean, var):
    layer = _frozen_ssn(mean, var, using_bn=False)
    model = nn.Sequential(copy.deepcopy(layer))
    collapse_model(model)
    x = _input((4, C, 5, 5))
    torch.testing.assert_close(model[0].double()(x), layer(x))


def test_collapsed_norm_state_picks_precision_and_memory_format():
    norm = CollapsedNorm(C, sources=('LN', 'IN'))
    state = norm.state_dict()
    other = CollapsedNorm(C)
    assert other.picks == ('BN', 'BN')
    other.load_state_dict(state)
    assert other.picks == ('LN', 'IN')
    state['sources'] = torch.tensor([0, 5])
    with pytest.raises(ValueError, match='sources must hold two indices'):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match='one of'):
        CollapsedNorm(C, sources=('GN', 'IN'))
    with pytest.raises(ValueError, match=r'expects \(N, 6, \.\.\.\)'):
        norm(torch.randn(2, 4, 3, 3))
    x = torch.randn(2, C, 5, 5) + 1
    expected = norm(x)
    # the differentiable formulation (input needing a gradient) agrees
    torch.testing.assert_close(norm(x.clone().requires_grad_()), expected)
    cl = norm(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, expected)
    half = norm(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=0.05, rtol=0.05)
    # the picks are Python state: tracing records one fixed graph
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # deprecation, shapes as constants
        traced = torch.jit.trace(norm, x)
    torch.testing.assert_close(traced(x * 2), norm(x * 2))


def test_bn_picks_fold_into_the_conv_with_mmcv():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, C, 3), _frozen_ssn('BN', 'BN').float(), nn.ReLU(),
        nn.Conv2d(C, C, 1), _frozen_ssn('BN', 'IN', seed=1).float())
    x = torch.randn(2, 3, 8, 8)
    collapse_model(model)
    expected = model(x)
    fuse_conv_bn(expose_batch_norms(model))
    assert isinstance(model[1], nn.Identity) and model[0].bias is not None
    assert isinstance(model[4], CollapsedNorm)  # BN/IN depends on the input
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def _sn(mean_logits, var_logits):
    layer = SwitchableNorm2d(C).double().eval()
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor(mean_logits))
        layer.var_weight.copy_(torch.tensor(var_logits))
        layer.running_var.fill_(1.5)
    return layer


def test_sn_layers_collapse_only_within_the_tolerance():
    model = nn.Sequential(_sn([0., 0., 9.], [9., 0., 0.]),
                          _frozen_ssn('LN', 'BN'))
    picks = plan_collapse(model)
    assert [p.collapse for p in picks] == [False, True]
    assert picks[0].distance == pytest.approx(2 * torch.e**-9, rel=1e-3)
    with pytest.raises(CollapseError, match=r'--sn-tolerance') as err:
        collapse_model(model)
    assert '0 (SN)' in str(err.value)
    assert isinstance(model[0], SwitchableNorm2d)  # nothing changed
    x = _input((4, C, 5, 5))
    expected = model(x)
    with pytest.raises(CollapseError):
        collapse_model(model, sn_tolerance=1e-4)
    picks = collapse_model(model, sn_tolerance=1e-3)
    assert (picks[0].mean, picks[0].var) == ('BN', 'IN')
    assert isinstance(model[0], CollapsedNorm)
    change = (model.double()(x) - expected).abs().max()
    assert 0 < change < 0.1
    # an SSN layer whose schedule did not finish is refused as well
    unfinished = _frozen_ssn('IN', 'IN')
    with torch.no_grad():
        unfinished.mean_fixed.zero_()
        unfinished.mean_weight.copy_(torch.tensor([0.4, 0.3, 0.3]))
    with pytest.raises(CollapseError, match=r'0 \(SSN\)'):
        collapse_model(nn.Sequential(unfinished))


def _trained_like(config, tmp_path, sn_logits=None):
    """The config's model with random weights, frozen random SSN picks (or
    SN logits) and running statistics, saved as an mmengine checkpoint."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(config)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    model.init_weights()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, m in enumerate(model.modules()):
            if not isinstance(m, _SwitchableNorm):
                continue
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape,
                                             generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape,
                                           generator=g) + 0.5)
            if sn_logits is not None:
                m.mean_weight.copy_(torch.tensor(sn_logits))
                m.var_weight.copy_(torch.tensor(sn_logits[::-1]))
                continue
            for param, flag in ((m.mean_weight, m.mean_fixed),
                                (m.var_weight, m.var_fixed)):
                param.copy_(F.one_hot(torch.randint(3, (), generator=g), 3))
                flag.fill_(1)
    ckpt = tmp_path / 'trained.pth'
    torch.save(dict(meta=dict(dataset_meta=dict(classes=list('0123456789'))),
                    state_dict=model.state_dict()), ckpt)
    return model.eval(), str(ckpt)


LOAD_WITHOUT_MMSN = """
import json, sys
import torch
from mmpretrain.apis import init_model
model = init_model(sys.argv[1], sys.argv[2], device='cpu')
x = torch.load(sys.argv[3])
with torch.no_grad():
    logits = model(x, mode='tensor')
print(json.dumps(dict(
    mmsn=sorted(m for m in sys.modules if m.split('.')[0] == 'mmsn'),
    runtime='mmsn_runtime' in sys.modules,
    classes=model._dataset_meta.get('classes'),
    logits=logits.tolist())))
"""


def _run_without_mmsn(cfg_path, ckpt_path, x, tmp_path):
    torch.save(x, tmp_path / 'x.pt')
    env = dict(__import__('os').environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, '-c', LOAD_WITHOUT_MMSN, cfg_path, ckpt_path,
         str(tmp_path / 'x.pt')], capture_output=True, text=True, env=env,
        cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tool_writes_a_model_that_runs_without_mmsn(tmp_path, capsys):
    model, ckpt = _trained_like(SSN_DEMO, tmp_path)
    out = tmp_path / 'deploy'
    assert load_tool(TOOL).main([SSN_DEMO, ckpt, str(out),
                                 '--input-shape', '1', '8', '8']) == 0
    printed = capsys.readouterr().out
    assert 'Largest change of the outputs' in printed
    assert 'SklearnDigits (dataset' in printed  # evaluation needs mmsn
    cfg_path = str(out / 'resnet_ssn_digits_collapsed.py')
    ckpt_path = str(out / 'resnet_ssn_digits_collapsed.pth')
    written = Config.fromfile(cfg_path, import_custom_modules=False)
    assert written.custom_imports.imports == ['mmsn_runtime']
    assert written.model.backbone.norm_cfg.type == 'CollapsedNorm'
    assert written.custom_hooks == []
    assert 'constructor' not in written.optim_wrapper

    x = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    result = _run_without_mmsn(cfg_path, ckpt_path, x, tmp_path)
    assert result['mmsn'] == [] and result['runtime']
    assert result['classes'] == list('0123456789')
    with torch.no_grad():
        expected = model(x, mode='tensor')
    got = torch.tensor(result['logits'])
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel <= 1e-4
    assert expected.std() > 0.1


def test_ssn_resnet50_collapses_with_its_stem(tmp_path):
    """The ImageNet SSN config: ResNetStemPool and the plain head come from
    mmsn_runtime and mmpretrain, so the written model needs no mmsn."""
    config = osp.join(REPO, 'configs', 'resnet50_ssn_8xb32.py')
    model, ckpt = _trained_like(config, tmp_path)
    out = tmp_path / 'deploy'
    assert load_tool(TOOL).main([config, ckpt, str(out), '--batch-size',
                                 '1', '--input-shape', '3', '64', '64']) == 0
    written = Config.fromfile(str(out / 'resnet50_ssn_8xb32_collapsed.py'),
                              import_custom_modules=False)
    assert written.model.backbone.type == 'ResNetStemPool'
    assert written.model.head.type == 'LinearClsHead'
    assert 'dropout_rate' not in written.model.head
    assert written.custom_imports.imports == ['mmsn_runtime']


def test_sn_model_needs_the_tolerance_and_prints_the_price(tmp_path, capsys):
    _, ckpt = _trained_like(SN_DEMO, tmp_path, sn_logits=[0., 1., 8.])
    out = tmp_path / 'deploy'
    args = [SN_DEMO, ckpt, str(out), '--input-shape', '1', '8', '8']
    assert load_tool(TOOL).main(args) == 1
    err = capsys.readouterr().err
    assert '10 of 10 layers do not collapse' in err
    assert 'Nothing was written' in err and not out.exists()
    assert load_tool(TOOL).main(args + ['--sn-tolerance', '0.01']) == 0
    printed = capsys.readouterr().out
    change = float(printed.split('relative to their largest magnitude: ')
                   [1].split(')')[0])
    assert 0 < change < 0.5  # a real, printed price
    assert (out / 'resnet_sn_digits_collapsed.pth').exists()


def test_fallback_when_the_model_needs_mmsn():
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'resnet50v2_sn_8xb32.py'))
    new, report = collapsed_config(cfg)
    assert report['norms'] == ['model.backbone.norm_cfg']
    assert any('PreActResNet' in t for t in report['model_needs_mmsn'])
    assert new.custom_imports.imports == ['mmsn_runtime', 'mmsn']
