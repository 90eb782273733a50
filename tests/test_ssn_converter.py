"""The converter on the SSN authors' ``resnetv1ssn50`` checkpoints.

A reference model is written here from the published layout (the SN v1
ResNet with SSN layers: the SN tensors plus ``radius``, ``mean_fixed``,
``var_fixed``; the stem max-pool with padding 0 and ceil_mode) and SSN's
eval numerics: frozen layers mix with their stored one-hot vectors, others
with SparsestMax at the stored radius (radius 0 here, i.e. sparsemax,
computed by bisection). It does not use mmsn. Its random weights are saved
in the authors' format, converted by the tool and loaded into
``configs/resnet50_ssn_8xb32.py``; both give the same logits.
"""
import importlib.util
import os.path as osp

import torch
import torch.nn.functional as F
from torch import nn

import mmsn  # noqa: F401
from mmsn.converters import suggested_config
from test_sparsestmax import bisection_sparsemax

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'model_converters', 'sn_to_mmpretrain.py')


class RefSSN2d(nn.Module):

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer('running_mean', torch.zeros(1, channels, 1))
        self.register_buffer('running_var', torch.zeros(1, channels, 1))
        self.register_buffer('mean_fixed', torch.LongTensor([0]))
        self.register_buffer('var_fixed', torch.LongTensor([0]))
        self.register_buffer('radius', torch.zeros(1))

    def _shares(self, logits, fixed):
        if fixed.item():
            return logits
        assert self.radius.item() == 0  # SparsestMax at 0 is sparsemax
        return bisection_sparsemax(logits.detach())

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, c, -1)
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True)
        second = var_in + mean_in**2
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = second.mean(1, keepdim=True) - mean_ln**2
        u = self._shares(self.mean_weight, self.mean_fixed)
        v = self._shares(self.var_weight, self.var_fixed)
        mean = u[0] * mean_in + u[1] * mean_ln + u[2] * self.running_mean
        var = v[0] * var_in + v[1] * var_ln + v[2] * self.running_var
        x = (x - mean) / (var + self.eps).sqrt()
        return x.view(n, c, h, w) * self.weight + self.bias


def conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)


class RefBottleneck(nn.Module):

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = conv(inplanes, planes, 1)
        self.sn1 = RefSSN2d(planes)
        self.conv2 = conv(planes, planes, 3, stride)
        self.sn2 = RefSSN2d(planes)
        self.conv3 = conv(planes, planes * 4, 1)
        self.sn3 = RefSSN2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.sn1(self.conv1(x)))
        out = F.relu(self.sn2(self.conv2(out)))
        out = self.sn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class RefResNetV1SSN50(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.sn1 = RefSSN2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, padding=0, ceil_mode=True)
        inplanes = 64
        for i, (planes, num) in enumerate(zip((64, 128, 256, 512),
                                              (3, 4, 6, 3))):
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                conv(inplanes, planes * 4, 1, stride), RefSSN2d(planes * 4))
            layers = [RefBottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            layers += [
                RefBottleneck(inplanes, planes, 1, None)
                for _ in range(num - 1)
            ]
            setattr(self, f'layer{i + 1}', nn.Sequential(*layers))
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = self.maxpool(F.relu(self.sn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f'layer{i}')(x)
        return self.fc(self.avgpool(x).flatten(1))


def randomize(model, seed=0):
    """Random weights; SSN layers frozen one-hot at random picks (a trained
    checkpoint), every fifth one not frozen (radius 0, sparsemax)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ssn = [m for m in model.modules() if isinstance(m, RefSSN2d)]
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=gen) *
                    (2 / module.weight[0].numel())**0.5)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0, 0.02, generator=gen)
                module.bias.normal_(0, 0.02, generator=gen)
        for i, module in enumerate(ssn):
            c = module.weight.shape[1]
            module.weight.copy_(torch.rand((1, c, 1, 1), generator=gen) + .5)
            module.bias.copy_(torch.randn((1, c, 1, 1), generator=gen) * .1)
            module.running_mean.copy_(torch.randn((1, c, 1), generator=gen))
            module.running_var.copy_(
                torch.rand((1, c, 1), generator=gen) + 0.5)
            if i % 5 == 4:
                module.mean_weight.copy_(torch.randn(3, generator=gen) * .3)
                module.var_weight.copy_(torch.randn(3, generator=gen) * .3)
                continue
            for param, flag in ((module.mean_weight, module.mean_fixed),
                                (module.var_weight, module.var_fixed)):
                param.copy_(F.one_hot(
                    torch.randint(3, (), generator=gen), 3).float())
                flag.fill_(1)
            module.radius.fill_(0.999)
    return model.eval()


def test_resnetv1ssn50_converts_with_equal_logits(tmp_path, capsys):
    ref = randomize(RefResNetV1SSN50())
    src = str(tmp_path / 'resnetv1ssn50.pth.tar')
    dst = str(tmp_path / 'resnet50_ssn.pth')
    torch.save(
        dict(epoch=100, model='resnetv1ssn50',
             state_dict={f'module.{k}': v
                         for k, v in ref.state_dict().items()},
             best_prec1=torch.tensor(77.25), optimizer=dict(state={})), src)
    spec = importlib.util.spec_from_file_location('sn_to_mmpretrain', TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([src, dst]) == 0

    config = suggested_config(1, 50, True, 'SSN')
    assert config == 'configs/resnet50_ssn_8xb32.py'
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(osp.join(REPO, config))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    checkpoint = torch.load(dst, map_location='cpu', weights_only=True)
    assert checkpoint['meta']['converted_from']['norm'] == 'SSN'
    model.load_state_dict(checkpoint['state_dict'], strict=True)
    model.eval()
    layer = model.backbone.layer1[0].ssn1
    assert layer.mean_fixed.item() == 1
    assert layer.radius.item() == torch.tensor(0.999).item()

    x = torch.randn((1, 3, 224, 224),
                    generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref(x)
        got = model(x, mode='tensor')
    diff = (got - expected).abs().max().item()
    with capsys.disabled():
        print(f'\n[converter] resnetv1ssn50: max |logit diff| = {diff:.3g} '
              f'(logit scale {expected.abs().max():.3g})')
    assert diff <= 1e-5 * max(1.0, expected.abs().max().item())
    assert expected.std() > 0.1
    # the stem pooling matters: mmpretrain's padding-1 pool changes them
    model.backbone.maxpool = nn.MaxPool2d(3, 2, 1)
    with torch.no_grad():
        assert (model(x, mode='tensor') - expected).abs().max() > 1e-3
