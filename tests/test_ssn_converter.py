"""The converter on the SSN authors' ``resnetv1ssn50`` checkpoints.

A reference model is written from the published layout (the authors' v1
ResNet of tests/_authors_resnet.py with SSN layers: the SN tensors plus ``radius``,
``mean_fixed``, ``var_fixed``; the stem max-pool with padding 0 and
ceil_mode) and SSN's eval numerics (tests/sn_reference.py): frozen layers
mix with their stored one-hot vectors, others with SparsestMax at the stored
radius (radius 0 here, i.e. sparsemax, computed by bisection). It does not
use mmsn. Its random weights are saved in the authors' format, converted by
the tool and loaded into ``configs/resnet50_ssn_8xb32.py``; both give the
same logits.
"""
import importlib.util
import os.path as osp

import torch
import torch.nn.functional as F
from torch import nn

import mmsn  # noqa: F401
from mmsn.converters import suggested_config
from sn_reference import reference_sn
from _authors_resnet import RefResNet
from test_sparsestmax import bisection_sparsemax

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'model_converters', 'sn_to_mmpretrain.py')


class RefSSN2d(nn.Module):
    """SSN in eval mode: SN's equations (tests/sn_reference.py) with the
    stored one-hot vectors of frozen layers, sparsemax at radius 0."""

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
        # log-shares as logits: the reference's softmax gives them back
        u = self._shares(self.mean_weight, self.mean_fixed)
        v = self._shares(self.var_weight, self.var_fixed)
        return reference_sn(
            x, self.weight, self.bias, u.log(), v.log(),
            (self.running_mean.flatten(), self.running_var.flatten()),
            training=False, eps=self.eps)[0]


def ref_resnetv1ssn50():
    """The authors' v1 ResNet-50 layout (tests/_authors_resnet.py) with
    SSN layers and the SSN stem pooling."""
    model = RefResNet(version=1, depth=50,
                      norm_layer=lambda channels, using_bn: RefSSN2d(channels))
    model.maxpool = nn.MaxPool2d(3, 2, padding=0, ceil_mode=True)
    return model


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
    ref = randomize(ref_resnetv1ssn50())
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

    config = suggested_config('resnetv1ssn50', True)
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
