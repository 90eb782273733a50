"""The converter of the SN authors' checkpoints, checked end to end.

A reference ResNet is written here from the published layout and equations
(the authors' module names, SN with the unbiased IN variance and LN/BN
statistics derived from the IN ones, running statistics of shape (1, C, 1),
gamma/beta of shape (1, C, 1, 1)); it does not use mmsn's SN. Its random
weights are saved in the authors' checkpoint format, converted with
``tools/model_converters/sn_to_mmpretrain.py`` and loaded into the model of
the matching config; both must give the same logits in eval mode.
"""
import importlib.util
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmsn  # noqa: F401
from mmsn.converters import suggested_config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'model_converters', 'sn_to_mmpretrain.py')
TOL = 1e-5


# -- the authors' layout, written from the description ------------------------
class RefSwitchNorm2d(nn.Module):
    """SN of the reference implementation (eval numerics are what matter)."""

    def __init__(self, channels, using_bn=True, eps=1e-5):
        super().__init__()
        self.using_bn = using_bn
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        branches = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(torch.ones(branches))
        self.var_weight = nn.Parameter(torch.ones(branches))
        if using_bn:
            self.register_buffer('running_mean', torch.zeros(1, channels, 1))
            self.register_buffer('running_var', torch.zeros(1, channels, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, c, -1)
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True)  # unbiased, as the authors
        second = var_in + mean_in**2
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = second.mean(1, keepdim=True) - mean_ln**2
        w_mean = F.softmax(self.mean_weight, 0)
        w_var = F.softmax(self.var_weight, 0)
        mean = w_mean[0] * mean_in + w_mean[1] * mean_ln
        var = w_var[0] * var_in + w_var[1] * var_ln
        if self.using_bn:
            if self.training:
                mean_bn = mean_in.mean(0, keepdim=True)
                var_bn = second.mean(0, keepdim=True) - mean_bn**2
            else:
                mean_bn, var_bn = self.running_mean, self.running_var
            mean = mean + w_mean[2] * mean_bn
            var = var + w_var[2] * var_bn
        x = (x - mean) / (var + self.eps).sqrt()
        return x.view(n, c, h, w) * self.weight + self.bias


def conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)


class RefBottleneckV1(nn.Module):

    def __init__(self, inplanes, planes, stride, downsample, using_bn):
        super().__init__()
        self.conv1 = conv(inplanes, planes, 1)
        self.sn1 = RefSwitchNorm2d(planes, using_bn)
        self.conv2 = conv(planes, planes, 3, stride)
        self.sn2 = RefSwitchNorm2d(planes, using_bn)
        self.conv3 = conv(planes, planes * 4, 1)
        self.sn3 = RefSwitchNorm2d(planes * 4, using_bn)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.sn1(self.conv1(x)))
        out = self.relu(self.sn2(self.conv2(out)))
        out = self.sn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class RefBottleneckV2(nn.Module):
    """Pre-activation: SN -> ReLU -> conv; the shortcut conv (no norm) takes
    the pre-activated input."""

    def __init__(self, inplanes, planes, stride, downsample, using_bn):
        super().__init__()
        self.sn1 = RefSwitchNorm2d(inplanes, using_bn)
        self.conv1 = conv(inplanes, planes, 1)
        self.sn2 = RefSwitchNorm2d(planes, using_bn)
        self.conv2 = conv(planes, planes, 3, stride)
        self.sn3 = RefSwitchNorm2d(planes, using_bn)
        self.conv3 = conv(planes, planes * 4, 1)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.sn1(x))
        identity = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.sn2(out)))
        out = self.conv3(self.relu(self.sn3(out)))
        return out + identity


class RefResNet(nn.Module):
    """``resnetv{1,2}sn{50,101}`` of the authors' zoo (names and numerics).

    7x7 average pool (the global average at the 224x224 input), dropout 0.5
    (a no-op in eval mode) and fc, as in the authors' model.
    """

    def __init__(self, version=1, depth=50, using_bn=True, num_classes=1000):
        super().__init__()
        blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
        block = RefBottleneckV1 if version == 1 else RefBottleneckV2
        self.version = version
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.sn1 = RefSwitchNorm2d(64, using_bn)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, num) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            if version == 1:
                downsample = nn.Sequential(
                    conv(inplanes, planes * 4, 1, stride),
                    RefSwitchNorm2d(planes * 4, using_bn))
            else:
                downsample = nn.Sequential(
                    conv(inplanes, planes * 4, 1, stride))
            layers = [block(inplanes, planes, stride, downsample, using_bn)]
            inplanes = planes * 4
            layers += [
                block(inplanes, planes, 1, None, using_bn)
                for _ in range(num - 1)
            ]
            setattr(self, f'layer{i + 1}', nn.Sequential(*layers))
        if version == 2:
            self.sn_out = RefSwitchNorm2d(inplanes, using_bn)
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.sn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f'layer{i}')(x)
        if self.version == 2:
            x = self.relu(self.sn_out(x))
        x = self.avgpool(x).flatten(1)
        return self.fc(self.dropout(x))


def randomize(model, seed):
    """Random weights, importance logits and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=gen) *
                    (2 / fan_in)**0.5)
            elif isinstance(module, nn.Linear):
                bound = module.in_features**-0.5
                module.weight.copy_(
                    (torch.rand(module.weight.shape, generator=gen) * 2 - 1) *
                    bound)
                module.bias.copy_(
                    (torch.rand(module.bias.shape, generator=gen) * 2 - 1) *
                    bound)
            elif isinstance(module, RefSwitchNorm2d):
                c = module.weight.shape[1]
                module.weight.copy_(
                    torch.rand((1, c, 1, 1), generator=gen) + 0.5)
                module.bias.copy_(
                    torch.randn((1, c, 1, 1), generator=gen) * 0.1)
                module.mean_weight.copy_(
                    torch.randn(module.mean_weight.shape, generator=gen))
                module.var_weight.copy_(
                    torch.randn(module.var_weight.shape, generator=gen))
                if module.using_bn:
                    module.running_mean.copy_(
                        torch.randn((1, c, 1), generator=gen) * 0.2)
                    module.running_var.copy_(
                        torch.rand((1, c, 1), generator=gen) + 0.5)
    return model.eval()


def save_authors_checkpoint(model, path, name):
    torch.save(
        dict(
            epoch=100,
            model=name,
            state_dict={f'module.{k}': v
                        for k, v in model.state_dict().items()},
            best_prec1=torch.tensor(77.49),
            optimizer=dict(
                state={},
                param_groups=[dict(lr=0.0, momentum=0.9, params=[0, 1])])),
            path)


def load_tool():
    spec = importlib.util.spec_from_file_location('sn_to_mmpretrain', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_from_config(config):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(config)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg.model).eval()


CASES = [
    # (model name, version, depth, using_bn)
    ('resnetv1sn50', 1, 50, True),
    ('resnetv2sn50', 2, 50, True),
    ('resnetv1sn50', 1, 50, False),
]


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """Convert one reference checkpoint per case (shared by the tests)."""
    tool = load_tool()
    out = {}
    for i, (name, version, depth, using_bn) in enumerate(CASES):
        folder = tmp_path_factory.mktemp(f'{name}_{using_bn}')
        ref = randomize(RefResNet(version, depth, using_bn), seed=i)
        src = str(folder / f'{name}.pth.tar')
        dst = str(folder / f'{name}_mmpretrain.pth')
        save_authors_checkpoint(ref, src, name)
        assert tool.main([src, dst]) == 0
        out[(name, using_bn)] = (ref, src, dst)
    return out


@pytest.mark.parametrize('name,version,depth,using_bn', CASES)
def test_logits_match_reference(converted, name, version, depth, using_bn,
                                capsys):
    ref, _, dst = converted[(name, using_bn)]
    config = osp.join(REPO, suggested_config(version, depth, using_bn))
    model = build_from_config(config)
    checkpoint = torch.load(dst, map_location='cpu', weights_only=True)
    incompatible = model.load_state_dict(checkpoint['state_dict'], strict=True)
    assert not incompatible.missing_keys
    assert not incompatible.unexpected_keys

    meta = checkpoint['meta']
    assert meta['converted_from']['model'] == name
    assert meta['converted_from']['using_bn'] == using_bn
    assert meta['converted_from']['epoch'] == 100
    assert meta['converted_from']['best_prec1'] == pytest.approx(77.49)
    assert meta['config'] == suggested_config(version, depth, using_bn)
    assert len(meta['dataset_meta']['classes']) == 1000

    sn = model.backbone.layer1[0].sn1
    assert tuple(sn.mean_weight.shape) == ((3, ) if using_bn else (2, ))
    assert sn.using_bn == using_bn

    # The authors' evaluation size. Smaller inputs leave IN statistics of
    # 2x2 maps in the last stage, where fp32 rounding of *both* models grows
    # past 1e-5 in a random 50-layer net (each is ~2e-5 from a float64 run
    # at 64x64 without the BN branch).
    x = torch.randn((1, 3, 224, 224),
                    generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref(x)
        got = model(x, mode='tensor')
    diff = (got - expected).abs().max().item()
    with capsys.disabled():
        print(f'\n[converter] {name} using_bn={using_bn}: max |logit diff| '
              f'= {diff:.3g} (logit scale {expected.abs().max():.3g})')
    assert got.shape == (1, 1000)
    assert diff <= TOL
    # Not trivially equal: the logits are spread, not constant.
    assert expected.std() > 0.1


def test_inferencer_runs_on_converted(converted):
    from mmpretrain.apis import ImageClassificationInferencer
    from mmpretrain.datasets.categories import IMAGENET_CATEGORIES
    _, _, dst = converted[('resnetv1sn50', True)]
    config = osp.join(REPO, suggested_config(1, 50, True))
    inferencer = ImageClassificationInferencer(
        model=config, pretrained=dst, device='cpu')
    image = np.random.default_rng(0).integers(
        0, 256, (96, 128, 3), dtype=np.uint8)
    result = inferencer(image)[0]
    assert result['pred_scores'].shape == (1000, )
    assert result['pred_label'] == int(np.argmax(result['pred_scores']))
    assert result['pred_class'] == IMAGENET_CATEGORIES[result['pred_label']]


def test_test_tool_runs_on_converted(converted, tmp_path):
    """tools/test.py evaluates the converted checkpoint with the zoo config
    (its ImageNet pipeline, pointed at two generated images)."""
    from PIL import Image
    root = tmp_path / 'imagenet'
    (root / 'val').mkdir(parents=True)
    (root / 'meta').mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)) \
            .save(root / 'val' / f'img_{i}.JPEG')
    (root / 'meta' / 'val.txt').write_text('img_0.JPEG 3\nimg_1.JPEG 7\n')
    _, _, dst = converted[('resnetv1sn50', True)]
    config = osp.join(REPO, suggested_config(1, 50, True))
    proc = subprocess.run([
        sys.executable,
        osp.join(REPO, 'tools', 'test.py'), config, dst, '--work-dir',
        str(tmp_path / 'work'), '--out',
        str(tmp_path / 'preds.pkl'), '--cfg-options',
        f'test_dataloader.dataset.data_root={root}',
        'test_dataloader.batch_size=2', 'test_dataloader.num_workers=0',
        'test_dataloader.persistent_workers=False'
    ],
                          capture_output=True,
                          text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'accuracy/top1' in proc.stdout + proc.stderr
    import pickle
    with open(tmp_path / 'preds.pkl', 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == 2
    assert preds[0]['pred_score'].shape == (1000, )


def _tamper_and_convert(tmp_path, src, edit, capsys, extra_args=()):
    checkpoint = torch.load(src, map_location='cpu', weights_only=True)
    edit(checkpoint)
    bad = str(tmp_path / 'bad.pth.tar')
    torch.save(checkpoint, bad)
    dst = tmp_path / 'out.pth'
    code = load_tool().main([bad, str(dst), *extra_args])
    err = capsys.readouterr().err
    assert code == 1
    assert not dst.exists(), 'nothing may be written on error'
    assert not list(tmp_path.glob('*.tmp'))
    return err


def test_unknown_key_is_refused(converted, tmp_path, capsys):
    _, src, _ = converted[('resnetv1sn50', True)]

    def edit(ckpt):
        ckpt['state_dict']['module.layer1.0.extra.weight'] = torch.zeros(3)

    err = _tamper_and_convert(tmp_path, src, edit, capsys)
    assert 'unknown keys' in err and 'module.layer1.0.extra.weight' in err


def test_missing_key_is_refused(converted, tmp_path, capsys):
    _, src, _ = converted[('resnetv1sn50', True)]

    def edit(ckpt):
        del ckpt['state_dict']['module.layer2.1.conv2.weight']

    err = _tamper_and_convert(tmp_path, src, edit, capsys)
    assert 'backbone.layer2.1.conv2.weight' in err


def test_shape_mismatch_is_refused(converted, tmp_path, capsys):
    _, src, _ = converted[('resnetv1sn50', True)]

    def edit(ckpt):
        ckpt['state_dict']['module.fc.weight'] = torch.zeros(10, 2048)
        ckpt['state_dict']['module.fc.bias'] = torch.zeros(10)

    err = _tamper_and_convert(tmp_path, src, edit, capsys)
    assert 'shape mismatches' in err and 'module.fc.weight' in err


def test_unknown_model_is_refused(converted, tmp_path, capsys):
    _, src, _ = converted[('resnetv1sn50', True)]

    def edit(ckpt):
        ckpt['model'] = 'resnetv1sn18'

    err = _tamper_and_convert(tmp_path, src, edit, capsys)
    assert "Unknown model 'resnetv1sn18'" in err


def test_wrong_architecture_is_refused(converted, tmp_path, capsys):
    # A v2 state dict labelled as v1 has the wrong keys for ResNet.
    _, src, _ = converted[('resnetv2sn50', True)]

    def edit(ckpt):
        ckpt['model'] = 'resnetv1sn50'

    err = _tamper_and_convert(tmp_path, src, edit, capsys)
    assert 'sn_out' in err


def test_mixed_branches_are_refused(converted, tmp_path, capsys):
    _, src, _ = converted[('resnetv1sn50', True)]

    def edit(ckpt):
        sd = ckpt['state_dict']
        sd['module.sn1.mean_weight'] = torch.ones(2)
        sd['module.sn1.var_weight'] = torch.ones(2)

    err = _tamper_and_convert(tmp_path, src, edit, capsys)
    assert 'importance logits' in err


def test_cli_reports_error(tmp_path):
    dst = tmp_path / 'out.pth'
    src = tmp_path / 'not_a_checkpoint.pth.tar'
    torch.save({'weights': torch.zeros(1)}, str(src))
    proc = subprocess.run([sys.executable, TOOL, str(src), str(dst)],
                          capture_output=True,
                          text=True,
                          cwd=REPO)
    assert proc.returncode == 1
    assert 'no "state_dict"' in proc.stderr
    assert not dst.exists()
